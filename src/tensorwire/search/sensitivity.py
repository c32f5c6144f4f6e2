"""Mixed precision by measured sensitivity: which layers' keys and values can take fewer bits.

:func:`scan` measures, for every layer and for keys and values apart, the perplexity
increase when only that part is quantized at each candidate width while every other part
stays at ``base_bits`` (near lossless): one cheap evaluation per (layer, part, width), on
the real model and text. :func:`allocate` then picks one width per part: starting from the
widest candidate everywhere, it repeatedly narrows the part that adds the least perplexity
per bit saved (:func:`narrowing_costs`) while the summed additions stay within the budget
(a greedy Lagrangian knapsack). The parts' increases are not exactly additive and the scan
is noisy, so a budget orders allocations rather than promising a quality: each allocation
is evaluated in full and the ones that meet the target are kept. The widths become a
``mixed`` quantizer (:class:`tensorwire.kv.quantizers.mixed.MixedBits`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Sensitivity", "allocate", "mixed_config", "narrowing_costs", "scan"]

PARTS = ("k", "v")


@dataclass
class Sensitivity:
    """``increase[part][layer][j]``: perplexity increase (relative) with ``bits[j]`` on that part alone."""

    bits: tuple[int, ...]
    base_bits: int
    base_increase: float  # every part at base_bits
    increase: dict[str, list[list[float]]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(self.increase["k"])

    def to_dict(self) -> dict[str, Any]:
        return {"bits": list(self.bits), "base_bits": self.base_bits, "base_increase": self.base_increase,
                "increase": self.increase, "settings": self.settings}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sensitivity:
        return cls(tuple(data["bits"]), data["base_bits"], data["base_increase"], data["increase"], data.get("settings", {}))


def mixed_config(k_bits: Sequence[int], v_bits: Sequence[int], group_size: int = 128, residual: int = 0,
                 encoder: str = "ans") -> dict[str, Any]:  # fmt: skip
    """A pipeline config: the ``mixed`` quantizer with these widths, then ``encoder``."""
    quantizer = {"id": "mixed", "k_bits": list(k_bits), "v_bits": list(v_bits), "group_size": group_size,
                 "residual": residual}  # fmt: skip
    return {"stages": [quantizer, {"id": encoder}]}


def scan(measure: Callable[[dict[str, Any]], float], n_layers: int, bits: Sequence[int] = (2, 3, 4),
         base_bits: int = 8, group_size: int = 128, residual: int = 0,
         log: Callable[[str], None] | None = None) -> Sensitivity:  # fmt: skip
    """Measure every (layer, part, width) alone; ``measure(pipeline config)`` returns a relative ppl increase.

    With :class:`tensorwire.kv.quality.Evaluator`:
    ``measure = lambda config: ev.evaluate(Pipeline.from_config(config), windows=1, needles=0, speed=False).ppl_increase``.
    """
    base = [base_bits] * n_layers
    base_increase = measure(mixed_config(base, base, group_size, residual))
    increase: dict[str, list[list[float]]] = {part: [] for part in PARTS}
    for layer in range(n_layers):
        for part in PARTS:
            row = []
            for width in bits:
                widths = {p: list(base) for p in PARTS}
                widths[part][layer] = width
                row.append(measure(mixed_config(widths["k"], widths["v"], group_size, residual)) - base_increase)
            increase[part].append(row)
        if log:
            log(f"layer {layer}: k {['%+.4f' % d for d in increase['k'][-1]]} v {['%+.4f' % d for d in increase['v'][-1]]}")
    settings = {"group_size": group_size, "residual": residual}
    return Sensitivity(tuple(bits), base_bits, base_increase, increase, settings)


def narrowing_costs(sensitivity: Sensitivity) -> dict[str, list[list[float]]]:
    """Per part, the increase at each width (``sorted(bits)`` order) over the widest width.

    Measured, not modelled: the increase a width adds to the part's increase at the widest
    candidate, clamped to be non-negative and never smaller at a narrower width (a few
    hundred scored tokens leave about +-0.3 % of noise, which must not buy bits back).
    Errors do not follow one curve across widths (2-bit keys break where 3-bit keys are
    nearly free, values degrade steadily), so each width is taken as measured.
    """
    bits = sorted(sensitivity.bits)
    costs: dict[str, list[list[float]]] = {}
    for part in PARTS:
        costs[part] = []
        for row in sensitivity.increase[part]:
            measured = [row[sensitivity.bits.index(width)] for width in bits]
            added = [max(0.0, m - measured[-1]) for m in measured]
            costs[part].append([max(added[j:]) for j in range(len(bits))])
    return costs


def allocate(sensitivity: Sensitivity, budget: float) -> tuple[list[int], list[int], float]:
    """Widths per layer for keys and values whose summed added increase stays within ``budget``.

    ``budget`` is on top of every part at the widest candidate (:func:`narrowing_costs`).
    Returns ``(k_bits, v_bits, predicted added increase)``. The prediction orders
    allocations; it is not the measured quality (the parts' increases are not exactly
    additive): evaluate the allocations and keep the ones that meet the quality target.
    """
    bits = sorted(sensitivity.bits)
    costs = narrowing_costs(sensitivity)
    choice = {part: [len(bits) - 1] * sensitivity.n_layers for part in PARTS}  # index into bits, widest first

    def cost(part: str, layer: int, j: int) -> float:
        return costs[part][layer][j]

    total = sum(cost(part, layer, choice[part][layer]) for part in PARTS for layer in range(sensitivity.n_layers))
    while True:
        best = None
        for part in PARTS:
            for layer in range(sensitivity.n_layers):
                j = choice[part][layer]
                if j == 0:
                    continue
                added = cost(part, layer, j - 1) - cost(part, layer, j)
                saved = bits[j] - bits[j - 1]
                if added > 0 and total + added > budget:  # a free narrowing is always taken
                    continue
                score = added / saved
                if best is None or score < best[0]:
                    best = (score, part, layer, added)
        if best is None:
            break
        _, part, layer, added = best
        choice[part][layer] -= 1
        total += added
    widths = {part: [bits[j] for j in choice[part]] for part in PARTS}
    return widths["k"], widths["v"], total
