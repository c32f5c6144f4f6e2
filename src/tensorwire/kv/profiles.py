"""The profile library: measured KV pipelines the online controller chooses from.

The offline search (``tensorwire.search``) measures many pipeline configs on one model and
one machine and keeps a Pareto set; each kept config is a *profile* with its compression
ratio, its quality loss and its encode/decode throughput. The online controller
(``tensorwire.control``) picks one per request, or sends the cache raw.

File format (JSON, UTF-8), version 1::

    {
      "format": "tensorwire.profiles",
      "version": 1,
      "model": {"name": "SmolLM2-135M", "n_layers": 30, "kv_heads": 3, "head_dim": 64, "dtype": "BF16"},
      "machine": {"cpu": "...", "threads": 2, ...},          # free-form: where it was measured
      "profiles": [
        {
          "name": "kivi2-zstd",                               # unique; "raw" is reserved
          "pipeline": {"stages": [{"id": "kivi", ...}, {"id": "zstd", ...}]},
          "ratio": 7.1,              # bytes of the cache in `dtype` / payload bytes (> 0)
          "ppl_increase": 0.012,     # relative perplexity increase (0.01 = +1 %)
          "retrieval_drop": 0.8,     # retrieval accuracy drop in points (0..100)
          "encode_bps": 1.4e9,       # bytes of the cache encoded per second, ONE thread
          "decode_bps": 2.2e9,       # bytes of the cache decoded per second, ONE thread
          "threads": 2               # threads the pipeline runs on when serving (>= 1)
        }
      ]
    }

Unknown keys in a profile are kept (``Profile.extra``) and written back, so a newer
search can add fields without breaking an older controller. Quality deltas may be
slightly negative (a lossy pipeline can measure marginally better than the baseline on a
finite evaluation), but not below -1 (perplexity cannot fall by 100 %) or -100 points.

Example
-------
>>> lib = ProfileLibrary.load("profiles.json")                    # doctest: +SKIP
>>> ok = lib.filter(max_ppl_increase=0.02, max_retrieval_drop=1.0)  # doctest: +SKIP
>>> lib.check_installed()                                         # doctest: +SKIP
{}
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import (
    BadMeasurement,
    ControlWarning,
    DuplicateProfile,
    EmptyLibrary,
    LibraryFormatError,
    LibraryModelMismatch,
    MissingField,
    ProfileError,
    StagesNotInstalled,
    TensorwireError,
    UnsupportedLibraryVersion,
)

__all__ = [
    "FORMAT",
    "RAW",
    "VERSION",
    "BadMeasurement",
    "DuplicateProfile",
    "EmptyLibrary",
    "LibraryFormatError",
    "LibraryModelMismatch",
    "MissingField",
    "ModelShape",
    "Profile",
    "ProfileError",
    "ProfileLibrary",
    "StagesNotInstalled",
    "UnsupportedLibraryVersion",
]

FORMAT = "tensorwire.profiles"
VERSION = 1
RAW = "raw"  # the name of "send the cache uncompressed"; no profile may take it

DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1, "F8_E5M2": 1}
_PROFILE_FIELDS = ("name", "pipeline", "ratio", "ppl_increase", "retrieval_drop", "encode_bps", "decode_bps", "threads")
_MODEL_FIELDS = ("name", "n_layers", "kv_heads", "head_dim")


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def _where(profile: str | None) -> str:
    return f"profile {profile!r}" if profile is not None else "the library"


def _number(value: Any, name: str, where: str, *, low: float, low_open: bool = False, high: float = math.inf) -> float:
    # bool is an int subclass: reject it so that `true` is not read as a ratio of 1.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadMeasurement(f"{where}: {name} is {value!r} ({type(value).__name__}); expected a number. "
                             "Re-run the profiling or fix the file.")  # fmt: skip
    value = float(value)
    if not math.isfinite(value):
        raise BadMeasurement(f"{where}: {name} is {value}; expected a finite number. Re-measure this profile or drop it.")
    if value < low or (low_open and value == low) or value > high:
        bound = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if math.isfinite(high) else "")
        raise BadMeasurement(f"{where}: {name} is {value:g}; expected {bound}. Re-measure this profile or drop it.")
    return value


def _integer(value: Any, name: str, where: str, *, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, float) and value.is_integer()):
        raise BadMeasurement(f"{where}: {name} is {value!r}; expected an integer >= {low}")
    if int(value) < low:
        raise BadMeasurement(f"{where}: {name} is {int(value)}; expected an integer >= {low}")
    return int(value)


def _require(data: Mapping[str, Any], names: tuple[str, ...], where: str) -> None:
    missing = [n for n in names if n not in data]
    if missing:
        raise MissingField(f"{where} has no {', '.join(missing)}; expected the fields {', '.join(names)}. "
                           "A library must hold every measurement of every profile (see tensorwire.kv.profiles).")  # fmt: skip


def _evicts(profile: Profile) -> bool:
    """Whether the profile's pipeline has a token selector other than ``keep_all``."""
    from .registry import stage_class, stage_ids

    known = set(stage_ids())
    return any(stage["id"] != "keep_all" and stage["id"] in known and stage_class(stage["id"]).kind == "selector"
               for stage in profile.pipeline["stages"])  # fmt: skip


