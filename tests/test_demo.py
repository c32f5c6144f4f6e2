"""The README's main job: its arguments, and the measured profile library it ships with."""

from __future__ import annotations

from pathlib import Path

import pytest

import tensorwire.demo
from tensorwire.cli import main
from tensorwire.control import RAW, Controller, RequestContext, gbps
from tensorwire.demo import KV_LIBRARY
from tensorwire.kv import Pipeline
from tensorwire.kv.profiles import ProfileLibrary


@pytest.mark.parametrize(
    ("argv", "library"),
    [([], KV_LIBRARY), (["--no-kv"], None), (["--kv-library", "mine.json"], Path("mine.json"))],
)
def test_demo_runs_the_kv_part_with_the_shipped_library_unless_told(monkeypatch, argv, library):
    seen = {}

    def run_demo(workdir, level, kv_library, **_):  # the demo itself runs real models and workers: not here
        seen["kv_library"] = kv_library
        return 0

    monkeypatch.setattr(tensorwire.demo, "run_demo", run_demo)
    assert main(["demo", *argv]) == 0
    assert seen["kv_library"] == library


def test_the_shipped_library_is_a_measured_smollm2_library():
    library = ProfileLibrary.load(KV_LIBRARY)
    assert (library.model.n_layers, library.model.kv_heads, library.model.head_dim) == (30, 3, 64)
    library.require_installed(deep=True)
    assert library.machine, "a measured library records the machine it was measured on"
    for profile in library:
        Pipeline.from_config(profile.pipeline)
        assert profile.ratio > 1.0 and profile.encode_bps > 0 and profile.decode_bps > 0
        assert profile.extra.get("measured", {}).get("needles", 0) > 0, "retrieval measured on planted facts"


def test_the_controller_compresses_on_the_demo_link_and_sends_raw_on_a_fast_one():
    library = ProfileLibrary.load(KV_LIBRARY)
    controller = Controller(library)
    budget = {"max_ppl_increase": 0.01, "max_retrieval_drop": 2.0}
    slow = controller.choose(RequestContext(tokens=2048, slo_s=0.05, bandwidth_bps=gbps(1.0), **budget), explore=False)
    assert slow.choice != RAW and library[slow.choice].meets(**budget)
    fast = controller.choose(RequestContext(tokens=2048, slo_s=0.05, bandwidth_bps=gbps(800.0), **budget), explore=False)
    assert fast.choice == RAW
