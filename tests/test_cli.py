"""The command line: each subcommand on a real small file, exit codes, and --help."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file as st_save

from tensorwire.cli import main


@pytest.fixture
def st_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "m.safetensors"
    st_save({"w": (torch.randn(300, 200, generator=g) * 0.02).to(torch.bfloat16), "b": torch.zeros(7)}, path)
    return path


def test_compress_inspect_verify_decompress(tmp_path, st_file, capsys):
    assert main(["compress", str(st_file), "--quiet", "--threads", "1"]) == 0
    twz = st_file.with_suffix(".twz")
    assert twz.exists()
    assert "ratio" in capsys.readouterr().out
    assert main(["inspect", str(twz), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {t["name"] for t in info["tensors"]} == {"w", "b"} and info["source"] == "safetensors"
    assert main(["inspect", str(twz)]) == 0
    assert main(["verify", str(twz), "--against", str(st_file)]) == 0
    assert "OK" in capsys.readouterr().out
    out = tmp_path / "back.safetensors"
    assert main(["decompress", str(twz), str(out), "--quiet"]) == 0
    assert out.read_bytes() == st_file.read_bytes()


def test_refuses_to_overwrite(st_file, capsys):
    st_file.with_suffix(".twz").write_bytes(b"keep")
    assert main(["compress", str(st_file), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "OutputExists" in err and "--force" in err and "Traceback" not in err
    assert st_file.with_suffix(".twz").read_bytes() == b"keep"


def test_bad_file_exits_1_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.twz"
    bad.write_bytes(b"garbage" * 10)
    assert main(["verify", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "BadMagic" in err and "Traceback" not in err


def test_missing_file_exits_1(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope.twz")]) == 1


def test_help_explains():
    result = subprocess.run([sys.executable, "-m", "tensorwire.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "compress" in result.stdout and "examples:" in result.stdout
