"""The online controller vs baselines and an oracle, on bandwidth traces (simulation).

    python benchmarks/control/run.py                              # placeholder library (NOT measured)
    python benchmarks/control/run.py --library profiles.json      # any profile library file
    python benchmarks/control/run.py --requests 500 --seeds 0     # quick look

Writes results/<stem>.json (machine, versions, the library used and its sha256, the scenario,
every run's metrics, the first seed's per-request series) and results/<stem>.png (link speed,
rolling-mean latency per policy and cumulative regret vs the oracle, one column per trace),
and prints the table README.md quotes. <stem> is "latest" for the placeholder library and
the library file's stem otherwise. The engine is ``tensorwire.control.simulate``, the table
and plot ``tensorwire.control.report`` (both also behind ``tensorwire simulate``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))  # run from a checkout without installing


from tensorwire.control.latency_model import break_even_bandwidth, to_gbps
from tensorwire.control.report import format_table, plot
from tensorwire.control.simulate import Scenario, example_library, run_suite
from tensorwire.kv.profiles import ProfileLibrary
from tensorwire.sysinfo import machine_info


def library_table(library: ProfileLibrary, max_ppl: float, max_drop: float) -> str:
    """Per profile: what the controller believes, and where each profile beats raw."""
    header = (f"{'profile':<24} {'ratio':>6} {'ppl +%':>7} {'drop':>5} {'enc GB/s':>9} {'dec GB/s':>9} {'thr':>4} "
              f"{'beats raw below (Gbps): serial':>31} {'pipelined':>10} {'in budget':>10}")  # fmt: skip
    lines = [header]
    for p in library:
        serial = to_gbps(break_even_bandwidth(p.ratio, p.encode_rate, p.decode_rate))
        piped = to_gbps(break_even_bandwidth(p.ratio, p.encode_rate, p.decode_rate, n_layers=library.model.n_layers))
        lines.append(f"{p.name:<24} {p.ratio:>6.2f} {p.ppl_increase * 100:>7.2f} {p.retrieval_drop:>5.1f} "
                     f"{p.encode_bps / 1e9:>9.2f} {p.decode_bps / 1e9:>9.2f} {p.threads:>4} {serial:>31.1f} {piped:>10.1f} "
                     f"{'yes' if p.meets(max_ppl, max_drop) else 'no':>10}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--library", type=Path, help="profile library JSON (default: the built-in placeholder, NOT measured)")
    p.add_argument("--traces", nargs="+", default=["step", "walk", "bursty"], help="step, walk, bursty or trace files")
    p.add_argument("--requests", type=int, default=2000, help="requests per run (default 2000)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="one run per trace per seed")
    p.add_argument("--max-ppl", type=float, default=0.03, help="quality budget: relative ppl increase (default 0.03)")
    p.add_argument("--max-drop", type=float, default=2.0, help="quality budget: retrieval drop, points (default 2)")
    p.add_argument("--model", choices=("pipelined", "serial"), default="pipelined")
    p.add_argument("--json", type=Path, help="default results/<stem>.json")
    p.add_argument("--png", type=Path, help="default results/<stem>.png")
    args = p.parse_args(argv)

    if args.library:
        library = ProfileLibrary.load(args.library)
        label, stem = str(args.library), args.library.stem
        digest = hashlib.sha256(args.library.read_bytes()).hexdigest()
    else:
        library, stem = example_library(), "latest"
        path = HERE / "results" / "placeholder_library.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        library.save(path)  # written out so that it can be inspected, explained and reused
        label = f"PLACEHOLDER {path.relative_to(HERE.parents[1])} (hand-set, NOT measured)"
        digest = hashlib.sha256(path.read_bytes()).hexdigest()

    scenario = Scenario(n_requests=args.requests, max_ppl_increase=args.max_ppl, max_retrieval_drop=args.max_drop,
                        latency_model=args.model)  # fmt: skip
    start = time.time()
    result = run_suite(library, args.traces, scenario, args.seeds, library_label=label,
                       progress=lambda m: print(f"[{time.time() - start:5.0f}s] {m}", file=sys.stderr, flush=True))  # fmt: skip
    result["library"]["sha256"] = digest
    result["machine"] = machine_info(("matplotlib",))
    result["wall_seconds"] = time.time() - start
    result["command"] = " ".join(["python", "benchmarks/control/run.py", *(argv if argv is not None else sys.argv[1:])])

    json_path = args.json or HERE / "results" / f"{stem}.json"
    png_path = args.png or HERE / "results" / f"{stem}.png"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result))
    plot(result, png_path)

    print(library_table(library, args.max_ppl, args.max_drop))
    print()
    print(format_table(result))
    print(f"\nwrote {json_path} and {png_path} in {result['wall_seconds']:.0f} s on {result['machine']['cpu_model']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
