"""``tensorwire diagnose run -- CMD``: run a job with the probe in every rank and the analyzer beside it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DiagnoseError
from .aggregator import Aggregator
from .analyzer import Finding, Settings
from .probe import ADDR_ENV
from .report import finding_line, report_json, report_text

__all__ = ["BOOTSTRAP", "RunResult", "job_env", "run", "stop_group"]

BOOTSTRAP = Path(__file__).parent / "bootstrap"
STOP_KINDS = {"hang", "crash", "desync"}


@dataclass
class RunResult:
    returncode: int | None
    findings: list[Finding]
    report: dict
    text: str
    stopped: bool = False
    wall_s: float = 0.0
    files: dict = field(default_factory=dict)


def job_env(addr: str, env: dict | None = None) -> dict:
    """The job's environment: the bootstrap first on PYTHONPATH, the aggregator's address."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BOOTSTRAP), env.get("PYTHONPATH", "")) if p)
    env[ADDR_ENV] = addr
    return env


def run(cmd: list[str], *, settings: Settings | None = None, out_dir: str | Path | None = None,
        stop_on_fault: bool = True, grace_s: float = 1.0, timeout_s: float | None = None,
        env: dict | None = None, quiet: bool = False, stdout=None, stderr=None) -> RunResult:
    """Run ``cmd`` (e.g. ``torchrun ... train.py``) with the probe in its ranks.

    With ``stop_on_fault``, a hang, crash or desync stops the job (its process group gets
    SIGTERM, then SIGKILL after ``grace_s``): a job in that state would otherwise wait for its
    backend's timeout (30 minutes by default) doing nothing. Records and the report go to
    ``out_dir/records.jsonl`` and ``out_dir/report.json`` when given.
    """
    if not cmd:
        raise DiagnoseError("no job to run: pass the command after `--`, e.g. "
                            "`tensorwire diagnose run -- torchrun --nproc-per-node 4 train.py`")
    aggregator = Aggregator(settings)
    printed: list[Finding] = []

    def on_finding(f: Finding) -> None:
        printed.append(f)
        if not quiet:
            print(f"tensorwire diagnose: {finding_line(f)}", file=sys.stderr, flush=True)

    aggregator.on_finding = on_finding
    aggregator.start()
    t0 = time.monotonic()
    stopped = False
    try:
        proc = subprocess.Popen(cmd, env=job_env(aggregator.address, env), start_new_session=True,
                                stdout=stdout, stderr=stderr)
    except OSError as exc:
        aggregator.stop()
        raise DiagnoseError(f"could not start the job {cmd[0]!r}: {exc}") from exc
    try:
        while proc.poll() is None:
            time.sleep(0.05)
            over_time = timeout_s is not None and time.monotonic() - t0 > timeout_s
            if over_time or (stop_on_fault and any(f.kind in STOP_KINDS for f in printed)):
                stopped = True
                stop_group(proc, grace_s)
                break
    finally:
        if proc.poll() is None:
            stop_group(proc, grace_s)
        # ranks this launcher stopped did not fall silent on their own: no last crash verdict then
        aggregator.stop(final=not stopped)
    wall = time.monotonic() - t0
    report = report_json(aggregator.analyzer, returncode=proc.returncode, stopped=stopped, wall_s=wall,
                         command=cmd, bad_batches=aggregator.bad_batches)
    text = report_text(aggregator.analyzer)
    files = {}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        aggregator.save(out / "records.jsonl", command=cmd, world=aggregator.analyzer.world, stopped=stopped)
        (out / "report.json").write_text(json.dumps(report, indent=1))
        files = {"records": str(out / "records.jsonl"), "report": str(out / "report.json")}
    return RunResult(proc.returncode, list(aggregator.analyzer.findings), report, text, stopped, wall, files)


def stop_group(proc: subprocess.Popen, grace_s: float) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace_s)
            return
        except subprocess.TimeoutExpired:
            continue
    proc.wait()
