"""The analyzer's findings as one screen of text and as JSON."""

from __future__ import annotations

from dataclasses import asdict

from .analyzer import Analyzer, Finding

__all__ = ["finding_line", "report_json", "report_text"]


def finding_line(f: Finding) -> str:
    who = ", ".join(map(str, f.ranks)) if f.ranks else "all"
    when = f" after {f.seconds_to_detect:.2f} s" if f.seconds_to_detect is not None else ""
    return f"{f.kind.upper():10} rank {who:<8} detected{when}: {f.evidence}"


def report_json(analyzer: Analyzer, **extra) -> dict:
    return {"findings": [f.to_json() for f in analyzer.findings], "visibility": analyzer.visibility(),
            "settings": asdict(analyzer.settings), **extra}


def report_text(analyzer: Analyzer, title: str = "tensorwire diagnose") -> str:
    vis = analyzer.visibility()
    lines = [f"{title}: {vis['ranks_seen']}/{vis['world']} ranks seen, {vis['records']} records"]
    if not analyzer.findings:
        lines.append("no fault found")
    lines += [finding_line(f) for f in analyzer.findings]
    blind = []
    if vis["never_heard"]:
        blind.append(f"never heard from ranks {vis['never_heard']}")
    if vis["dropped_records"]:
        blind.append(f"records dropped by the probes (aggregator unreachable or slow): {vis['dropped_records']}")
    if vis["orphan_ends"]:
        blind.append(f"{vis['orphan_ends']} op ends whose start was lost")
    if blind:
        lines.append("could not see: " + "; ".join(blind))
    return "\n".join(lines)
