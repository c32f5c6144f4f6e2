"""The rank-level probe: traces every collective and point-to-point op of a torch.distributed job.

``install()`` wraps ``torch.distributed``'s collective and point-to-point functions and
DistributedDataParallel, and ``init_process_group`` starts the probe once the rank is known.
What PyTorch gives and what the probe adds:

- PyTorch's Flight Recorder keeps a ring of collectives per process group, but on gloo it
  records neither start nor end times nor point-to-point ops, and is read only when someone
  dumps it. The probe records enqueue and end times of both kinds and streams them out.
- DDP all-reduces its gradient buckets from C++, out of reach of the Python functions; the
  probe registers a comm hook that wraps DDP's own (PyTorch's ``allreduce_hook`` when the job
  set none, else the job's), so each bucket is traced as a ``ddp_bucket`` collective, and
  counts a step at each DDP forward.
- Records leave the job over a torch ``TCPStore`` queue hosted by the aggregator, from a
  background thread, never through the job's own process groups. The job's threads only
  append to a bounded buffer: a slow, unreachable or dead aggregator costs dropped records
  (counted, and reported in every heartbeat), never a stalled or failed step.
"""

from __future__ import annotations

import datetime
import functools
import itertools
import os
import socket
import threading
import time
from collections import deque

from .hostmetrics import host_sample
from .records import encode_batch

__all__ = ["ADDR_ENV", "QUEUE_KEY", "Probe", "active_probe", "install"]

QUEUE_KEY = "tensorwire/diagnose/records"
ADDR_ENV = "TENSORWIRE_DIAGNOSE_ADDR"

COLLECTIVES = ("all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "barrier", "monitored_barrier",
               "gather", "scatter")
POINT_TO_POINT = ("send", "recv", "isend", "irecv")

_probe: Probe | None = None
_depth = threading.local()  # a collective built from other collectives is traced once, as itself


def active_probe() -> Probe | None:
    return _probe


def _nbytes(obj) -> int:
    if hasattr(obj, "element_size") and hasattr(obj, "numel"):
        return obj.element_size() * obj.numel()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    return 0


