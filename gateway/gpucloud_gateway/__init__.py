"""The gpucloud model gateway.

* ``metering``: usage (tokens, images, videos) read from responses as they stream.
* ``callers``: who calls (bearer tokens -> accounts), who pays, 401/402/403.
* ``outbox``: request usage recorded before the answer completes, posted later.
* ``app`` / ``main``: the reverse proxy (``gpucloud-gateway``); ``discovery`` and ``kube``
  are its pluggable edges; ``fake_model_server`` is the test model server.

The rules it shares with the operator are in the core: ``gpucloud.autoscale`` (the
scaling rule), ``gpucloud.model_manifests`` (names, labels and the Deployment and
Service), ``gpucloud.billing.model_charges`` (which charge applies to a model) and
``gpucloud.modelstore`` (the store that posts it to the ledger). See docs/models.md.
"""
