"""Eviction policies for the per-layer expert cache (``nemojax.offload``), plus a trace simulator.

Every policy sees ``access(e)`` once per needed expert per forward of its layer (hits and misses), ``step()``
once per forward, and chooses ``victim(residents, pinned)`` among residents that the current batch does not
need (``pinned`` — the rule the vLLM fork and polarquant break, see the expert-offload reference). The three
LFRU definitions in circulation are kept apart:

* ``lfru-tinyserve``: freq +1 per hit (1 on insert), global access clock; evict argmin freq / (clock - last + 1).
* ``lfru-fork``: freq <- 0.95 freq + 1 per access, age in forwards; evict argmin freq / (1 + step - last).
* ``lfru-polarquant``: integer freq +1 per access, all halved every 1000 misses; evict min freq, ties LRU.

``ours`` (:class:`Ours`): an adaptive ensemble. Candidate scorers from LRU to a long-memory LFU (decayed counts,
repeats of the previous forward's experts down-weighted), the fork's LFRU and Markov predictors of each expert's
use over the next 1 and 4 forwards (learned transitions from one forward's experts to the next's) each run a
shadow cache of the same size; the victim has the lowest
rank averaged over the candidates, weighted by their recent shadow hits (pooled over the model's MoE layers).
With more needed experts than slots it orders the passes: residents first, the most valued misses last, so those
stay resident.
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
    """Adaptive ensemble of eviction scorers, each also run as a shadow cache of ``n_slots`` on the same accesses
    (same pinning):

    * decayed access counts, ``COUNTS`` = (per-forward decay, weight of a repeat) pairs: decay 0 is recency only,
      1 a long-memory LFU; an access by an expert the previous forward also used counts the repeat weight (it
      is explained by locality more than by popularity);
    * the fork's LFRU score, 0.95-decayed frequency / (1 + age in forwards);
    * Markov predictors: learned transitions from one forward's experts to the next forward's (smoothed toward
      popularity), applied to the experts of the current forward and iterated: expected uses over the next h
      forwards, h in ``HORIZONS``.

    ``gain[i]`` counts candidate i's shadow hits (exponential window ``WINDOW`` per forward of the model; shared
    by the MoE layers of one model when ``shared`` is given, so the evidence grows with depth). A victim is the non-pinned
    resident with the lowest gain-weighted mean rank over all candidates (weights ``exp((gain - max) /
    TEMPERATURE)``). With fewer slots than needed experts the leading candidate also orders the passes (see
    :meth:`pass_order`)."""

    name = "ours"
    COUNTS = ((0.0, 1.0), (0.9, 0.25), (1.0, 0.25))
    HORIZONS = (1, 4)
    WINDOW = 0.995
    TEMPERATURE = 3.0

    def __init__(self, n, shared: dict | None = None):
        super().__init__(n)
        k = len(self.COUNTS) + 1 + len(self.HORIZONS)
        self.decay = np.asarray([d for d, _ in self.COUNTS])
        self.repeat_weight = np.asarray([r for _, r in self.COUNTS])
        self.count = np.zeros((len(self.COUNTS), n))
        self.fork = np.zeros(n)
        self.fork_step = np.zeros(n, np.int64)
        self.trans = np.zeros((n, n))  # trans[a, b]: forwards that used b right after one that used a
        self.trans_n = np.zeros(n)
        self.total = np.zeros(n)
        self.shadow: list[dict] = [{} for _ in range(k)]  # candidate -> its shadow's resident experts
        shared = {} if shared is None else shared
        self.gain = shared.setdefault("ours_gain", np.zeros(k))
        self.members = shared.setdefault("ours_members", [0])
        self.members[0] += 1  # layers pooling this evidence
        self.cur: set = set()
        self.prev: set = set()
        self.pinned: set = set()
        self._markov_cache: tuple = (None, None)

    def step(self):
        if self.prev and self.cur:
            a, b = np.fromiter(self.prev, np.int64), np.fromiter(self.cur, np.int64)
            self.trans[np.ix_(a, b)] += 1.0
            self.trans_n[a] += 1.0
        if self.cur:
            self.total[np.fromiter(self.cur, np.int64)] += 1.0
        super().step()
        self.count *= self.decay[:, None]
        self.gain *= self.WINDOW ** (1.0 / self.members[0])  # a window of ~1/(1-W) forwards of the whole model
        self.prev, self.cur = self.cur, set()

    def pin(self, needed):
        self.pinned = set(needed)

    def _markov(self) -> np.ndarray:
        """[len(HORIZONS), n]: expected uses of each expert over the next h forwards (h in ``HORIZONS``), from
        this forward's experts through the learned transitions. Cached per forward."""
        src = tuple(sorted(self.pinned or self.cur))
        if self._markov_cache[0] == (self.steps, src):
            return self._markov_cache[1]
        pop = (self.total + 1.0) / (self.total.sum() + self.n)
        m = (self.trans + pop) / (self.trans_n[:, None] + 1.0)  # m[a, b]: P(b used next | a used now)
        p = m[list(src)].mean(0) if src else pop * max(1.0, self.total.sum() / max(1, self.steps))
        acc, out = np.zeros(self.n), []
        for h in range(1, max(self.HORIZONS) + 1):
            acc = acc + p
            if h in self.HORIZONS:
                out.append(acc.copy())
            p = (p / max(p.sum(), 1e-12)) @ m  # the experts used h forwards ahead -> h + 1
        out = np.stack(out)
        self._markov_cache = ((self.steps, src), out)
        return out

    def key(self, i: int, e: int) -> tuple:
        """Candidate ``i``'s keep-value of expert ``e`` (lowest is evicted first; ties: least recently used)."""
        nd = len(self.COUNTS)
        if i < nd:
            return (self.count[i, e], self.last[e])
        if i == nd:
            return (self.fork[e] / (1 + self.steps - self.fork_step[e]), self.last[e])
        return (self._markov()[i - nd - 1, e], self.last[e])

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
        self.count[:, e] += self.repeat_weight if e in self.prev else 1.0
        self.fork[e] = 0.95 * self.fork[e] + 1.0
        self.fork_step[e] = self.steps

    def victim(self, residents, pinned):
        cands = [e for e in residents if e not in pinned]
        if not cands:
            raise RuntimeError("no evictable expert: every resident is needed by the current batch")
        w = np.exp((self.gain - self.gain.max()) / self.TEMPERATURE)
        total = np.zeros(len(cands))
        for i in range(len(self.gain)):
            order = sorted(range(len(cands)), key=lambda j, i=i: self.key(i, cands[j]))
            total[order] += w[i] * np.arange(len(cands))
        return cands[min(range(len(cands)), key=lambda j: (total[j], self.last[cands[j]]))]

    def pass_order(self, needed: list[int], resident) -> list[int]:
        """Resident experts first (hits before anything is evicted), then the misses from least to most valued by
        the leading candidate, so the most valued end the forward resident."""
        i = self.leader()
        return ([e for e in needed if resident(e)] +
                sorted((e for e in needed if not resident(e)), key=lambda e: self.key(i, e)))


