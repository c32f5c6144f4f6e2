"""Rendering decisions: rows per candidate, plain text and the rich table."""

import io

import pytest
from rich.console import Console

from tensorwire.control import RAW, Controller, ControlWarning, gbps
from tensorwire.control.explain import decision_rows, format_text, render

from .conftest import ctx


def test_rows_fastest_first_with_the_choice_marked(library):
    d = Controller(library).choose(ctx(bandwidth_bps=gbps(2), max_ppl_increase=0.01), explore=False)
    rows = decision_rows(d)
    assert [r["candidate"] for r in rows] == sorted((c.name for c in d.candidates), key=lambda n: d.candidate(n).predicted)
    assert [r["candidate"] for r in rows if r[""] == "->"] == [d.choice]
    assert next(r for r in rows if r["candidate"] == RAW)["beats raw"] == "-"


def test_text_and_table(library):
    d = Controller(library).choose(ctx(bandwidth_bps=gbps(2), max_ppl_increase=0.01), explore=False)
    text = format_text(d)
    assert "SLO 200 ms" in text and "excluded fast-lossy" in text and text.endswith(d.reason)
    out = io.StringIO()
    render(d, Console(file=out, width=200))
    assert f"choice: {d.choice}" in out.getvalue() and "excluded fast-lossy" in out.getvalue()


def test_fallback_is_flagged(library):
    with pytest.warns(ControlWarning, match="sending raw"):
        fallback = Controller(library).choose(ctx(tokens=-1), explore=False)
    assert format_text(fallback).splitlines()[-1].startswith("FALLBACK choice: raw")
