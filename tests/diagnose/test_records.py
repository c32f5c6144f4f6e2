"""Record files: round trip, atomic writes, and a named error for every kind of bad file."""

from __future__ import annotations

import json

import pytest

from tensorwire.diagnose.records import FORMAT, VERSION, decode_batch, encode_batch, read_records, write_records
from tensorwire.errors import FormatError, RecordFileError

OP = {"k": "op", "r": 1, "id": 7, "pg": "default", "seq": 3, "op": "all_reduce", "n": 4096, "peer": -1,
      "step": 2, "t0": 10, "t1": None, "err": None}
RECORDS = [
    {"k": "hello", "r": 1, "w": 4, "pid": 99, "host": "node0", "t": 1},
    OP,
    {"k": "end", "r": 1, "id": 7, "t1": 20, "err": "RuntimeError: closed"},
    {"k": "step", "r": 1, "n": 3, "t": 21},
    {"k": "hb", "r": 1, "t": 22, "cpu": 1.5, "steal": 0.0, "rss": 1 << 20, "rx": 5, "tx": 6, "drop": 0, "step": 3},
    {"k": "bye", "r": 1, "t": 30},
]


def test_round_trip(tmp_path):
    path = tmp_path / "records.jsonl"
    write_records(path, RECORDS, world=4)
    header, records = read_records(path)
    assert header == {"format": FORMAT, "version": VERSION, "world": 4}
    assert records == RECORDS
    assert decode_batch(encode_batch(RECORDS)) == RECORDS


def test_empty_file_of_records(tmp_path):
    path = tmp_path / "records.jsonl"
    write_records(path, [])
    assert read_records(path)[1] == []


def test_cut_short_file_is_named(tmp_path):
    path = tmp_path / "records.jsonl"
    write_records(path, RECORDS)
    data = path.read_bytes()
    path.write_bytes(data[:-7])
    with pytest.raises(RecordFileError, match="cut short"):
        read_records(path)
    path.write_bytes(data[: len(data) // 2].rsplit(b"\n", 1)[0] + b"\n{\"k\": \"op\"\n")
    with pytest.raises(RecordFileError, match="line"):
        read_records(path)


@pytest.mark.parametrize("first_line, match", [
    (b"not json", "not a tensorwire diagnosis record file"),
    (json.dumps({"format": "something-else", "version": 1}).encode(), "not a tensorwire"),
    (json.dumps({"format": FORMAT, "version": 99}).encode(), "version 99"),
    (b"", "not a tensorwire"),
])
def test_bad_header(tmp_path, first_line, match):
    path = tmp_path / "records.jsonl"
    path.write_bytes(first_line + b"\n")
    with pytest.raises(RecordFileError, match=match):
        read_records(path)


@pytest.mark.parametrize("record, match", [
    ([1, 2], "JSON object"),
    ({"k": "nope", "r": 0}, "unknown record kind"),
    ({**OP, "seq": "3"}, "seq='3'"),
    ({**OP, "n": True}, "n=True"),
    ({k: v for k, v in OP.items() if k != "t0"}, "t0=Ellipsis"),
    ({**OP, "r": -1}, "negative rank"),
])
def test_bad_record_is_named(record, match):
    with pytest.raises(RecordFileError, match=match):
        decode_batch(json.dumps(record).encode() + b"\n")


def test_record_file_error_is_a_format_error():
    assert issubclass(RecordFileError, FormatError) and issubclass(RecordFileError, ValueError)


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "records.jsonl"
    write_records(path, RECORDS)
    before = path.read_bytes()

    def records_then_failure():
        yield RECORDS[0]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_records(path, records_then_failure())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["records.jsonl"]
