"""The baseline eviction policies of the per-layer expert cache: LRU, LFU and the three LFRU definitions in
circulation (docs/expert-offload.md compares them), kept apart:

* ``lfru-tinyserve`` (tinyserve's ``LFRUPolicy``, where the LFRU idea of the vLLM expert-offload pull request
  #37190 comes from): freq +1 per hit (1 on insert), global access clock; evict argmin freq / (clock - last + 1).
* ``lfru-vllm`` (``LFRUCachedWeightProvider`` of the implementation behind vLLM PR #37190,
  caiovicentino/vllm-expert-offload): freq <- 0.95 freq + 1 per access, age in forwards; evict argmin
  freq / (1 + step - last).
* ``lfru-polarquant`` (polarquant's ``LFRUCache``): integer freq +1 per access, all halved every 1000 misses;
  evict min freq, ties LRU.

Every policy sees ``pin(needed)`` and ``access(e)`` once per needed expert per forward of its layer (hits and
misses), ``step()`` after each forward, and chooses ``victim(residents, pinned)`` among residents that the current
batch does not need (``pinned`` -- the rule the vLLM expert-offload pull request and polarquant break: they may
evict an expert the batch still needs).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

__all__ = ["Policy", "LRU", "LFU", "LFRUTinyserve", "LFRUVllm", "LFRUPolarquant"]


class Policy:
    name = "base"

    def __init__(self, n_experts: int, shared: dict | None = None):
        """``shared``: a dict the policies of one model's MoE layers share (the baselines ignore it)."""
        self.n = n_experts
        self.n_slots = n_experts  # set by SlotTable
        self.clock = 0
        self.steps = 0
        self.last = np.full(n_experts, -1, np.int64)  # clock of the last access

    def step(self) -> None:
        self.steps += 1

    def access(self, e: int, hit: bool) -> None:
        self.clock += 1
        self.last[e] = self.clock

    def evicted(self, e: int) -> None:
        pass

    def pin(self, needed: list[int]) -> None:
        """Every expert the current forward needs (before its first access); most policies ignore it."""

    def pass_order(self, needed: list[int], resident) -> list[int]:
        """Order of ``needed`` when it is split into passes of ``n_slots`` (``resident(e)``: e is on the device)."""
        return needed

    def score(self, e: int) -> tuple:
        raise NotImplementedError

    def victim(self, residents: Iterable[int], pinned: set) -> int:
        cands = [e for e in residents if e not in pinned]
        if not cands:
            raise RuntimeError("no evictable expert: every resident is needed by the current batch")
        return min(cands, key=self.score)


class LRU(Policy):
    name = "lru"

    def score(self, e):
        return (self.last[e],)


class LFU(Policy):
    name = "lfu"

    def __init__(self, n, shared=None):
        super().__init__(n, shared)
        self.freq = np.zeros(n, np.int64)

    def access(self, e, hit):
        super().access(e, hit)
        self.freq[e] = self.freq[e] + 1 if hit else 1  # in-cache frequency

    def score(self, e):
        return (self.freq[e], self.last[e])


class LFRUTinyserve(Policy):
    name = "lfru-tinyserve"

    def __init__(self, n, shared=None):
        super().__init__(n, shared)
        self.freq = np.zeros(n, np.int64)
        self.order: dict[int, None] = {}  # insertion order for ties

    def access(self, e, hit):
        super().access(e, hit)
        if hit:
            self.freq[e] += 1
        else:
            self.freq[e] = 1
            self.order.pop(e, None)
            self.order[e] = None

    def evicted(self, e):
        self.order.pop(e, None)

    def victim(self, residents, pinned):
        cands = [e for e in self.order if e in set(residents) and e not in pinned]
        if not cands:
            raise RuntimeError("no evictable expert: every resident is needed by the current batch")
        return min(cands, key=lambda e: self.freq[e] / (self.clock - self.last[e] + 1))


class LFRUVllm(Policy):
    name = "lfru-vllm"

    def __init__(self, n, shared=None):
        super().__init__(n, shared)
        self.freq = np.zeros(n, np.float64)
        self.last_step = np.zeros(n, np.int64)

    def access(self, e, hit):
        super().access(e, hit)
        self.freq[e] = 0.95 * self.freq[e] + 1.0
        self.last_step[e] = self.steps

    def score(self, e):
        return (self.freq[e] / (1 + self.steps - self.last_step[e]), self.last[e])


class LFRUPolarquant(Policy):
    name = "lfru-polarquant"

    def __init__(self, n, shared=None):
        super().__init__(n, shared)
        self.freq = np.zeros(n, np.int64)
        self.misses = 0

    def access(self, e, hit):
        super().access(e, hit)
        self.freq[e] += 1
        if not hit:
            self.misses += 1
            if self.misses % 1000 == 0:
                self.freq >>= 1

    def score(self, e):
        return (self.freq[e], self.last[e])
