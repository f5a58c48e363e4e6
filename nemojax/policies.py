"""Eviction policies for the per-layer expert cache (``nemojax.offload``), plus a trace simulator.

Every policy sees ``access(e)`` once per needed expert per forward of its layer (hits and misses), ``step()``
once per forward, and chooses ``victim(residents, pinned)`` among residents that the current batch does not
need (``pinned`` — the rule the vLLM fork and polarquant break, see the expert-offload reference). The three
LFRU definitions in circulation are kept apart:

* ``lfru-tinyserve``: freq +1 per hit (1 on insert), global access clock; evict argmin freq / (clock - last + 1).
* ``lfru-fork``: freq <- 0.95 freq + 1 per access, age in forwards; evict argmin freq / (1 + step - last).
* ``lfru-polarquant``: integer freq +1 per access, all halved every 1000 misses; evict min freq, ties LRU.

``ours`` (:class:`Ours`): an adaptive LRFU. It keeps expert scores for a family of policies from LRU to a
long-memory LFU (access counts with per-forward decay 0 / 0.9 / 1, where an access by an expert the previous
forward also used counts 1/4: that repeat is explained by locality, not popularity) plus the fork's LFRU score,
simulates a shadow cache of the same size for each on the same accesses (with the same pinning), and evicts by the
one whose shadow has the most hits over the last ~200 forwards. It also orders a forward's passes when the batch
needs more experts than there are slots: resident experts first, and the experts it most wants to keep last, so
they are the ones left resident.
"""
from __future__ import annotations


from typing import Iterable

import numpy as np

__all__ = ["POLICIES", "make_policy", "Policy", "simulate", "synthetic_trace"]


class Policy:
    name = "base"

    def __init__(self, n_experts: int):
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

    def __init__(self, n):
        super().__init__(n)
        self.freq = np.zeros(n, np.int64)

    def access(self, e, hit):
        super().access(e, hit)
        self.freq[e] = self.freq[e] + 1 if hit else 1  # in-cache frequency

    def score(self, e):
        return (self.freq[e], self.last[e])


class LFRUTinyserve(Policy):
    name = "lfru-tinyserve"

    def __init__(self, n):
        super().__init__(n)
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


class LFRUFork(Policy):
    name = "lfru-fork"

    def __init__(self, n):
        super().__init__(n)
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

    def __init__(self, n):
        super().__init__(n)
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


class Ours(Policy):
    """Adaptive LRFU: the candidate scorers of ``DECAYS`` (decayed access counts, repeats of the previous forward
    weighted ``REPEAT_WEIGHT``) and the fork's LFRU, each run as a shadow cache of ``n_slots``; eviction by the
    candidate with the most shadow hits (exponential window ``WINDOW`` per forward). See the module docstring."""

    name = "ours"
    DECAYS = (0.0, 0.9, 1.0)
    REPEAT_WEIGHT = 0.25
    WINDOW = 0.995

    def __init__(self, n):
        super().__init__(n)
        k = len(self.DECAYS) + 1
        self.decay = np.asarray(self.DECAYS)
        self.count = np.zeros((len(self.DECAYS), n))
        self.fork = np.zeros(n)
        self.fork_step = np.zeros(n, np.int64)
        self.shadow: list[dict] = [{} for _ in range(k)]  # candidate -> its resident experts (insertion-ordered)
        self.gain = np.zeros(k)
        self.cur: set = set()
        self.prev: set = set()
        self.pinned: set = set()

    def step(self):
        super().step()
        self.count *= self.decay[:, None]
        self.gain *= self.WINDOW
        self.prev, self.cur = self.cur, set()

    def pin(self, needed):
        self.pinned = set(needed)

    def key(self, i: int, e: int) -> tuple:
        """Candidate ``i``'s keep-value of expert ``e`` (lower is evicted first)."""
        if i == len(self.DECAYS):
            return (self.fork[e] / (1 + self.steps - self.fork_step[e]), self.last[e])
        return (self.count[i, e], self.last[e])

    def leader(self) -> int:
        return int(np.argmax(self.gain))

    def access(self, e, hit):
        super().access(e, hit)
        self.cur.add(e)
        for i, res in enumerate(self.shadow):
            if e in res:
                self.gain[i] += 1
                continue
            if len(res) >= self.n_slots:
                cands = [r for r in res if r not in self.pinned]
                if not cands:
                    continue  # the shadow streams it (more distinct experts than slots)
                del res[min(cands, key=lambda r, i=i: self.key(i, r))]
            res[e] = None
        self.count[:, e] += self.REPEAT_WEIGHT if e in self.prev else 1.0
        self.fork[e] = 0.95 * self.fork[e] + 1.0
        self.fork_step[e] = self.steps

    def score(self, e):
        return self.key(self.leader(), e)

    def pass_order(self, needed: list[int], resident) -> list[int]:
        i = self.leader()
        return ([e for e in needed if resident(e)] +
                sorted((e for e in needed if not resident(e)), key=lambda e: self.key(i, e)))


