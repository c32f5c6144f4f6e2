"""Does the Bayesian search find the Pareto front with far fewer evaluations than a grid?

    python benchmarks/search/run.py grid                  # once: measure every config of the sub-space (long)
    python benchmarks/search/run.py retime                # every config's codec timed again in one sitting
    python benchmarks/search/run.py retime-library LIB    # a profile library's codecs timed again (after a codec change)
    python benchmarks/search/run.py sensitivity           # per-layer K/V sensitivity scan, mixed-precision allocations
    python benchmarks/search/run.py replay                # searches replayed against the cached grid
    python benchmarks/search/run.py replay --seeds 0 1 2 3 4 5 6 7 8 9

``grid`` enumerates a sub-space of the strategy space (``GRID_STAGES``: the same
``SearchSpace`` code the search uses, restricted) and measures every config once on the
real model and WikiText-2 at a fixed cheap fidelity (``GRID_SETTINGS``), resumably
(results/grid_<id>.partial.jsonl), then writes results/grid_<id>.json.

``replay`` runs the study driver (``tensorwire.search.study.ProfileSearch``) with a measure
that looks the config up in the grid instead of evaluating it: legitimate because the
quality objective is deterministic (same windows, same model) and throughput is taken as
measured once. Per seed it runs the Bayesian search (TPE, the default sampler) and random
search, counts evaluations (distinct configs measured; a repeated config is answered from
the study, as the real driver does, and costs none), and records the hypervolume of the
feasible Pareto front after each evaluation as a fraction of the grid's. Writes
results/replay_<id>.json, .png and .txt.

Hypervolume: objectives as the study holds them (log2 ratio, log1p(ppl_increase),
log10 codec bytes/s), turned into minimisation; only feasible points (ppl_increase <=
the budget) count; reference point = (ratio 1, the budget, 1 MB/s). A ratio of HVs does
not depend on how the axes are scaled, so no normalisation is needed beyond that.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))  # run from a checkout without installing

RESULTS = HERE / "results"
TEXT = Path(os.environ.get("TENSORWIRE_TEXT", HERE.parents[2] / "shared" / "data" / "wikitext-2-raw-test.txt"))

# The sub-space: 2 transforms x 10 selectors x 16 quantizers x 5 encoder chains = 1600 configs.
GRID_ID = "ctx512"
GRID_STAGES = {
    "hadamard": {"values": (True,)},
    "snapkv": {"keep_fraction": (0.5, 0.7, 0.9)},
    "key_norm": {"keep_fraction": (0.5, 0.7, 0.9)},
    "streaming_llm": {"keep_fraction": (0.5, 0.7, 0.9)},
    "kivi": {"k_bits": (2, 3, 4, 8), "v_bits": (2, 3, 4, 8), "group_size": (32,), "residual": (32,)},
    "raw": {},
    "enec": {"level": ("max",)},
    "ans": {"context": ("column",)},
    "zstd": {"level": (3,)},
    "lz4": {"level": (0,)},
}
# The fixed, cheap fidelity of the grid: 2 perplexity windows of 512 + 64 tokens, no retrieval.
GRID_SETTINGS = {"context": 512, "continuation": 64, "windows": 2, "needles": 0, "seed": 0}


def grid_space():
    from tensorwire.search.space import SearchSpace

    return SearchSpace.from_registry(GRID_STAGES)


# -- grid ---------------------------------------------------------------------------------
def cmd_grid(args: argparse.Namespace) -> int:
    from tensorwire.kv.quality import EvalSettings, Evaluator
    from tensorwire.models import load_smollm2
    from tensorwire.search.objectives import EvaluatorMeasure
    from tensorwire.sysinfo import machine_info
    from tensorwire.search.space import config_key, lossy_key

    RESULTS.mkdir(parents=True, exist_ok=True)
    partial = RESULTS / f"grid_{GRID_ID}.partial.jsonl"
    space = grid_space()
    configs = list(space.configs())
    # Group configs by lossy prefix so each prefix's quality is measured once, then reused.
    configs.sort(key=lambda c: lossy_key(space.build(c)))
    done = {}
    if partial.exists():
        for line in partial.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short when the run was stopped
                continue
            done[rec["key"]] = rec
    todo = [c for c in configs if config_key(space.build(c)) not in done]
    print(f"grid {GRID_ID}: {len(configs)} configs, {len(done)} done, {len(todo)} to go", flush=True)
    started = time.time()
    if todo:
        import torch

        # One torch thread: on this shared 2-core VM more threads spin against the other jobs
        # (measured: prefill 5x slower with 2). The codec is timed on one thread either way.
        torch.set_num_threads(args.torch_threads)
        model, tokenizer = load_smollm2()
        evaluator = Evaluator(model, tokenizer, EvalSettings(str(TEXT), **GRID_SETTINGS))
        measure = EvaluatorMeasure(evaluator)
        # Measurements already on disk seed the quality cache (resume without re-running the model).
        for rec in done.values():
            if not rec["measurement"]["quality_reused"]:
                from tensorwire.search.objectives import Measurement

                measure._quality[(rec["lossy_key"], "full")] = Measurement.from_dict(rec["measurement"])
        with partial.open("a") as out:
            for i, config in enumerate(todo):
                pipeline = space.build(config)
                m = measure(pipeline, "full")
                rec = {"key": config_key(pipeline), "lossy_key": lossy_key(pipeline), "config": pipeline.to_config(),
                       "measurement": m.to_dict()}  # fmt: skip
                out.write(json.dumps(rec) + "\n")
                out.flush()
                done[rec["key"]] = rec
                if i % 10 == 0:
                    rate = (time.time() - started) / (i + 1)
                    print(f"  {len(done)}/{len(configs)}  ratio {m.ratio:.2f} ppl {m.ppl_increase:+.4f} "
                          f"codec {m.codec_bps / 1e6:.0f} MB/s  [{rate:.1f} s/config, ~{rate * (len(todo) - i - 1) / 60:.0f} min left]",
                          flush=True)  # fmt: skip
    records = [done[config_key(space.build(c))] for c in configs]
    out = {
        "grid_id": GRID_ID,
        "text": str(TEXT.name),
        "settings": GRID_SETTINGS,
        "stages": {k: {p: list(v) for p, v in ps.items()} for k, ps in GRID_STAGES.items()},
        "size": len(records),
        "lossy_prefixes": len({r["lossy_key"] for r in records}),
        "machine": machine_info(("torch", "optuna")),
        "note": "each config measured once; quality measured once per lossy prefix (encoders are lossless) and reused",
        "records": records,
    }
    path = RESULTS / f"grid_{GRID_ID}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path} ({len(records)} configs)")
    return 0


def cmd_retime(args: argparse.Namespace) -> int:
    """Time every config's codec again, all in one sitting (quality and size are kept).

    A grid measured over several sessions mixes machine conditions (this shared VM's load
    varied 1-12 while it was built), and throughput is one of the three objectives; one
    sitting gives every config the same conditions.
    """
    import torch

    from tensorwire.kv.quality import EvalSettings, Evaluator
    from tensorwire.models import load_smollm2
    from tensorwire.sysinfo import machine_info

    path = RESULTS / f"grid_{GRID_ID}.json"
    grid = json.loads(path.read_text())
    space = grid_space()
    torch.set_num_threads(args.torch_threads)
    model, tokenizer = load_smollm2()
    evaluator = Evaluator(model, tokenizer, EvalSettings(str(TEXT), **GRID_SETTINGS))
    started = time.time()
    for i, rec in enumerate(grid["records"]):
        encode_bps, decode_bps = evaluator.codec_speed(space.build(rec["config"]))
        rec["measurement"]["encode_bps"], rec["measurement"]["decode_bps"] = encode_bps, decode_bps
        if i % 100 == 0:
            print(f"  {i}/{len(grid['records'])} [{time.time() - started:.0f} s]", flush=True)
    grid["timing"] = {"retimed_in_one_sitting": time.strftime("%Y-%m-%d %H:%M"), "seconds": time.time() - started,
                      "machine": machine_info(("torch", "optuna"))}  # fmt: skip
    path.write_text(json.dumps(grid, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


def cmd_retime_library(args: argparse.Namespace) -> int:
    """Time every profile of a library again on the library's own evaluation windows.

    Ratio and quality do not change when only a lossless coder gets faster, so they are
    kept; ``encode_bps`` and ``decode_bps`` are replaced and the sitting is recorded in
    ``machine.retimed``.
    """
    import torch

    from tensorwire.kv.pipeline import Pipeline
    from tensorwire.kv.profiles import ProfileLibrary
    from tensorwire.kv.quality import EvalSettings, Evaluator
    from tensorwire.models import load_smollm2
    from tensorwire.sysinfo import machine_info

    library = ProfileLibrary.load(args.library)
    data = json.loads(library.dumps())
    settings = data["machine"]["search"]["settings"]
    torch.set_num_threads(args.torch_threads)
    model, tokenizer = load_smollm2()
    evaluation = EvalSettings(str(TEXT), context=settings["context"], continuation=settings["continuation"],
                              windows=settings["windows"], needles=0)  # fmt: skip
    evaluator = Evaluator(model, tokenizer, evaluation)
    for profile in data["profiles"]:
        before = profile["encode_bps"], profile["decode_bps"]
        profile["encode_bps"], profile["decode_bps"] = evaluator.codec_speed(Pipeline.from_config(profile["pipeline"]))
        print(f"  {profile['name']}: encode {before[0] / 1e9:.2f} -> {profile['encode_bps'] / 1e9:.2f} GB/s, "
              f"decode {before[1] / 1e9:.2f} -> {profile['decode_bps'] / 1e9:.2f} GB/s", flush=True)  # fmt: skip
    data["machine"]["retimed"] = {"when": time.strftime("%Y-%m-%d %H:%M"), "windows": settings["windows"],
                                  "machine": machine_info(("torch",))}  # fmt: skip
    ProfileLibrary.from_dict(data).save(args.library)
    print(f"wrote {args.library}")
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    """Scan every layer's keys and values alone (``--bits``, ``--scan-windows``), then evaluate allocations.

    The scan (``tensorwire.search.sensitivity.scan``) is cached in results/sensitivity.json
    (``--rescan`` measures again); each budget's allocation is evaluated with the library's
    settings (context 2048, 4 windows, 10 needles, question in the prompt) and written to
    results/mixed.json with the uniform KIVI points of the same run beside it.
    """
    import torch

    from tensorwire.kv.pipeline import Pipeline
    from tensorwire.kv.quality import EvalSettings, Evaluator
    from tensorwire.models import load_smollm2
    from tensorwire.search.sensitivity import Sensitivity, allocate, mixed_config, scan
    from tensorwire.sysinfo import machine_info

    torch.set_num_threads(args.torch_threads)
    model, tokenizer = load_smollm2()
    path = RESULTS / "sensitivity.json"
    if args.rescan or not path.exists():
        scanner = Evaluator(model, tokenizer, EvalSettings(str(TEXT), context=2048, windows=args.scan_windows, needles=0))

        def measure(config):
            return scanner.evaluate(Pipeline.from_config(config), needles=0, speed=False).ppl_increase

        started = time.time()
        sensitivity = scan(measure, model.config.num_hidden_layers, bits=tuple(args.bits),
                           log=lambda line: print(f"  {line} [{time.time() - started:.0f} s]", flush=True))  # fmt: skip
        sensitivity.settings.update({"context": 2048, "windows": args.scan_windows, "continuation": 128,
                                     "seconds": time.time() - started})  # fmt: skip
        path.write_text(json.dumps(sensitivity.to_dict(), indent=1) + "\n")
    sensitivity = Sensitivity.from_dict(json.loads(path.read_text()))
    evaluator = Evaluator(model, tokenizer, EvalSettings(str(TEXT), context=2048, windows=4, needles=10, question="in_prompt"))
    uniform = [{"stages": [{"id": "kivi", "k_bits": k, "v_bits": v, "group_size": 128, "residual": 0}, {"id": "ans"}]}
               for k, v in ((4, 4), (4, 3), (3, 3), (4, 2), (3, 2))]  # fmt: skip
    rows = []
    candidates = [("uniform", None, None, config) for config in uniform]
    for budget in args.budgets:
        k_bits, v_bits, predicted = allocate(sensitivity, budget)
        candidates.append(("mixed", budget, predicted, mixed_config(k_bits, v_bits)))
    for kind, budget, predicted, config in candidates:
        result = evaluator.evaluate(Pipeline.from_config(config))
        quantizer = config["stages"][0]
        k_bits = quantizer["k_bits"] if kind == "mixed" else [quantizer["k_bits"]]
        v_bits = quantizer["v_bits"] if kind == "mixed" else [quantizer["v_bits"]]
        row = {"kind": kind, "budget": budget, "predicted": predicted, "pipeline": config,
               "mean_k_bits": sum(k_bits) / len(k_bits), "mean_v_bits": sum(v_bits) / len(v_bits),
               **{key: getattr(result, key) for key in ("ratio", "ppl_increase", "retrieval", "retrieval_base",
                                                         "encode_bps", "decode_bps")}}  # fmt: skip
        rows.append(row)
        print(f"  {kind:7s} K {row['mean_k_bits']:.2f} V {row['mean_v_bits']:.2f} bits: ratio {result.ratio:.2f}  "
              f"ppl {result.ppl_increase * 100:+.2f}%  retrieval {result.retrieval:.0f}% (base {result.retrieval_base:.0f}%)  "
              f"encode {result.encode_bps / 1e9:.2f} decode {result.decode_bps / 1e9:.2f} GB/s", flush=True)  # fmt: skip
    out = RESULTS / "mixed.json"
    out.write_text(json.dumps({"machine": machine_info(("torch",)), "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


# -- replay -------------------------------------------------------------------------------
REFERENCE_BPS = 1e6  # HV reference throughput: 1 MB/s (every grid config is faster)


class GridLookup:
    """A measure that answers from the grid: the objective the search would have measured."""

    def __init__(self, table: dict[str, dict]):
        from tensorwire.search.objectives import Measurement

        self.table = {k: Measurement.from_dict(v) for k, v in table.items()}
        self.order: list[str] = []  # configs in the order they were evaluated

    def __call__(self, pipeline, fidelity):
        from tensorwire.search.space import config_key

        key = config_key(pipeline)
        self.order.append(key)
        return self.table[key]


def hv_setup(records: list[dict], max_ppl: float):
    """Objective values, feasibility, reference point and the grid's hypervolume."""
    import numpy as np

    from tensorwire.search.objectives import DIRECTIONS, Measurement
    from tensorwire.search.pareto import hypervolume, pareto_mask

    ms = [Measurement.from_dict(r["measurement"]) for r in records]
    values = np.array([m.values() for m in ms])
    feasible = np.array([m.ppl_increase <= max_ppl for m in ms])
    reference = (0.0, math.log1p(max_ppl), math.log10(REFERENCE_BPS))
    total = hypervolume(values[feasible], reference, DIRECTIONS)
    front = np.zeros(len(ms), dtype=bool)
    front[np.flatnonzero(feasible)[pareto_mask(values[feasible], DIRECTIONS)]] = True
    return values, feasible, reference, total, front


