"""Eviction policies for the per-layer expert cache (``nemojax.offload``), plus a trace simulator.

Every policy sees ``pin(needed)`` and ``access(e)`` once per needed expert per forward of its layer (hits and
misses), ``step()`` after each forward, and chooses ``victim(residents, pinned)`` among residents that the current batch does not
need (``pinned`` — the rule the vLLM fork and polarquant break, see the expert-offload reference). The three
LFRU definitions in circulation are kept apart:

* ``lfru-tinyserve``: freq +1 per hit (1 on insert), global access clock; evict argmin freq / (clock - last + 1).
* ``lfru-fork``: freq <- 0.95 freq + 1 per access, age in forwards; evict argmin freq / (1 + step - last).
* ``lfru-polarquant``: integer freq +1 per access, all halved every 1000 misses; evict min freq, ties LRU.

``ours`` (:class:`Ours`): an adaptive ensemble. Candidate scorers from LRU to a long-memory LFU (decayed counts,
repeats of the previous forward's experts down-weighted), the fork's LFRU and Markov predictors of each expert's
use over the next 1 and 4 forwards (learned transitions from one forward's experts to the next's) each run a
shadow cache of the same size; the candidate with the most recent shadow hits (pooled over the model's MoE layers)
chooses the victims. With more needed experts than slots it orders the passes: residents first, the most valued
misses last, so those stay resident.
"""
from __future__ import annotations