@dataclass(frozen=True)
class ModelShape:
    """The model whose KV cache the profiles were measured on.

    ``kv_bytes(tokens)`` is the size of the cache a server holds for one sequence of
    ``tokens`` tokens: ``2 (K and V) x n_layers x kv_heads x head_dim x tokens x itemsize``.
    """

    name: str
    n_layers: int
    kv_heads: int
    head_dim: int
    dtype: str = "BF16"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ProfileError(f"the model name is {self.name!r}; expected a non-empty string")
        for dim in ("n_layers", "kv_heads", "head_dim"):
            object.__setattr__(self, dim, _integer(getattr(self, dim), f"model.{dim}", "the library"))
        if self.dtype not in DTYPE_BYTES:
            raise ProfileError(f"the model dtype is {self.dtype!r}; expected one of {', '.join(DTYPE_BYTES)}")

    @property
    def itemsize(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.n_layers * self.kv_heads * self.head_dim * self.itemsize

    def kv_bytes(self, tokens: int, batch: int = 1) -> int:
        """Bytes of the KV cache of ``batch`` sequences of ``tokens`` tokens each."""
        return self.bytes_per_token * int(tokens) * int(batch)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "n_layers": self.n_layers, "kv_heads": self.kv_heads,
                "head_dim": self.head_dim, "dtype": self.dtype}  # fmt: skip

    @classmethod
    def from_dict(cls, data: Any) -> ModelShape:
        if not isinstance(data, Mapping):
            raise MissingField(f"the library's 'model' is {data!r}; expected an object with {', '.join(_MODEL_FIELDS)}")
        _require(data, _MODEL_FIELDS, "the library's model")
        return cls(data["name"], data["n_layers"], data["kv_heads"], data["head_dim"], data.get("dtype", "BF16"))


