"""The weights benchmark engine on a tiny real slice: structure and round trips only, no timing checks."""

import json

import pytest

from tensorwire.benchmarking import weights

pytest.importorskip("zstandard")


def test_run_on_a_real_slice(minilm_path, tmp_path):
    out = tmp_path / "bench.json"
    result = weights.run(
        [str(minilm_path)],
        dtypes=("BF16", "F32"),
        threads=(1,),
        repeats=1,
        json_path=out,
        codecs=["tensorwire-fast", "zstd-3+bytesplit", "entropy-bound"],
        max_values=1 << 16,
    )
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "weights" and saved["schema"] == weights.SCHEMA
    assert {"cpu_model", "logical_cores", "python", "versions"} <= saved["machine"].keys()
    assert saved["config"]["repeats"] == 1 and saved["config"]["threads"] == [1]
    assert [d["id"]["dtype"] for d in saved["datasets"]] == ["BF16", "F32"]
    for ds in saved["datasets"]:
        ident = ds["id"]
        assert ident["elements"] == 1 << 16 and len(ident["file_sha256"]) == 64
        assert ident["path"] == str(minilm_path)
        rows = {r["codec"]: r for r in ds["results"]}
        assert set(rows) == {"tensorwire-fast", "zstd-3+bytesplit", "entropy-bound"}
        for name in ("tensorwire-fast", "zstd-3+bytesplit"):
            row = rows[name]
            assert row["lossless"] and row["roundtrip_failures"] == 0 and row["roundtrips"] == 2  # warm-up + 1
            assert row["input_preserved"]
            assert row["ratio"] > 1.0
            assert len(row["compress"]["1"]["seconds"]) == 1 and len(row["decompress"]["1"]["seconds"]) == 1
        assert rows["tensorwire-fast"]["ratio_vs_tensorwire_fast"] == 1.0
        # no lossless codec beats the order-0 bound by much (chunked codecs may adapt a little)
        assert rows["tensorwire-fast"]["ratio"] <= rows["entropy-bound"]["ratio"] * 1.02
    table = weights.format_table(result)
    assert "tensorwire-fast" in table and "entropy-bound" in table


def test_unknown_codec_is_refused():
    with pytest.raises(ValueError, match="unknown codecs"):
        weights.run(None, codecs=["gzip"])


def test_a_codec_that_cannot_load_is_reported_not_fatal(minilm_path, monkeypatch):
    def missing(dtype, threads):
        raise ImportError("No module named 'not_here'")

    monkeypatch.setitem(weights.CODECS, "tensorwire-max", weights.Codec(missing, "both"))
    result = weights.run(
        [str(minilm_path)], dtypes=("BF16",), threads=(1,), repeats=1,
        codecs=["tensorwire-fast", "tensorwire-max"], max_values=1 << 12,
    )  # fmt: skip
    assert [r["codec"] for r in result["datasets"][0]["results"]] == ["tensorwire-fast"]
    assert result["unavailable"]["tensorwire-max"]["dtypes"] == ["BF16"]
    assert "not_here" in result["unavailable"]["tensorwire-max"]["reason"]
    assert "tensorwire-max: unavailable" in weights.format_table(result)
