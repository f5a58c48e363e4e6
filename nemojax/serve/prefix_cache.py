"""Host-side prefix cache: checkpoints of a prompt's prefix keyed by its exact tokens, as a chain over blocks of
``block`` tokens plus end-of-prompt checkpoints (a partial block under the node at ``n // block * block``).
Entries are opaque (the engine stores a segment's KV and the Mamba state there). LRU eviction under
``capacity_bytes``; evicting a node evicts its descendants. Exact matching: keys are the token tuples themselves.
"""
from __future__ import annotations

import collections
from typing import Any, Sequence

__all__ = ["PrefixCache"]


class PrefixCache:
    """See the module docstring. ``lookup`` / ``insert`` / ``stats``; not thread-safe (one engine thread)."""

    def __init__(self, capacity_bytes: int, block: int):
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        self.capacity, self.block = int(capacity_bytes), int(block)
        self._entries: collections.OrderedDict[tuple, tuple[Any, int]] = collections.OrderedDict()  # LRU order
        self._children: dict[tuple, set[tuple]] = collections.defaultdict(set)
        self.bytes = self.queries = self.hits = 0

    def _parent(self, key: tuple) -> tuple:
        n = len(key)
        return key[:(n - 1) // self.block * self.block] if n % self.block == 0 else key[:n // self.block * self.block]

    def lookup(self, tokens: Sequence[int]) -> tuple[int, list[Any]]:
        """The deepest checkpoint n <= len(tokens) - 1 matching tokens[:n] -> (n, entries root first); (0, [])."""
        tokens = tuple(int(t) for t in tokens)
        self.queries += len(tokens)
        chain, n = [], 0
        while n + self.block <= len(tokens) - 1 and tokens[:n + self.block] in self._entries:
            n += self.block
            chain.append(tokens[:n])
        best = None
        for child in self._children.get(tokens[:n], ()):  # an end-of-prompt checkpoint under the deepest node
            if len(child) % self.block and len(child) <= len(tokens) - 1 and tokens[:len(child)] == child:
                best = child if best is None or len(child) > len(best) else best
        if best is not None:
            chain.append(best)
        if not chain:
            return 0, []
        for key in chain:
            self._entries.move_to_end(key)
        self.hits += len(chain[-1])
        return len(chain[-1]), [self._entries[k][0] for k in chain]

    def insert(self, tokens: Sequence[int], n: int, entry: Any, nbytes: int) -> None:
        """Store the checkpoint for tokens[:n] (ignored when its parent chain is missing or it does not fit)."""
        key = tuple(int(t) for t in tokens[:n])
        parent = self._parent(key)
        if len(key) != n or n == 0 or nbytes > self.capacity or (parent and parent not in self._entries):
            return
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        for p in (parent, *self._ancestors(parent)):
            if p in self._entries:
                self._entries.move_to_end(p)
        self._entries[key] = (entry, int(nbytes))
        self._children[parent].add(key)
        self.bytes += int(nbytes)
        while self.bytes > self.capacity:
            self._evict(next(iter(self._entries)))

    def _ancestors(self, key: tuple):
        while key:
            key = self._parent(key)
            yield key

    def _evict(self, key: tuple) -> None:
        for child in list(self._children.pop(key, ())):
            self._evict(child)
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry[1]
            self._children.get(self._parent(key), set()).discard(key)

    def stats(self) -> dict:
        return {"queries": self.queries, "hits": self.hits, "entries": len(self._entries), "bytes": self.bytes}