@dataclass(frozen=True)
class Profile:
    """One measured pipeline config.

    Parameters
    ----------
    name : str
        Unique in its library; ``"raw"`` is reserved for sending the cache uncompressed.
    pipeline : dict
        The pipeline config, ``{"stages": [{"id": ..., ...}, ...]}`` (see ``kv/pipeline.py``).
    ratio : float
        Bytes of the cache in the model dtype / payload bytes (> 0; < 1 would expand it).
    ppl_increase : float
        Relative perplexity increase on the evaluation text (0.01 = +1 %).
    retrieval_drop : float
        Retrieval accuracy drop in points (0..100).
    encode_bps, decode_bps : float
        Bytes of the (uncompressed) cache encoded / decoded per second on ONE thread.
    threads : int
        Threads the pipeline runs on when serving. The latency model assumes linear
        scaling (``encode_bps * threads``); the controller's learned residual absorbs the
        difference when scaling is worse.
    extra : dict
        Fields this version does not know, kept so that ``save`` writes them back.
    """

    name: str
    pipeline: dict[str, Any] = field(hash=False)
    ratio: float
    ppl_increase: float
    retrieval_drop: float
    encode_bps: float
    decode_bps: float
    threads: int = 1
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ProfileError(f"a profile name is {self.name!r}; expected a non-empty string")
        if self.name == RAW:
            raise ProfileError(f"a profile is named {RAW!r}, which is reserved for sending the cache uncompressed; "
                               "rename it (e.g. 'lossless-raw')")  # fmt: skip
        where = _where(self.name)
        _check_pipeline(self.pipeline, where)
        set_ = object.__setattr__
        set_(self, "ratio", _number(self.ratio, "ratio", where, low=0.0, low_open=True))
        set_(self, "ppl_increase", _number(self.ppl_increase, "ppl_increase", where, low=-1.0))
        set_(self, "retrieval_drop", _number(self.retrieval_drop, "retrieval_drop", where, low=-100.0, high=100.0))
        set_(self, "encode_bps", _number(self.encode_bps, "encode_bps", where, low=0.0, low_open=True))
        set_(self, "decode_bps", _number(self.decode_bps, "decode_bps", where, low=0.0, low_open=True))
        set_(self, "threads", _integer(self.threads, "threads", where))

    @property
    def stage_ids(self) -> tuple[str, ...]:
        """The ids of the pipeline's stages, in order."""
        return tuple(stage["id"] for stage in self.pipeline["stages"])

    @property
    def encode_rate(self) -> float:
        """Encode throughput when serving: ``encode_bps * threads`` (bytes/s, linear scaling)."""
        return self.encode_bps * self.threads

    @property
    def decode_rate(self) -> float:
        """Decode throughput when serving: ``decode_bps * threads`` (bytes/s, linear scaling)."""
        return self.decode_bps * self.threads

    def payload_bytes(self, kv_bytes: float) -> float:
        """Bytes on the wire for a cache of ``kv_bytes`` (in the library's dtype).

        ``kv_bytes / ratio``, unless the profile carries a size model measured at two cache
        sizes (``extra["size_model"]``, written by a worker's calibration): then a fixed
        part (header, tokens some stages keep at full precision, such as KIVI's residual
        window) plus ``kv_bytes / size_model["ratio"]``. Short prompts compress less.
        """
        model = self.extra.get("size_model")
        if model:
            return max(1.0, model["fixed_bytes"] + kv_bytes / model["ratio"]) if kv_bytes > 0 else 0.0
        return kv_bytes / self.ratio

    def ratio_at(self, kv_bytes: float) -> float:
        """The compression ratio for a cache of ``kv_bytes`` (see :meth:`payload_bytes`)."""
        sent = self.payload_bytes(kv_bytes)
        return kv_bytes / sent if sent > 0 else self.ratio

    def meets(self, max_ppl_increase: float = math.inf, max_retrieval_drop: float = math.inf) -> bool:
        """Whether this profile's quality loss is within both budgets."""
        return self.ppl_increase <= max_ppl_increase and self.retrieval_drop <= max_retrieval_drop

    def to_dict(self) -> dict[str, Any]:
        return {**self.extra, "name": self.name, "pipeline": self.pipeline, "ratio": self.ratio,
                "ppl_increase": self.ppl_increase, "retrieval_drop": self.retrieval_drop,
                "encode_bps": self.encode_bps, "decode_bps": self.decode_bps, "threads": self.threads}  # fmt: skip

    @classmethod
    def from_dict(cls, data: Any) -> Profile:
        if not isinstance(data, Mapping):
            raise ProfileError(f"a profile is {data!r}; expected an object with {', '.join(_PROFILE_FIELDS)}")
        _require(data, _PROFILE_FIELDS, _where(data.get("name") if isinstance(data.get("name"), str) else None))
        extra = {k: v for k, v in data.items() if k not in _PROFILE_FIELDS}
        return cls(**{k: data[k] for k in _PROFILE_FIELDS}, extra=extra)


