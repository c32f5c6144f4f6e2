"""Cold start through a slow read path: process start to first output, raw safetensors vs .twz.

ENEC's end-to-end claim: when weights reach the accelerator through a slow path (network
storage, a remote object store, a slow disk), fewer bytes make a model start sooner, as
long as decoding keeps up with the read. For each model, checkpoint format and read rate a
fresh Python process is started, and the time until it has its first output is measured:

* ``raw``: ``model.safetensors`` read whole through the paced source, then
  ``safetensors.torch.load`` (bytes -> tensors);
* ``twz-fast`` / ``twz-max``: ``tensorwire.integrations.transformers.from_pretrained`` on the
  compressed folder: chunk ``i`` is decoded while chunk ``i + 1`` is read.

Both build the model the same way (``integrations.transformers.model_from_state``:
accelerate's ``init_empty_weights``, then ``load_state_dict(assign=True)``), so the difference is bytes moved and decode time. First
output: SmolLM2-135M-Instruct's first generated token for a short prompt; MiniLM's first
sentence embedding. The read rate is a token bucket on the read path
(:mod:`tensorwire.container.source`, the serving transport's bucket); ``local`` is the disk
unpaced, after dropping the page cache when the machine allows it (root), else from the
page cache (the JSON says which).

The latency model (:func:`summarize`) predicts each time as ``fixed + bytes / rate`` for raw
and ``fixed + overhead + bytes_twz / rate`` for .twz (decoding overlaps the read; what it
does not hide is ``overhead``), both fitted at the fastest paced rate; compression pays
below the break-even rate ``(bytes_raw - bytes_twz) / overhead``.

    .venv/bin/python benchmarks/weights/cold_start.py                 # both models, all rates, 3 repeats
    .venv/bin/python benchmarks/weights/cold_start.py --models minilm --rates 0.5 local --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / ".cache" / "cold_start"
RATES_GBIT = ("0.1", "0.5", "1", "2.5", "10", "local")
VARIANTS = ("raw", "twz-fast", "twz-max")
PROMPT = "The capital of France is"


# ----------------------------------------------------------------------------- the child process
def child(model: str, variant: str, rate: str, folder: str) -> None:
    """Load and produce the first output; print JSON timings (seconds since process start)."""
    began = float(os.environ["TW_COLD_START_T0"])
    import torch
    import transformers

    from tensorwire.container.source import open_source
    from tensorwire.integrations.transformers import from_pretrained, model_from_state
    from tensorwire.serve.transport.shaping import TokenBucket

    torch.set_num_threads(1)
    pacer = None if rate == "local" else TokenBucket(float(rate) * 1e9 / 8)
    auto = "AutoModelForCausalLM" if model == "smollm2" else "AutoModel"
    imported = time.time()
    if variant == "raw":
        from safetensors.torch import load as load_bytes

        source = open_source(Path(folder) / "model.safetensors", pacer)
        data = source.read(0, source.size)
        state = load_bytes(data)
        del data
        net = model_from_state(folder, state, auto)
    else:
        net = from_pretrained(folder, auto, pacer=pacer)
    loaded = time.time()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = net(ids)
        first = int(out.logits[0, -1].argmax()) if model == "smollm2" else float(out.last_hidden_state[0, 0, 0])
    done = time.time()
    print(json.dumps({"imported": imported - began, "loaded": loaded - began, "first_output": done - began,
                      "first": first, "peak_rss_mib": _peak_rss_mib()}))  # fmt: skip


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ----------------------------------------------------------------------------- preparing folders
def prepare(model: str) -> dict[str, Path]:
    """bf16 safetensors folder + .twz fast / max folders (made once under .cache/)."""
    import torch
    from safetensors.torch import load_file, save_file

    from tensorwire.integrations.safetensors import compress_folder
    from tensorwire.models import minilm_folder, smollm2_folder

    src = smollm2_folder() if model == "smollm2" else minilm_folder()
    base = WORK / model
    raw = base / "raw"
    if not (raw / "model.safetensors").exists():
        raw.mkdir(parents=True, exist_ok=True)
        for name in os.listdir(src):
            if name.endswith((".json", ".txt", ".jinja", ".model")) and (Path(src) / name).is_file():
                shutil.copy(Path(src) / name, raw / name)
        state = load_file(str(Path(src) / "model.safetensors"))
        save_file({k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in state.items()},
                  str(raw / "model.safetensors"), metadata={"format": "pt"})  # fmt: skip
    folders = {"raw": raw}
    for level in ("fast", "max"):
        out = base / f"twz-{level}"
        if not any(out.glob("*.twz")):
            compress_folder(raw, out, level=level)
        folders[f"twz-{level}"] = out
    return folders


def folder_bytes(folder: Path, variant: str) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.twz" if variant != "raw" else "*.safetensors"))


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def run_child(model: str, variant: str, rate: str, folder: Path) -> dict:
    env = {**os.environ, "TW_COLD_START_T0": repr(time.time()), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error"}  # fmt: skip
    # -P: this folder holds kernels.py, which would shadow the `kernels` package transformers imports
    proc = subprocess.run([sys.executable, "-P", __file__, "--child", model, variant, rate, str(folder)],
                          capture_output=True, text=True, env=env, timeout=900)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{model} {variant} {rate} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["smollm2", "minilm"], choices=["smollm2", "minilm"])
    p.add_argument("--rates", nargs="+", default=list(RATES_GBIT), help="Gbit/s, or 'local'")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=HERE / "results" / "cold_start.json")
    p.add_argument("--summarize", type=Path, help="recompute the summary and table of a results file")
    p.add_argument("--child", nargs=4, metavar=("MODEL", "VARIANT", "RATE", "FOLDER"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child)
        return 0
    if args.summarize:
        result = json.loads(args.summarize.read_text())
        result["summary"] = summarize(result["rows"])
        args.summarize.write_text(json.dumps(result, indent=1) + "\n")
        print(table(result["summary"]))
        return 0

    sys.path.insert(0, str(HERE.parents[1] / "src"))
    from tensorwire.sysinfo import machine_info

    rows, dropped_all = [], True
    for model in args.models:
        folders = prepare(model)
        sizes = {v: folder_bytes(folders[v], v) for v in VARIANTS}
        for rep in range(args.repeats):
            for rate in args.rates:
                for variant in VARIANTS:  # interleaved: every variant at every rate in each round
                    dropped = drop_page_cache() if rate == "local" else None
                    dropped_all &= dropped is not False
                    result = run_child(model, variant, rate, folders[variant])
                    rows.append({"model": model, "variant": variant, "rate_gbit": rate, "repeat": rep,
                                 "bytes": sizes[variant], "page_cache_dropped": dropped, **result})  # fmt: skip
                    print(f"{model:8s} {rate:>6s} {variant:9s} first output {result['first_output']:6.2f} s "
                          f"(load {result['loaded'] - result['imported']:5.2f} s, peak {result['peak_rss_mib']:.0f} MiB)", flush=True)
    summary = summarize(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine_info(["torch", "transformers", "safetensors"]),
                                    "page_cache_dropped_for_local": dropped_all, "rows": rows, "summary": summary},
                                   indent=1) + "\n")  # fmt: skip
    print(table(summary))
    return 0


def summarize(rows: list[dict]) -> list[dict]:
    """Median per (model, rate, variant), the speed-up vs raw, and the latency model's prediction.

    The model is fitted at the fastest paced rate ``R0``: ``fixed = t_raw(R0) - S_raw / R0``
    (interpreter, imports, model build, first forward) and, per .twz variant, the time it
    adds that reading does not hide, ``overhead = t_twz(R0) - fixed - S_twz / R0`` (numba's
    kernels loading, decode not overlapped). Then ``t(R) = fixed [+ overhead] + S / R`` and
    compression pays above the break-even rate's slowness: ``R* = (S_raw - S_twz) / overhead``.
    """
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]

        def median(variant, rate, key="first_output"):
            return statistics.median(r[key] for r in mine if r["variant"] == variant and r["rate_gbit"] == rate)

        sizes = {r["variant"]: r["bytes"] for r in mine}
        paced = sorted({r["rate_gbit"] for r in mine} - {"local"}, key=float)
        fit = None
        if paced:
            r0 = float(paced[-1]) * 1e9 / 8
            fixed = median("raw", paced[-1]) - sizes["raw"] / r0
            overhead = {v: max(0.0, median(v, paced[-1]) - fixed - sizes[v] / r0) for v in VARIANTS if v != "raw"}
            fit = (fixed, overhead)
        for rate in dict.fromkeys(r["rate_gbit"] for r in mine):
            raw = median("raw", rate)
            for variant in VARIANTS:
                t = median(variant, rate)
                row = {"model": model, "rate_gbit": rate, "variant": variant, "bytes": sizes[variant],
                       "first_output_s": t, "speedup_vs_raw": raw / t,
                       "load_s": median(variant, rate, "loaded") - median(variant, rate, "imported"),
                       "peak_rss_mib": median(variant, rate, "peak_rss_mib")}  # fmt: skip
                if fit is not None and rate != "local":
                    fixed, overhead = fit
                    row["predicted_s"] = fixed + overhead.get(variant, 0.0) + sizes[variant] / (float(rate) * 1e9 / 8)
                    if variant != "raw":
                        extra = overhead[variant]
                        row["overhead_s"] = extra
                        row["break_even_gbit"] = (sizes["raw"] - sizes[variant]) / extra * 8 / 1e9 if extra > 0 else None
                out.append(row)
    return out


def table(summary: list[dict]) -> str:
    lines = ["| model | read rate | format | MB read | first output s | vs raw | load s | peak RSS MiB | model predicts s | break-even Gbit/s |",
             "|---|---|---|--:|--:|--:|--:|--:|--:|--:|"]  # fmt: skip
    for r in summary:
        rate = "local disk" if r["rate_gbit"] == "local" else f"{r['rate_gbit']} Gbit/s"
        pred = f"{r['predicted_s']:.2f}" if r.get("predicted_s") is not None else "—"
        even = "—" if "overhead_s" not in r else "∞ (no overhead seen)" if r["break_even_gbit"] is None else f"{r['break_even_gbit']:.2f}"
        lines.append(f"| {r['model']} | {rate} | {r['variant']} | {r['bytes'] / 1e6:.0f} | {r['first_output_s']:.2f} | "
                     f"{r['speedup_vs_raw']:.2f}× | {r['load_s']:.2f} | {r['peak_rss_mib']:.0f} | {pred} | {even} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
