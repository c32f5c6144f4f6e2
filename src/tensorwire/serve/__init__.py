"""Serving: prefill/decode-disaggregated workers exchanging compressed KV, and the
OpenAI-compatible HTTP front end in front of them.

* :mod:`tensorwire.serve.http` is the front door: ``create_app(backend, ...)`` builds the
  FastAPI app; :mod:`tensorwire.serve.http.backend` is the small interface (``Backend``)
  that the serving system implements for it; :mod:`tensorwire.serve.http.local` is the
  in-process SmolLM2 backend (plain local generation, the reference).

Nothing here is imported eagerly: importing :mod:`tensorwire.serve` needs no optional
dependency.
"""
