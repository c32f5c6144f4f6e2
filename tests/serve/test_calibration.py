"""Start-up calibration: speeds measured here replace the library's, everything else is kept."""

from __future__ import annotations

from tensorwire.data import SMOLLM2_LIBRARY as KV_LIBRARY
from tensorwire.kv import Pipeline
from tensorwire.kv.profiles import ProfileLibrary
from tensorwire.serve.calibration import calibrate
from tensorwire.testing.strategies import kv_cache_data


def test_calibration_replaces_speeds_and_keeps_the_offline_measurements(tmp_path):
    library = ProfileLibrary.load(KV_LIBRARY)
    cache = kv_cache_data(30, 1, 3, 96, 64)  # the library's model shape (mixed widths per layer); no SnapKV: no observations
    lines = []
    calibrated = calibrate(library, cache, repeats=1, log=lines.append)
    assert calibrated.names == library.names and calibrated.model == library.model and len(lines) == len(library)
    for before, after in zip(library, calibrated):
        assert (after.ratio, after.ppl_increase, after.retrieval_drop, after.pipeline) == (
            before.ratio, before.ppl_increase, before.retrieval_drop, before.pipeline)
        assert after.encode_bps > 0 and after.decode_bps > 0
        assert after.extra["offline"] == {"encode_bps": before.encode_bps, "decode_bps": before.decode_bps}
        assert after.extra["calibrated"]["tokens"] == 96
        size = after.extra["size_model"]
        assert size["tokens"] == [48, 96] and size["ratio"] > 0
        kv = cache.nbytes(2)
        # the fitted model reproduces the two measured sizes it was fitted on
        assert abs(after.payload_bytes(kv) - len(Pipeline.from_config(after.pipeline).encode(cache))) <= 1
    calibrated.save(tmp_path / "calibrated.json")
    again = ProfileLibrary.load(tmp_path / "calibrated.json")
    assert [p.encode_bps for p in again] == [p.encode_bps for p in calibrated]
    assert again["uniform:bits=8/raw"].extra["offline"]["decode_bps"] == library["uniform:bits=8/raw"].decode_bps
