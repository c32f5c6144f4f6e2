"""The ``ans`` array encoder: rANS entropy coding of code planes with static per-plane models.

Code planes (uint8, ``bits`` in 1..8) are coded with range asymmetric numeral systems
(rANS) under static models built from the plane's own histograms, by the interleaved
numba coder of :mod:`tensorwire.kv.encoders.rans`. Only the symbols that occur get
probability mass, so unlike a Huffman code (at least one bit per value) a skewed 2-bit
plane costs close to its entropy, e.g. 0.3 bits per value.

Models (``context``):

* ``"none"``: one model for the whole plane.
* ``"column"``: one model per *column*, the values that share every index but the token
  axis (axis -2; for a ``(batch, kv_heads, tokens, head_dim)`` plane, one model per batch
  row, head and channel). Real key caches have channels of very different spread, so
  their codes depend on the channel: on a SmolLM2 key layer quantised per token, the
  per-column entropy is 1.11 bits per code against 1.46 for the plane at 2 bits (3.14
  against 3.62 at 4 bits). The encoder estimates both sizes, tables included, and keeps
  one model when the columns' tables would cost more than they save (few tokens, flat
  histograms, planes of fewer than 2 dimensions).

Stream layout of a code plane (little-endian; ``n``, ``shape`` and ``bits`` come from the caller)::

    u8  mode                          2: one model; 3: one model per column
    u8  prob_bits                     P, 1..12: frequencies sum to 2**P
    u8  lanes                         interleaved coder states, a power of two, 1..64
    u8  present[m][ceil(2**bits/8)]   per model, bit s (LSB-first) set when symbol s occurs
    u16 freq[...]                     per model with k >= 2 symbols present: k frequencies
    u32 states[lanes]                 the coder's final states; absent when no model has k >= 2
    u16 words[...]                    the coder's words, in decoding order

``m = 1`` in mode 2; in mode 3 ``m = n / shape[-2]`` models in the C order of the plane's
other axes. ``freq`` holds a model's frequency of each present symbol in increasing
symbol order, each at least 1, summing to exactly ``2**P`` (so ``2**P >= k``). The coded
sequence is the values of the models with two or more symbols, model after model (mode 3:
column after column, each along the tokens); a model with one symbol (a constant column)
codes nothing. Value ``i`` of the sequence is coded by lane ``i % lanes``, exactly as
:mod:`tensorwire.kv.encoders.rans` specifies (states in ``[2**15, 2**31)``, 16-bit words,
symbol ``s`` of a model owning the slots ``[cum_s, cum_s + freq_s)``). The decoder cannot
produce a value the encoder did not see, let alone one ``>= 2**bits``.

Modes 0 and 1 are the first version of the stream, written until 2026-12 and still
decoded: the same models with frequencies summing to ``2**16`` and no ``prob_bits`` or
``lanes`` bytes, coded by ``constriction.stream.stack.AnsCoder`` (32-bit words, models
``constriction.stream.model.Categorical(freq / 2**16, perfect=False)`` over the indices of
the present symbols), its ``get_compressed()`` words stored as ``u32`` after the tables.
They ran at about 0.07 GB/s of bf16 KV; the lane coder runs several times faster.

Float planes are not entropy coded: ``ans`` stores them as their little-endian bytes,
exactly as :class:`~tensorwire.kv.encoders.raw.Raw` does (their exponents are what
compresses; use :class:`~tensorwire.kv.encoders.enec.Enec` for that).

The decoder checks the header and tables (mode, ``prob_bits``, ``lanes``, reserved bits,
symbols present in every model, frequencies that sum to ``2**P``), that the states are in
range and the words whole, and that decoding ``n`` values reads every word and returns
every lane to its initial state. That catches truncation and most alterations; others
decode to wrong codes of the right shape: integrity is the payload's job, whose checksums
cover every stream. ANS streams do not bound ``n``: a run of the most likely symbol can
cost no bits at all, so the plane size is the caller's to check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from ...errors import CorruptData, Truncated, require
from ..stage import ArrayEncoder, Plane
from . import rans
from .bitpack import check_codes
from .streams import as_bytes, check_request, decode_floats, encode_floats, plane_values

__all__ = ["ANS", "CONTEXTS", "LANES", "MODE_COLUMNS", "MODE_PLANE", "quantize_frequencies"]

CONTEXTS: tuple[str, ...] = ("none", "column")
MODE_PLANE = 2
MODE_COLUMNS = 3
LEGACY_PLANE, LEGACY_COLUMNS = 0, 1  # constriction's streams, decoded only
LEGACY_PROBABILITY_BITS = 16
LANES = 8  # enough independent states for a CPU to overlap; more only add 4 bytes each
MAX_LANES = 64
_FREQ = np.dtype("<u2")
_STATE = np.dtype("<u4")
_WORD = np.dtype("<u2")
_LEGACY_WORD = np.dtype("<u4")
TOKEN_AXIS = -2  # columns run along this axis (tokens in (batch, heads, tokens, head_dim))


def probability_bits(bits: int, length: int) -> int:
    """The encoder's precision: enough for ``length`` values per model, at most 12 bits.

    Finer than a model's sample count buys nothing, and the decoder's table holds
    ``2**P`` slots per model.
    """
    return max(bits, min(rans.MAX_PROB_BITS, int(np.ceil(np.log2(max(length, 2))))))


def quantize_frequencies(counts: np.ndarray, total: int = 1 << rans.MAX_PROB_BITS) -> np.ndarray:
    """Integer frequencies proportional to ``counts``: >= 1 where a count is, summing to ``total`` per row.

    Largest-remainder rounding of ``counts * (total - k) / sum(counts)``, plus one for
    each of the ``k`` present symbols, so none is starved. An encoder choice: any table
    that meets the constraints decodes.

    Parameters
    ----------
    counts : numpy.ndarray
        Non-negative counts, 1-D (one model) or 2-D (one model per row); every row has at
        least one non-zero count.
    total : int
        The sum of every row of the result, at least the row's ``k``.

    Returns
    -------
    numpy.ndarray
        int64 frequencies of the shape of ``counts``, zero exactly where the count is.

    Examples
    --------
    >>> quantize_frequencies(np.array([0, 1, 999]), total=16).tolist()
    [0, 1, 15]
    """
    counts = np.asarray(counts, dtype=np.int64)
    rows = np.atleast_2d(counts)
    present = rows > 0
    k = present.sum(axis=1, keepdims=True)
    scaled = rows * ((total - k) / rows.sum(axis=1, keepdims=True))
    base = np.floor(scaled)
    freq = np.where(present, base.astype(np.int64) + 1, 0)
    deficit = total - freq.sum(axis=1, keepdims=True)  # in [0, k): each floor lost less than one
    # Rank present symbols by their rounding loss, largest first; absent ones last.
    loss = np.where(present, scaled - base, -1.0)
    order = np.argsort(-loss, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(rows.shape[1])[None, :].repeat(rows.shape[0], axis=0), axis=1)
    freq += (rank < deficit) & present
    return freq.reshape(counts.shape)


def _column_view(codes: np.ndarray) -> np.ndarray:
    """The plane as ``(columns, tokens)``: row ``c`` is one column along the token axis."""
    tokens = codes.shape[TOKEN_AXIS]
    return np.moveaxis(codes, TOKEN_AXIS, -1).reshape(-1, tokens)


def _estimated_bytes(counts: np.ndarray, bitmap_bytes: int) -> float:
    """Coded size of ``counts``' rows at their entropies, plus their tables."""
    n = counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        bits = np.where(counts > 0, counts * np.log2(n / np.maximum(counts, 1)), 0.0).sum()
    k = (counts > 0).sum(axis=1)
    table = counts.shape[0] * bitmap_bytes + _FREQ.itemsize * int(k[k >= 2].sum())
    return bits / 8 + table


