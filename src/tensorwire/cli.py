"""The ``tensorwire`` command line: one thin function per subcommand.

Exit codes: 0 success, 1 the input is bad or a check failed (a tensorwire error, printed
as one line), 2 wrong usage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputExists, TensorwireError

__all__ = ["main"]

EPILOG = """\
examples:
  tensorwire compress model.safetensors            # writes model.twz
  tensorwire compress ./Llama-checkpoint/          # writes ./Llama-checkpoint-twz/
  tensorwire decompress model.twz out.safetensors  # byte-identical to the original
  tensorwire inspect model.twz                     # header and per-tensor ratios, no decoding
  tensorwire verify model.twz                      # checksums + full decode
  tensorwire bench weights --json bench.json       # side-by-side with zstd, lz4, ZipNN, blosc
  tensorwire demo                                  # prefill/decode workers on a shaped link, raw vs compressed
  tensorwire serve --gbps 1                        # the workers + an OpenAI-compatible API on :8000
  tensorwire kv eval --pipeline kivi-2 --text wiki.txt   # KV ratio, perplexity, retrieval, speed
  tensorwire explain profiles.json --tokens 4096 --gbps 10 --slo-ms 100   # which KV pipeline, and why
  tensorwire simulate --library profiles.json      # controller vs baselines on bandwidth traces
  tensorwire profile --text wiki.txt --trials 60 --workers 2   # offline search -> profiles.json + Pareto plot
  tensorwire diagnose run -- torchrun --nproc-per-node 4 train.py   # which rank makes a collective slow or hang