def first_reaching(curve, target: float) -> int | None:
    """1-based number of evaluations after which ``curve`` reaches ``target`` (None: never)."""
    for i, v in enumerate(curve):
        if v >= target - 1e-12:
            return i + 1
    return None


def run_search(space, lookup_table, method: str, seed: int, budget, max_evals: int, startup: int, index, values,
               feasible, reference, total, repeats: str = "prune") -> dict:  # fmt: skip
    import optuna

    from tensorwire.search.objectives import DIRECTIONS
    from tensorwire.search.pareto import hypervolume_history
    from tensorwire.search.study import ProfileSearch

    measure = GridLookup(lookup_table)
    search = ProfileSearch(space, measure, sampler=method, seed=seed, budget=budget, cheap_first=False,
                           n_startup_trials=startup, worker=f"replay-{method}-{seed}", repeats=repeats)  # fmt: skip
    stop_at = {"evals": max_evals}

    def enough(study, trial):
        if len(measure.order) >= stop_at["evals"]:
            study.stop()

    began = time.perf_counter()
    search.optimize(n_trials=100 * max_evals, callbacks=[enough])
    seconds = time.perf_counter() - began
    rows = [index[k] for k in measure.order]
    curve = hypervolume_history(values[rows], reference, DIRECTIONS, feasible=feasible[rows]) / total
    trials = search.study.trials
    # Trials (draws, repeats and skips included) spent up to each evaluation.
    trial_of_eval = [t.number + 1 for t in trials if t.user_attrs.get("evaluations", 0) > 0]
    out = {"method": method, "seed": seed, "evaluations": len(rows), "trials": len(trials),
           "repeats": sum("duplicate_of" in t.user_attrs for t in trials),
           "skipped": sum(t.state == optuna.trial.TrialState.PRUNED for t in trials),
           "seconds": seconds, "hv_fraction": [round(float(v), 6) for v in curve]}  # fmt: skip
    for target in (0.9, 0.95, 0.99):
        n = first_reaching(curve, target)
        out[f"evals_to_{int(target * 100)}"] = n
        out[f"trials_to_{int(target * 100)}"] = None if n is None else trial_of_eval[n - 1]
    return out