@dataclass(frozen=True)
class ANS(ArrayEncoder):
    """Entropy code a code plane with interleaved rANS under its own static histograms.

    The smallest of the array encoders on skewed codes: within a fraction of a percent of
    the plane's order-0 entropy (per column with ``context="column"``) plus its tables.
    Float planes are stored raw.

    Parameters
    ----------
    context : {"column", "none"}
        ``"column"``: one model per column along the token axis where that is estimated
        smaller, else one model. ``"none"``: always one model for the plane.

    Examples
    --------
    >>> import numpy as np
    >>> from tensorwire.kv.stage import Plane
    >>> p = [0.02, 0.48, 0.48, 0.02]
    >>> codes = np.random.default_rng(0).choice(4, size=(1, 3, 300, 64), p=p).astype(np.uint8)
    >>> data = ANS(context="none").encode(Plane(codes, bits=2))
    >>> round(len(data) * 8 / codes.size, 2)  # bits per code: the entropy is 1.24, tables and states 0.006
    1.25
    >>> bool((ANS().decode(data, np.uint8, codes.shape, 2) == codes).all())
    True
    """

    context: Literal["none", "column"] = "column"
    id: ClassVar[str] = "ans"
    search_space: ClassVar[dict[str, tuple]] = {"context": ("column", "none")}  # offline search candidates

    def __post_init__(self) -> None:
        self.check(self.context in CONTEXTS, f"context must be one of {list(CONTEXTS)}, got {self.context!r}")

    def encode(self, plane: Plane) -> bytes:
        values, name = plane_values(plane)
        if name is not None:
            return encode_floats(values)
        bits = plane.bits
        check_codes(values, bits)
        alphabet = 1 << bits
        bitmap_bytes = (alphabet + 7) // 8
        mode, groups = MODE_PLANE, values.reshape(1, -1)
        shape = plane.data.shape
        if len(shape) >= 2 and values.size:
            column_counts = rans.column_counts(values.reshape(-1, shape[TOKEN_AXIS], shape[-1]), alphabet)
            counts = column_counts.sum(axis=0, keepdims=True)
            if self.context == "column" and (
                _estimated_bytes(column_counts, bitmap_bytes) < _estimated_bytes(counts, bitmap_bytes)
            ):
                mode, groups, counts = MODE_COLUMNS, _column_view(values.reshape(shape)), column_counts
        else:
            counts = np.bincount(values.reshape(-1), minlength=alphabet)[None, :]
        prob_bits = probability_bits(bits, groups.shape[1])
        present = counts > 0
        bitmaps = np.packbits(present, axis=1, bitorder="little")
        coded = np.flatnonzero(present.sum(axis=1) >= 2)  # groups with one symbol (or none) code nothing
        freq = quantize_frequencies(counts[coded], total=1 << prob_bits)
        tables = freq[present[coded]].astype(_FREQ).tobytes()  # row by row, present symbols in order
        coder = b""
        if coded.size:
            states, words = rans.encode(groups, coded, freq, prob_bits, LANES)
            coder = states.astype(_STATE).tobytes() + words.astype(_WORD, copy=False).tobytes()
        return b"".join([bytes([mode, prob_bits, LANES]), bitmaps.tobytes(), tables, coder])

    def decode(self, data: bytes | memoryview, dtype: np.dtype, shape: tuple[int, ...], bits: int | None) -> np.ndarray:
        dtype, name, shape, n = check_request(dtype, shape, bits)
        if name is not None:
            return decode_floats(data, dtype, name, shape, n)
        buf = as_bytes(data)
        if buf.size < 1:
            raise Truncated("an ans stream of codes starts with a mode byte, got 0 bytes")
        mode = int(buf[0])
        legacy = mode in (LEGACY_PLANE, LEGACY_COLUMNS)
        if mode in (MODE_PLANE, LEGACY_PLANE):
            groups, length = 1, n
        elif mode in (MODE_COLUMNS, LEGACY_COLUMNS) and len(shape) >= 2 and n:
            length = shape[TOKEN_AXIS]
            groups = n // length
        else:
            raise CorruptData(
                f"ans mode {mode} for a plane of shape {shape}; expected mode 2 (or 0), or 3 (or 1) for a non-empty "
                "plane of 2 or more dimensions. The stream is corrupt"
            )
        if legacy:
            prob_bits, lanes, header = LEGACY_PROBABILITY_BITS, 0, 1
        else:
            if buf.size < 3:
                raise Truncated(f"an ans stream starts with 3 header bytes, got {buf.size}")
            prob_bits, lanes, header = int(buf[1]), int(buf[2]), 3
            if not 1 <= prob_bits <= rans.MAX_PROB_BITS or lanes not in [1 << i for i in range(7)]:
                raise CorruptData(
                    f"ans probability bits {prob_bits} and lanes {lanes}; expected 1..{rans.MAX_PROB_BITS} "
                    f"and a power of two up to {MAX_LANES}. The stream is corrupt"
                )
        total = 1 << prob_bits
        alphabet = 1 << bits
        bitmap_bytes = (alphabet + 7) // 8
        freq_at = header + groups * bitmap_bytes
        if buf.size < freq_at:
            raise Truncated(
                f"{groups} symbol bitmaps of {bitmap_bytes} bytes end at byte {freq_at}, the stream has {buf.size}"
            )
        masks = np.unpackbits(buf[header:freq_at].reshape(groups, bitmap_bytes), axis=1, bitorder="little")
        if masks[:, alphabet:].any():
            raise CorruptData(
                f"a symbol bitmap marks symbols >= {alphabet} for {bits}-bit codes; the stream is corrupt"
            )
        masks = masks[:, :alphabet].astype(bool)
        k = masks.sum(axis=1)
        if (n and k.min() == 0) or (not n and k.max(initial=0)):
            raise CorruptData(
                f"symbol bitmaps list {int(k.min())}..{int(k.max())} symbols for models of {length} values each; "
                "the stream is corrupt"
            )
        if k.max(initial=0) > total:
            raise CorruptData(
                f"a model lists {int(k.max())} symbols, more than its {total} probability slots; the stream is corrupt"
            )
        coded = np.flatnonzero(k >= 2)
        words_at = freq_at + _FREQ.itemsize * int(k[coded].sum())
        if buf.size < words_at:
            raise Truncated(f"symbol frequencies end at byte {words_at}, the stream has {buf.size} bytes")
        freqs = buf[freq_at:words_at].view(_FREQ).astype(np.int64)
        if coded.size:
            starts = np.concatenate([[0], np.cumsum(k[coded])[:-1]])
            if freqs.min() < 1 or (np.add.reduceat(freqs, starts) != total).any():
                raise CorruptData(
                    f"the symbol frequencies of every model must each be >= 1 and sum to {total}; the stream is corrupt"
                )
        rest = buf.size - words_at
        if not coded.size and rest:
            raise CorruptData(
                f"every model has a single symbol, yet {rest} bytes of words follow; the stream is corrupt"
            )
        out = np.empty((groups, length), dtype=np.uint8)
        single = np.flatnonzero(k == 1)
        out[single] = np.argmax(masks[single], axis=1)[:, None].astype(np.uint8)
        if coded.size:
            if legacy:
                _decode_legacy(buf[words_at:], masks, k, coded, freqs, out)
            else:
                table = np.zeros((coded.size, alphabet), dtype=np.int64)
                table[masks[coded]] = freqs
                _decode_lanes(buf[words_at:], lanes, table, prob_bits, coded, out)
        if mode in (MODE_COLUMNS, LEGACY_COLUMNS):
            moved = shape[:TOKEN_AXIS] + shape[TOKEN_AXIS + 1 :] + (length,)
            return np.ascontiguousarray(np.moveaxis(out.reshape(moved), -1, TOKEN_AXIS))
        return out.reshape(shape)


