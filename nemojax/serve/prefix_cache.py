"""Host-side prefix cache for a hybrid model: checkpoints keyed by the exact token prefix, LRU under a byte budget.

A checkpoint for ``tokens[:n]`` holds what a request needs to resume after those ``n`` tokens: the engine's opaque
entry (for Nemotron-H: the attention KV of a segment and the Mamba conv window + SSM state at ``n``) and its size.
The store never looks inside an entry.

Checkpoints form a trie over blocks of ``block`` tokens:

* a *chain node* at ``n = k * block`` (``tokens[:k*block]``) is the child of the node at ``(k-1) * block`` (the
  root, which holds no entry, for ``k == 1``), keyed by the exact tuple of its block's tokens;
* a *tail* at a prompt end ``n`` that is not a multiple of ``block`` hangs under the node at
  ``n // block * block``, keyed by the exact tuple of its ``n % block`` tokens. A tail has no children.

Keys are token tuples compared by value, so two different prefixes never share a checkpoint (no hash collisions).

Recency: touching a checkpoint (a lookup returning it, an insert of it) also touches every node above it, and
those count as more recent. A parent is therefore never less recent than anything below it, so LRU eviction takes
leaves first. Evicting a node evicts everything below it as well, so no unreachable entry stays in memory.

Not thread-safe: one thread (the engine loop) calls every method.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

__all__ = ["PrefixCache"]


class _Checkpoint:
    """One stored checkpoint (chain node or tail) in the trie; the root is a node with ``n == 0`` and no entry."""

    __slots__ = ("n", "key", "parent", "entry", "nbytes", "children", "tails")

    def __init__(self, n: int, key: tuple, parent: "_Checkpoint | None", entry: Any, nbytes: int, node: bool):
        self.n, self.key, self.parent = n, key, parent
        self.entry, self.nbytes = entry, nbytes
        # children: block tuple -> node; tails: tail tuple -> tail (None on a tail, which has no children)
        self.children: dict[tuple, _Checkpoint] | None = {} if node else None
        self.tails: dict[tuple, _Checkpoint] | None = {} if node else None

    def chain(self) -> list["_Checkpoint"]:
        """This checkpoint and the nodes above it, root excluded, root side first."""
        out = []
        c = self
        while c.parent is not None:
            out.append(c)
            c = c.parent
        out.reverse()
        return out


def _positive_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"PrefixCache: {name} must be an integer >= {minimum}, got {value!r}")
    return value


class PrefixCache:
    """Checkpoints of token prefixes (see the module docstring), at most ``capacity_bytes`` in total.

    ``capacity_bytes == 0`` disables the store (nothing is kept); an entry larger than the capacity is not stored.
    """

    def __init__(self, capacity_bytes: int, block: int):
        self.capacity_bytes = _positive_int("capacity_bytes", capacity_bytes, 0)
        self.block = _positive_int("block", block, 1)
        self._root = _Checkpoint(0, (), None, None, 0, node=True)
        self._lru: OrderedDict[_Checkpoint, None] = OrderedDict()  # least recent first
        self._bytes = 0
        self._queries = self._hits = self._evictions = 0

    # -- queries -----------------------------------------------------------------------------------------------

    def lookup(self, tokens: Sequence[int]) -> tuple[int, list[Any]]:
        """The deepest checkpoint ``n <= len(tokens) - 1`` whose prefix equals ``tokens[:n]``.

        Returns ``(n, entries)``: the entries of the chain nodes at ``block, 2*block, ...`` up to it, then its own
        entry if it is a tail (root side first); ``(0, [])`` on a miss. At least one token is always left to
        prefill, so a resend of exactly a stored prompt of length ``L`` hits a checkpoint at ``L - 1`` if one is
        stored, else the deepest one below. Touches the returned chain for LRU; counts ``queries += len(tokens)``,
        ``hits += n``. Cost: ``len(tokens) / block`` dict lookups plus one per tail length stored under the deepest
        matching node.
        """
        limit = len(tokens) - 1
        self._queries += len(tokens)
        node, b = self._root, self.block
        while node.n + b <= limit:
            child = node.children.get(tuple(tokens[node.n:node.n + b]))
            if child is None:
                break
            node = child
        best = node
        if node.tails:
            room = limit - node.n
            for t in sorted({len(k) for k in node.tails}, reverse=True):
                if t <= room:
                    tail = node.tails.get(tuple(tokens[node.n:node.n + t]))
                    if tail is not None:
                        best = tail
                        break
        if best is self._root:
            return 0, []
        chain = best.chain()
        self._touch(best)
        self._hits += best.n
        return best.n, [c.entry for c in chain]

    def stats(self) -> dict:
        """``queries`` / ``hits`` (tokens, as vLLM's prefix_cache_queries / _hits count), ``entries``, ``bytes``,
        ``evictions`` (entries removed to make room, descendants included), ``capacity_bytes``."""
        return {"queries": self._queries, "hits": self._hits, "entries": len(self._lru), "bytes": self._bytes,
                "evictions": self._evictions, "capacity_bytes": self.capacity_bytes}

    # -- updates -----------------------------------------------------------------------------------------------

    def insert(self, tokens: Sequence[int], n: int, entry: Any, nbytes: int) -> bool:
        """Store ``entry`` (``nbytes`` bytes) as the checkpoint for ``tokens[:n]``.

        ``n`` a multiple of ``block``: a chain node; otherwise a tail under the node at ``n // block * block``. The
        nodes above it must all be stored, else the call is ignored. Re-inserting a stored checkpoint replaces its
        entry (one copy is kept) and refreshes it; an entry larger than the capacity is ignored (a stored copy
        stays). Returns whether the checkpoint is stored when the call returns (eviction to make room never
        removes the nodes above it first, but can remove the new checkpoint itself when those fill the capacity).
        Cost: the walk from the root, at most ``n / block`` dict lookups (the stored chain is at most
        ``capacity_bytes / nbytes`` deep), plus evictions.
        """
        n = _positive_int("n", n, 1)
        nbytes = _positive_int("nbytes", nbytes, 1)
        if n > len(tokens):
            raise ValueError(f"PrefixCache.insert: n={n} is past the end of tokens (len {len(tokens)})")
        if nbytes > self.capacity_bytes:
            return False
        b = self.block
        parent = self._root
        while parent.n + b < n:  # walk the nodes strictly above the checkpoint
            parent = parent.children.get(tuple(tokens[parent.n:parent.n + b]))
            if parent is None:
                return False
        key = tuple(tokens[parent.n:n])
        is_node = n - parent.n == b
        table = parent.children if is_node else parent.tails
        ck = table.get(key)
        if ck is None:
            ck = _Checkpoint(n, key, parent, entry, nbytes, node=is_node)
            table[key] = ck
        else:
            self._bytes -= ck.nbytes
            ck.entry, ck.nbytes = entry, nbytes
        self._bytes += nbytes
        self._touch(ck)
        while self._bytes > self.capacity_bytes:
            victim = next(iter(self._lru))
            self._evictions += self._remove(victim)
        return ck in self._lru

    def _touch(self, ck: _Checkpoint) -> None:
        """Mark ``ck`` used, then each node above it (so a parent ends up more recent than its descendants)."""
        while ck.parent is not None:
            self._lru[ck] = None
            self._lru.move_to_end(ck)
            ck = ck.parent

    def _remove(self, ck: _Checkpoint) -> int:
        """Drop ``ck`` and everything below it; returns how many entries went."""
        removed = 0
        stack = [ck]
        while stack:
            c = stack.pop()
            if c.children is not None:
                stack.extend(c.children.values())
                stack.extend(c.tails.values())
            del self._lru[c]
            self._bytes -= c.nbytes
            removed += 1
        (ck.parent.children if ck.children is not None else ck.parent.tails).pop(ck.key)
        return removed