import time
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
    by the MoE layers of one model when ``shared`` is given, so the evidence grows with depth). The leader (most
    gain) chooses the victims: the non-pinned residents it values least. With fewer slots than needed experts it
    also orders the passes (see :meth:`pass_order`). (Mixing the candidates' ranks by gain instead measured within
    0.003 of following the leader from 8 slots up and 0.009 better at 4 of 128, at several times the host time.)"""

    name = "ours"
    COUNTS = ((0.0, 1.0), (0.9, 0.25), (1.0, 0.25))
    HORIZONS = (1, 4)
    WINDOW = 0.995

    def __init__(self, n, shared: dict | None = None):
        super().__init__(n)
        nc = len(self.COUNTS)
        k = nc + 1 + len(self.HORIZONS)
        self.decay = np.asarray([d for d, _ in self.COUNTS])[:, None]
        self.repeat_weight = np.asarray([r for _, r in self.COUNTS])[:, None]
        self.count = np.zeros((nc, n))
        self.fork = np.zeros(n)
        self.fork_step = np.zeros(n, np.int64)
        self.trans = np.zeros((n, n))  # trans[a, b]: forwards that used b right after one that used a
        self.trans_n = np.zeros(n)
        self.total = np.zeros(n)
        self.shadow = np.zeros((k, n), bool)  # shadow[i]: candidate i's cache
        shared = {} if shared is None else shared
        self.gain = shared.setdefault("ours_gain", np.zeros(k))
        self.members = shared.setdefault("ours_members", [0])
        self.members[0] += 1  # layers pooling this evidence
        self.used: list[int] = []  # this forward's accesses, in order
        self.prev: set = set()  # the previous forward's experts
        self.pinned: set = set()
        self._pinned_now = False  # pin() was called for this forward
        self._mk: np.ndarray | None = None  # this forward's Markov expectations
        self._queue: tuple | None = None  # (pinned set, leader, eviction order, position) of one SlotTable.plan
        self._lead = 0
        self._ahead: tuple | None = None  # (leader, residents in eviction order) sorted by step for the next forward
        self.resident: set = set()  # the real cache's experts (accesses insert, ``evicted`` removes)

    # Host time matters: choosing victims sits between a layer's router and its experts. So accesses are only
    # recorded, and the shadows, counts and transitions are settled in one vectorized ``step`` at the forward's end
    # (the offload calls it after dispatching the experts, overlapping their compute). Only non-pinned experts are
    # ever evicted and their keep-values do not move during a forward, so this equals replaying the accesses one by
    # one (except that ``gain`` counts a forward's shadow hits at its end).
    def _rows(self, rows, idx) -> np.ndarray:
        """[len(rows), len(idx)]: candidates ``rows``' keep-values of experts ``idx`` at the start of this forward."""
        nc = len(self.COUNTS)
        fork = lambda: self.fork[idx] / (1 + self.steps - self.fork_step[idx])  # noqa: E731
        if len(rows) == len(self.gain):  # all candidates, in order
            return np.concatenate([self.count[:, idx], fork()[None], self._markov()[:, idx]])
        return np.stack([self.count[i, idx] if i < nc else fork() if i == nc else self._markov()[i - nc - 1, idx]
                         for i in rows])

    def _live_rows(self, rows, cands: list[int]) -> np.ndarray:
        """:meth:`_rows` with this forward's accesses so far applied (what :meth:`key` returns)."""
        sub = self._rows(rows, np.asarray(cands))
        used = set(self.used)
        if used and not used.isdisjoint(cands):  # a later pass of this forward may evict one an earlier pass used
            nc, applied = len(self.COUNTS), self._applied()
            for j, e in enumerate(cands):
                if e in applied:
                    for r, i in enumerate(rows):
                        if i < nc:
                            sub[r, j] += applied[e][0][i]
                        elif i == nc:
                            sub[r, j] = applied[e][1]  # age 0 forwards
        return sub

    def _applied(self) -> dict:
        """expert -> (count increments [len(COUNTS)], fork frequency) after this forward's accesses so far."""
        out: dict = {}
        for e in self.used:  # few: the experts accessed in this forward (each once, via SlotTable.passes)
            inc, fork = out.get(e, (np.zeros(len(self.COUNTS)), self.fork[e]))
            out[e] = (inc + (self.repeat_weight[:, 0] if e in self.prev else 1.0), 0.95 * fork + 1.0)
        return out

    def step(self):
        self._settle()
        super().step()
        self.count *= self.decay
        self.gain *= self.WINDOW ** (1.0 / self.members[0])  # a window of ~1/(1-W) forwards of the whole model
        self.pinned = set()
        self._pinned_now = False
        self._mk = None
        self._queue = None
        self._ahead = None
        lead = self.leader()
        if lead <= len(self.COUNTS) and len(self.resident) >= self.n_slots:  # not Markov: ready before the router
            cands = list(self.resident)
            order = np.lexsort((self.last[cands], self._rows([lead], cands)[0]))
            self._ahead = (lead, [cands[j] for j in order])

    def pin(self, needed):
        self.pinned = set(needed)
        self._pinned_now = True
        self._mk = None
        self._lead = self.leader()  # gains move only when a forward settles

    def access(self, e, hit):
        super().access(e, hit)
        self.used.append(e)
        self.resident.add(e)
        if not self._pinned_now:  # direct ``SlotTable.plan`` calls, without :meth:`pin`: the accessed are pinned
            self.pinned.add(e)
            self._mk = None

    def _settle(self) -> None:
        """Apply the ended forward's accesses: shadow caches (and their hits), counts, transitions."""
        if not self.used:
            self.prev = set()
            return
        used = np.asarray(list(dict.fromkeys(self.used)), np.int64)
        pin = np.zeros(self.n, bool)
        pin[list(self.pinned)] = True
        hit = self.shadow[:, used]  # [k, u]
        self.gain += hit.sum(1)
        miss = ~hit
        n_miss = miss.sum(1)
        free = self.n_slots - self.shadow.sum(1)
        evictable = self.shadow & ~pin
        n_ev = evictable.sum(1)
        n_in = np.minimum(n_miss, free + n_ev)  # the rest is streamed (more distinct experts than slots)
        n_out = np.maximum(n_in - free, 0)
        rows = np.flatnonzero(n_out)
        if rows.size:  # evict each of these shadows' lowest (score, last access) non-pinned residents
            S = self._rows(rows, slice(None))
            order = np.lexsort((np.broadcast_to(self.last, S.shape), S), axis=-1)
            ev = evictable[rows[:, None], order]
            out = ev & (np.cumsum(ev, 1) <= n_out[rows, None])
            r, c = np.nonzero(out)
            self.shadow[rows[r], order[r, c]] = False
        ins = miss & (np.cumsum(miss, 1) <= n_in[:, None])
        r, c = np.nonzero(ins)
        self.shadow[r, used[c]] = True
        for e, (inc, fork) in self._applied().items():  # counts and the fork's LFRU
            self.count[:, e] += inc
            self.fork[e] = fork
            self.fork_step[e] = self.steps
        if self.prev:
            prev = np.fromiter(self.prev, np.int64)
            self.trans[np.ix_(prev, used)] += 1.0
            self.trans_n[prev] += 1.0
        self.total[used] += 1.0
        self.prev = set(used.tolist())
        self.used = []

    def _markov(self) -> np.ndarray:
        """[len(HORIZONS), n]: expected uses of each expert over the next h forwards (h in ``HORIZONS``), from
        this forward's experts through the learned transitions. Cached per forward."""
        if self._mk is not None:
            return self._mk
        src = sorted(self.pinned)  # pin()'s set, or without it the experts accessed so far
        pop = (self.total + 1.0) / (self.total.sum() + self.n)
        inv = 1.0 / (self.trans_n + 1.0)  # P(b used next | a used now) = (trans[a, b] + pop[b]) * inv[a]
        p = ((self.trans[src] + pop) * inv[src, None]).mean(0) if src else \
            pop * max(1.0, self.total.sum() / max(1, self.steps))
        ps = [p]
        for _ in range(max(self.HORIZONS) - 1):  # the experts used h forwards ahead -> h + 1
            q = p * (inv / max(p.sum(), 1e-12))
            p = q @ self.trans + pop * q.sum()
            ps.append(p)
        out = np.cumsum(ps, axis=0)[[h - 1 for h in self.HORIZONS]]
        self._mk = out
        return self._mk

    def key(self, i: int, e: int) -> tuple:
        """Candidate ``i``'s keep-value of expert ``e`` (lowest is evicted first; ties: least recently used):
        decayed count, the fork's 0.95-decayed frequency / (1 + age in forwards), or Markov expectation."""
        return (self._live_rows([i], [e])[0, 0], self.last[e])

    def leader(self) -> int:
        return int(np.argmax(self.gain))

    def evicted(self, e):
        self.resident.discard(e)

    def victim(self, residents, pinned):
        """The leading candidate's lowest (keep-value, last access) non-pinned resident. One call of
        ``SlotTable.plan`` evicts from one queue, sorted at its first miss (the values cannot move meanwhile), or
        sorted ahead by :meth:`step` when the leader's values do not depend on this forward's experts."""
        lead = self._lead if self._pinned_now else self.leader()
        if self._queue is None or self._queue[0] is not pinned or self._queue[1] != lead:
            ahead, self._ahead = self._ahead, None
            if ahead is not None and ahead[0] == lead and set(self.used) <= pinned and \
                    len(ahead[1]) == len(residents):  # first pass, nothing evicted since: the order holds
                order = [e for e in ahead[1] if e not in pinned]
            else:
                cands = [e for e in residents if e not in pinned]
                row = self._live_rows([lead], cands)[0]
                order = [cands[j] for j in np.lexsort((self.last[np.asarray(cands, np.int64)], row))] if cands else []
            self._queue = (pinned, lead, order, [0])
        queue, at = self._queue[2], self._queue[3]
        if at[0] >= len(queue):
            raise RuntimeError("no evictable expert: every resident is needed by the current batch")
        at[0] += 1
        return queue[at[0] - 1]

    def pass_order(self, needed: list[int], resident) -> list[int]:
        """Resident experts first (hits before anything is evicted), then the misses from least to most valued by
        the leading candidate, so the most valued end the forward resident."""
        misses = [e for e in needed if not resident(e)]
        if not misses:
            return needed
        order = np.lexsort((self.last[misses], self._live_rows([self.leader()], misses)[0]))
        return [e for e in needed if resident(e)] + [misses[j] for j in order]


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
        self.n_free = self.n_slots

    @property
    def residents(self) -> list[int]:
        """Resident experts in slot order."""
        return self.expert_in[self.expert_in >= 0].tolist()

    def plan(self, needed: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
        """``needed`` (distinct, at most n_slots) -> (hits, [(expert, slot)] to load). Pins ``needed`` first."""
        assert len(needed) <= self.n_slots
        pinned = set(needed)
        slot_of, expert_in = self.slot_of, self.expert_in
        hits, loads, residents = [], [], None
        for e in needed:
            hit = bool(slot_of[e] >= 0)
            self.policy.access(e, hit)
            if hit:
                hits.append(e)
                continue
            if self.n_free:
                slot = int(np.flatnonzero(expert_in < 0)[0])
                self.n_free -= 1
            else:
                residents = self.residents if residents is None else residents
                v = self.policy.victim(residents, pinned)
                slot = int(slot_of[v])
                slot_of[v] = -1
                self.policy.evicted(v)
                residents[residents.index(v)] = e  # same slot: the list stays in slot order
            slot_of[e] = slot
            expert_in[slot] = e
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
    """Replay ``trace[token][layer] = expert ids`` through one cache per layer; hit rate, misses per token and the
    policy's host time per token: ``decide_us`` (choosing the passes and victims, between a layer's router and its
    experts) and ``settle_us`` (its bookkeeping at the end of a forward, which can overlap the experts' compute)."""
    n_layers = len(trace[0]) if trace else 0
    shared: dict = {}  # one model: its layers' policies share evidence (``ours``)
    tables = [SlotTable(n_experts, n_slots, policy, shared) for _ in range(n_layers)]
    hits = misses = 0
    decide = settle = 0.0
    clock = time.perf_counter
    for tok in trace:
        for t, ids in zip(tables, tok):
            t0 = clock()
            needed = list(dict.fromkeys(int(e) for e in ids))
            for part in t.passes(needed):
                h, loads = t.plan(part)
                hits += len(h)
                misses += len(loads)
            t1 = clock()
            t.policy.step()
            decide += t1 - t0
            settle += clock() - t1
    total = hits + misses
    n = max(1, len(trace))
    return {"policy": policy, "slots": n_slots, "hit_rate": hits / total if total else 0.0,
            "misses_per_token": misses / n, "decide_us": 1e6 * decide / n, "settle_us": 1e6 * settle / n}


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