POLICIES = {c.name: c for c in (LRU, LFU, LFRUTinyserve, LFRUFork, LFRUPolarquant, Ours)}


def make_policy(name: str, n_experts: int) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"policy={name!r}: unknown; choose one of {sorted(POLICIES)}")
    return POLICIES[name](n_experts)


class SlotTable:
    """Host bookkeeping of one layer's cache: which expert sits in which slot, and the policy."""

    def __init__(self, n_experts: int, n_slots: int, policy: str):
        if isinstance(n_slots, bool) or not isinstance(n_slots, (int, np.integer)) or n_slots < 1:
            raise ValueError(f"expert_cache={n_slots!r}: the number of device slots per MoE layer must be >= 1")
        self.n_slots = min(int(n_slots), n_experts)
        self.policy = make_policy(policy, n_experts)
        self.policy.n_slots = self.n_slots
        self.slot_of = np.full(n_experts, -1, np.int64)
        self.expert_in = np.full(self.n_slots, -1, np.int64)

    @property
    def residents(self) -> list[int]:
        return [int(e) for e in self.expert_in if e >= 0]

    def plan(self, needed: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
        """``needed`` (distinct, at most n_slots) -> (hits, [(expert, slot)] to load). Pins ``needed`` first."""
        assert len(needed) <= self.n_slots
        pinned = set(needed)
        hits, loads = [], []
        for e in needed:
            hit = self.slot_of[e] >= 0
            self.policy.access(e, bool(hit))
            if hit:
                hits.append(e)
                continue
            free = np.flatnonzero(self.expert_in < 0)
            if free.size:
                slot = int(free[0])
            else:
                v = self.policy.victim(self.residents, pinned)
                slot = int(self.slot_of[v])
                self.slot_of[v] = -1
                self.policy.evicted(v)
            self.slot_of[e] = slot
            self.expert_in[slot] = e
            loads.append((e, slot))
        return hits, loads


    def passes(self, needed: list[int]) -> list[list[int]]:
        """One forward's distinct ``needed`` experts -> passes of at most ``n_slots`` (the policy sees the whole set
        first and orders the passes; call :meth:`plan` on each in turn)."""
        self.policy.pin(needed)
        if len(needed) > self.n_slots:
            needed = self.policy.pass_order(list(needed), lambda e: self.slot_of[e] >= 0)
        return groups(needed, self.n_slots)


def groups(needed_in_order: list[int], n_slots: int) -> list[list[int]]:
    """Split the distinct experts a batch needs into passes of at most ``n_slots``."""
    return [needed_in_order[i:i + n_slots] for i in range(0, len(needed_in_order), n_slots)]


def simulate(trace: list[list[list[int]]], n_experts: int, n_slots: int, policy: str) -> dict:
    """Replay ``trace[token][layer] = expert ids`` through one cache per layer; hit rate and misses per token."""
    n_layers = len(trace[0]) if trace else 0
    tables = [SlotTable(n_experts, n_slots, policy) for _ in range(n_layers)]
    hits = misses = 0
    for tok in trace:
        for t, ids in zip(tables, tok):
            t.policy.step()
            needed = list(dict.fromkeys(int(e) for e in ids))
            for part in t.passes(needed):
                h, loads = t.plan(part)
                hits += len(h)
                misses += len(loads)
    total = hits + misses
    return {"policy": policy, "slots": n_slots, "hit_rate": hits / total if total else 0.0,
            "misses_per_token": misses / max(1, len(trace))}


def synthetic_trace(n_tokens: int, n_layers: int = 23, n_experts: int = 128, top_k: int = 6, zipf: float = 0.8,
                    repeat: float = 0.45, seed: int = 0) -> list[list[list[int]]]:
    """Routing trace with Zipf popularity (a random expert order per layer) and temporal locality: each of a
    token's picks repeats one of the previous token's picks with probability ``repeat``."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, n_experts + 1, dtype=np.float64) ** -zipf
    probs = [ranks[np.argsort(rng.permutation(n_experts))] for _ in range(n_layers)]
    probs = [p / p.sum() for p in probs]
    prev: list[list[int]] = [[] for _ in range(n_layers)]
    out = []
    for _ in range(n_tokens):
        tok = []
        for layer in range(n_layers):
            pick: list[int] = []
            for _k in range(top_k):
                if prev[layer] and rng.random() < repeat:
                    cand = [e for e in prev[layer] if e not in pick]
                    if cand:
                        pick.append(int(rng.choice(cand)))
                        continue
                p = probs[layer].copy()
                p[pick] = 0
                pick.append(int(rng.choice(n_experts, p=p / p.sum())))
            prev[layer] = pick
            tok.append(pick)
        out.append(tok)
    return out



