"""Warm a worker's codecs and measure them on the running machine, before the first request.

A profile library is measured once, offline, on some machine; a worker runs on another,
beside other work. At start a worker therefore (1) encodes and decodes a real cache
with every profile once, which compiles the numba kernels (seconds each on a cold
cache, otherwise the first request pays them), and (2) times each profile's encode and
decode on that cache on one thread, the unit the latency model's throughputs are in. The
library the controller gets carries these speeds; ratios and quality stay the offline
measurements (they do not depend on the machine). The controller's bandit then corrects
what remains from observed requests.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from ..kv.pipeline import Pipeline
from ..kv.profiles import ProfileLibrary
from ..kv.stage import KVCacheData
from ..search.objectives import measure_codec

__all__ = ["calibrate"]


def calibrate(library: ProfileLibrary, cache: KVCacheData, repeats: int = 2,
              log: Callable[[str], None] | None = None) -> ProfileLibrary:  # fmt: skip
    """``library`` with every profile's ``encode_bps``/``decode_bps`` measured here on ``cache``.

    Each profile's offline speeds are kept in its ``extra["offline"]`` and the measurement
    in ``extra["calibrated"]`` (seconds it took, cache tokens), so ``library.save`` keeps
    both. ``repeats`` timed encode/decode rounds follow one untimed warm-up; the median
    is taken.
    """
    profiles = []
    for profile in library:
        began = time.perf_counter()
        pipeline = Pipeline.from_config(profile.pipeline)
        _, encode_bps, decode_bps = measure_codec(pipeline, [cache] * repeats, expect=None)
        seconds = time.perf_counter() - began
        extra = {**profile.extra, "offline": {"encode_bps": profile.encode_bps, "decode_bps": profile.decode_bps},
                 "calibrated": {"seconds": seconds, "tokens": cache.seq_len}}  # fmt: skip
        profiles.append(dataclasses.replace(profile, encode_bps=encode_bps, decode_bps=decode_bps, extra=extra))
        if log:
            log(f"calibrated {profile.name}: encode {encode_bps / 1e9:.2f} GB/s, decode {decode_bps / 1e9:.2f} GB/s "
                f"(offline {profile.encode_bps / 1e9:.2f} / {profile.decode_bps / 1e9:.2f}) in {seconds:.1f} s")  # fmt: skip
    return dataclasses.replace(library, profiles=tuple(profiles))
