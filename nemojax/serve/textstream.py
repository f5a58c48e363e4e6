"""Streaming text of one request: incremental detokenization (:class:`Detokenizer`) and stop-string matching on
the accumulated text (:class:`StopMatcher`). Both hold back what may still change, so what they emit is final."""
from __future__ import annotations

from typing import Callable, Sequence

__all__ = ["Detokenizer", "StopMatcher"]

_REPLACEMENT = "\ufffd"


class Detokenizer:
    """Token ids in, the new stable text out.

    ``decode(ids) -> str`` decodes a token list. Each :meth:`push` decodes a short window of the ids (from the last
    stable point, so the cost per token stays constant) and emits only the suffix that is new; a trailing U+FFFD (a
    multi-byte character whose bytes have not all arrived) is held back until the character completes or
    :meth:`flush` ends the text. The pieces joined equal ``decode(all ids)`` for byte-level BPE tokenizers."""

    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.prefix_offset = 0   # ids[prefix_offset:read_offset] decode to the text already emitted last
        self.read_offset = 0

    def push(self, ids: Sequence[int]) -> str:
        """Append token ids; the text that became stable."""
        self.ids.extend(int(i) for i in ids)
        if len(self.ids) == self.read_offset:
            return ""
        prefix = self.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT) or not full.startswith(prefix):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]

    def flush(self) -> str:
        """The text still held back (the end of the output: a trailing U+FFFD is emitted as it is)."""
        prefix = self.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):] if full.startswith(prefix) else full


class StopMatcher:
    """Stop strings matched on the accumulated text, also across piece boundaries.

    :meth:`push` returns (text to emit, matched): the text before the stop string that completes first (the stop
    string itself is not emitted), holding back a tail that could be the start of a stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.matched = False

    def push(self, text: str) -> tuple[str, bool]:
        if self.matched:
            return "", True
        if not self.stops:
            return text, False
        s = self.held + text
        hits = [(i + len(stop), i) for stop in self.stops if (i := s.find(stop)) >= 0]
        if hits:  # the match that completes first (then the longest): the same whatever the split
            self.matched, self.held = True, ""
            return s[:min(hits)[1]], True
        keep = 0
        for stop in self.stops:  # the longest tail of s that is a proper prefix of a stop string
            for k in range(min(len(stop) - 1, len(s)), keep, -1):
                if s.endswith(stop[:k]):
                    keep = k
                    break
        self.held = s[len(s) - keep:] if keep else ""
        return s[:len(s) - keep], False

    def flush(self) -> str:
        """What was held back (the output ended without a match)."""
        out, self.held = self.held, ""
        return "" if self.matched else out
