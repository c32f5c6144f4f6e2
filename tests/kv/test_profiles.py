"""The profile library: validation (one test per error), JSON round trip, filter, install check."""

import copy
import json
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tensorwire.errors import FormatError, TensorwireError, UnsupportedVersion
from tensorwire.kv.profiles import (
    RAW,
    BadMeasurement,
    DuplicateProfile,
    EmptyLibrary,
    LibraryFormatError,
    MissingField,
    ModelShape,
    Profile,
    ProfileError,
    ProfileLibrary,
    StagesNotInstalled,
    UnsupportedLibraryVersion,
    _umask,
)


def library_dict() -> dict:
    """A hand-written version-1 library: SmolLM2-135M's cache shape, two measured profiles."""
    return {
        "format": "tensorwire.profiles",
        "version": 1,
        "model": {"name": "SmolLM2-135M-Instruct", "n_layers": 30, "kv_heads": 3, "head_dim": 64, "dtype": "BF16"},
        "machine": {"cpu": "Intel Xeon", "threads": 2},
        "profiles": [
            {"name": "kivi2-zstd", "pipeline": {"stages": [{"id": "kivi", "k_bits": 2, "v_bits": 2}, {"id": "zstd"}]},
             "ratio": 6.8, "ppl_increase": 0.025, "retrieval_drop": 1.5, "encode_bps": 1.5e9, "decode_bps": 2.2e9,
             "threads": 2, "trial": 17},
            {"name": "fp8-lz4", "pipeline": {"stages": [{"id": "cast"}, {"id": "lz4"}]},
             "ratio": 2.1, "ppl_increase": -0.0004, "retrieval_drop": 0.0, "encode_bps": 2.8e9, "decode_bps": 3.0e9,
             "threads": 1},
        ],
    }  # fmt: skip


def test_load_save_round_trip(tmp_path):
    path = tmp_path / "profiles.json"
    path.write_text(json.dumps(library_dict()))
    lib = ProfileLibrary.load(path)
    assert lib.names == ("kivi2-zstd", "fp8-lz4")
    assert lib.model.kv_bytes(1024) == 2 * 30 * 3 * 64 * 1024 * 2
    assert lib["kivi2-zstd"].stage_ids == ("kivi", "zstd")
    assert lib["kivi2-zstd"].extra == {"trial": 17}  # unknown fields survive
    assert lib["kivi2-zstd"].encode_rate == 3.0e9  # one-thread throughput x threads
    out = tmp_path / "again.json"
    lib.save(out)
    again = ProfileLibrary.load(out)
    assert again == lib and again.machine == lib.machine
    assert json.loads(out.read_text())["profiles"][0]["trial"] == 17
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []  # no temp file left behind
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()  # readable like any file, not mkstemp's 0600


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "profiles.json"
    ProfileLibrary.from_dict(library_dict()).save(path)
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        ProfileLibrary.from_dict(library_dict()).without({"fp8-lz4"}).save(path)
    assert path.read_bytes() == before  # the old file is intact
    assert list(tmp_path.iterdir()) == [path]  # and the temp file is gone


finite = st.floats(0.01, 1e4, allow_nan=False)


@given(
    names=st.lists(st.text("abcdefghijklmnop-0123456789", min_size=1, max_size=12).filter(lambda s: s != RAW),
                   min_size=1, max_size=5, unique=True),
    ratio=finite, ppl=st.floats(-0.5, 5.0), drop=st.floats(-10, 100), enc=finite, dec=finite,
    threads=st.integers(1, 64), layers=st.integers(1, 128), heads=st.integers(1, 16), head_dim=st.sampled_from([64, 128]),
)  # fmt: skip
def test_round_trip_property(tmp_path_factory, names, ratio, ppl, drop, enc, dec, threads, layers, heads, head_dim):
    profiles = tuple(Profile(n, {"stages": [{"id": "zstd", "level": i}]}, ratio, ppl, drop, enc * 1e6, dec * 1e6, threads)
                     for i, n in enumerate(names))  # fmt: skip
    lib = ProfileLibrary(ModelShape("m", layers, heads, head_dim), profiles, {"cpu": "x"})
    assert ProfileLibrary.loads(lib.dumps()) == lib
    path = tmp_path_factory.mktemp("lib") / "p.json"
    lib.save(path)
    assert ProfileLibrary.load(path) == lib


