"""The search space: the KV strategy space, derived from the stage registry.

Every stage class may declare a class attribute ``search_space``: a dict from one of its
parameters to the values the offline search may give it. A stage that declares one joins
the space (an empty dict: it joins with its defaults); a stage without one stays out
(``identity`` and ``keep_all`` are the same as leaving their slot empty). Two kinds of
entry are understood::

    {"k_bits": (2, 3, 4, 8)}          # categorical: these candidates
    {"level": ("int", 1, 19)}         # integer range (inclusive); ("int", lo, hi, step) too
    {"ratio": ("float", 0.1, 1.0)}    # float range; ("float", lo, hi, "log") for a log scale

A tuple that starts with ``"int"`` or ``"float"`` and has 3 or 4 items is a range; any
other tuple is a list of candidates. Parameters a stage does not list keep their defaults.
Three or more numeric candidates are ordered: optuna is asked for their rank
(``"kivi.k_bits:rank"``), so that the sampler can use that 3 bits lie between 2 and 4
(replayed on a 240-config slice of the benchmark grid, 10 seeds: 33 evaluations to 95 %
of the front's hypervolume instead of 41 as categories).

A pipeline is built from five slots, in pipeline order: at most one transform, at most
one selector, one quantizer, and one *encoder chain*: an array encoder optionally followed
by one bytes encoder (``"raw+zstd"``). A longer chain of transforms or bytes encoders is
not searched: composing two rotations or two general-purpose compressors does not pay.
The optuna parameters are conditional: ``"selector"`` picks an id (or ``"none"``), then
``"snapkv.keep_fraction"`` is asked only when ``snapkv`` was picked, and so on.

Combinations known to be useless are skipped by :class:`SkipRule` (:data:`DEFAULT_RULES`),
checked before anything is evaluated: a skipped or invalid candidate costs a trial, not
an evaluation.

Example
-------
>>> space = SearchSpace.from_registry()
>>> space.slot_ids("encoder")[:3]
('ans', 'enec', 'enec+lz4')
>>> sub = SearchSpace.from_registry({"kivi": {"k_bits": (2, 4), "v_bits": (2,)}, "raw": None, "zstd": {"level": (3,)}})
>>> sub.size()
4
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import CandidateRejected, SearchSpaceError, require
from ..kv.pipeline import Pipeline
from ..kv.stage import SLOTS as STAGE_SLOTS
from ..kv.stage import StageConfigError, slot_of

__all__ = [
    "DEFAULT_OPTIONAL",
    "DEFAULT_RULES",
    "FLOAT_QUANTIZERS",
    "NONE",
    "SLOTS",
    "CandidateRejected",
    "SearchSpace",
    "SearchSpaceError",
    "SkipRule",
    "StageSpace",
    "config_key",
    "lossy_key",
    "optuna_module",
    "slot_view",
]

NONE = "none"  # the choice that leaves a slot empty
# The search's slots: a pipeline's (kv.stage.SLOTS), with the array and bytes encoders
# merged into one slot of encoder chains.
SLOTS = ("transform", "selector", "quantizer", "encoder")
DEFAULT_OPTIONAL = frozenset({"transform", "selector"})
# Quantizers whose planes are floats, not codes (the skip rules below need to know).
FLOAT_QUANTIZERS = frozenset({"cast"})
_SCALARS = (type(None), bool, int, float, str)


def config_key(config: Mapping[str, Any] | Pipeline) -> str:
    """A canonical string for a pipeline config (equal pipelines, equal keys)."""
    pipeline = config if isinstance(config, Pipeline) else Pipeline.from_config(dict(config))
    return json.dumps(pipeline.to_config(), sort_keys=True, separators=(",", ":"))


def lossy_key(config: Mapping[str, Any] | Pipeline) -> str:
    """The key of the pipeline's lossy part: its transforms, selector and quantizer.

    Encoders are lossless, so two pipelines with the same lossy key decode to the same
    cache and have the same quality; only their size and speed differ.
    """
    pipeline = config if isinstance(config, Pipeline) else Pipeline.from_config(dict(config))
    lossy = [s.to_config() for s in pipeline.stages if slot_of(s) in ("transform", "selector", "quantizer")]
    return json.dumps(lossy, sort_keys=True, separators=(",", ":"))


# -- one stage's parameters ---------------------------------------------------------------
def _is_range(spec: tuple) -> bool:
    return len(spec) in (3, 4) and spec[0] in ("int", "float")


def _check_spec(stage_id: str, name: str, spec: Any) -> tuple:
    where = f"stage {stage_id!r} search_space[{name!r}]"
    if not isinstance(spec, (tuple, list)) or not spec:
        raise SearchSpaceError(f"{where} is {spec!r}; expected a non-empty tuple of candidates or ('int'|'float', low, high)")
    spec = tuple(spec)
    if _is_range(spec):
        kind, low, high, *rest = spec
        number = int if kind == "int" else (int, float)
        if not all(isinstance(v, number) and not isinstance(v, bool) for v in (low, high)) or low > high:
            raise SearchSpaceError(f"{where} is {spec!r}; a range needs {kind} bounds with low <= high")
        if rest and not (rest[0] == "log" or (kind == "int" and isinstance(rest[0], int) and rest[0] >= 1)):
            raise SearchSpaceError(f"{where} is {spec!r}; the 4th item is 'log' (or an int step for 'int')")
        if rest == ["log"] and low <= 0:
            raise SearchSpaceError(f"{where} is {spec!r}; a log range needs low > 0")
        return spec
    bad = [v for v in spec if not isinstance(v, _SCALARS) or (isinstance(v, float) and not math.isfinite(v))]
    if bad:
        raise SearchSpaceError(f"{where} holds {bad!r}; candidates are None, bool, int, finite float or str (optuna's rule)")
    if len(set(map(repr, spec))) != len(spec):
        raise SearchSpaceError(f"{where} is {spec!r}; candidates must be distinct")
    return spec


@dataclass(frozen=True)
class StageSpace:
    """One stage id and the candidates of its searched parameters.

    ``params`` maps a parameter to a checked spec (see the module docstring); parameters
    not listed keep the stage's defaults. Parameters with one candidate are fixed: they
    are written into every config but not asked of optuna.
    """

    id: str
    stage_class: type = field(repr=False, compare=False)
    params: Mapping[str, tuple] = field(default_factory=dict)

    @classmethod
    def of(cls, stage_id: str, params: Mapping[str, Any] | None = None) -> StageSpace:
        """The space of ``stage_id``: its class's ``search_space``, or ``params`` instead."""
        from ..kv.registry import stage_class

        klass = stage_class(stage_id)
        declared = getattr(klass, "search_space", None) if params is None else params
        if declared is None:
            raise SearchSpaceError(f"stage {stage_id!r} declares no search_space; give its parameters explicitly "
                                   "or add `search_space = {...}` to its class")  # fmt: skip
        if not isinstance(declared, Mapping):
            raise SearchSpaceError(f"stage {stage_id!r} search_space is a {type(declared).__name__}; expected a dict")
        fields = {f.name for f in dataclasses.fields(klass)} if dataclasses.is_dataclass(klass) else set()
        unknown = sorted(set(declared) - fields)
        if unknown:
            raise SearchSpaceError(f"stage {stage_id!r} search_space names {unknown}, which are not its parameters "
                                   f"({sorted(fields)})")  # fmt: skip
        return cls(stage_id, klass, {name: _check_spec(stage_id, name, spec) for name, spec in declared.items()})

    def param_name(self, name: str) -> str:
        """The optuna parameter name of one of this stage's parameters.

        ``"<id>.<name>"``, or ``"<id>.<name>:rank"`` for an ordered one (see :meth:`ordered`).
        """
        return f"{self.id}.{name}" + (":rank" if name in self.ordered else "")

    @property
    def ordered(self) -> dict[str, tuple]:
        """Searched parameters whose candidates are 3 or more numbers, sorted ascending.

        optuna is asked for their rank (an integer 0..n-1), not for a category: TPE then
        sees that 3 bits lie between 2 and 4 and generalises along that order, where a
        categorical parameter treats every value as unrelated to the others.
        """
        return {name: tuple(sorted(spec)) for name, spec in self.searched.items()
                if not _is_range(spec) and len(spec) >= 3
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec)}  # fmt: skip

    @property
    def searched(self) -> dict[str, tuple]:
        """Parameters optuna is asked about (ranges and categoricals with >= 2 candidates)."""
        return {k: s for k, s in self.params.items() if _is_range(s) or len(s) > 1}

    def distributions(self) -> dict[str, Any]:
        """``{optuna parameter name: optuna distribution}`` of the searched parameters."""
        optuna_module()
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        out: dict[str, Any] = {}
        ordered = self.ordered
        for name, spec in self.searched.items():
            if name in ordered:
                out[self.param_name(name)] = IntDistribution(0, len(spec) - 1)
            elif not _is_range(spec):
                out[self.param_name(name)] = CategoricalDistribution(spec)
            elif spec[0] == "int":
                step = spec[3] if len(spec) == 4 and spec[3] != "log" else 1
                out[self.param_name(name)] = IntDistribution(spec[1], spec[2], log=spec[3:] == ("log",), step=step)
            else:
                out[self.param_name(name)] = FloatDistribution(spec[1], spec[2], log=spec[3:] == ("log",))
        return out

    def suggest(self, trial) -> dict[str, Any]:
        """One stage config, its searched parameters asked of ``trial``."""
        config: dict[str, Any] = {"id": self.id}
        distributions = self.distributions()
        ordered = self.ordered
        for name, spec in self.params.items():
            if name in self.searched:
                value = ask(trial, self.param_name(name), distributions[self.param_name(name)])
                config[name] = ordered[name][value] if name in ordered else value
            else:
                config[name] = spec[0]
        return config

    def configs(self) -> Iterator[dict[str, Any]]:
        """Every config of this stage (categoricals and integer ranges; a float range raises)."""
        axes = []
        for name, spec in self.params.items():
            if not _is_range(spec):
                axes.append([(name, v) for v in spec])
            elif spec[0] == "int" and spec[3:] != ("log",):
                step = spec[3] if len(spec) == 4 else 1
                axes.append([(name, v) for v in range(spec[1], spec[2] + 1, step)])
            else:
                raise SearchSpaceError(f"stage {self.id!r} parameter {name!r} is a {spec[0]} range {spec!r}; "
                                       "it cannot be enumerated (give candidates to enumerate the space)")  # fmt: skip
        for combo in itertools.product(*axes):
            yield {"id": self.id, **dict(combo)}

    def size(self) -> int:
        return sum(1 for _ in self.configs())


