"""Diagnosis benchmark: injected faults in a real DDP job, tensorwire's probe + analyzer vs PyTorch's tools.

Each scenario runs `tensorwire.testing.ddp_job` (a byte-level transformer, DDP over gloo, a
ring all-reduce of point-to-point sends) under torchrun with one fault from
`tensorwire.diagnose.faults` drawn at random (kind, rank, onset step, severity), plus clean
runs. Every scenario runs twice, interleaved:

- tensorwire: `tensorwire.diagnose.launch.run` (probe in every rank, analyzer online);
- PyTorch alone: the same job with a `monitored_barrier` after each step (timeout = the hang
  timeout) and the Flight Recorder dumped by every rank at the end or on error, then read
  by PyTorch's own trace analyzer (`python -m torch.distributed.flight_recorder.fr_trace`).

Scored per run: detected (anything reported), right rank and kind, false alarms on clean
runs, seconds and steps from the fault's onset (the injector's own line) to the report.
Probe overhead: step time with and without the probe, clean runs interleaved.

    python benchmarks/diagnose/run.py --scenarios 100 --clean 20   # about 60 minutes here
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from tensorwire.diagnose.analyzer import Settings
from tensorwire.diagnose.faults import FAULT_ENV, Fault, sample_faults
from tensorwire.diagnose.launch import BOOTSTRAP, run, stop_group
from tensorwire.sysinfo import machine_info

HERE = Path(__file__).parent


JOB_ARGS = ["--dim", "64", "--seq", "64", "--device-ms", "80"]


def job_cmd(world: int, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--monitor-interval",
            "0.1", "-m", "tensorwire.testing.ddp_job", "--steps", str(steps), *JOB_ARGS, *extra]


def fault_line(stderr: str) -> dict | None:
    for line in stderr.splitlines():
        if line.startswith("tensorwire-fault "):
            return json.loads(line.removeprefix("tensorwire-fault "))
    return None


def expected(fault: Fault | None) -> tuple[str, tuple[int, ...]] | None:
    if fault is None:
        return None
    return fault.kind, tuple(sorted((fault.rank, fault.peer))) if fault.kind == "slow_link" else (fault.rank,)


def steps_between(records: list[dict], rank: int, t0: int, t1: int) -> int:
    return sum(1 for r in records if r["k"] == "step" and r["r"] == rank and t0 < r["t"] <= t1)


def run_tensorwire(fault: Fault | None, args, workdir: Path) -> dict:
    env = dict(os.environ)
    env.pop(FAULT_ENV, None)
    if fault is not None:
        env[FAULT_ENV] = fault.to_env()
    stats = workdir / "stats.json"
    err_path = workdir / "stderr.txt"
    settings = Settings(hang_timeout_s=args.hang_timeout)
    with open(err_path, "w") as err:
        run(job_cmd(args.world, args.steps, "--stats", str(stats)), settings=settings, out_dir=workdir,
            env=env, quiet=True, stdout=subprocess.DEVNULL, stderr=err, timeout_s=args.job_timeout)
    return tensorwire_result(fault, args, workdir)


MB_RE = re.compile(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier")


def run_pytorch(fault: Fault | None, args, workdir: Path) -> dict:
    """The job with PyTorch's own tools only; what they name, and when."""
    env = dict(os.environ)
    env.pop(FAULT_ENV, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BOOTSTRAP), env.get("PYTHONPATH", "")) if p)
    env["TORCH_FR_BUFFER_SIZE"] = "20000"
    if fault is not None:
        env[FAULT_ENV] = fault.to_env()
    dumps = workdir / "fr"
    shutil.rmtree(dumps, ignore_errors=True)
    t0 = time.time_ns()
    lines: list[tuple[int, str]] = []
    # PyTorch's tools at their best: gloo gives up after the hang timeout too, so that a wait
    # anywhere (not only in the monitored barrier) ends in an error and a Flight Recorder dump
    proc = subprocess.Popen(job_cmd(args.world, args.steps, "--monitored-barrier", str(args.hang_timeout),
                                    "--gloo-timeout", str(args.hang_timeout), "--fr-dump", str(dumps)),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + args.job_timeout
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stderr, selectors.EVENT_READ)
    while proc.poll() is None and time.monotonic() < deadline:
        if sel.select(0.2):
            line = proc.stderr.readline()
            if line:
                lines.append((time.time_ns(), line.rstrip()))
    if proc.poll() is None:
        (dumps / "dump").touch()  # ask every rank for its Flight Recorder buffer, then stop the job
        time.sleep(1.0)
        stop_group(proc, 2.0)
    lines += [(time.time_ns(), line.rstrip()) for line in proc.stderr.read().splitlines()]
    (workdir / "pytorch_stderr.txt").write_text("".join(f"{t}\t{text}\n" for t, text in lines))
    return {**pytorch_result(fault, args, workdir), "returncode": proc.returncode,
            "wall_s": (time.time_ns() - t0) / 1e9}