def test_filter_by_quality_budget():
    lib = ProfileLibrary.from_dict(library_dict())
    assert [p.name for p in lib.filter(max_ppl_increase=0.01)] == ["fp8-lz4"]
    assert [p.name for p in lib.filter(max_retrieval_drop=2.0)] == ["kivi2-zstd", "fp8-lz4"]
    assert lib.filter(max_ppl_increase=-0.01) == ()  # nothing qualifies: the controller sends raw
    assert len(lib.filter()) == 2


def test_check_installed_reports_unknown_stage_ids():
    data = library_dict()
    data["profiles"][1]["pipeline"]["stages"].insert(0, {"id": "no-such-transform"})
    lib = ProfileLibrary.from_dict(data)
    assert lib.check_installed() == {"fp8-lz4": ("no-such-transform",)}
    with pytest.raises(StagesNotInstalled, match="no-such-transform"):
        lib.require_installed()
    assert ProfileLibrary.from_dict(library_dict()).check_installed() == {}


# ---- one test per error ---------------------------------------------------------------


def _load(data) -> ProfileLibrary:
    return ProfileLibrary.loads(json.dumps(data))


def test_error_empty_library():
    data = library_dict()
    data["profiles"] = []
    with pytest.raises(EmptyLibrary, match="no profile"):
        _load(data)


def test_error_duplicate_names():
    data = library_dict()
    data["profiles"].append(copy.deepcopy(data["profiles"][0]))
    with pytest.raises(DuplicateProfile, match="kivi2-zstd"):
        _load(data)


@pytest.mark.parametrize("field", ["ratio", "ppl_increase", "encode_bps", "decode_bps", "pipeline", "name", "threads"])
def test_error_missing_field(field):
    data = library_dict()
    del data["profiles"][0][field]
    with pytest.raises(MissingField, match=field):
        _load(data)


@pytest.mark.parametrize(
    "field, value",
    [("ratio", 0.0), ("ratio", -2.0), ("encode_bps", 0.0), ("decode_bps", -1e9), ("ratio", float("nan")),
     ("encode_bps", float("inf")), ("ppl_increase", float("nan")), ("retrieval_drop", 101.0), ("ppl_increase", -1.5),
     ("ratio", "7"), ("ratio", True), ("threads", 0), ("threads", 2.5)],
)  # fmt: skip
def test_error_bad_measurement(field, value):
    data = library_dict()
    data["profiles"][0][field] = value
    with pytest.raises(BadMeasurement, match=field):
        ProfileLibrary.from_dict(data)


def test_small_negative_quality_delta_is_a_measurement_not_an_error():
    assert ProfileLibrary.from_dict(library_dict())["fp8-lz4"].ppl_increase == -0.0004


def test_error_reserved_name():
    data = library_dict()
    data["profiles"][0]["name"] = RAW
    with pytest.raises(ProfileError, match="reserved"):
        _load(data)


@pytest.mark.parametrize("pipeline", [[{"id": "zstd"}], {"stages": "zstd"}, {"stages": [{"level": 3}]}, {"stages": [3]}])
def test_error_bad_pipeline(pipeline):
    data = library_dict()
    data["profiles"][0]["pipeline"] = pipeline
    with pytest.raises(MissingField, match="pipeline"):
        _load(data)


def test_error_wrong_format():
    data = library_dict()
    data["format"] = "something.else"
    with pytest.raises(LibraryFormatError, match="format") as info:
        _load(data)
    assert isinstance(info.value, FormatError) and isinstance(info.value, ValueError)