def _check_pipeline(pipeline: Any, where: str) -> None:
    stages = pipeline.get("stages") if isinstance(pipeline, Mapping) else None
    if not isinstance(stages, list):
        raise MissingField(f"{where}: pipeline is {pipeline!r}; expected {{'stages': [{{'id': ...}}, ...]}}")
    for i, stage in enumerate(stages):
        if not isinstance(stage, Mapping) or not isinstance(stage.get("id"), str):
            raise MissingField(f"{where}: pipeline stage {i} is {stage!r}; expected an object with a string 'id'")


@dataclass(frozen=True)
class ProfileLibrary:
    """A validated, non-empty set of profiles measured on one model and machine.

    Build with :meth:`load`, :meth:`from_dict` or the constructor; every path validates
    (named :class:`ProfileError` subclasses, also ``ValueError``).
    """

    model: ModelShape
    profiles: tuple[Profile, ...]
    machine: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "profiles", tuple(self.profiles))
        if not self.profiles:
            raise EmptyLibrary("the profile library holds no profile; expected at least one. "
                               "Run the offline search (tensorwire.search) to produce one.")  # fmt: skip
        if not isinstance(self.model, ModelShape):
            raise ProfileError(f"model is a {type(self.model).__name__}; expected a ModelShape")
        seen: set[str] = set()
        for p in self.profiles:
            if not isinstance(p, Profile):
                raise ProfileError(f"a library holds Profile objects, got {type(p).__name__}")
            if p.name in seen:
                raise DuplicateProfile(f"two profiles are named {p.name!r}; names must be unique. Rename one.")
            seen.add(p.name)

    # ---- container protocol -------------------------------------------------------
    def __len__(self) -> int:
        return len(self.profiles)

    def __iter__(self) -> Iterator[Profile]:
        return iter(self.profiles)

    def __getitem__(self, name: str) -> Profile:
        for p in self.profiles:
            if p.name == name:
                return p
        raise KeyError(f"no profile named {name!r}; the library holds {', '.join(self.names)}")

    def __contains__(self, name: object) -> bool:
        return any(p.name == name for p in self.profiles)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.profiles)

    # ---- queries ------------------------------------------------------------------
    def filter(self, max_ppl_increase: float = math.inf, max_retrieval_drop: float = math.inf) -> tuple[Profile, ...]:
        """The profiles within both quality budgets (may be empty: then only raw qualifies)."""
        return tuple(p for p in self.profiles if p.meets(max_ppl_increase, max_retrieval_drop))

    def check_installed(self, deep: bool = False) -> dict[str, tuple[str, ...]]:
        """Profiles that cannot run here: ``{profile name: (missing stage id, ...)}``.

        A stage id is missing when :func:`tensorwire.kv.registry.stage_ids` does not list it.
        With ``deep=True`` each listed id's class is also imported, so an id whose module or
        optional dependency is absent counts as missing too. An empty dict: all can run.
        """
        from .registry import stage_class, stage_ids

        known = set(stage_ids())
        importable: dict[str, bool] = {}

        def ok(stage_id: str) -> bool:
            if stage_id not in known:
                return False
            if not deep:
                return True
            if stage_id not in importable:
                try:
                    stage_class(stage_id)
                    importable[stage_id] = True
                except (ImportError, TensorwireError):
                    importable[stage_id] = False
            return importable[stage_id]

        report = {}
        for p in self.profiles:
            missing = tuple(dict.fromkeys(s for s in p.stage_ids if not ok(s)))
            if missing:
                report[p.name] = missing
        return report

    def require_installed(self, deep: bool = False) -> None:
        """Raise :class:`StagesNotInstalled` when any profile names an unknown stage id."""
        report = self.check_installed(deep)
        if report:
            listing = "; ".join(f"{name}: {', '.join(ids)}" for name, ids in report.items())
            raise StagesNotInstalled(f"{len(report)} profile(s) use stages that are not installed ({listing}); "
                                     "install the plugin that provides them or drop these profiles")  # fmt: skip

    def for_model(self, shape: Mapping[str, int], allow_other: bool = False) -> ProfileLibrary:
        """This library, checked against the model it will serve (``n_layers``, ``kv_heads``, ``head_dim``).

        A library measured on another shape carries ratios, speeds and qualities that do not
        hold for this model: :class:`LibraryModelMismatch` unless ``allow_other``, which
        warns and returns it as it is. ``shape["sliding_layers"]`` (see
        :func:`tensorwire.kv.hf.model_shape`) drops the profiles with a token selector,
        which cannot run on caches whose sliding-window layers hold fewer tokens.
        """
        mine = self.model.to_dict()
        differ = {k: (mine[k], shape[k]) for k in ("n_layers", "kv_heads", "head_dim") if k in shape and shape[k] != mine[k]}
        if differ:
            listing = ", ".join(f"{k} {lib} vs {model}" for k, (lib, model) in differ.items())
            message = (f"the profile library was measured on {self.model.name} and this model differs ({listing}: "
                       "library vs model); measure a library on this model (tensorwire profile) or allow it explicitly")  # fmt: skip
            if not allow_other:
                raise LibraryModelMismatch(message)
            warnings.warn(message, ControlWarning, stacklevel=2)
        if shape.get("sliding_layers"):
            return self.without({p.name for p in self.profiles if _evicts(p)})
        return self

    def without(self, names: set[str] | frozenset[str] | tuple[str, ...] | list[str]) -> ProfileLibrary:
        """A copy without the named profiles (raises EmptyLibrary if none would be left)."""
        drop = set(names)
        return ProfileLibrary(self.model, tuple(p for p in self.profiles if p.name not in drop), dict(self.machine))

    # ---- (de)serialisation --------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "model": self.model.to_dict(), "machine": self.machine,
                "profiles": [p.to_dict() for p in self.profiles]}  # fmt: skip

    @classmethod
    def from_dict(cls, data: Any) -> ProfileLibrary:
        if not isinstance(data, Mapping):
            raise LibraryFormatError(f"a profile library is a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise LibraryFormatError(f"'format' is {data.get('format')!r}; expected {FORMAT!r}. "
                                     "Is this a profile library written by tensorwire.search?")  # fmt: skip
        if data.get("version") != VERSION:
            raise UnsupportedLibraryVersion(f"profile library version {data.get('version')!r}; this build reads "
                                            f"version {VERSION}. Upgrade tensorwire or re-run the search.")  # fmt: skip
        _require(data, ("model", "profiles"), "the library")
        if not isinstance(data["profiles"], list):
            raise LibraryFormatError(f"'profiles' is a {type(data['profiles']).__name__}; expected a list")
        machine = data.get("machine", {})
        if not isinstance(machine, Mapping):
            raise LibraryFormatError(f"'machine' is a {type(machine).__name__}; expected an object")
        profiles = tuple(Profile.from_dict(p) for p in data["profiles"])
        return cls(ModelShape.from_dict(data["model"]), profiles, dict(machine))

    @classmethod
    def loads(cls, text: str | bytes) -> ProfileLibrary:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LibraryFormatError(f"a profile library is JSON; parsing failed: {exc}") from exc
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ProfileLibrary:
        """Read and validate a library file (raises a :class:`ProfileError` naming the problem)."""
        path = Path(path)
        try:
            return cls.loads(path.read_bytes())
        except ProfileError as exc:
            raise type(exc)(f"{path}: {exc}") from None

    def dumps(self) -> str:
        # allow_nan=False: a library with NaN cannot be built, and JSON has no NaN.
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically: a temporary file in the same folder, flushed, then renamed."""
        path = Path(path)
        text = self.dumps()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            # mkstemp makes the file private (0600); give it the mode a plain open() would.
            os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask())
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
