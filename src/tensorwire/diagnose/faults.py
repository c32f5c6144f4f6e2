"""Fault injection into a real torch.distributed job, for the tests and the benchmark.

A fault is set from outside the job, in ``TENSORWIRE_FAULT`` (JSON of :class:`Fault`); the
bootstrap that loads the probe installs the injector first, so the probe traces the faulty
job as it would trace a real one and the job's code knows nothing of either. Steps are
counted at each DDP forward, as the probe counts them.

=========  ============================================================================
kind       what the faulty rank does from ``step`` on
=========  ============================================================================
straggler  sleeps ``seconds`` before each forward (compute that takes longer)
hang       sleeps for ever before the forward of ``step`` (never reaches its collectives)
crash      kills itself with SIGKILL before the forward of ``step``
desync     at ``step``, its next all_reduce becomes an all_gather (``mode="op"``) or
           reduces one element more (``mode="size"``)
slow_link  every send to ``peer`` leaves ``seconds`` late, beneath the probe (after the op
           was recorded) and without holding the sender (an isend starts on a timer
           thread): a path that delivers late while both ends are on time
=========  ============================================================================

Each injected fault prints one line ``tensorwire-fault {json}`` on stderr with its onset time,
which the benchmark takes as the ground truth.
"""

from __future__ import annotations

import functools
import json
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass

from ..errors import TensorwireError

__all__ = ["FAULT_ENV", "Fault", "install_from_env", "sample_faults"]

FAULT_ENV = "TENSORWIRE_FAULT"
KINDS = ("straggler", "hang", "crash", "desync", "slow_link")


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int
    step: int
    seconds: float = 0.0
    peer: int = -1
    mode: str = "op"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise TensorwireError(f"unknown fault kind {self.kind!r}; known: {', '.join(KINDS)}")
        if self.kind == "slow_link" and (self.peer < 0 or self.peer == self.rank):
            raise TensorwireError(f"a slow link needs a peer other than rank {self.rank}, found {self.peer}")
        if self.kind == "desync" and self.mode not in ("op", "size"):
            raise TensorwireError(f"a desync mode is 'op' or 'size', found {self.mode!r}")

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls, text: str) -> Fault:
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError) as exc:
            raise TensorwireError(f"{FAULT_ENV} is not a fault: {text!r} ({exc})") from None


def sample_faults(n: int, world: int, steps: tuple[int, int], step_s: float, rng: random.Random) -> list[Fault]:
    """``n`` random faults: kind, rank, onset step and severity (straggler 20-100 % of a step)."""
    faults = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        rank = rng.randrange(world)
        step = rng.randint(*steps)
        if kind == "straggler":
            faults.append(Fault(kind, rank, step, seconds=round(rng.uniform(0.2, 1.0) * step_s, 4)))
        elif kind == "slow_link":
            faults.append(Fault(kind, rank, step, seconds=round(rng.uniform(0.02, 0.08), 4),
                                peer=(rank + 1) % world))
        elif kind == "desync":
            faults.append(Fault(kind, rank, step, mode=rng.choice(("op", "size"))))
        else:
            faults.append(Fault(kind, rank, step))
    rng.shuffle(faults)
    return faults


def _announce(fault: Fault, **extra) -> None:
    print("tensorwire-fault " + json.dumps({**asdict(fault), "onset_ns": time.time_ns(), **extra}),
          file=sys.stderr, flush=True)


_installed: dict[str, object] = {}


class _LateWork:
    """An isend that leaves after a delay, like data on a slow path: the caller goes on at once."""

    def __init__(self, delay_s: float, start):
        self._work = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(delay_s, start), daemon=True)
        self._thread.start()

    def _run(self, delay_s, start):
        time.sleep(delay_s)
        try:
            self._work = start()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's wait()
            self._error = exc

    def wait(self, *args, **kwargs):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._work.wait(*args, **kwargs)

    def is_completed(self):
        return not self._thread.is_alive() and (self._error is not None or self._work.is_completed())


def _fault_here() -> Fault | None:
    text = os.environ.get(FAULT_ENV)
    if not text:
        return None
    fault = Fault.from_env(text)
    return fault if int(os.environ.get("RANK", "-1")) == fault.rank else None


def install_from_env(part: str = "all") -> Fault | None:
    """Install the fault ``TENSORWIRE_FAULT`` names, in this rank only if it is the faulty one.

    ``part`` places the injector around the probe: "below" (the slow link, beneath the
    probe's record of the send) is installed before the probe, "above" (the job's own
    behaviour: steps, collectives it calls) after it; "all" does both, for a job without probe.
    """
    fault = _fault_here()
    if fault is None:
        return None
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d
    from .probe import before_each_ddp_forward

    state = _installed.setdefault("state", {"step": 0, "announced": False})

    def once(**extra):
        if not state["announced"]:
            state["announced"] = True
            _announce(fault, **extra)

    if part in ("below", "all") and fault.kind == "slow_link":
        send, isend = c10d.send, c10d.isend

        @functools.wraps(send)
        def delayed_send(tensor, dst=None, *args, **kwargs):
            if state["step"] >= fault.step and dst == fault.peer:
                once()
                time.sleep(fault.seconds)
            return send(tensor, dst, *args, **kwargs)

        @functools.wraps(isend)
        def delayed_isend(tensor, dst=None, *args, **kwargs):
            if state["step"] < fault.step or dst != fault.peer:
                return isend(tensor, dst, *args, **kwargs)
            once()
            return _LateWork(fault.seconds, lambda: isend(tensor, dst, *args, **kwargs))

        dist.send = c10d.send = delayed_send
        dist.isend = c10d.isend = delayed_isend
    if part not in ("above", "all"):
        return fault

    def before_forward(module, inputs):
        state["step"] += 1
        if state["step"] < fault.step:
            return
        if fault.kind == "straggler":
            once()
            time.sleep(fault.seconds)
        elif fault.kind == "hang":
            once()
            while True:
                time.sleep(3600)
        elif fault.kind == "crash":
            once()
            os.kill(os.getpid(), signal.SIGKILL)

    before_each_ddp_forward(before_forward)

    if fault.kind == "desync":
        all_reduce = dist.all_reduce

        @functools.wraps(all_reduce)
        def desynced_all_reduce(tensor, *args, **kwargs):
            if state["step"] < fault.step or state["announced"]:
                return all_reduce(tensor, *args, **kwargs)
            once()
            if fault.mode == "op":
                return dist.all_gather([tensor.clone() for _ in range(dist.get_world_size())], tensor)
            return all_reduce(tensor.new_zeros(tensor.numel() + 1), *args, **kwargs)

        dist.all_reduce = c10d.all_reduce = desynced_all_reduce
    return fault
