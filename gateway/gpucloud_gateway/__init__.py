"""The gpucloud model gateway and the pure pieces of model serving.

* ``autoscale``: the scaling rule (pure; the operator calls ``decide``).
* ``manifests``: ``build_model_deployment`` / ``build_model_service`` (pure).
* ``billing``: which charge applies to a model, and the store that posts it to the ledger.
* ``metering``: usage (tokens, images, videos) read from responses as they stream.
* ``callers``: who calls (bearer tokens -> accounts), who pays, 401/402/403.
* ``app`` / ``main``: the reverse proxy (``gpucloud-gateway``); ``discovery`` and ``kube``
  are its pluggable edges; ``fake_model_server`` is the test model server.

See docs/models.md.
"""