"""


def _threads(n: int | None) -> None:
    if n:
        from .codec.cpu import set_threads

        set_threads(n)


@contextmanager
def _progress(total: int, label: str, quiet: bool):
    if quiet or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    with Progress("[bold]" + label, BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def _input_bytes(path: Path, suffix: str) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.suffix == suffix)
    return path.stat().st_size


def _refuse_overwrite(target: Path, force: bool) -> None:
    if target.exists() and not force:
        raise OutputExists(f"{target} exists; pass --force to overwrite it")


def cmd_compress(args: argparse.Namespace) -> int:
    from .integrations.safetensors import compress_path, compressed_path

    src = Path(args.input)
    target = Path(args.output) if args.output else compressed_path(src)
    _refuse_overwrite(target, args.force)
    _threads(args.threads)
    size = _input_bytes(src, ".safetensors")
    start = time.perf_counter()
    with _progress(size, "compress", args.quiet) as advance:
        compress_path(src, target, level=args.level, chunk_bytes=args.chunk_mib << 20, progress=advance)
    seconds = time.perf_counter() - start
    out_size = _input_bytes(target, ".twz")
    print(f"{src} -> {target}: {size:,} -> {out_size:,} bytes, ratio {size / max(out_size, 1):.4f}, "
          f"{size / seconds / 1e9:.2f} GB/s")  # fmt: skip
    return 0


def cmd_decompress(args: argparse.Namespace) -> int:
    from .integrations.safetensors import decompress_path, restored_path

    src = Path(args.input)
    target = Path(args.output) if args.output else restored_path(src)
    _refuse_overwrite(target, args.force)
    _threads(args.threads)
    start = time.perf_counter()
    with _progress(_input_bytes(src, ".twz"), "decompress", args.quiet) as advance:
        decompress_path(src, target, progress=advance)
    size = _input_bytes(target, ".safetensors")
    print(f"{src} -> {target}: {size:,} bytes, {size / (time.perf_counter() - start) / 1e9:.2f} GB/s")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .container.inspect import describe

    info = describe(args.file)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{info['path']}[/]: {info['file_bytes']:,} bytes holding {info['original_bytes']:,} "
                  f"(ratio {info['ratio']:.4f}), {len(info['tensors'])} tensors {info['dtypes']}, source: {info['source']}")  # fmt: skip
    if info["metadata"]:
        console.print(f"metadata: {info['metadata']}")
    table = Table("tensor", "dtype", "shape", "bytes", "stored", "ratio", "chunks")
    rows = info["tensors"] if args.all else info["tensors"][: args.limit]
    for t in rows:
        modes = ", ".join(f"{k}:{v}" for k, v in t["modes"].items())
        table.add_row(t["name"], t["dtype"], "x".join(map(str, t["shape"])), f"{t['bytes']:,}", f"{t['stored']:,}", f"{t['ratio']:.3f}", modes)
    console.print(table)
    if len(rows) < len(info["tensors"]):
        console.print(f"... {len(info['tensors']) - len(rows)} more (--all to list them)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .integrations.verify import verify_file

    _threads(args.threads)
    report = verify_file(args.file, against=args.against)
    print(report.summary())
    return 0 if report.ok else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from .benchmarking import weights

    _threads(None)
    result = weights.run(
        [args.file] if args.file else None,
        threads=tuple(args.threads_list),
        repeats=args.repeats,
        json_path=args.json,
        png_path=args.png,
        via=args.via,
    )
    print(weights.format_table(result))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import KV_LIBRARY, run_demo

    _threads(args.threads)
    library = None if args.no_kv else Path(args.kv_library) if args.kv_library else KV_LIBRARY
    return run_demo(Path(args.workdir), level=args.level, kv_library=library, weights=not args.no_weights,
                    gbps=args.gbps, shaper=args.shaper)  # fmt: skip


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve.cluster import ClusterConfig, serve_forever
    from .serve.http import ServerDefaults

    config = ClusterConfig(decode_workers=args.decode_workers, gbps=args.gbps, trace=args.trace,
                           trace_step_s=args.trace_step_s, trace_scale=args.trace_scale, rtt_ms=args.rtt_ms,
                           shaper=args.shaper, library=args.library, secret_file=args.secret_file, pool=args.pool,
                           pool_block_tokens=args.pool_block_tokens, pool_maxmemory=args.pool_maxmemory,
                           pool_shared=args.pool_shared, pool_gbps=args.pool_gbps)  # fmt: skip
    defaults = ServerDefaults(compression=args.compression, slo_ms=args.slo_ms, max_ppl_increase=args.max_ppl,
                              max_retrieval_drop=args.max_drop)  # fmt: skip
    serve_forever(config, http_host=args.host, http_port=args.port, defaults=defaults)
    return 0


def _diagnose_settings(args: argparse.Namespace):
    from .diagnose.analyzer import Settings

    return Settings(hang_timeout_s=args.hang_timeout, crash_after_s=args.crash_after)


def cmd_diagnose_run(args: argparse.Namespace) -> int:
    from .diagnose.launch import run

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    result = run(cmd, settings=_diagnose_settings(args), out_dir=args.out, stop_on_fault=not args.no_stop)
    print(result.text)
    if result.files:
        print(f"records: {result.files['records']}  report: {result.files['report']}")
    return 1 if result.findings or result.returncode else 0


def cmd_diagnose_analyze(args: argparse.Namespace) -> int:
    from .diagnose.analyzer import analyze_records
    from .diagnose.records import read_records
    from .diagnose.report import report_json, report_text

    header, records = read_records(args.records)
    analyzer = analyze_records(records, _diagnose_settings(args), world=header.get("world"),
                               final=not header.get("stopped", False))
    print(report_text(analyzer, title=str(args.records)))
    if args.json:
        Path(args.json).write_text(json.dumps(report_json(analyzer, records_file=str(args.records)), indent=1))
    return 1 if analyzer.findings else 0


def cmd_diagnose_simulate(args: argparse.Namespace) -> int:
    from .diagnose.faults import Fault
    from .diagnose.simulate import simulate

    settings = _diagnose_settings(args)
    rows = []
    for kind in args.kinds:
        rank = args.ranks // 3
        fault = None if kind == "clean" else Fault(kind, rank, args.onset, seconds=0.06 if kind != "slow_link" else 0.02,
                                                   peer=(rank + 1) % args.ranks)
        res = simulate(args.ranks, fault, steps=args.steps, settings=settings)
        rows.append({"kind": kind, "ranks": args.ranks, "records": res.records, "simulated_s": round(res.simulated_s, 2),
                     "analyze_s": round(res.analyze_s, 3),
                     "right": res.right, "seconds_to_detect": res.seconds_to_detect,
                     "named": [(f["kind"], f["ranks"]) for f in res.findings]})
        print(f"{kind:10} {args.ranks} ranks, {res.records} records over {res.simulated_s:.1f} s of job: "
              f"analyzed in {res.analyze_s:.2f} s, "
              f"{'right' if res.right else 'WRONG'} {rows[-1]['named']}"
              + (f", detected {res.seconds_to_detect:.2f} s after onset" if res.seconds_to_detect is not None else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(r["right"] for r in rows) else 1


def cmd_pool(args: argparse.Namespace) -> int:
    import os

    from .errors import BackendUnavailable, require
    from .serve.pool import clear_pool, pool_stats

    redis = require("redis")
    password = Path(args.password_file).read_text().strip() if args.password_file else os.environ.get("TENSORWIRE_POOL_PASSWORD")
    client = redis.Redis.from_url(args.url, password=password, socket_timeout=5.0, socket_connect_timeout=2.0)
    try:
        if args.pool_cmd == "clear":
            print(f"deleted {clear_pool(client, args.tenant)} blocks")
            return 0
        stats = pool_stats(client, args.block_tokens)
    except redis.RedisError as exc:
        raise BackendUnavailable(f"the pool at {args.url} cannot be used: {type(exc).__name__}: {exc}") from exc
    if args.json:
        print(json.dumps(stats, indent=1))
    else:
        for key, value in stats.items():
            if key == "by_pipeline":
                for tag, counts in value.items():
                    print(f"  pipeline {tag}: {counts['blocks']} blocks, {counts['stored_bytes']} bytes")
            else:
                print(f"{key:<18}{value:.4g}" if isinstance(value, float) else f"{key:<18}{value}")
    return 0


def cmd_kv_eval(args: argparse.Namespace) -> int:
    from .kv.pipeline import Pipeline
    from .kv.presets import resolve
    from .kv.quality import Evaluator
    from .models import load_smollm2

    pipelines = [(spec, Pipeline.from_config(resolve(spec))) for spec in args.pipeline]
    settings = eval_settings(args)
    model, tokenizer = load_smollm2()
    evaluator = Evaluator(model, tokenizer, settings)
    results = []
    for spec, pipeline in pipelines:
        result = evaluator.evaluate(pipeline)
        results.append({"name": spec, **result.to_dict()})
        if not args.quiet:
            _print_eval(spec, result)
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(settings), "results": results}, indent=2))
    return 0


def cmd_kv_warm(args: argparse.Namespace) -> int:
    from .kv.warmup import warm_up

    print(f"compiled or loaded the KV kernels of every preset and shipped profile in {warm_up():.1f} s")
    return 0


def _print_eval(name: str, r) -> None:
    retrieval = "-" if r.retrieval is None else f"{r.retrieval:.0f}% (base {r.retrieval_base:.0f}%)"
    gbps = lambda v: "-" if v is None else f"{v / 1e9:.2f}"  # noqa: E731
    print(
        f"{name}: ratio {r.ratio:.2f}x  ppl {r.ppl:.3f} ({r.ppl_increase * 100:+.2f}%, base {r.ppl_base:.3f})  "
        f"retrieval {retrieval}  key/value error {r.key_error:.4f}/{r.value_error:.4f}  "
        f"encode {gbps(r.encode_bps)} GB/s  decode {gbps(r.decode_bps)} GB/s  [{r.seconds:.1f} s]"
    )


def cmd_explain(args: argparse.Namespace) -> int:
    from .control import Controller, RequestContext, gbps
    from .control.explain import render
    from .kv.profiles import ProfileLibrary

    library = ProfileLibrary.load(args.library)
    context = RequestContext(tokens=args.tokens, kv_bytes=args.kv_bytes,
                             slo_s=float("inf") if args.slo_ms is None else args.slo_ms / 1e3,
                             max_ppl_increase=args.max_ppl, max_retrieval_drop=args.max_drop, workload=args.workload,
                             bandwidth_bps=gbps(args.gbps))  # fmt: skip
    # A fresh controller without exploring: residuals at their prior, the profiles as measured.
    controller = Controller(library, latency_model=args.model, overhead_s=args.overhead_ms / 1e3)
    decision = controller.choose(context, explore=False)
    if args.json:
        print(json.dumps(decision.to_dict(), indent=2, default=str))
    else:
        render(decision)
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from .control.report import format_table, plot
    from .control.simulate import Scenario, example_library, run_suite
    from .kv.profiles import ProfileLibrary

    if args.library:
        library, label = ProfileLibrary.load(args.library), args.library
    else:
        library = example_library()
        label = "built-in placeholder (tensorwire.control.simulate.example_library, NOT measured)"
    scenario = Scenario(n_requests=args.requests, max_ppl_increase=args.max_ppl, max_retrieval_drop=args.max_drop,
                        latency_model=args.model)  # fmt: skip
    keep_series = bool(args.png or args.json)  # the table alone needs no per-request series
    result = run_suite(library, args.trace, scenario, args.seeds, library_label=label, keep_series=keep_series)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result))
    if args.png:
        plot(result, args.png)
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from .search.runner import run_profile

    run_profile(profile_settings(args), log=None if args.quiet else print)
    return 0


# Checked by EvalSettings (kv/quality.py): importing it here would slow every command's start.
QUESTION_HELP = ("where the retrieval question sits: 'after' the compressed context (a stored context reused "
                 "later) or 'in_prompt', inside the compressed prompt (disaggregated prefill and decode)")
# The profile search measures every candidate's full pass on all its retrieval cases; fewer
# than kv eval's 50 (EvalSettings' default) keep a trial short, at 5 points a missed case.
PROFILE_NEEDLES = 20
EVAL_DEST = "eval_"  # args.eval_<field>: the EvalSettings fields, read by eval_settings


def add_eval_flags(p: argparse.ArgumentParser, *, needles: int | None = None, seed_flag: str = "--seed",
                   full_pass: bool = False) -> None:  # fmt: skip
    """Add the evaluation flags (``EvalSettings``' fields) to ``p``; :func:`eval_settings` reads them.

    A flag left out stays out of the parsed args, so that EvalSettings' own defaults apply.

    Parameters
    ----------
    p : argparse.ArgumentParser
        The subcommand's parser.
    needles : int, optional
        The command's default for ``--needles`` (None: EvalSettings').
    seed_flag : str
        The flag of ``EvalSettings.seed`` (``profile`` keeps ``--seed`` for its sampler).
    full_pass : bool
        Say in the help that windows and needles are the full pass's: the search's cheap
        pass uses one window and no retrieval case.
    """

    def flag(option: str, field: str, *, default=argparse.SUPPRESS, **kwargs) -> None:
        p.add_argument(option, dest=EVAL_DEST + field, metavar=field.upper(), default=default, **kwargs)

    windows_help, needles_help = "perplexity windows", "retrieval cases (planted facts)"
    if full_pass:
        windows_help, needles_help = windows_help + " of the full pass (the cheap pass uses 1)", needles_help + " of the full pass"
    if needles is not None:
        needles_help += f" (default {needles})"
    flag("--text", "text", required=True, help="UTF-8 text file to measure on (e.g. WikiText-2 raw test)")
    flag("--context", "context", type=int, help="prefix tokens whose KV cache is compressed")
    flag("--continuation", "continuation", type=int, help="tokens scored after the prefix")
    flag("--windows", "windows", type=int, help=windows_help)
    flag("--needles", "needles", type=int, default=argparse.SUPPRESS if needles is None else needles, help=needles_help)
    flag(seed_flag, "seed", type=int, help="seed that draws the retrieval cases")
    flag("--question", "question", help=QUESTION_HELP)


def eval_settings(args: argparse.Namespace):
    """The ``EvalSettings`` of the flags :func:`add_eval_flags` added (it checks them)."""
    from .kv.quality import EvalSettings

    return EvalSettings(**{k[len(EVAL_DEST):]: v for k, v in vars(args).items() if k.startswith(EVAL_DEST)})


def profile_settings(args: argparse.Namespace):
    """The ``ProfileSettings`` of ``tensorwire profile``'s flags."""
    from .search.objectives import Budget
    from .search.runner import ProfileSettings

    return ProfileSettings(eval_settings(args), trials=args.trials, storage=args.storage, study_name=args.study_name,
                           workers=args.workers, out=args.out, png=args.png, seed=args.seed, sampler=args.sampler,
                           budget=Budget(args.max_ppl_increase, args.max_retrieval_drop))  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tensorwire",
        description="Lossless compression of model weights (ENEC method): .safetensors <-> .twz.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"tensorwire {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--threads", type=int, default=None, help="CPU threads for the codec (default: all cores)")

    p = sub.add_parser("compress", help="compress a .safetensors file or a model folder")
    p.add_argument("input", help="X.safetensors, or a folder of shards (+ index json)")
    p.add_argument("output", nargs="?", help="default: X.twz, or FOLDER-twz/ beside the folder")
    p.add_argument("--level", choices=("fast", "max"), default="fast",
                   help="fast: fixed-width block codes (fastest); max: Huffman exponents (best ratio)")  # fmt: skip
    p.add_argument("--chunk-mib", type=int, default=4, help="MiB of original data per chunk (default 4)")
    p.add_argument("--force", action="store_true", help="overwrite the output if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    common(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("decompress", help="restore the .safetensors file (byte-identical) or folder")
    p.add_argument("input", help="X.twz or a FOLDER-twz/")
    p.add_argument("output", nargs="?", help="default: X.safetensors, or FOLDER-restored/")
    p.add_argument("--force", action="store_true", help="overwrite the output if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    common(p)
    p.set_defaults(func=cmd_decompress)

    p = sub.add_parser("inspect", help="show the header and per-tensor ratios without decoding")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--all", action="store_true", help="list every tensor")
    p.add_argument("--limit", type=int, default=20, help="tensors to list without --all (default 20)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="check every checksum and decode every tensor")
    p.add_argument("file")
    p.add_argument("--against", help="a .safetensors file that must hold the same tensors, bit for bit")
    common(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("bench", help="benchmarks side by side with peers")
    bench = p.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")
    b = bench.add_parser("weights", help="ratio and throughput vs zstd, lz4, ZipNN, blosc, entropy bound")
    b.add_argument("file", nargs="?", help="a .safetensors file (default: the real MiniLM weights)")
    b.add_argument("--json", help="write every repeat to this JSON file")
    b.add_argument("--png", help="write ratio-vs-throughput plot here")
    b.add_argument("--repeats", type=int, default=7)
    b.add_argument("--threads", dest="threads_list", type=int, nargs="+", default=[1, 2], help="thread counts to measure")
    b.add_argument("--via", default="F32", help="cast the weights to this dtype first (BF16: an upcast checkpoint's F32/F16 rows)")
    b.set_defaults(func=cmd_bench)

    p = sub.add_parser("kv", help="KV-cache compression on a real model (SmolLM2-135M-Instruct)")
    kv = p.add_subparsers(dest="kv_command", required=True, metavar="ACTION")
    k = kv.add_parser("eval", help="ratio, perplexity, retrieval, error and speed of pipelines")
    k.add_argument("--pipeline", action="append", required=True,
                   help="a preset name (bf16, kivi-2, kivi-4, cachegen, snapkv-0.5, ...), JSON, or a JSON file; repeatable")
    add_eval_flags(k)
    k.add_argument("--json", help="write the results here")
    k.add_argument("--quiet", action="store_true")
    k.set_defaults(func=cmd_kv_eval)
    k = kv.add_parser("warm", help="compile the KV kernels ahead (numba's disk cache), so no request pays it")
    k.set_defaults(func=cmd_kv_warm)

    p = sub.add_parser("explain", help="which KV pipeline the controller picks for a request, and why")
    p.add_argument("library", help="profile library JSON (from the offline search)")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--tokens", type=int, help="context length (KV size from the library's model shape)")
    size.add_argument("--kv-bytes", type=int, help="KV cache size in bytes")
    p.add_argument("--gbps", type=float, required=True, help="link bandwidth, Gbit/s")
    p.add_argument("--slo-ms", type=float, default=None, help="latency objective for the transfer, ms (default: none)")
    p.add_argument("--max-ppl", type=float, default=float("inf"), help="max relative perplexity increase (0.01 = 1%%)")
    p.add_argument("--max-drop", type=float, default=float("inf"), help="max retrieval accuracy drop, points")
    p.add_argument("--workload", default="default", help="workload class")
    p.add_argument("--model", choices=("pipelined", "serial"), default="pipelined", help="latency model")
    p.add_argument("--overhead-ms", type=float, default=0.0, help="fixed per-request overhead, ms")
    p.add_argument("--json", action="store_true", help="print the decision as JSON")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("simulate", help="the KV controller vs baselines and an oracle on bandwidth traces")
    p.add_argument("--library", help="profile library JSON (default: a built-in placeholder, NOT measured)")
    p.add_argument("--trace", nargs="+", default=["step", "walk", "bursty"],
                   help="step, walk, bursty, or trace files (one Gbps value per line)")  # fmt: skip
    p.add_argument("--requests", type=int, default=2000, help="requests per run (default 2000)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (one run per trace per seed)")
    p.add_argument("--max-ppl", type=float, default=0.03, help="quality budget: max relative perplexity increase")
    p.add_argument("--max-drop", type=float, default=2.0, help="quality budget: max retrieval drop, points")
    p.add_argument("--model", choices=("pipelined", "serial"), default="pipelined", help="latency model")
    p.add_argument("--json", help="write the full result (metrics + per-request series) here")
    p.add_argument("--png", help="write the latency-over-time plot here")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("profile", help="offline Bayesian search of KV pipelines -> profile library + Pareto plot")
    add_eval_flags(p, needles=PROFILE_NEEDLES, seed_flag="--eval-seed", full_pass=True)
    p.add_argument("--trials", type=int, default=60, help="trials to add to the study (all workers together)")
    p.add_argument("--storage", help="optuna storage URL shared by the workers (default: sqlite:///OUT.db)")
    p.add_argument("--study-name", default="tensorwire-profile", help="study to create or join")
    p.add_argument("--workers", type=int, default=1, help="search processes on this machine")
    p.add_argument("--out", default="profiles.json", help="profile library to write (default profiles.json)")
    p.add_argument("--png", help="write the Pareto plot here")
    p.add_argument("--max-ppl-increase", type=float, default=0.03, help="quality budget: relative perplexity increase")
    p.add_argument("--max-retrieval-drop", type=float, default=2.0, help="quality budget: retrieval drop, points")
    p.add_argument("--sampler", choices=("tpe", "gp", "random"), default="tpe", help="optuna sampler (default tpe)")
    p.add_argument("--seed", type=int, default=0,
                   help="sampler seed (worker i uses seed + i); the retrieval cases' seed is --eval-seed")  # fmt: skip
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("demo", help="disaggregated serving raw vs compressed, then the weights codec (the README's main job)")
    p.add_argument("--workdir", default="out/demo", help="where to write the files (default out/demo)")
    p.add_argument("--level", choices=("fast", "max"), default="fast")
    p.add_argument("--kv-library", metavar="PROFILES_JSON",
                   help="profile library of the KV part (default: the one measured for SmolLM2 that ships with tensorwire)")
    p.add_argument("--no-kv", action="store_true", help="weights only: skip the serving part")
    p.add_argument("--no-weights", action="store_true", help="serving only: skip the weights part")
    p.add_argument("--gbps", type=float, default=0.1, help="link between the prefill and decode worker (default 0.1)")
    p.add_argument("--shaper", choices=("auto", "tbf", "token-bucket", "none"), default="auto",
                   help="auto: the kernel's tbf in a network namespace where allowed, else a sender-side token bucket")
    common(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="prefill and decode workers + the OpenAI-compatible API (Ctrl-C stops all)")
    p.add_argument("--host", default="127.0.0.1", help="where the API listens (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="API port (default 8000)")
    p.add_argument("--decode-workers", type=int, default=1)
    link = p.add_mutually_exclusive_group()
    link.add_argument("--gbps", type=float, default=None, help="shape the prefill->decode link to this rate")
    link.add_argument("--trace", help="follow a bandwidth trace instead (step, walk, bursty)")
    p.add_argument("--trace-step-s", type=float, default=1.0, help="seconds per trace value")
    p.add_argument("--trace-scale", type=float, default=1.0, help="multiply the trace's rates by this")
    p.add_argument("--rtt-ms", type=float, default=0.0, help="round-trip time the sender adds per message")
    p.add_argument("--shaper", choices=("auto", "tbf", "token-bucket", "none"), default="auto")
    p.add_argument("--library", help="profile library JSON (default: the shipped SmolLM2 library)")
    p.add_argument("--secret-file", help="shared secret of the workers (created with mode 0600 when absent)")
    p.add_argument("--compression", default="auto", help="default per request: auto, raw or a profile name")
    p.add_argument("--slo-ms", type=float, default=None, help="default SLO for moving a request's KV cache")
    p.add_argument("--max-ppl", type=float, default=None, help="default quality budget: relative perplexity increase")
    p.add_argument("--max-drop", type=float, default=None, help="default quality budget: retrieval points")
    p.add_argument("--pool", action="store_true", help="start a Redis KV pool: stored prefixes are fetched, not recomputed")
    p.add_argument("--pool-block-tokens", type=int, default=256, help="tokens per pool block (default 256)")
    p.add_argument("--pool-maxmemory", default="1gb", help="the pool's Redis maxmemory (LRU eviction; default 1gb)")
    p.add_argument("--pool-shared", action="store_true", help="stored prefixes serve every tenant (default: per API key)")
    p.add_argument("--pool-gbps", type=float, default=None, help="shape the pool link to this rate (tbf, where allowed)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("diagnose", help="find the rank behind a slow or hung collective in a torch.distributed job")
    diag = p.add_subparsers(dest="diagnose_cmd", required=True, metavar="ACTION")

    def thresholds(q):
        q.add_argument("--hang-timeout", type=float, default=10.0, help="seconds in a collective that make a hang (default 10)")
        q.add_argument("--crash-after", type=float, default=2.0, help="seconds of silence that make a rank dead (default 2)")

    q = diag.add_parser("run", help="run a job with the probe in every rank and the analyzer online: run -- torchrun ...")
    q.add_argument("--out", default="out/diagnose", help="where records.jsonl and report.json go (default out/diagnose)")
    q.add_argument("--no-stop", action="store_true", help="let a hung, crashed or desynced job run on (default: stop it)")
    q.add_argument("cmd", nargs=argparse.REMAINDER, help="-- the job's command, e.g. torchrun --nproc-per-node 4 train.py")
    thresholds(q)
    q.set_defaults(func=cmd_diagnose_run)
    q = diag.add_parser("analyze", help="the same analysis from a saved records.jsonl")
    q.add_argument("records", type=Path)
    q.add_argument("--json", help="also write the report as JSON here")
    thresholds(q)
    q.set_defaults(func=cmd_diagnose_analyze)
    q = diag.add_parser("simulate", help="the analyzer on synthetic records of a large job (default 4,000 ranks)")
    q.add_argument("--ranks", type=int, default=4000)
    q.add_argument("--steps", type=int, default=30)
    q.add_argument("--onset", type=int, default=12)
    q.add_argument("--kinds", nargs="+", default=["clean", "straggler", "slow_link", "hang", "crash", "desync"],
                   choices=["clean", "straggler", "slow_link", "hang", "crash", "desync"])
    q.add_argument("--json", help="write the rows as JSON here")
    thresholds(q)
    q.set_defaults(func=cmd_diagnose_simulate)

    p = sub.add_parser("pool", help="the KV pool's Redis: what it holds (stats), or empty it (clear)")
    pool = p.add_subparsers(dest="pool_cmd", required=True)
    for name, what in (("stats", "blocks, bytes, tenants, memory, evictions"), ("clear", "delete the pool's blocks")):
        q = pool.add_parser(name, help=what)
        q.add_argument("--url", required=True, help="redis://HOST:PORT of the pool (tensorwire serve --pool prints it)")
        q.add_argument("--password-file", help="its password (default: $TENSORWIRE_POOL_PASSWORD)")
        q.add_argument("--tenant", help="clear: only this tenant's blocks")
        q.add_argument("--block-tokens", type=int, default=256, help="stats: tokens per block, for bytes per token")
        q.add_argument("--json", action="store_true", help="stats: print JSON")
        q.set_defaults(func=cmd_pool)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TensorwireError as exc:
        print(f"tensorwire: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        print(f"tensorwire: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