CULPRIT = re.compile(r"Culprit rank (\d+); Error type: (\w+)")
MISSING = re.compile(r"missing ranks: \{([\d, ]+)\}")


def repair_dumps(dumps: Path, files: list[Path]) -> Path:
    """Gloo's dumps key pg_config by '' while entries name the group '0': PyTorch's analyzer then
    stops with a KeyError (torch 2.13). Rewrite the key, nothing else, so it can read them."""
    import pickle

    fixed = dumps / "repaired"
    fixed.mkdir(exist_ok=True)
    for f in files:
        trace = pickle.loads(f.read_bytes())
        ranks = next(iter(trace["pg_config"].values()))["ranks"] if trace["pg_config"] else "[]"
        groups = {tuple(e["process_group"]) for e in trace["entries"]}
        trace["pg_config"] = {name: {"name": name, "desc": desc, "ranks": ranks} for name, desc in groups}
        (fixed / f.name).write_bytes(pickle.dumps(trace))
    return fixed


def analyze_fr(dumps: Path, world: int) -> dict | None:
    """PyTorch's Flight Recorder analyzer on the dumps: what it names (a culprit, missing ranks)."""
    files = sorted(dumps.glob("rank_*")) if dumps.exists() else []
    if not files:
        return None
    fixed = repair_dumps(dumps, files)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.flight_recorder.fr_trace", str(fixed), "-p",
                          "rank_", "--allow-incomplete-ranks", "-v"], capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    culprit, missing = CULPRIT.search(text), MISSING.search(text)
    found = {"by": "flight_recorder", "dumps": len(files), "evidence": text[-600:]}
    if culprit and culprit.group(2).endswith("MISMATCH") and culprit.group(2) != "COLLECTIVE_STATE_MISMATCH":
        return {**found, "kind": "desync", "ranks": [int(culprit.group(1))]}
    if missing:
        return {**found, "kind": "hang", "ranks": sorted(int(x) for x in missing.group(1).replace(",", " ").split())}
    if culprit:
        return {**found, "kind": "hang", "ranks": [int(culprit.group(1))]}
    return {**found, "kind": None, "ranks": []}


def tensorwire_result(fault: Fault | None, args, workdir: Path) -> dict:
    """A finished scenario's result from its folder (report, records, the injector's line)."""
    from tensorwire.diagnose.records import read_records

    report = json.loads((workdir / "report.json").read_text())
    onset = fault_line((workdir / "stderr.txt").read_text(errors="replace"))
    _, records = read_records(workdir / "records.jsonl")
    findings = report["findings"]
    for f in findings:
        if onset is not None:
            f["seconds_from_onset"] = (f["detected_ns"] - onset["onset_ns"]) / 1e9
            ref = fault.rank if fault.kind != "hang" else (fault.rank + 1) % args.world
            f["steps_from_onset"] = steps_between(records, ref, onset["onset_ns"], f["detected_ns"])
    stats = workdir / "stats.json"
    return {"findings": findings, "onset": onset, "returncode": report["returncode"], "stopped": report["stopped"],
            "wall_s": report["wall_s"], "step_s": json.loads(stats.read_text())["step_s"] if stats.exists() else None}