def optuna_module():
    """``import optuna``, or :class:`~tensorwire.errors.MissingDependency` naming the ``search`` extra."""
    return require("optuna")


def ask(trial, name: str, distribution) -> Any:
    """Ask ``trial`` for parameter ``name`` through optuna's public ``suggest_*`` methods."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(name, distribution.low, distribution.high, step=distribution.step, log=distribution.log)
    return trial.suggest_float(name, distribution.low, distribution.high, log=distribution.log)


# -- rules ------------------------------------------------------------------------------
@dataclass(frozen=True)
class SkipRule:
    """A combination not worth evaluating.

    ``applies`` gets the candidate as ``{slot: stage config or None}`` with the slots
    ``transform``, ``selector``, ``quantizer``, ``array_encoder`` and ``bytes_encoder``,
    and returns True to skip it; ``reason`` says why (it is recorded on the trial).
    ``slots`` names the slots the rule reads: a rule that reads only the encoder slots
    also removes, when the space is built, encoder chains it skips for every setting.
    """

    name: str
    reason: str
    applies: Callable[[Mapping[str, Mapping[str, Any] | None]], bool] = field(compare=False)
    slots: frozenset[str] = frozenset({"transform", "selector", "quantizer", "array_encoder", "bytes_encoder"})


def _emits_codes(view: Mapping[str, Any]) -> bool:
    quantizer = view.get("quantizer")
    return quantizer is not None and quantizer["id"] not in FLOAT_QUANTIZERS


def _entropy_coded(view: Mapping[str, Any]) -> bool:
    array = view.get("array_encoder") or {"id": "raw"}
    return array["id"] == "ans" or (array["id"] == "enec" and array.get("level", "max") == "max")


DEFAULT_RULES: tuple[SkipRule, ...] = (
    SkipRule(
        "enec-fast-on-codes",
        "enec level 'fast' stores code planes at 4 or more bits per code, more than raw bit-packing; "
        "use raw or enec level 'max' for quantized planes",
        lambda v: _emits_codes(v) and (v.get("array_encoder") or {}).get("id") == "enec"
        and v["array_encoder"].get("level") == "fast",
    ),
    SkipRule(
        "ans-on-floats",
        "ans stores float planes raw: the payload is raw's, only slower; it pays only after a quantizer that emits codes",
        lambda v: not _emits_codes(v) and (v.get("array_encoder") or {}).get("id") == "ans",
    ),
    SkipRule(
        "bytes-after-entropy-coder",
        "the planes are already entropy coded (ans, or enec level 'max'); a general-purpose compressor after it "
        "costs time and gains nothing",
        lambda v: v.get("bytes_encoder") is not None and _entropy_coded(v),
        frozenset({"array_encoder", "bytes_encoder"}),
    ),
)


# -- the space --------------------------------------------------------------------------
@dataclass(frozen=True)
class EncoderChain:
    """An array encoder, optionally followed by one bytes encoder; labelled ``"raw+zstd"``."""

    array: StageSpace
    tail: StageSpace | None = None

    @property
    def label(self) -> str:
        return self.array.id if self.tail is None else f"{self.array.id}+{self.tail.id}"


@dataclass(frozen=True)
class SearchSpace:
    """The candidates of each slot, which slots may stay empty, and the skip rules.

    Build it with :meth:`from_registry`; draw a candidate with :meth:`suggest` (optuna),
    list all with :meth:`configs`, turn one into a pipeline with :meth:`build`.
    """

    transforms: tuple[StageSpace, ...]
    selectors: tuple[StageSpace, ...]
    quantizers: tuple[StageSpace, ...]
    chains: tuple[EncoderChain, ...]
    optional: frozenset[str] = DEFAULT_OPTIONAL
    rules: tuple[SkipRule, ...] = DEFAULT_RULES

    def __post_init__(self) -> None:
        unknown = sorted(set(self.optional) - set(SLOTS))
        if unknown:
            raise SearchSpaceError(f"optional slots {unknown} do not exist; the slots are {list(SLOTS)}")
        if "encoder" in self.optional:
            raise SearchSpaceError("the encoder slot cannot be empty: every pipeline has an array encoder (raw by default)")
        for slot in SLOTS:
            if not self._choices(slot) and slot not in self.optional:
                raise SearchSpaceError(f"the {slot} slot has no candidate and may not stay empty; "
                                       "include a stage of that kind or make the slot optional")  # fmt: skip

    @classmethod
    def from_registry(
        cls,
        stages: Mapping[str, Mapping[str, Any] | None] | Iterable[str] | None = None,
        *,
        optional: Iterable[str] = DEFAULT_OPTIONAL,
        rules: Iterable[SkipRule] = DEFAULT_RULES,
    ) -> SearchSpace:
        """The space of the registered stages that declare a ``search_space``.

        Parameters
        ----------
        stages : mapping or iterable of str, optional
            Restrict the space to these stage ids. In a mapping, a value replaces that
            stage's declared ``search_space`` (``None``: keep the declared one). Default:
            every registered stage that declares one.
        optional : iterable of str
            Slots that may stay empty (``"none"``): by default the transform and the
            selector. The quantizer slot is required unless listed here; the encoder slot
            always holds at least ``raw``.
        rules : iterable of SkipRule
            Combinations to skip (:data:`DEFAULT_RULES`).
        """
        from ..kv.registry import stage_class, stage_ids

        if stages is None:
            chosen: dict[str, Mapping[str, Any] | None] = {
                i: None for i in stage_ids() if getattr(stage_class(i), "search_space", None) is not None
            }
        elif isinstance(stages, Mapping):
            chosen = dict(stages)
        else:
            chosen = {i: None for i in stages}
        by_slot: dict[str, list[StageSpace]] = {s: [] for s in STAGE_SLOTS}
        for stage_id, params in chosen.items():
            space = StageSpace.of(stage_id, params)
            slot = slot_of(space.stage_class)
            if slot is None:
                raise SearchSpaceError(f"stage {stage_id!r} is a {space.stage_class.__name__}, not a KV stage kind")
            by_slot[slot].append(space)
        rules = tuple(rules)
        arrays = by_slot["array_encoder"] or [StageSpace.of("raw", {})]  # raw: what a pipeline without one uses
        chains = []
        for array in arrays:
            for tail in (None, *by_slot["bytes_encoder"]):
                chain = EncoderChain(array, tail)
                if not _chain_always_skipped(chain, rules):
                    chains.append(chain)
        return cls(tuple(by_slot["transform"]), tuple(by_slot["selector"]), tuple(by_slot["quantizer"]), tuple(chains),
                   frozenset(optional), rules)  # fmt: skip

    # -- structure -------------------------------------------------------------------------
    def _choices(self, slot: str) -> tuple:
        if slot == "encoder":
            return self.chains
        return {"transform": self.transforms, "selector": self.selectors, "quantizer": self.quantizers}[slot]

    def slot_ids(self, slot: str) -> tuple[str, ...]:
        """The choices of a slot as optuna sees them (``"none"`` first when it may stay empty)."""
        labels = tuple(c.label if isinstance(c, EncoderChain) else c.id for c in self._choices(slot))
        return ((NONE,) if slot in self.optional else ()) + labels

    def stage_ids(self) -> tuple[str, ...]:
        """Every stage id in the space."""
        ids = [s.id for s in (*self.transforms, *self.selectors, *self.quantizers)]
        for chain in self.chains:
            ids += [chain.array.id] + ([chain.tail.id] if chain.tail else [])
        return tuple(dict.fromkeys(ids))

    def distributions(self) -> dict[str, Any]:
        """Every optuna parameter of the space and its distribution (conditional ones included)."""
        optuna_module()
        from optuna.distributions import CategoricalDistribution

        out: dict[str, Any] = {}
        for slot in SLOTS:
            if len(self.slot_ids(slot)) > 1:
                out[slot] = CategoricalDistribution(self.slot_ids(slot))
        for stage in self.stage_spaces():
            out.update(stage.distributions())
        return out

    def stage_spaces(self) -> list[StageSpace]:
        """The space of every stage id in the space, once each."""
        seen: dict[str, StageSpace] = {}
        for stage in (*self.transforms, *self.selectors, *self.quantizers):
            seen.setdefault(stage.id, stage)
        for chain in self.chains:
            seen.setdefault(chain.array.id, chain.array)
            if chain.tail is not None:
                seen.setdefault(chain.tail.id, chain.tail)
        return list(seen.values())

    # -- drawing and listing -----------------------------------------------------------------
    def suggest(self, trial) -> dict[str, Any]:
        """Draw one pipeline config from an optuna trial (conditional parameters)."""
        optuna_module()
        from optuna.distributions import CategoricalDistribution

        stages: list[dict[str, Any]] = []
        for slot in SLOTS:
            ids = self.slot_ids(slot)
            pick = ids[0] if len(ids) == 1 else ask(trial, slot, CategoricalDistribution(ids))
            if pick == NONE:
                continue
            choice = next(c for c in self._choices(slot) if (c.label if isinstance(c, EncoderChain) else c.id) == pick)
            if isinstance(choice, EncoderChain):
                stages.append(choice.array.suggest(trial))
                if choice.tail is not None:
                    stages.append(choice.tail.suggest(trial))
            else:
                stages.append(choice.suggest(trial))
        return {"stages": stages}

    def configs(self, skip: bool = True) -> Iterator[dict[str, Any]]:
        """Every pipeline config of the space, in a fixed order (``skip``: without skipped ones)."""
        per_slot = []
        for slot in SLOTS:
            options: list[list[dict[str, Any]]] = [[]] if slot in self.optional else []
            for choice in self._choices(slot):
                if isinstance(choice, EncoderChain):
                    tails = list(choice.tail.configs()) if choice.tail is not None else [None]
                    options += [[a] + ([t] if t else []) for a in choice.array.configs() for t in tails]
                else:
                    options += [[c] for c in choice.configs()]
            per_slot.append(options)
        for combo in itertools.product(*per_slot):
            config = {"stages": [dict(stage) for part in combo for stage in part]}
            if not skip or self.skip_reason(config) is None:
                yield config

    def size(self, skip: bool = True) -> int:
        """How many configs :meth:`configs` lists."""
        return sum(1 for _ in self.configs(skip))

    # -- checking ------------------------------------------------------------------------------
    def skip_reason(self, config: Mapping[str, Any]) -> str | None:
        """``"<rule>: <reason>"`` of the first rule that skips ``config``, else None."""
        view = slot_view(config)
        for rule in self.rules:
            if rule.applies(view):
                return f"{rule.name}: {rule.reason}"
        return None

    def build(self, config: Mapping[str, Any]) -> Pipeline:
        """The pipeline of ``config``; raises :class:`CandidateRejected` when skipped or invalid."""
        reason = self.skip_reason(config)
        if reason is not None:
            raise CandidateRejected(f"skipped: {reason}")
        try:
            return Pipeline.from_config(dict(config))
        except StageConfigError as exc:
            raise CandidateRejected(f"invalid: {exc}") from exc


def slot_view(config: Mapping[str, Any]) -> dict[str, dict[str, Any] | None]:
    """``{slot: stage config or None}`` of a pipeline config (the first stage of each kind)."""
    from ..kv.registry import stage_class

    view: dict[str, dict[str, Any] | None] = dict.fromkeys(STAGE_SLOTS)
    for stage in config.get("stages", ()):
        slot = slot_of(stage_class(stage["id"]))
        if slot is not None and view[slot] is None:
            view[slot] = _with_defaults(stage)
    return view


def _with_defaults(stage: Mapping[str, Any]) -> dict[str, Any]:
    """The stage config with every parameter (defaults filled in), without building the stage."""
    from ..kv.registry import stage_class

    klass = stage_class(stage["id"])
    full = {"id": stage["id"]}
    for f in dataclasses.fields(klass):
        if f.name in stage:
            full[f.name] = stage[f.name]
        elif f.default is not dataclasses.MISSING:
            full[f.name] = f.default
    return full


def _chain_always_skipped(chain: EncoderChain, rules: tuple[SkipRule, ...]) -> bool:
    """Whether an encoder-only rule skips every setting of ``chain`` (then it is not offered)."""
    encoder_rules = [r for r in rules if r.slots <= {"array_encoder", "bytes_encoder"}]
    if not encoder_rules:
        return False
    try:
        arrays = list(chain.array.configs())
        tails = list(chain.tail.configs()) if chain.tail is not None else [None]
    except SearchSpaceError:  # a float range: cannot tell, keep the chain
        return False
    for array, tail in itertools.product(arrays, tails):
        view = {"transform": None, "selector": None, "quantizer": None,
                "array_encoder": _with_defaults(array), "bytes_encoder": _with_defaults(tail) if tail else None}  # fmt: skip
        if not any(rule.applies(view) for rule in encoder_rules):
            return False
    return True
