"""The report of a simulation suite (:func:`tensorwire.control.simulate.run_suite`): a
plain-text table per trace and a plot of link speed, latency and regret over time.

matplotlib is imported only by :func:`plot`, so the table needs no plotting extra.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .simulate import ABANDON_WINDOW, MATERIAL, PLOTTED

__all__ = ["format_table", "plot"]


def _med(stat: dict[str, float] | None, scale: float = 1.0, fmt: str = "{:.3g}") -> str:
    return "-" if stat is None else fmt.format(stat["median"] * scale)


def _range(stat: dict[str, float] | None, fmt: str = "{:.3f}") -> str:
    if stat is None:
        return "-"
    lo, med, hi = (fmt.format(stat[k]) for k in ("min", "median", "max"))
    return med if lo == hi else f"{med} ({lo}-{hi})"


def _abandon(row: dict[str, Any]) -> str:
    runs = row.get("abandon_after_all") or []
    if not runs or all(v is None for v in runs) and not any(v == 0 for v in runs):
        return "never" if runs else "-"
    done = [v for v in runs if v is not None]
    text = f"{int(np.median(done))} ({max(done)})" if max(done) != min(done) else f"{done[0]}"
    return text + (f" +{len(runs) - len(done)} never" if len(done) < len(runs) else "")


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table per trace. Absolute numbers are medians over seeds (each seed has its
    own trace and requests); "/oracle" also gives min-max; "abandon" gives median (max)."""
    title = (f"library: {result['library']['label'] or '(in memory)'}  model: {result['library']['model']['name']}  "
             f"seeds: {result['seeds']}  requests/run: {result['scenario']['n_requests']}")  # fmt: skip
    lines = [title]
    source = result["library"]["machine"].get("source")
    if source:
        lines.append(f"library source: {source}")
    for tname, tres in result["traces"].items():
        s = tres["summary"]
        first = tres["runs"][0]
        lines.append("")
        lines.append(f"== {tname}: {first['trace']['description']}; slowed x{first['mismatch']['factor']:g} from request "
                     f"{first['mismatch']['at_request']}: {', '.join(sorted(set(map(str, s['_mismatch']))))}; "
                     f"raw region >= {first['high_bandwidth_gbps']:.3g} Gbps")  # fmt: skip
        header = (f"{'policy':<27} {'mean ms':>8} {'p99 ms':>8} {'mean/oracle (min-max)':>22} {'SLO miss':>8} "
                  f"{'regret s':>9} {'abandon':>9} {'raw|best':>8} {'raw@hi':>6}")  # fmt: skip
        lines.append(header)
        lines.append("-" * len(header))
        for name, row in s.items():
            if name.startswith("_"):
                continue
            marks = " *" if name in s["_best_static"] else ""
            lines.append(f"{(name + marks):<27} {_med(row.get('mean_s'), 1e3):>8} {_med(row.get('p99_s'), 1e3):>8} "
                         f"{_range(row.get('mean_vs_oracle')):>22} {_med(row.get('slo_violations'), 1, '{:.0f}'):>8} "
                         f"{_med(row.get('regret_s'), 1, '{:.3g}'):>9} {_abandon(row):>9} "
                         f"{_med(row.get('raw_when_oracle_raw'), 100, '{:.0f}%'):>8} "
                         f"{_med(row.get('raw_share_high_bw'), 100, '{:.0f}%'):>6}")  # fmt: skip
        checks = ", ".join(f"{k}: {sum(bool(v) for v in vs if v is not None)}/{sum(v is not None for v in vs)}"
                           for k, vs in s["_checks"].items())  # fmt: skip
        lines.append(f"controller targets met (runs): {checks}")
    lines.append("")
    lines.append("* best static policy in hindsight (in at least one run). abandon: decisions after the slowdown until "
                 f"{ABANDON_WINDOW} in a row without picking the slowed profile where it is > {MATERIAL - 1:.0%} slower than "
                 "the best. raw|best: share sent raw among requests where raw is truly fastest; raw@hi: share sent raw "
                 "above the raw-region bandwidth.")  # fmt: skip
    return "\n".join(lines)


def plot(result: dict[str, Any], png_path: str | os.PathLike[str], window: int = 50) -> None:
    """Bandwidth, rolling-mean latency per policy and cumulative regret, one column per trace
    (the first seed's run)."""
    from ..errors import require

    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = [(name, t["runs"][0]) for name, t in result["traces"].items() if "series" in t["runs"][0]]
    if not traces:
        return
    fig, axes = plt.subplots(3, len(traces), figsize=(6 * len(traces), 10), squeeze=False, sharex="col")
    for col, (name, run) in enumerate(traces):
        series = run["series"]
        x = np.arange(len(series["gbps"]))
        shown = [*PLOTTED[:-1], run["best_static"], "oracle"]
        shown = list(dict.fromkeys(s for s in shown if s and s in series["policies"]))
        oracle = np.asarray(series["policies"]["oracle"]["latency_s"])
        ax_bw, ax_lat, ax_reg = axes[0, col], axes[1, col], axes[2, col]
        ax_bw.plot(x, series["gbps"], color="k", lw=0.8)
        ax_bw.set_yscale("log")
        ax_bw.set_ylabel("link (Gbps)")
        ax_bw.set_title(f"{name}: {run['trace']['description']}", fontsize=9)
        kernel = np.ones(window) / window
        for k, pname in enumerate(shown):
            lat = np.asarray(series["policies"][pname]["latency_s"])
            label = pname + (" (best static)" if pname == run["best_static"] else "")
            style = {"lw": 1.0, "label": label, "color": f"C{k}"}  # one colour per policy in every panel
            ax_lat.plot(x[window - 1:], np.convolve(lat, kernel, mode="valid") * 1e3, **style)
            if pname not in ("oracle", "always-raw"):  # raw's regret would flatten every other curve
                ax_reg.plot(x, np.cumsum(lat - oracle), **style)
        ax_lat.set_yscale("log")
        ax_lat.set_ylabel(f"latency, ms (mean of {window})")
        ax_reg.set_yscale("symlog", linthresh=0.1)
        ax_reg.set_ylabel("cumulative regret vs oracle (s)")
        ax_reg.legend(fontsize=7)
        ax_reg.set_xlabel("request")
        m = run["mismatch"]
        if m["profile"]:
            for ax in (ax_bw, ax_lat, ax_reg):
                ax.axvline(m["at_request"], color="r", ls=":", lw=0.8)
            ax_lat.annotate(f"{m['profile']} x{m['factor']:g} slower", (m["at_request"], ax_lat.get_ylim()[1]),
                            fontsize=7, color="r", va="top")  # fmt: skip
        ax_lat.legend(fontsize=7)
    label = result["library"]["label"] or "(in memory)"
    fig.suptitle(f"tensorwire controller vs baselines, library: {label}", fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
