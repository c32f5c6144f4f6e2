"""Human-readable decisions: what every candidate would cost and why one was chosen.

:func:`decision_rows` gives one dict of display strings per candidate, :func:`format_text`
the whole decision as plain text for logs, :func:`render` as a rich table. Any policy's
decision renders; ``tensorwire explain`` shows a fresh controller's (residuals at their
prior: the profiles as measured), made without exploring.

Example
-------
>>> from tensorwire.control import Controller, RequestContext, gbps
>>> from tensorwire.control.simulate import example_library
>>> ctx = RequestContext(tokens=4096, bandwidth_bps=gbps(10), slo_s=0.1, max_ppl_increase=0.02)
>>> d = Controller(example_library()).choose(ctx, explore=False)
>>> decision_rows(d)[0]["candidate"]
'kivi4-zstd'
"""

from __future__ import annotations

import math
from typing import Any

from ..kv.profiles import RAW
from .context import Decision
from .units import format_bandwidth, format_seconds

__all__ = ["decision_rows", "format_text", "render"]


def _be(bps: float) -> str:
    if bps == math.inf:
        return "always"
    if bps == 0.0:
        return "never"
    return f"< {format_bandwidth(bps)}"


def decision_rows(decision: Decision) -> list[dict[str, str]]:
    """One dict of display strings per candidate, fastest prediction first."""
    rows = []
    for c in sorted(decision.candidates, key=lambda c: (math.isnan(c.predicted), c.predicted)):
        rows.append({
            "": "->" if c.name == decision.choice else "",
            "candidate": c.name,
            "ratio": f"{c.ratio:.2f}",
            "ppl +%": f"{c.ppl_increase * 100:.2f}",
            "retr. -pts": f"{c.retrieval_drop:.2f}",
            "model": format_seconds(c.model_latency),
            "residual": f"{c.residual:.2f}" + (f" ({c.observations:.0f} obs)" if c.observations >= 0.5 else ""),
            "predicted": format_seconds(c.predicted),
            "SLO": "-" if not math.isfinite(decision.slo_s) else ("yes" if c.meets_slo else f"no ({format_seconds(c.upper)})"),
            "beats raw": "-" if c.name == RAW else _be(c.break_even_bps),
        })  # fmt: skip
    return rows


def _header(decision: Decision) -> str:
    size = "unknown size" if decision.kv_bytes is None else f"{decision.kv_bytes:,} bytes of KV cache"
    slo = format_seconds(decision.slo_s) if math.isfinite(decision.slo_s) else "none"
    return (f"{size}, link {format_bandwidth(decision.bandwidth_bps)} ({decision.bandwidth_source}), SLO {slo}, "
            f"workload {decision.workload!r}, policy {decision.policy}")  # fmt: skip


def format_text(decision: Decision) -> str:
    """The decision as plain text: header, one line per candidate, exclusions, reason."""
    lines = [_header(decision)]
    rows = decision_rows(decision)
    if rows:
        keys = list(rows[0])
        widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in keys}
        lines.append("  ".join(k.ljust(widths[k]) for k in keys))
        lines += ["  ".join(r[k].ljust(widths[k]) for k in keys) for r in rows]
    lines += [f"excluded {name}: {why}" for name, why in decision.excluded]
    lines.append(("FALLBACK " if decision.fallback else "") + f"choice: {decision.choice} - {decision.reason}")
    return "\n".join(lines)


def render(decision: Decision, console: Any = None) -> None:
    """Print the decision as a rich table (header, candidates, exclusions, reason)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    if console is None:  # the table is wide: do not squeeze it into 80 columns when piped
        console = Console(width=max(Console().width, 132))
    console.print(_header(decision), highlight=False)
    rows = decision_rows(decision)
    if rows:
        table = Table(box=box.SIMPLE_HEAD)
        for key in rows[0]:
            table.add_column(key, no_wrap=True, justify="left" if key in ("", "candidate", "SLO", "beats raw") else "right")
        for r in rows:
            table.add_row(*r.values(), style="bold green" if r[""] else None)
        console.print(table)
    for name, why in decision.excluded:
        console.print(f"[dim]excluded {name}: {why}[/]")
    tag = "[bold red]FALLBACK[/] " if decision.fallback else ""
    console.print(f"{tag}[bold]choice: {decision.choice}[/] - {decision.reason}", highlight=False)
