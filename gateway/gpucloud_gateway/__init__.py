"""The gpucloud model gateway.

* ``metering``: usage (tokens, images, videos) read from responses as they stream.
* ``callers``: who calls (bearer tokens -> accounts), who pays, 401/402/403.
* ``outbox``: request usage queued durably before the answer completes, then recorded
  and charged in the ledger (``Ledger.record_model_requests``).
* ``app`` / ``main``: the reverse proxy (``gpucloud-gateway``); ``discovery`` and ``kube``
  are its pluggable edges; ``fake_model_server`` is the test model server.

The rules it shares with the operator are in the core: ``gpucloud.autoscale`` (the
scaling rule), ``gpucloud.model_manifests`` (names, labels and the Deployment and
Service), ``gpucloud.billing.model_charges`` (which charge applies to a model) and
``gpucloud.ledger`` (where requests and online time are recorded and charged). See
docs/models.md.
"""