def random_permutation(n_configs: int, seed: int, values, feasible, reference, total) -> dict:
    """Uniform random order of the grid (sampling without replacement): the other random baseline."""
    import numpy as np

    from tensorwire.search.objectives import DIRECTIONS
    from tensorwire.search.pareto import hypervolume_history

    order = np.random.default_rng(seed).permutation(n_configs)
    curve = hypervolume_history(values[order], reference, DIRECTIONS, feasible=feasible[order]) / total
    out = {"method": "permutation", "seed": seed, "evaluations": n_configs,
           "hv_fraction": [round(float(v), 6) for v in curve]}  # fmt: skip
    for target in (0.9, 0.95, 0.99):
        out[f"evals_to_{int(target * 100)}"] = first_reaching(curve, target)
    return out


def stats(xs: list) -> dict:
    done = [x for x in xs if x is not None]
    if not done:
        return {"mean": None, "std": None, "median": None, "min": None, "max": None, "missed": len(xs)}
    return {"mean": statistics.fmean(done), "std": statistics.stdev(done) if len(done) > 1 else 0.0,
            "median": statistics.median(done), "min": min(done), "max": max(done), "missed": len(xs) - len(done)}  # fmt: skip


def cmd_replay(args: argparse.Namespace) -> int:
    import optuna

    from tensorwire.search.objectives import Budget
    from tensorwire.sysinfo import machine_info
    from tensorwire.search.space import config_key

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path = Path(args.grid) if args.grid else RESULTS / f"grid_{GRID_ID}.json"
    grid = json.loads(path.read_text())
    records = grid["records"]
    space = grid_space()
    keys = [config_key(space.build(c)) for c in space.configs()]
    table = {r["key"]: r["measurement"] for r in records}
    missing = [k for k in keys if k not in table]
    if missing:
        raise SystemExit(f"the grid lacks {len(missing)} of the space's {len(keys)} configs; run `run.py grid` first")
    index = {r["key"]: i for i, r in enumerate(records)}
    values, feasible, reference, total, front = hv_setup(records, args.max_ppl_increase)
    budget = Budget(args.max_ppl_increase, 100.0)  # the grid has no retrieval cases
    print(f"grid: {len(records)} configs, {int(feasible.sum())} within ppl_increase <= {args.max_ppl_increase}, "
          f"{int(front.sum())} on the feasible 3-D Pareto front; HV {total:.4f}", flush=True)  # fmt: skip
    runs = []
    for method, cap in (("tpe", args.max_evals), ("random", args.max_evals_random)):
        for seed in args.seeds:
            run = run_search(space, table, method, seed, budget, cap, args.startup, index, values, feasible, reference,
                             total)  # fmt: skip
            runs.append(run)
            print(f"  {method:<6} seed {seed}: 95% HV after {run['evals_to_95']} evaluations ({run['trials_to_95']} trials), "
                  f"{run['evaluations']} evaluations in {run['seconds']:.0f} s", flush=True)  # fmt: skip
    for seed in args.seeds:
        runs.append(random_permutation(len(records), seed, values, feasible, reference, total))
    summary = {}
    for method in ("tpe", "random", "permutation"):
        mine = [r for r in runs if r["method"] == method]
        summary[method] = {f"evals_to_{t}": stats([r[f"evals_to_{t}"] for r in mine]) for t in (90, 95, 99)}
        if method != "permutation":
            summary[method]["trials_to_95"] = stats([r["trials_to_95"] for r in mine])
    result = {
        "grid": {"file": path.name, "size": len(records), "settings": grid["settings"], "stages": grid["stages"],
                 "feasible": int(feasible.sum()), "pareto_front": int(front.sum()), "hypervolume": total,
                 "pareto_configs": [records[i]["key"] for i in range(len(records)) if front[i]]},
        "hypervolume": {"objectives": ["log2_ratio", "quality_loss=log1p(ppl_increase)", "log10_codec_bps"],
                        "reference": {"ratio": 1.0, "ppl_increase": args.max_ppl_increase, "codec_bps": REFERENCE_BPS},
                        "feasible": f"ppl_increase <= {args.max_ppl_increase}"},
        "search": {"sampler_tpe": "TPESampler(multivariate=True, group=True), MO, constraints via set_constraint",
                   "n_startup_trials": args.startup, "seeds": args.seeds, "max_evals": args.max_evals,
                   "max_evals_random": args.max_evals_random, "cheap_first": False,
                   "evaluation": "a distinct config measured (a repeated draw is answered from the study and costs none)"},
        "summary": summary,
        "runs": runs,
        "machine": machine_info(("torch", "optuna")),
    }
    stem = RESULTS / f"replay_{GRID_ID}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    text = format_table(result)
    stem.with_suffix(".txt").write_text(text + "\n")
    plot_replay(result, stem.with_suffix(".png"))
    print(text)
    return 0