def _decode_lanes(buf: np.ndarray, lanes: int, freq: np.ndarray, prob_bits: int, coded: np.ndarray, out: np.ndarray) -> None:
    states_bytes = lanes * _STATE.itemsize
    if buf.size < states_bytes:
        raise Truncated(f"the ans stream ends before its {lanes} coder states ({buf.size} of {states_bytes} bytes)")
    if (buf.size - states_bytes) % _WORD.itemsize:
        raise Truncated(
            f"the ans words are {buf.size - states_bytes} bytes, not a whole number of 16-bit words; "
            "the stream was cut (or has stray bytes appended)"
        )
    states = buf[:states_bytes].view(_STATE).astype(np.int64)
    if states.min() < rans.LOWER or states.max() >= rans.LOWER << 16:
        raise CorruptData(
            f"ans coder states {states.min()}..{states.max()} outside [{rans.LOWER}, {rans.LOWER << 16}); "
            "the stream is corrupt"
        )
    words = buf[states_bytes:].view(_WORD).astype(np.uint16)
    read, exact = rans.decode(words, states, freq, prob_bits, coded, out)
    if read > words.size:
        raise Truncated(f"the ans stream ran out of words after {words.size} words; it was cut or is corrupt")
    if not exact:
        raise CorruptData(
            f"decoding {out.shape[0] * out.shape[1]} codes read {read} of {words.size} ans words and left the coder "
            "in another state than it started; the stream is corrupt or was written for another shape"
        )


