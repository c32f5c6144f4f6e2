"""The aggregator: hosts the TCPStore queue the probes push to, and runs the analyzer online.

It is torch's own ``TCPStore`` (the channel torch.distributed already uses to rendezvous),
hosted by the process that watches the job, never by a rank: a rank that hangs or dies
cannot take the records of the others with it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from ..errors import DiagnoseError, RecordFileError, require
from .analyzer import Analyzer, Finding, Settings
from .probe import QUEUE_KEY
from .records import decode_batch, write_records

__all__ = ["Aggregator"]


class Aggregator:
    """Receive records, analyze them as they come, keep them for the record file.

    Parameters
    ----------
    settings : the analyzer's thresholds.
    on_finding : called (from the aggregator's thread) with each new finding.
    poll_s : how often the queue is drained and the rules applied.
    """

    def __init__(self, settings: Settings | None = None, on_finding: Callable[[Finding], None] | None = None,
                 poll_s: float = 0.05, port: int = 0):
        require("torch")
        import torch.distributed as dist

        try:
            self._store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, use_libuv=True)
        except Exception as exc:
            raise DiagnoseError(f"the aggregator's TCPStore could not listen on port {port}: {exc}") from exc
        self.analyzer = Analyzer(settings)
        self.records: list[dict] = []
        self.bad_batches: list[str] = []
        self.on_finding = on_finding
        self.poll_s = poll_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tensorwire-aggregator", daemon=True)
        self.started_ns = time.time_ns()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self._store.port}"

    def start(self) -> Aggregator:
        self._thread.start()
        return self

    def poll(self, final: bool = False) -> list[Finding]:
        """Drain the queue, feed the analyzer, apply the rules once (the last time, if ``final``)."""
        import torch.distributed as dist

        received = []
        for _ in range(self._store.queue_len(QUEUE_KEY)):
            try:
                data = self._store.queue_pop(QUEUE_KEY, block=False)
            except dist.QueueEmptyError:
                break
            at = time.time_ns()
            try:
                batch = decode_batch(data, "probe batch")
            except RecordFileError as exc:  # a bad batch costs its own records, not the run
                self.bad_batches.append(str(exc))
                continue
            for rec in batch:
                rec["at"] = at
            received.extend(batch)
        with self._lock:
            self.records.extend(received)
            self.analyzer.feed(received)
            now = time.time_ns()
            new = self.analyzer.finish(now) if final else self.analyzer.check(now)
        for finding in new:
            if self.on_finding is not None:
                self.on_finding(finding)
        return new

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def stop(self, final: bool = True) -> None:
        """Stop polling after one last drain; with ``final``, the job is over and silent ranks stay so."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.poll(final=final)

    def save(self, path, **meta) -> None:
        with self._lock:
            write_records(path, list(self.records), started_ns=self.started_ns, **meta)
