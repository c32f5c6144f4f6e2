"""Benchmarks that ship with the package, so that ``tensorwire bench SCENARIO`` can run them.

Each scenario measures tensorwire side by side with its peers in one process, on real
data, and writes every repeat to JSON (see ``benchmarks/`` for the scripts and tables).
"""

__all__ = ["weights"]