def _decode_legacy(buf: np.ndarray, masks, k, coded, freqs, out) -> None:
    """Modes 0 and 1: constriction's 32-bit words."""
    if buf.size % _LEGACY_WORD.itemsize:
        raise Truncated(
            f"the ans words are {buf.size} bytes, not a whole number of 32-bit words; "
            "the stream was cut (or has stray bytes appended)"
        )
    if not buf.size:
        # Coding any symbol but index 0 leaves the coder's state non-zero for good, so a
        # model of two or more symbols always leaves words (an empty coder would silently
        # decode index 0 forever).
        raise Truncated("the ans stream ends after its frequency tables, before any coded words")
    constriction = require("constriction")
    words = buf.view(_LEGACY_WORD).astype(np.uint32)  # native order, owned by constriction
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        at = 0
        for row in coded:
            symbols = np.flatnonzero(masks[row]).astype(np.uint8)
            model = freqs[at : at + k[row]].astype(np.float64) / (1 << LEGACY_PROBABILITY_BITS)
            index = coder.decode(constriction.stream.model.Categorical(model, perfect=False), out.shape[1])
            out[row] = symbols[index]
            at += k[row]
    except (ValueError, RuntimeError, OverflowError) as exc:
        raise CorruptData(f"the ans words are not a valid rANS stream ({exc}); the stream is corrupt") from exc
    if not coder.is_empty():
        raise CorruptData(
            f"{coder.num_words()} words of the ans stream are left after {out.size} codes; "
            "the stream is corrupt or was written for another shape"
        )