class Probe:
    """Buffers one rank's records and sends them to the aggregator from a background thread.

    Parameters
    ----------
    addr : "host:port" of the aggregator's TCPStore, or None to keep records in memory only.
    rank, world : this rank and the world size.
    flush_s : how often records are sent; an op still running at a flush is announced in
        flight (so a hang is visible) and its end follows as an ``end`` record.
    heartbeat_s : how often host metrics are sampled.
    max_buffer : records kept while the aggregator is unreachable; older ones are dropped.
    """

    def __init__(self, addr: str | None, rank: int, world: int, *, flush_s: float = 0.05,
                 heartbeat_s: float = 0.25, max_buffer: int = 200_000, connect_timeout_s: float = 2.0):
        self.addr, self.rank, self.world = addr, rank, world
        self.flush_s, self.heartbeat_s, self.connect_timeout_s = flush_s, heartbeat_s, connect_timeout_s
        self.step = 0
        self.dropped = 0
        self.sent = 0
        self._ids = itertools.count()
        self._seq: dict[str, int] = {}
        self._pair_seq: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()
        self._buffer: deque[dict] = deque()
        self._max_buffer = max_buffer
        self._inflight: dict[int, dict] = {}
        self._announced: set[int] = set()
        self._store = None
        self._next_connect = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.kept: list[dict] | None = [] if addr is None else None

    # -- the job's side: cheap, never blocks on the network ---------------------------------------
    def _put(self, rec: dict) -> None:
        if len(self._buffer) >= self._max_buffer:
            self._buffer.popleft()
            self.dropped += 1
        self._buffer.append(rec)

    def begin(self, op: str, pg: str, nbytes: int, peer: int = -1) -> dict:
        """Record an op entering; returns its record for :meth:`end`."""
        with self._lock:
            if peer < 0:
                seq = self._seq[pg] = self._seq.get(pg, 0) + 1
            else:
                pair = (self.rank, peer) if op in ("send", "isend") else (peer, self.rank)
                seq = self._pair_seq[pair] = self._pair_seq.get(pair, 0) + 1
            rec = {"k": "op", "r": self.rank, "id": next(self._ids), "pg": pg, "seq": seq,
                   "op": op.removeprefix("i") if peer >= 0 else op, "n": nbytes, "peer": peer,
                   "step": self.step, "t0": time.time_ns(), "t1": None, "err": None}
            self._inflight[rec["id"]] = rec
        return rec

    def end(self, rec: dict, err: BaseException | None = None) -> None:
        t1 = time.time_ns()
        message = None if err is None else f"{type(err).__name__}: {err}"[:300]
        with self._lock:
            if self._inflight.pop(rec["id"], None) is None:
                return  # already ended (a Work waited twice)
            if rec["id"] in self._announced:
                self._announced.discard(rec["id"])
                self._put({"k": "end", "r": self.rank, "id": rec["id"], "t1": t1, "err": message})
            else:
                self._put({**rec, "t1": t1, "err": message})

    def mark_step(self) -> None:
        with self._lock:
            self.step += 1
            self._put({"k": "step", "r": self.rank, "n": self.step, "t": time.time_ns()})

    # -- the background side ---------------------------------------------------------------------
    def start(self) -> Probe:
        host = socket.gethostname()
        self._put({"k": "hello", "r": self.rank, "w": self.world, "pid": os.getpid(), "host": host,
                   "t": time.time_ns()})
        self._thread = threading.Thread(target=self._run, name="tensorwire-probe", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 2.0) -> None:
        """Send what is buffered and a ``bye``; used at exit."""
        if self._thread is None or self._stop.is_set():
            return
        with self._lock:
            self._put({"k": "bye", "r": self.rank, "t": time.time_ns()})
        self._stop.set()
        self._thread.join(timeout_s)

    def _heartbeat(self) -> dict:
        return {"k": "hb", "r": self.rank, "t": time.time_ns(), **host_sample(), "drop": self.dropped,
                "step": self.step}

    def _run(self) -> None:
        next_beat = 0.0
        while True:
            stopping = self._stop.wait(self.flush_s)
            now = time.monotonic()
            with self._lock:
                if now >= next_beat:
                    self._put(self._heartbeat())
                    next_beat = now + self.heartbeat_s
                # every op running at a flush is announced, so that a rank killed the next moment
                # leaves a record of what it was waiting in; only the shortest ops are spared
                old = time.time_ns() - 5_000_000
                for rec in self._inflight.values():
                    if rec["id"] not in self._announced and rec["t0"] < old:
                        self._announced.add(rec["id"])
                        self._put(dict(rec))
                batch = list(self._buffer)
                self._buffer.clear()
            if batch:
                self._send(batch)
            if stopping:
                return

    def _send(self, batch: list[dict]) -> None:
        if self.kept is not None:
            self.kept.extend(batch)
            return
        store = self._connect()
        if store is not None:
            try:
                store.queue_push(QUEUE_KEY, encode_batch(batch))
                self.sent += len(batch)
                return
            except Exception:  # noqa: BLE001 - the aggregator went away: count the loss, try again later
                self._store = None
        with self._lock:
            self.dropped += len(batch)

    def _connect(self):
        if self._store is not None or time.monotonic() < self._next_connect:
            return self._store
        import torch.distributed as dist

        host, _, port = self.addr.rpartition(":")
        try:
            # A plain socket first: a dead aggregator is found in Python, not in TCPStore's C++
            # retry loop (up to its whole timeout) on a thread that the job's exit may cut short
            socket.create_connection((host, int(port)), timeout=self.connect_timeout_s).close()
            self._store = dist.TCPStore(host, int(port), is_master=False, wait_for_workers=False,
                                        timeout=datetime.timedelta(seconds=self.connect_timeout_s))
        except Exception:  # noqa: BLE001 - unreachable, refused, timed out: try again later
            self._next_connect = time.monotonic() + 2.0
        return self._store


# -- wrapping torch.distributed -----------------------------------------------------------------------
def _pg_name(group) -> str:
    if group is None:
        return "default"
    return str(getattr(group, "group_name", None) or id(group))


class _TracedWork:
    """A point-to-point Work (gloo gives these no future): the op ends when a wait returns."""

    def __init__(self, work, rec: dict):
        self._work, self._rec = work, rec

    def wait(self, *args, **kwargs):
        try:
            result = self._work.wait(*args, **kwargs)
        except BaseException as exc:
            _probe_end(self._rec, exc)
            raise
        _probe_end(self._rec)
        return result

    def is_completed(self):
        done = self._work.is_completed()
        if done:
            _probe_end(self._rec)
        return done

    def __getattr__(self, name):
        return getattr(self._work, name)


def _probe_end(rec: dict, err: BaseException | None = None) -> None:
    if _probe is not None:
        _probe.end(rec, err)


def _end_when_done(fut, rec: dict) -> None:
    def done(f):
        try:
            f.value()
        except BaseException as exc:  # noqa: BLE001 - the op failed: recorded, the future keeps its error
            _probe_end(rec, exc)
            return
        _probe_end(rec)

    fut.add_done_callback(done)


