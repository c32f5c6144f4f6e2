"""Shipped test helpers: hypothesis strategies and awkward inputs for codecs."""
