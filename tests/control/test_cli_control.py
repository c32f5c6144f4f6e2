"""`tensorwire explain` and `tensorwire simulate`: thin layers over the control package."""

import json

import pytest

from tensorwire.cli import main
from tensorwire.control.simulate import example_library


@pytest.fixture
def library_file(tmp_path):
    path = tmp_path / "profiles.json"
    example_library().save(path)
    return path


def test_explain_table(library_file, capsys):
    assert main(["explain", str(library_file), "--tokens", "8192", "--gbps", "5", "--slo-ms", "200", "--max-ppl", "0.03"]) == 0
    out = capsys.readouterr().out
    assert "choice:" in out and "raw" in out and "excluded streaming50-kivi4-lz4" in out


def test_explain_json_and_high_bandwidth(library_file, capsys):
    assert main(["explain", str(library_file), "--kv-bytes", "100000000", "--gbps", "400", "--json"]) == 0
    decision = json.loads(capsys.readouterr().out)
    assert decision["choice"] == "raw" and decision["bandwidth_source"] == "context"
    assert len(decision["candidates"]) == 1 + len(example_library())


def test_explain_bad_library_is_a_clean_error(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "tensorwire.profiles", "version": 1, "model": {}, "profiles": []}))
    assert main(["explain", str(bad), "--tokens", "10", "--gbps", "1"]) == 1
    assert "MissingField" in capsys.readouterr().err
    assert main(["explain", str(tmp_path / "missing.json"), "--tokens", "10", "--gbps", "1"]) == 1


def test_explain_usage_errors():
    with pytest.raises(SystemExit) as info:
        main(["explain", "x.json", "--gbps", "1"])  # neither --tokens nor --kv-bytes
    assert info.value.code == 2


def test_simulate(library_file, tmp_path, capsys):
    out_json, out_png = tmp_path / "sim.json", tmp_path / "sim.png"
    assert main(["simulate", "--library", str(library_file), "--trace", "step", "--requests", "150",
                 "--json", str(out_json), "--png", str(out_png)]) == 0  # fmt: skip
    table = capsys.readouterr().out
    assert str(library_file) in table and "controller" in table
    result = json.loads(out_json.read_text())
    assert result["library"]["label"] == str(library_file) and "step" in result["traces"]
    assert out_png.stat().st_size > 0


def test_simulate_default_library_is_labelled_placeholder(capsys):
    assert main(["simulate", "--trace", "walk", "--requests", "100"]) == 0
    assert "placeholder" in capsys.readouterr().out