STAMPED = re.compile(r"^(\d+)\t(.*)$")


def pytorch_result(fault: Fault | None, args, workdir: Path) -> dict:
    """What PyTorch's tools named, from the scenario's folder: the monitored barrier's line (at its
    arrival time) and the Flight Recorder analyzer's verdict (at the time the dumps were written).
    Folders of the first benchmark run hold stderr lines without times; their barrier lines are
    dated by the dumps too."""
    dumps = workdir / "fr"
    files = sorted(dumps.glob("rank_*")) if dumps.exists() else []
    dumped = max((f.stat().st_mtime_ns for f in files), default=None)
    lines = []
    for line in (workdir / "pytorch_stderr.txt").read_text(errors="replace").splitlines():
        m = STAMPED.match(line)
        lines.append((int(m.group(1)), m.group(2)) if m else (dumped, line))
    onset = fault_line("\n".join(text for _, text in lines))
    found = []
    for t, text in lines:
        m = MB_RE.search(text)
        if m:
            ranks = sorted(int(x) for x in m.group(1).replace(",", " ").split())
            found.append({"kind": "hang", "ranks": ranks, "by": "monitored_barrier", "detected_ns": t,
                          "evidence": text[:300]})
            break
    fr = analyze_fr(dumps, args.world)
    if fr is not None:
        fr["detected_ns"] = dumped
        found.append(fr)
    for f in found:
        if onset is not None and f["detected_ns"] is not None:
            f["seconds_from_onset"] = (f["detected_ns"] - onset["onset_ns"]) / 1e9
    return {"findings": found, "onset": onset}


def score(fault: Fault | None, res: dict) -> dict:
    named = [(f["kind"], tuple(sorted(f["ranks"]))) for f in res["findings"] if f.get("kind")]
    want = expected(fault)
    right = [f for f in res["findings"] if f.get("kind") and want == (f["kind"], tuple(sorted(f["ranks"])))]
    first = right[0] if right else None
    right_rank = [f for f in res["findings"] if want and tuple(sorted(f["ranks"])) == want[1]]
    return {"detected": bool(named), "right": bool(right), "right_rank": bool(right_rank), "only_right": bool(right) and len(set(named)) == 1,
            "false_alarm": fault is None and bool(named),
            "seconds": first.get("seconds_from_onset") if first else None,
            "steps": first.get("steps_from_onset") if first else None, "named": named}


def summarize(rows: list[dict], tool: str) -> dict:
    faults = [r for r in rows if r["fault"] is not None]
    clean = [r for r in rows if r["fault"] is None]
    out = {"runs": len(rows), "faults": len(faults), "clean": len(clean)}
    if faults:
        s = [r[tool] for r in faults]
        out["detection_rate"] = sum(x["detected"] for x in s) / len(s)
        out["right_rank_and_kind"] = sum(x["right"] for x in s) / len(s)
        out["right_rank"] = sum(x["right_rank"] for x in s) / len(s)
        out["only_right"] = sum(x["only_right"] for x in s) / len(s)
        by_kind = {}
        for r in faults:
            k = r["fault"]["kind"]
            d = by_kind.setdefault(k, {"n": 0, "right": 0, "seconds": [], "steps": []})
            d["n"] += 1
            d["right"] += r[tool]["right"]
            if r[tool]["seconds"] is not None:
                d["seconds"].append(r[tool]["seconds"])
            if r[tool]["steps"] is not None:
                d["steps"].append(r[tool]["steps"])
        for d in by_kind.values():
            d["median_s"] = statistics.median(d["seconds"]) if d["seconds"] else None
            d["max_s"] = max(d["seconds"]) if d["seconds"] else None
            d["max_steps"] = max(d["steps"]) if d["steps"] else None
        out["by_kind"] = by_kind
    if clean:
        out["false_alarm_runs"] = sum(r[tool]["false_alarm"] for r in clean)
    return out