def _cell(x: dict, spread: bool) -> str:
    if x["mean"] is None:
        return "never"
    text = f"{x['mean']:.0f} ± {x['std']:.0f}" + (f" ({x['min']}-{x['max']})" if spread else "")
    return text + (f" +{x['missed']} missed" if x["missed"] else "")


def format_table(result: dict) -> str:
    g = result["grid"]
    lines = [
        (f"grid: {g['size']} configs measured once ({g['settings']}), {g['feasible']} within the budget, "
         f"{g['pareto_front']} on the feasible 3-D Pareto front"),
        f"{'method':<30} {'evals to 90% HV':>17} {'evals to 95% HV':>22} {'evals to 99% HV':>17} {'grid/evals@95':>14}",
    ]
    names = {"tpe": "Bayesian (MO-TPE)", "random": "random (optuna RandomSampler)", "permutation": "random order of the grid"}
    for method, s in result["summary"].items():
        cells = [_cell(s[f"evals_to_{t}"], t == 95) for t in (90, 95, 99)]
        mean95 = s["evals_to_95"]["mean"]
        factor = f"{g['size'] / mean95:.0f}x" if mean95 else "-"
        lines.append(f"{names[method]:<30} {cells[0]:>17} {cells[1]:>22} {cells[2]:>17} {factor:>14}")
    lines.append(f"(mean ± std over seeds {result['search']['seeds']}, min-max in brackets; "
                 "an evaluation = one distinct config measured)")  # fmt: skip
    return "\n".join(lines)