def _wrap_collective(name: str, fn):
    @functools.wraps(fn)
    def traced(*args, **kwargs):
        probe = _probe
        if probe is None or getattr(_depth, "n", 0):
            return fn(*args, **kwargs)
        group = kwargs.get("group")
        rec = probe.begin(name, _pg_name(group), _nbytes(args[0]) if args else 0)
        _depth.n = 1
        try:
            work = fn(*args, **kwargs)
        except BaseException as exc:
            probe.end(rec, exc)
            raise
        finally:
            _depth.n = 0
        if kwargs.get("async_op") and work is not None:
            try:
                _end_when_done(work.get_future(), rec)
            except RuntimeError:  # no future for this backend: the op ends at its wait
                return _TracedWork(work, rec)
        else:
            probe.end(rec)
        return work

    traced.__tensorwire_traced__ = True
    return traced


def _wrap_p2p(name: str, fn):
    peer_arg = "dst" if name in ("send", "isend") else "src"

    @functools.wraps(fn)
    def traced(tensor, *args, **kwargs):
        probe = _probe
        peer = kwargs.get(peer_arg, args[0] if args else None)
        if probe is None or peer is None:  # a receive from any source: no pair to attribute
            return fn(tensor, *args, **kwargs)
        rec = probe.begin(name, _pg_name(kwargs.get("group")), _nbytes(tensor), int(peer))
        try:
            result = fn(tensor, *args, **kwargs)
        except BaseException as exc:
            probe.end(rec, exc)
            raise
        if name.startswith("i"):
            return _TracedWork(result, rec)
        probe.end(rec)
        return result

    traced.__tensorwire_traced__ = True
    return traced


def _traced_comm_hook(hook):
    """A DDP comm hook whose bucket all-reduce is traced as a ``ddp_bucket`` collective."""

    @functools.wraps(hook)
    def traced(state, bucket):
        probe = _probe
        if probe is None:
            return hook(state, bucket)
        # the state is the process group itself (PyTorch's hooks) or holds one, or is the job's own
        group = state if hasattr(state, "group_name") else getattr(state, "process_group", None)
        rec = probe.begin("ddp_bucket", _pg_name(group), _nbytes(bucket.buffer()))
        _depth.n = 1
        try:
            fut = hook(state, bucket)
        except BaseException as exc:
            probe.end(rec, exc)
            raise
        finally:
            _depth.n = 0
        _end_when_done(fut, rec)
        return fut

    return traced


def before_each_ddp_forward(hook) -> None:
    """Run ``hook(module, inputs)`` before every forward of each DDP module made from now on."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    init = DDP.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.register_forward_pre_hook(hook)

    DDP.__init__ = __init__


def _patch_ddp() -> None:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    if getattr(DDP, "__tensorwire_traced__", False):
        return
    register = DDP.register_comm_hook

    def register_comm_hook(self, state, hook):
        return register(self, state, _traced_comm_hook(hook))

    def forward_pre_hook(module, inputs):
        if not module._comm_hooks:
            # DDP's built-in all-reduce runs in C++; PyTorch's allreduce_hook does the same in Python
            register(module, module.process_group, _traced_comm_hook(allreduce_hook))
        if _probe is not None:
            _probe.mark_step()

    before_each_ddp_forward(forward_pre_hook)
    DDP.register_comm_hook = register_comm_hook
    DDP.__tensorwire_traced__ = True


def install(addr: str | None = None, **probe_options) -> None:
    """Trace this process's torch.distributed calls; the probe starts when the process group exists.

    ``addr`` is the aggregator's "host:port" (default: the ``TENSORWIRE_DIAGNOSE_ADDR``
    environment variable that ``tensorwire diagnose run`` sets). Calling it twice is harmless.
    """
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    addr = addr if addr is not None else os.environ.get(ADDR_ENV)
    for module in (dist, c10d):
        for name in COLLECTIVES + POINT_TO_POINT:
            fn = getattr(module, name, None)
            if fn is None or getattr(fn, "__tensorwire_traced__", False):
                continue
            setattr(module, name, (_wrap_p2p if name in POINT_TO_POINT else _wrap_collective)(name, fn))
    _patch_ddp()
    init = c10d.init_process_group
    if getattr(init, "__tensorwire_traced__", False):
        return

    @functools.wraps(init)
    def init_process_group(*args, **kwargs):
        global _probe
        result = init(*args, **kwargs)
        if _probe is None:
            import atexit

            _probe = Probe(addr, dist.get_rank(), dist.get_world_size(), **probe_options).start()
            atexit.register(_probe.stop)
        return result

    init_process_group.__tensorwire_traced__ = True
    c10d.init_process_group = dist.init_process_group = init_process_group