def overhead(args, workdir: Path) -> dict:
    """Median step time of clean runs with and without the probe, interleaved A B A B."""
    workdir.mkdir(parents=True, exist_ok=True)
    with_probe, without = [], []
    for i in range(args.overhead_pairs):
        stats = workdir / f"overhead_{i}.json"
        subprocess.run(job_cmd(args.world, args.steps, "--stats", str(stats)), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        without.append(statistics.median(json.loads(stats.read_text())["step_s"][3:]))
        (workdir / f"overhead_probe_{i}").mkdir(exist_ok=True)
        res = run_tensorwire(None, args, workdir / f"overhead_probe_{i}")
        with_probe.append(statistics.median(res["step_s"][3:]))
    ratios = [a / b - 1 for a, b in zip(with_probe, without)]
    return {"step_s_without": without, "step_s_with": with_probe, "overhead": ratios,
            "median_overhead": statistics.median(ratios)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenarios", type=int, default=100)
    p.add_argument("--clean", type=int, default=20)
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--onset", type=int, nargs=2, default=(10, 25))
    p.add_argument("--hang-timeout", type=float, default=5.0)
    p.add_argument("--job-timeout", type=float, default=60.0)
    p.add_argument("--step-s", type=float, default=0.12, help="the clean step time, for straggler severities")
    p.add_argument("--overhead-pairs", type=int, default=5)
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--rescore", action="store_true",
                   help="score the scenarios already run in --workdir (same seed and counts) instead of running them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/tensorwire-diagnose-bench"))
    p.add_argument("--json", type=Path, default=HERE / "results" / "diagnose.json")
    args = p.parse_args()

    rng = random.Random(args.seed)
    plan: list[Fault | None] = sample_faults(args.scenarios, args.world, tuple(args.onset), args.step_s, rng)
    plan += [None] * args.clean
    rng.shuffle(plan)
    rows = []
    for i, fault in enumerate(plan):
        workdir = args.workdir / f"{i:03d}"
        if not args.rescore:
            shutil.rmtree(workdir, ignore_errors=True)
            workdir.mkdir(parents=True)
        row = {"i": i, "fault": None if fault is None else asdict(fault)}
        res = tensorwire_result(fault, args, workdir) if args.rescore else run_tensorwire(fault, args, workdir)
        row["tensorwire_raw"], row["tensorwire"] = res, score(fault, res)
        if not args.no_baseline:
            base = pytorch_result(fault, args, workdir) if args.rescore else run_pytorch(fault, args, workdir)
            row["pytorch_raw"], row["pytorch"] = base, score(fault, base)
        rows.append(row)
        tw = row["tensorwire"]
        ok = tw["right"] if fault else not tw["false_alarm"]
        when = "" if tw["seconds"] is None else f" {tw['seconds']:.2f} s"
        base = "" if args.no_baseline else f" | pytorch {row['pytorch']['named']}"
        print(f"{i:3d} {fault.kind if fault else 'clean':9} rank {fault.rank if fault else '-'} | tensorwire "
              f"{'ok ' if ok else 'BAD'} {tw['named']}{when}{base}", flush=True)
    summary = {"tensorwire": summarize(rows, "tensorwire")}
    if not args.no_baseline:
        summary["pytorch"] = summarize(rows, "pytorch")
    if args.overhead_pairs:
        summary["overhead"] = overhead(args, args.workdir / "overhead")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine_info(), "config": {k: str(v) for k, v in vars(args).items()},
                                     "summary": summary, "rows": rows}, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
