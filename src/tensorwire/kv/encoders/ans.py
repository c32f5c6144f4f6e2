"""The ``ans`` array encoder: rANS entropy coding of code planes with static per-plane models.

Code planes (uint8, ``bits`` in 1..8) are coded with the range variant of asymmetric
numeral systems from the `constriction <https://bamler-lab.github.io/constriction/>`_
library (``constriction.stream.stack.AnsCoder``, 32-bit words, 24-bit probabilities),
under static categorical models built from the plane's own histograms. Only the symbols
that occur get probability mass, so unlike a Huffman code (at least one bit per value) a
skewed 2-bit plane costs close to its entropy, e.g. 0.3 bits per value.

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

    u8  mode                          0: one model; 1: one model per column
    u8  present[m][ceil(2**bits/8)]   per model, bit s (LSB-first) set when symbol s occurs
    u16 freq[...]                     per model with k >= 2 symbols present: k frequencies
    u32 words[...]                    AnsCoder.get_compressed(); none when no model has k >= 2

``m = 1`` in mode 0; in mode 1 ``m = n / shape[-2]`` models in the C order of the
plane's other axes. ``freq`` holds a model's quantised frequency of each present symbol
in increasing symbol order, each at least 1, summing to exactly ``2**16``. Coder and
decoder build each model as ``constriction.stream.model.Categorical(freq / 2**16,
perfect=False)`` over the indices ``0..k-1`` of its present symbols; the stream depends
on that exact model construction (constriction >= 0.4; the format is pinned to it). The
models' values are coded in order (mode 1: column after column, each along the tokens),
and a model with one symbol (a constant column) codes nothing. The decoder maps indices
back through the ``present`` table, so it cannot produce a value the encoder did not
see, let alone one ``>= 2**bits``.

Float planes are not entropy coded: ``ans`` stores them as their little-endian bytes,
exactly as :class:`~tensorwire.kv.encoders.raw.Raw` does (their exponents are what
compresses; use :class:`~tensorwire.kv.encoders.enec.Enec` for that).

The decoder checks the tables (mode, reserved bits, symbols present in every model,
frequencies that sum to ``2**16``), that there are words when some model has two or more
symbols and that they end on a word boundary, and that the coder is empty after ``n``
values, which catches most truncations and many alterations; others decode to wrong
codes of the right shape: integrity is the payload's job, whose checksums cover every
stream. ANS streams do not bound ``n``: a run of the most likely symbol can cost no bits
at all, so the plane size is the caller's to check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from ...errors import CorruptData, Truncated, require
from ..stage import ArrayEncoder, Plane
from .bitpack import check_codes
from .streams import as_bytes, check_request, decode_floats, encode_floats, plane_values

__all__ = ["ANS", "CONTEXTS", "MODE_COLUMNS", "MODE_PLANE", "PROBABILITY_BITS", "quantize_frequencies"]

CONTEXTS: tuple[str, ...] = ("none", "column")
MODE_PLANE = 0
MODE_COLUMNS = 1
PROBABILITY_BITS = 16  # frequencies in the stream sum to 2**16 (part of the format)
_TOTAL = 1 << PROBABILITY_BITS
_FREQ = np.dtype("<u2")
_WORD = np.dtype("<u4")
TOKEN_AXIS = -2  # columns run along this axis (tokens in (batch, heads, tokens, head_dim))


def quantize_frequencies(counts: np.ndarray, total: int = _TOTAL) -> np.ndarray:
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


def _model(freq: np.ndarray):
    constriction = require("constriction")
    return constriction.stream.model.Categorical(freq.astype(np.float64) / _TOTAL, perfect=False)


def _column_view(codes: np.ndarray) -> np.ndarray:
    """The plane as ``(columns, tokens)``: row ``c`` is one column along the token axis."""
    tokens = codes.shape[TOKEN_AXIS]
    return np.moveaxis(codes, TOKEN_AXIS, -1).reshape(-1, tokens)


def _histograms(groups: np.ndarray, alphabet: int) -> np.ndarray:
    """``(rows, alphabet)`` symbol counts of a ``(rows, length)`` uint8 array."""
    rows = groups.shape[0]
    keys = (np.arange(rows, dtype=np.int64)[:, None] * alphabet + groups).reshape(-1)
    return np.bincount(keys, minlength=rows * alphabet).reshape(rows, alphabet)


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
    """Entropy code a code plane with rANS under its own static histograms (``constriction``).

    Slower than ``raw`` or ``enec`` (tens of MB/s) but the smallest of them on skewed
    codes: within a fraction of a percent of the plane's order-0 entropy (per column
    with ``context="column"``) plus its tables. Float planes are stored raw.

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
    >>> round(len(data) * 8 / codes.size, 2)  # bits per code: the entropy is 1.24
    1.24
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
        counts = _histograms(groups, alphabet)
        shape = plane.data.shape
        if self.context == "column" and len(shape) >= 2 and values.size:
            columns = _column_view(values.reshape(shape))
            column_counts = _histograms(columns, alphabet)
            if _estimated_bytes(column_counts, bitmap_bytes) < _estimated_bytes(counts, bitmap_bytes):
                mode, groups, counts = MODE_COLUMNS, columns, column_counts
        present = counts > 0
        bitmaps = np.packbits(present, axis=1, bitorder="little")
        coded = np.flatnonzero(present.sum(axis=1) >= 2)  # groups with one symbol (or none) code nothing
        freq = quantize_frequencies(counts[coded])
        tables = [f[p].astype(_FREQ).tobytes() for f, p in zip(freq, present[coded])]
        words = b""
        if coded.size:
            constriction = require("constriction")
            coder = constriction.stream.stack.AnsCoder()
            index = np.zeros(alphabet, dtype=np.int32)
            for at in reversed(range(coded.size)):  # a stack: the last group coded is the first decoded
                row = coded[at]
                symbols = np.flatnonzero(present[row])
                index[symbols] = np.arange(symbols.size, dtype=np.int32)
                coder.encode_reverse(index[groups[row]], _model(freq[at][symbols]))
            words = coder.get_compressed().astype(_WORD, copy=False).tobytes()
        return b"".join([bytes([mode]), bitmaps.tobytes(), *tables, words])

    def decode(self, data: bytes | memoryview, dtype: np.dtype, shape: tuple[int, ...], bits: int | None) -> np.ndarray:
        dtype, name, shape, n = check_request(dtype, shape, bits)
        if name is not None:
            return decode_floats(data, dtype, name, shape, n)
        buf = as_bytes(data)
        if buf.size < 1:
            raise Truncated("an ans stream of codes starts with a mode byte, got 0 bytes")
        mode = int(buf[0])
        if mode == MODE_PLANE:
            groups, length = 1, n
        elif mode == MODE_COLUMNS and len(shape) >= 2 and n:
            length = shape[TOKEN_AXIS]
            groups = n // length
        else:
            raise CorruptData(
                f"ans mode {mode} for a plane of shape {shape}; expected mode 0, or 1 for a non-empty plane "
                "of 2 or more dimensions. The stream is corrupt"
            )
        alphabet = 1 << bits
        bitmap_bytes = (alphabet + 7) // 8
        freq_at = 1 + groups * bitmap_bytes
        if buf.size < freq_at:
            raise Truncated(
                f"{groups} symbol bitmaps of {bitmap_bytes} bytes end at byte {freq_at}, the stream has {buf.size}"
            )
        masks = np.unpackbits(buf[1:freq_at].reshape(groups, bitmap_bytes), axis=1, bitorder="little")
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
        coded = np.flatnonzero(k >= 2)
        words_at = freq_at + _FREQ.itemsize * int(k[coded].sum())
        if buf.size < words_at:
            raise Truncated(f"symbol frequencies end at byte {words_at}, the stream has {buf.size} bytes")
        freqs = buf[freq_at:words_at].view(_FREQ).astype(np.int64)
        if coded.size:
            starts = np.concatenate([[0], np.cumsum(k[coded])[:-1]])
            if freqs.min() < 1 or (np.add.reduceat(freqs, starts) != _TOTAL).any():
                raise CorruptData(
                    f"the symbol frequencies of every model must each be >= 1 and sum to {_TOTAL}; the stream is corrupt"
                )
        rest = buf.size - words_at
        if rest % _WORD.itemsize:
            raise Truncated(
                f"the ans words are {rest} bytes, not a whole number of 32-bit words; "
                "the stream was cut (or has stray bytes appended)"
            )
        if coded.size and not rest:
            # Coding any symbol but index 0 leaves the coder's state non-zero for good, so a
            # model of two or more symbols always leaves words (an empty coder would silently
            # decode index 0 forever).
            raise Truncated("the ans stream ends after its frequency tables, before any coded words")
        if not coded.size and rest:
            raise CorruptData(
                f"every model has a single symbol, yet {rest} bytes of words follow; the stream is corrupt"
            )
        out = np.empty((groups, length), dtype=np.uint8)
        single = np.flatnonzero(k == 1)
        out[single] = np.argmax(masks[single], axis=1)[:, None].astype(np.uint8)
        if coded.size:
            self._decode_words(buf[words_at:], masks, k, coded, freqs, out)
        if mode == MODE_COLUMNS:
            moved = shape[:TOKEN_AXIS] + shape[TOKEN_AXIS + 1 :] + (length,)
            return np.ascontiguousarray(np.moveaxis(out.reshape(moved), -1, TOKEN_AXIS))
        return out.reshape(shape)

    @staticmethod
    def _decode_words(words_buf, masks, k, coded, freqs, out) -> None:
        constriction = require("constriction")
        words = words_buf.view(_WORD).astype(np.uint32)  # native order, owned by constriction
        try:
            coder = constriction.stream.stack.AnsCoder(words)
            at = 0
            for row in coded:
                symbols = np.flatnonzero(masks[row]).astype(np.uint8)
                index = coder.decode(_model(freqs[at : at + k[row]]), out.shape[1])
                out[row] = symbols[index]
                at += k[row]
        except (ValueError, RuntimeError, OverflowError) as exc:
            raise CorruptData(f"the ans words are not a valid rANS stream ({exc}); the stream is corrupt") from exc
        if not coder.is_empty():
            raise CorruptData(
                f"{coder.num_words()} words of the ans stream are left after {out.size} codes; "
                "the stream is corrupt or was written for another shape"
            )
