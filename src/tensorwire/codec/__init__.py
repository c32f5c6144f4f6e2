"""Lossless float codec (the ENEC method): planes, block transform, kernels, frames."""

from .chunks import LEVELS, decode_chunk, encode_chunk
from .frame import DEFAULT_CHUNK_BYTES, EnecCodec

__all__ = ["EnecCodec", "LEVELS", "DEFAULT_CHUNK_BYTES", "encode_chunk", "decode_chunk"]
