"""Diagnosis records: what the probe sends, what the aggregator saves (docs/FORMAT.md section 8).

A record is a flat JSON object whose ``k`` names its kind. Times are wall-clock nanoseconds
(``time.time_ns()``), so that ranks on different hosts with synchronised clocks compare;
durations that must not depend on clocks being in step are taken on one rank only.

=======  ===========================================================================
kind     fields
=======  ===========================================================================
hello    r (rank), w (world size), pid, host, t
op       r, id (per rank), pg, seq, op, n (bytes), peer (-1 for a collective), step,
         t0 (enqueued), t1 (ended, null while in flight), err (null or the message)
end      r, id, t1, err: the end of an op first sent while in flight
step     r, n (step number), t: a training step begins (a DDP forward)
hb       r, t, cpu (process CPU s), steal (host steal s), rss, rx, tx (bytes), drop, step
bye      r, t: the rank's probe stopped cleanly
=======  ===========================================================================

The aggregator adds ``at``, its own receive time in ns, to every record it keeps.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from ..errors import RecordFileError

__all__ = [
    "FORMAT",
    "KINDS",
    "VERSION",
    "check_record",
    "decode_batch",
    "encode_batch",
    "read_records",
    "write_records",
]

FORMAT = "tensorwire-diagnose-records"
VERSION = 1

_INT = (int,)
_OPT_INT = (int, type(None))
_OPT_STR = (str, type(None))
KINDS: dict[str, dict[str, tuple[type, ...]]] = {
    "hello": {"r": _INT, "w": _INT, "pid": _INT, "host": (str,), "t": _INT},
    "op": {"r": _INT, "id": _INT, "pg": (str,), "seq": _INT, "op": (str,), "n": _INT, "peer": _INT,
           "step": _INT, "t0": _INT, "t1": _OPT_INT, "err": _OPT_STR},
    "end": {"r": _INT, "id": _INT, "t1": _INT, "err": _OPT_STR},
    "step": {"r": _INT, "n": _INT, "t": _INT},
    "hb": {"r": _INT, "t": _INT, "cpu": (int, float), "steal": (int, float), "rss": _INT, "rx": _INT,
           "tx": _INT, "drop": _INT, "step": _INT},
    "bye": {"r": _INT, "t": _INT},
}


def check_record(rec: object, where: str) -> dict:
    """Return ``rec`` if it is a valid record, else raise :class:`RecordFileError` saying why."""
    if not isinstance(rec, dict):
        raise RecordFileError(f"{where}: a record is a JSON object, found {type(rec).__name__}")
    kind = rec.get("k")
    fields = KINDS.get(kind)  # type: ignore[arg-type]
    if fields is None:
        raise RecordFileError(f"{where}: unknown record kind {kind!r}; known kinds are {sorted(KINDS)}")
    for name, types in fields.items():
        value = rec.get(name, ...)
        # bool is an int in Python; a flag where a number belongs is a bad record all the same
        if value is ... or isinstance(value, bool) or not isinstance(value, types):
            raise RecordFileError(f"{where}: {kind} record has {name}={value!r} "
                                  f"(expected {'/'.join(t.__name__ for t in types)})")
    if rec["r"] < 0:
        raise RecordFileError(f"{where}: {kind} record has a negative rank {rec['r']}")
    return rec


def encode_batch(records: Iterable[dict]) -> bytes:
    """Records as JSON lines: the unit a probe sends to the aggregator."""
    return b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in records)


def decode_batch(data: bytes, where: str = "batch") -> list[dict]:
    """The records of one batch; a line that is not a whole valid record raises."""
    out = []
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:
        raise RecordFileError(f"{where}: the last line has no newline: the batch was cut short")
    for i, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except ValueError as exc:
            raise RecordFileError(f"{where}, line {i}: not JSON ({exc})") from None
        out.append(check_record(rec, f"{where}, line {i}"))
    return out


def write_records(path: str | Path, records: Iterable[dict], **meta) -> None:
    """Write a record file atomically: a temporary file in the same folder, then a rename."""
    path = Path(path)
    header = {"format": FORMAT, "version": VERSION, **meta}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(header).encode() + b"\n")
            for rec in records:
                f.write(json.dumps(rec, separators=(",", ":")).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_records(path: str | Path) -> tuple[dict, list[dict]]:
    """``(header, records)`` of a record file; a bad or cut-short file raises :class:`RecordFileError`."""
    path = Path(path)
    with open(path, "rb") as f:
        data = f.read()
    first, sep, rest = data.partition(b"\n")
    try:
        header = json.loads(first) if sep else None
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise RecordFileError(f"{path}: not a tensorwire diagnosis record file (its first line is not "
                              f"the {FORMAT!r} header); pass the records.jsonl that `tensorwire diagnose "
                              "run` wrote")
    if header.get("version") != VERSION:
        raise RecordFileError(f"{path}: record file version {header.get('version')!r}, this build reads "
                              f"version {VERSION}; upgrade tensorwire")
    return header, decode_batch(rest, str(path)) if rest else []

