"""Interleaved static rANS over uint8 codes: the numba kernels behind ``ans``'s lane modes.

Hand-written because no well-kept Python library codes small alphabets fast enough:
``constriction`` (the coder of ``ans``'s first two modes) runs at about 0.07 GB/s of bf16
KV, and zstd's Huffman stage cannot code below one bit per value nor switch models per
column. The coder is the rANS of Duda (2013) in the form of Giesen's ``rans_byte`` with a
16-bit word instead of a byte:

* a state ``x`` per lane, ``LOWER = 2**15 <= x < 2**31`` between symbols;
* probability ``freq / 2**P`` with ``P`` (``prob_bits``) at most 12 and ``cum`` the sum of
  the frequencies of the smaller present symbols of the same model;
* coding a symbol: if ``x >= freq << (31 - P)`` write ``x & 0xffff`` and ``x >>= 16`` (once
  is enough), then ``x = (x // freq << P) + x % freq + cum``; the division is a
  multiplication by a 32-bit reciprocal (Alverson), exact because ``x < 2**31``;
* decoding: ``slot = x & (2**P - 1)``, the symbol ``s`` whose ``[cum, cum + freq)`` holds
  ``slot``, ``x = freq * (x >> P) + slot - cum``, and if ``x < LOWER`` read one word:
  ``x = x << 16 | word``.

Symbol ``i`` of the sequence goes to lane ``i % lanes``: the lanes' arithmetic is
independent, so a CPU overlaps their latencies. The coder runs backwards (a stack), so
the encoder walks the sequence from its end and writes words from the end of its buffer;
the decoder then reads states and words front to back. Every lane starts at ``LOWER``, so
a decoder that has read every word must find every lane back at ``LOWER``: a check that
catches almost every alteration the tables do not.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["LOWER", "MAX_PROB_BITS", "column_counts", "decode", "encode"]

LOWER = 1 << 15  # states live in [LOWER, LOWER << 16) between symbols
MAX_PROB_BITS = 12
WORD_BITS = 16


@njit(nogil=True, cache=True)
def column_counts(codes, alphabet):  # pragma: no cover
    """Symbol counts per column of a uint8 ``(outer, tokens, inner)`` array: ``(outer * inner, alphabet)``.

    A column is one ``(outer, inner)`` index along the tokens; rows in C order. One pass
    over the codes, without the transposed copy that ``numpy.bincount`` would need.
    """
    outer, tokens, inner = codes.shape
    counts = np.zeros((outer * inner, alphabet), dtype=np.int64)
    for o in range(outer):
        base = o * inner
        for t in range(tokens):
            for i in range(inner):
                counts[base + i, codes[o, t, i]] += 1
    return counts


def _encoder_tables(freq: np.ndarray, prob_bits: int) -> np.ndarray:
    """Per (model, symbol) two words: ``bound << 32 | rcp`` and ``shift << 32 | complement << 16 | bias``.

    ``bound = freq << (31 - P)`` (renormalise at or above it), ``rcp`` and ``shift`` the
    reciprocal of ``freq``, ``complement = 2**P - freq``: Giesen's ``RansEncSymbolInit``
    (rans_byte.h, public domain) for 16-bit words. All fit their fields for ``P <= 12``.
    """
    freq = freq.astype(np.int64)
    cum = np.cumsum(freq, axis=1) - freq
    total = 1 << prob_bits
    bound = freq << (31 - prob_bits)
    shift = np.zeros_like(freq)
    safe = np.maximum(freq, 1)
    while True:  # smallest shift with freq <= 2**shift
        grow = safe > (1 << shift)
        if not grow.any():
            break
        shift += grow
    rcp = np.where(freq >= 2, ((np.int64(1) << (shift + 31)) + safe - 1) // safe, 0xFFFFFFFF)
    rcp_shift = np.where(freq >= 2, shift - 1, 0)
    bias = np.where(freq >= 2, cum, cum + total - 1)
    table = np.empty(freq.shape + (2,), dtype=np.uint64)
    table[..., 0] = (bound.astype(np.uint64) << np.uint64(32)) | rcp.astype(np.uint64)
    table[..., 1] = ((rcp_shift << 32) | ((total - freq) << 16) | bias).astype(np.uint64)
    return table


@njit(nogil=True, cache=True)
def _encode_kernel(groups, rows, table, lanes, words, states):  # pragma: no cover
    """Words go to ``words[at:]``, ``at`` returned; ``words`` has one slot more than values.

    Branch-free renormalisation: the low half of the state is always stored at ``at - 1``
    and ``at`` moves only when it was due (an unpredictable branch costs more).
    """
    length = groups.shape[1]
    mask = lanes - 1
    low32 = np.uint64(0xFFFFFFFF)
    for j in range(lanes):
        states[j] = LOWER
    at = words.shape[0]
    p = rows.shape[0] * length
    for m in range(rows.shape[0] - 1, -1, -1):
        row = groups[rows[m]]
        entries = table[m]
        for t in range(length - 1, -1, -1):
            p -= 1
            lane = p & mask
            s = row[t]
            first = entries[s, 0]
            second = entries[s, 1]
            x = states[lane]
            words[at - 1] = np.uint16(x & np.uint64(0xFFFF))
            emit = np.uint64(x >= (first >> np.uint64(32)))
            at -= np.int64(emit)
            x >>= emit << np.uint64(4)
            q = ((x * (first & low32)) >> np.uint64(32)) >> (second >> np.uint64(32))
            states[lane] = x + (second & np.uint64(0xFFFF)) + q * ((second >> np.uint64(16)) & np.uint64(0xFFFF))
    return at


@njit(nogil=True, cache=True)
def _slot_table(freq, prob_bits):  # pragma: no cover
    """Per model and slot: ``freq << 20 | (slot - cum) << 8 | symbol`` (freq < 2**12 when coded)."""
    table = np.empty((freq.shape[0], 1 << prob_bits), dtype=np.uint32)
    for m in range(freq.shape[0]):
        slot = 0
        for s in range(freq.shape[1]):
            f = freq[m, s]
            for k in range(f):
                table[m, slot] = np.uint32((f << 20) | (k << 8) | s)
                slot += 1
    return table


@njit(nogil=True, cache=True)
def _decode_kernel(words, states, table, prob_bits, rows, out):  # pragma: no cover
    """Returns the number of words read; more than ``len(words) - 1`` when the stream ran out.

    ``words`` ends with one zero pad; branch-free like the encoder.
    """
    length = out.shape[1]
    lanes = states.shape[0]
    mask = lanes - 1
    slot_mask = (1 << prob_bits) - 1
    at = 0
    n_words = words.shape[0] - 1
    p = 0
    for m in range(rows.shape[0]):
        target = out[rows[m]]
        entries = table[m]
        for t in range(length):
            lane = p & mask
            p += 1
            x = states[lane]
            e = np.int64(entries[x & slot_mask])
            target[t] = e & 0xFF
            x = (e >> 20) * (x >> prob_bits) + ((e >> 8) & 0xFFF)
            need = np.int64(x < LOWER)
            word = np.int64(words[min(at, n_words)])  # words[n_words] is a zero pad
            x = (x << (need << 4)) | (word & -need)
            at += need
            states[lane] = x
    return at


def encode(groups: np.ndarray, rows: np.ndarray, freq: np.ndarray, prob_bits: int, lanes: int) -> tuple[np.ndarray, np.ndarray]:
    """Code ``groups[rows[m]]`` under model ``freq[m]``, the rows one after the other.

    Parameters
    ----------
    groups : numpy.ndarray
        uint8 ``(groups, length)``; every value of a coded row has a non-zero frequency.
    rows : numpy.ndarray
        int64 indices of the rows to code, in coding order.
    freq : numpy.ndarray
        ``(len(rows), alphabet)`` frequencies, each row summing to ``2**prob_bits``.
    prob_bits, lanes : int
        Probability precision (at most 12) and interleaved states (a power of two).

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        The lanes' final states (uint32) and the words (uint16) in decoding order.
    """
    table = _encoder_tables(freq, prob_bits)
    words = np.empty(rows.size * groups.shape[1] + 1, dtype=np.uint16)  # at most one word per value
    states = np.empty(lanes, dtype=np.uint64)
    at = _encode_kernel(np.ascontiguousarray(groups), rows.astype(np.int64), table, lanes, words, states)
    return states.astype(np.uint32), words[at:]


def decode(words: np.ndarray, states: np.ndarray, freq: np.ndarray, prob_bits: int, rows: np.ndarray,
           out: np.ndarray) -> tuple[int, bool]:
    """Decode into ``out[rows[m]]`` under model ``freq[m]`` (``len(states)`` lanes).

    Returns the words read (more than ``len(words)`` when the stream ran out) and whether
    the stream was exact: every word read, none missing, every lane back at ``LOWER``.
    ``states`` must already be checked to lie in ``[LOWER, LOWER << 16)``.
    """
    table = _slot_table(freq.astype(np.int64), prob_bits)
    lane_states = states.astype(np.int64)
    padded = np.zeros(words.size + 1, dtype=np.uint16)
    padded[:-1] = words
    read = _decode_kernel(padded, lane_states, table, prob_bits, rows.astype(np.int64), out)
    return read, read == words.shape[0] and bool((lane_states == LOWER).all())
