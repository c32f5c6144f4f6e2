"""End to end: a real DDP job on gloo under torchrun, a real fault, the probe and the analyzer.

Each run starts 4 ranks (about 10 s on 2 cores). The job waits 80 ms per step on an
emulated accelerator (see ddp_job.py: 4 ranks share 2 cores here) and the injected
straggler sleeps 60 % of a step, far above this machine's noise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")

from tensorwire.cli import main as cli
from tensorwire.diagnose.analyzer import Settings
from tensorwire.diagnose.faults import FAULT_ENV, Fault
from tensorwire.diagnose.launch import BOOTSTRAP, run
from tensorwire.diagnose.probe import ADDR_ENV

pytestmark = pytest.mark.slow
WORLD = 4


def job(steps=24, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD), "--monitor-interval", "0.1",
            "-m", "tensorwire.testing.ddp_job", "--steps", str(steps), "--dim", "32", "--seq", "32",
            "--device-ms", "80", *extra]


def run_with(fault: Fault | None, tmp_path, **kwargs):
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    if fault is not None:
        env[FAULT_ENV] = fault.to_env()
    return run(job(), settings=Settings(hang_timeout_s=3.0), out_dir=tmp_path, env=env, quiet=True,
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout_s=120, **kwargs)


@pytest.mark.parametrize("fault", [
    None,
    Fault("straggler", 2, 8, seconds=0.08),
    Fault("slow_link", 1, 8, seconds=0.05, peer=2),
    Fault("hang", 3, 8),
    Fault("crash", 1, 8),
    Fault("desync", 0, 8, mode="size"),
], ids=["clean", "straggler", "slow_link", "hang", "crash", "desync"])
def test_fault_is_named(fault, tmp_path):
    result = run_with(fault, tmp_path)
    named = [(f.kind, f.ranks) for f in result.findings]
    if fault is None:
        assert named == [] and result.returncode == 0
        return
    want = (fault.kind, tuple(sorted((fault.rank, fault.peer))) if fault.kind == "slow_link" else (fault.rank,))
    assert named == [want], result.text
    assert result.stopped == (fault.kind in ("hang", "desync"))
    if fault.kind == "hang":
        seconds = result.findings[0].seconds_to_detect
        assert seconds is not None and seconds < 2 * 3.0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["findings"][0]["kind"] == fault.kind
    # offline: the saved records give the same verdict
    assert cli(["diagnose", "analyze", str(tmp_path / "records.jsonl"), "--hang-timeout", "3"]) == 1


def test_job_runs_on_when_the_aggregator_is_gone(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BOOTSTRAP), env.get("PYTHONPATH", "")) if p)
    env[ADDR_ENV] = "127.0.0.1:9"  # the discard port: nothing listens
    stats = tmp_path / "stats.json"
    done = subprocess.run(job(10, "--stats", str(stats)), env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(json.loads(stats.read_text())["step_s"]) == 10


def test_cli_analyze_names_a_bad_file(tmp_path, capsys):
    bad = tmp_path / "records.jsonl"
    bad.write_text("this is not a record file\n")
    assert cli(["diagnose", "analyze", str(bad)]) == 1
    assert "RecordFileError" in capsys.readouterr().err


def test_cli_run_without_a_command(capsys):
    assert cli(["diagnose", "run", "--"]) == 1
    assert "no job to run" in capsys.readouterr().err