def plot_replay(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    colours = {"tpe": "tab:blue", "random": "tab:orange", "permutation": "tab:gray"}
    names = {"tpe": "Bayesian (MO-TPE)", "random": "random (optuna)", "permutation": "random order of the grid"}
    for method in ("permutation", "random", "tpe"):
        runs = [r for r in result["runs"] if r["method"] == method]
        for r in runs:
            ax.plot(np.arange(1, len(r["hv_fraction"]) + 1), r["hv_fraction"], color=colours[method], alpha=0.3, lw=0.8)
        n = min(len(r["hv_fraction"]) for r in runs)
        median = np.median(np.array([r["hv_fraction"][:n] for r in runs]), axis=0)
        ax.plot(np.arange(1, n + 1), median, color=colours[method], lw=2.2, label=f"{names[method]} (median of {len(runs)})")
    size = result["grid"]["size"]
    ax.axhline(0.95, color="black", ls="--", lw=0.8, label="95 % of the grid's hypervolume")
    ax.axvline(size / 50, color="crimson", ls=":", lw=1.2, label=f"grid size / 50 = {size / 50:.0f}")
    ax.set_xscale("log")
    ax.set_xlim(1, size)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("evaluations (distinct pipeline configs measured)")
    ax.set_ylabel("hypervolume / grid hypervolume")
    ax.set_title(f"Search vs grid ({size} configs): feasible 3-D Pareto front found")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, which="both", alpha=0.25)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("grid", help="measure every config of the sub-space once (long; resumable)")
    g.add_argument("--torch-threads", type=int, default=1, help="threads of the model forward passes (default 1)")
    g.set_defaults(func=cmd_grid)
    t = sub.add_parser("retime", help="time every grid config's codec again in one sitting")
    t.add_argument("--torch-threads", type=int, default=1, help="threads of the model forward passes (default 1)")
    t.set_defaults(func=cmd_retime)
    lib = sub.add_parser("retime-library", help="time a profile library's codecs again (ratio and quality kept)")
    lib.add_argument("library", help="profile library JSON, rewritten in place")
    lib.add_argument("--torch-threads", type=int, default=1, help="threads of the model forward passes (default 1)")
    lib.set_defaults(func=cmd_retime_library)
    sens = sub.add_parser("sensitivity", help="per-layer K/V sensitivity scan and mixed-precision allocations")
    sens.add_argument("--budgets", type=float, nargs="+", default=[0.005, 0.01, 0.02, 0.03],
                      help="allocation budgets (summed added increases over the widest width; they order allocations)")
    sens.add_argument("--rescan", action="store_true", help="measure the scan again (else results/sensitivity.json)")
    sens.add_argument("--scan-windows", type=int, default=8,
                      help="perplexity windows per scan measurement (2 proved too noisy: see README)")
    sens.add_argument("--bits", type=int, nargs="+", default=[3, 4], help="candidate widths of the scan")
    sens.add_argument("--torch-threads", type=int, default=2)
    sens.set_defaults(func=cmd_sensitivity)
    r = sub.add_parser("replay", help="Bayesian vs random search, replayed against the cached grid")
    r.add_argument("--grid", help="grid JSON (default results/grid_<id>.json)")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    r.add_argument("--max-ppl-increase", type=float, default=0.03, help="quality budget (feasible points)")
    r.add_argument("--max-evals", type=int, default=300, help="evaluations per Bayesian run")
    r.add_argument("--max-evals-random", type=int, default=1600, help="evaluations per random run")
    r.add_argument("--startup", type=int, default=10, help="random trials before TPE models")
    r.set_defaults(func=cmd_replay)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
