"""Shipped test helpers, for tensorwire's own tests and for plugins.

* :mod:`tensorwire.testing.strategies`: hypothesis strategies and awkward inputs (NaN
  payloads, infinities, subnormals, -0.0, odd shapes) for codecs and KV stages;
* :mod:`tensorwire.testing.conformance`: one pytest suite per kind (lossless codec,
  transform, selector, quantizer, array encoder, bytes encoder, wire transport) that every
  implementation, built-in or plugin, runs by subclassing it. Needs ``tensorwire[dev]``
  (pytest, hypothesis).
"""
