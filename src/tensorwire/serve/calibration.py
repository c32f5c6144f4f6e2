"""Warm a worker's codecs and measure them on the running machine, before the first request.

A profile library is measured once, offline, on some machine; a worker runs on another,
beside other work. At start a worker therefore (1) encodes and decodes a real cache
with every profile once (:func:`tensorwire.kv.warmup.warm_up`), which compiles or loads the
numba kernels (otherwise the first request pays them), and (2) times each profile's encode and
decode on that cache on one thread, the unit the latency model's throughputs are in, and
(3) measures each payload's size at two cache lengths, which gives a size model: a fixed
part (the header, and tokens some stages keep at full precision, such as KIVI's residual
window) plus a part proportional to the cache. Short prompts compress much less than the
library's ratio, measured at 2048 tokens, says; the controller uses the size model
(:meth:`~tensorwire.kv.profiles.Profile.payload_bytes`). Quality stays the offline
measurement. The controller's bandit then corrects what remains from observed requests.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable


from ..kv.pipeline import Pipeline
from ..kv.profiles import ProfileLibrary
from ..kv.stage import KVCacheData
from ..search.objectives import measure_codec
from .pool.store import block_of

__all__ = ["calibrate"]


def _prefix(cache: KVCacheData, tokens: int) -> KVCacheData:
    """The first ``tokens`` tokens of a (full, unselected) cache, with its observations."""
    return dataclasses.replace(block_of(cache, 0, tokens), observations=cache.observations)


def _size_model(pipeline: Pipeline, cache: KVCacheData, short: KVCacheData) -> dict[str, float] | None:
    """``{"fixed_bytes", "ratio"}`` fitted through the payload sizes of ``short`` and ``cache``."""
    (k1, s1), (k2, s2) = ((c.nbytes(2), len(pipeline.encode(c))) for c in (short, cache))
    slope = (s2 - s1) / (k2 - k1) if k2 > k1 else 0.0
    if slope <= 0:
        return None
    return {"fixed_bytes": s1 - k1 * slope, "ratio": 1.0 / slope, "tokens": [short.seq_len, cache.seq_len]}


def calibrate(library: ProfileLibrary, cache: KVCacheData, repeats: int = 2, short_tokens: int = 256,
              log: Callable[[str], None] | None = None) -> ProfileLibrary:  # fmt: skip
    """``library`` with every profile's speeds and size model measured here on ``cache``.

    Each profile's offline speeds are kept in its ``extra["offline"]``, the measurement in
    ``extra["calibrated"]`` (seconds it took, cache tokens) and the size model, fitted on
    ``cache`` and its first ``short_tokens`` tokens, in ``extra["size_model"]``, so
    ``library.save`` keeps them all. ``repeats`` timed encode/decode rounds follow one
    untimed warm-up; the median is taken.
    """
    short = _prefix(cache, min(short_tokens, cache.seq_len // 2)) if cache.seq_len >= 4 else cache
    profiles = []
    for profile in library:
        began = time.perf_counter()
        pipeline = Pipeline.from_config(profile.pipeline)
        _, encode_bps, decode_bps = measure_codec(pipeline, [cache] * repeats, expect=None)
        size = _size_model(pipeline, cache, short) if short is not cache else None
        seconds = time.perf_counter() - began
        extra = {**profile.extra, "offline": {"encode_bps": profile.encode_bps, "decode_bps": profile.decode_bps},
                 "calibrated": {"seconds": seconds, "tokens": cache.seq_len}}  # fmt: skip
        if size is not None:
            extra["size_model"] = size
        profiles.append(dataclasses.replace(profile, encode_bps=encode_bps, decode_bps=decode_bps, extra=extra))
        if log:
            log(f"calibrated {profile.name}: encode {encode_bps / 1e9:.2f} GB/s, decode {decode_bps / 1e9:.2f} GB/s "
                f"(offline {profile.encode_bps / 1e9:.2f} / {profile.decode_bps / 1e9:.2f}), size model {size} "
                f"in {seconds:.1f} s")  # fmt: skip
    return dataclasses.replace(library, profiles=tuple(profiles))
