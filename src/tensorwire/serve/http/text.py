"""Token ids in, text deltas out: incremental detokenization and stop strings.

:class:`TextAssembler` is used for streamed and non-streamed responses alike, so that the
deltas of a stream always add up to the text of the same request unstreamed.

* Incremental decoding keeps a short window of ids before the new ones (the prefix
  offset scheme of vLLM and TGI): the text of ``ids[prefix:]`` minus the text of
  ``ids[prefix:read]`` is what the new ids added, which keeps the spaces a tokenizer only
  renders in context. A delta ending in U+FFFD (a character whose bytes are split over
  tokens) is held back until the character is complete.
* Stop strings: the text never emitted includes the last ``len(longest stop) - 1``
  characters, so a stop string split over tokens is caught before any part of it is sent.
  The stop string itself is not part of the output (OpenAI's behaviour). Generation ends
  with the first token that completes a stop string (a longer stop string that would have
  started earlier never completes); among those completed by the same token, the text is
  cut where the earliest starts.
"""

from __future__ import annotations

from collections.abc import Sequence

from .backend import Tokenizer

__all__ = ["TextAssembler"]

_REPLACEMENT = "\ufffd"


class TextAssembler:
    """Turns token ids into text deltas, and finds stop strings.

    ``feed(ids)`` returns the text that may be sent now; after it, ``stopped`` tells whether
    a stop string was found (then stop generating and send nothing more). ``flush()``
    returns what was held back, once generation has ended without a stop string.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self._prefix = 0  # start of the context window of the decoded ids
        self._read = 0  # ids before this are in self.text
        self.text = ""  # everything decoded so far (stop strings not cut yet)
        self._sent = 0  # characters of self.text already returned
        self.stopped = False

    @property
    def n_tokens(self) -> int:
        return len(self.ids)

    def _decode_new(self) -> None:
        before = self.tokenizer.decode(self.ids[self._prefix : self._read])
        after = self.tokenizer.decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith(_REPLACEMENT):
            self.text += after[len(before) :]
            self._prefix = self._read
            self._read = len(self.ids)

    def feed(self, token_ids: Sequence[int]) -> str:
        """Add new token ids; return the text that can be sent now ("" while held back)."""
        if self.stopped:
            return ""
        self.ids.extend(int(t) for t in token_ids)
        start = len(self.text)
        self._decode_new()
        return self._emit(start, final=False)

    def flush(self) -> str:
        """Generation ended (not at a stop string): the rest of the text, incomplete characters included."""
        if self.stopped:
            return ""
        start = len(self.text)
        if self._read < len(self.ids):
            before = self.tokenizer.decode(self.ids[self._prefix : self._read])
            after = self.tokenizer.decode(self.ids[self._prefix :])
            self.text += after[len(before) :]
            self._prefix = self._read = len(self.ids)
        return self._emit(start, final=True)

    def _emit(self, start: int, final: bool) -> str:
        if self.stop:
            # A stop string found now ends in the new text; it cannot start in sent text
            # (at least len(stop) - 1 characters before the new text were held back).
            search_from = max(0, start - self._hold)
            hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return self._take(len(self.text))
        end = len(self.text) if final else max(self._sent, len(self.text) - self._hold)
        return self._take(end)

    def _take(self, end: int) -> str:
        out = self.text[self._sent : end]
        self._sent = max(self._sent, end)
        return out

    @property
    def output(self) -> str:
        """The text sent so far (after ``flush`` or a stop: the whole completion)."""
        return self.text[: self._sent]
