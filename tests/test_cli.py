"""The command line: each subcommand on a real small file, exit codes, and --help."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file as st_save

from tensorwire.cli import PROFILE_NEEDLES, build_parser, eval_settings, main, profile_settings
from tensorwire.kv.quality import EvalSettings
from tensorwire.search.runner import ProfileSettings


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


EVAL_FLAGS = ["--text", "t.txt", "--context", "64", "--continuation", "8", "--windows", "2", "--needles", "3",
              "--question", "in_prompt"]  # fmt: skip


def test_kv_eval_and_profile_build_one_evaluation():
    parse = build_parser().parse_args
    evaluation = eval_settings(parse(["kv", "eval", "--pipeline", "bf16", *EVAL_FLAGS, "--seed", "7"]))
    assert evaluation == EvalSettings("t.txt", context=64, continuation=8, windows=2, needles=3, seed=7, question="in_prompt")
    profile = profile_settings(parse(["profile", *EVAL_FLAGS, "--eval-seed", "7", "--seed", "3", "--workers", "2"]))
    assert profile.evaluation == evaluation and (profile.seed, profile.workers) == (3, 2)


def test_flags_left_out_take_the_settings_defaults():
    parse = build_parser().parse_args
    evaluation = eval_settings(parse(["kv", "eval", "--pipeline", "bf16", "--text", "t.txt"]))
    assert evaluation == EvalSettings("t.txt") and evaluation.needles == 50
    profile = profile_settings(parse(["profile", "--text", "t.txt"]))
    assert PROFILE_NEEDLES == 20 and profile == ProfileSettings(replace(evaluation, needles=PROFILE_NEEDLES))


def test_the_sampler_seed_and_the_retrieval_seed_are_independent():
    parse = build_parser().parse_args
    sampler = profile_settings(parse(["profile", "--text", "t.txt", "--seed", "5"]))
    cases = profile_settings(parse(["profile", "--text", "t.txt", "--eval-seed", "5"]))
    assert (sampler.seed, sampler.evaluation.seed) == (5, 0)
    assert (cases.seed, cases.evaluation.seed) == (0, 5)


def test_the_parser_imports_no_package():
    # Every command starts with the parser: the packages (torch-facing kv, optuna-facing search) wait for their command.
    code = ("import sys; from tensorwire.cli import build_parser; build_parser(); "
            "print(sorted(m for m in sys.modules if m.startswith(('tensorwire.kv', 'tensorwire.search'))))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_help_explains():
    result = subprocess.run([sys.executable, "-m", "tensorwire.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "compress" in result.stdout and "examples:" in result.stdout