def test_error_wrong_version():
    data = library_dict()
    data["version"] = 2
    with pytest.raises(UnsupportedLibraryVersion, match="version 2") as info:
        _load(data)
    assert isinstance(info.value, UnsupportedVersion) and isinstance(info.value, ProfileError)


@pytest.mark.parametrize("text", ["", "{", "[1, 2]", "null", b"\xff\xfe"])
def test_error_not_a_library(text):
    with pytest.raises(LibraryFormatError):
        ProfileLibrary.loads(text)


@pytest.mark.parametrize("dim, value", [("n_layers", 0), ("kv_heads", -1), ("head_dim", "64"), ("dtype", "INT4")])
def test_error_bad_model_shape(dim, value):
    data = library_dict()
    data["model"][dim] = value
    with pytest.raises(ProfileError, match=dim if dim != "dtype" else "dtype"):
        _load(data)


def test_error_missing_model():
    data = library_dict()
    del data["model"]
    with pytest.raises(MissingField, match="model"):
        _load(data)


def test_load_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    data = library_dict()
    data["profiles"][0]["ratio"] = -1
    path.write_text(json.dumps(data))
    with pytest.raises(BadMeasurement, match="broken.json"):
        ProfileLibrary.load(path)


def test_every_error_is_a_tensorwire_value_error():
    for cls in (EmptyLibrary, DuplicateProfile, MissingField, BadMeasurement, LibraryFormatError, UnsupportedLibraryVersion,
                StagesNotInstalled):  # fmt: skip
        assert issubclass(cls, TensorwireError) and issubclass(cls, ValueError)


def test_nan_in_file_is_rejected_at_load():
    text = json.dumps(library_dict()).replace('"ratio": 6.8', '"ratio": NaN')
    with pytest.raises(BadMeasurement, match="finite"):
        ProfileLibrary.loads(text)


def test_a_size_model_makes_short_caches_compress_less():
    base = Profile("p", {"stages": [{"id": "uniform", "bits": 4}]}, ratio=4.0, ppl_increase=0.0, retrieval_drop=0.0,
                   encode_bps=1e9, decode_bps=1e9)  # fmt: skip
    assert base.payload_bytes(4e6) == 1e6 and base.ratio_at(4e6) == 4.0
    fitted = Profile(**{**{f: getattr(base, f) for f in ("name", "pipeline", "ratio", "ppl_increase", "retrieval_drop",
                                                          "encode_bps", "decode_bps")},
                        "extra": {"size_model": {"fixed_bytes": 5e5, "ratio": 5.0}}})  # fmt: skip
    assert fitted.payload_bytes(5e6) == 5e5 + 1e6
    assert fitted.ratio_at(1e6) < 2.0 < fitted.ratio_at(1e8) < 5.0
    assert fitted.payload_bytes(0) == 0.0


def test_a_library_is_checked_against_the_model_it_serves():
    from tensorwire.data import SMOLLM2_LIBRARY
    from tensorwire.errors import ControlWarning, LibraryModelMismatch

    library = ProfileLibrary.load(SMOLLM2_LIBRARY)
    smollm2 = {"n_layers": 30, "kv_heads": 3, "q_heads": 9, "head_dim": 64, "sliding_layers": 0}
    assert library.for_model(smollm2) is library
    other = {**smollm2, "kv_heads": 8, "head_dim": 128}
    with pytest.raises(LibraryModelMismatch, match="kv_heads 3 vs 8, head_dim 64 vs 128"):
        library.for_model(other)
    with pytest.warns(ControlWarning, match="measured on SmolLM2"):
        assert library.for_model(other, allow_other=True) is library
    # Sliding-window layers hold only their window: profiles that evict tokens cannot run on them.
    sliding = library.for_model({**smollm2, "sliding_layers": 15})
    evicting = [p.name for p in library if any(s["id"] == "streaming_llm" for s in p.pipeline["stages"])]
    assert evicting and set(sliding.names) == set(library.names) - set(evicting)