POLICIES = {c.name: c for c in (LRU, LFU, LFRUTinyserve, LFRUFork, LFRUPolarquant, Ours)}


def make_policy(name: str, n_experts: int, shared: dict | None = None) -> Policy:
    """Policy ``name`` for one layer of ``n_experts``; ``shared``: a dict the policies of one model's MoE layers
    share (``ours`` pools its candidates' evidence there)."""
    if name not in POLICIES:
        raise ValueError(f"policy={name!r}: unknown; choose one of {sorted(POLICIES)}")
    cls = POLICIES[name]
    return cls(n_experts, shared=shared) if cls is Ours else cls(n_experts)


class SlotTable:
    """Host bookkeeping of one layer's cache: which expert sits in which slot, and the policy."""

    def __init__(self, n_experts: int, n_slots: int, policy: str, shared: dict | None = None):
        if isinstance(n_slots, bool) or not isinstance(n_slots, (int, np.integer)) or n_slots < 1:
            raise ValueError(f"expert_cache={n_slots!r}: the number of device slots per MoE layer must be >= 1")
        self.n_slots = min(int(n_slots), n_experts)
        self.policy = make_policy(policy, n_experts, shared)
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
    shared: dict = {}  # one model: its layers' policies share evidence (``ours``)
    tables = [SlotTable(n_experts, n_slots, policy, shared) for _ in range(n_layers)]
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



