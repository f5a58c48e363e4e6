"""``adaptive`` (:class:`Adaptive`): an adaptive ensemble eviction policy. Candidate scorers from LRU to a
long-memory LFU (decayed counts, repeats of the previous forward's experts down-weighted), the LFRU of the vLLM
expert-offload pull request (``lfru-vllm``) and Markov predictors of each expert's use over the next 1 and 4 forwards
(learned transitions from one forward's experts to the next's) each run a shadow cache of the same size; the
candidate with the most recent shadow hits (pooled over the model's MoE layers) chooses the victims. With more
needed experts than slots it orders the passes: residents first, the most valued misses last, so those stay
resident.
"""
from __future__ import annotations

import numpy as np

from .baseline import Policy

__all__ = ["Adaptive"]


class Adaptive(Policy):
    """Adaptive ensemble of eviction scorers, each also run as a shadow cache of ``n_slots`` on the same accesses
    (same pinning):

    * decayed access counts, ``COUNTS`` = (per-forward decay, weight of a repeat) pairs: decay 0 is recency only,
      1 a long-memory LFU; an access by an expert the previous forward also used counts the repeat weight (it
      is explained by locality more than by popularity);
    * the ``lfru-vllm`` score, 0.95-decayed frequency / (1 + age in forwards);
    * Markov predictors: learned transitions from one forward's experts to the next forward's (smoothed toward
      popularity), applied to the experts of the current forward and iterated: expected uses over the next h
      forwards, h in ``HORIZONS``.

    ``gain[i]`` counts candidate i's shadow hits (exponential window ``WINDOW`` per forward of the model; shared
    by the MoE layers of one model when ``shared`` is given, so the evidence grows with depth). The leader (most
    gain) chooses the victims: the non-pinned residents it values least. With fewer slots than needed experts it
    also orders the passes (see :meth:`pass_order`). (Mixing the candidates' ranks by gain instead measured within
    0.003 of following the leader from 8 slots up and 0.009 better at 4 of 128, at several times the host time.)"""

    name = "adaptive"
    COUNTS = ((0.0, 1.0), (0.9, 0.25), (1.0, 0.25))
    HORIZONS = (1, 4)
    WINDOW = 0.995

    def __init__(self, n, shared: dict | None = None):
        super().__init__(n, shared)
        nc = len(self.COUNTS)
        k = nc + 1 + len(self.HORIZONS)
        self.decay = np.asarray([d for d, _ in self.COUNTS])[:, None]
        self.repeat_weight = np.asarray([r for _, r in self.COUNTS])[:, None]
        self.count = np.zeros((nc, n))
        self.lfru = np.zeros(n)
        self.lfru_step = np.zeros(n, np.int64)
        self.trans = np.zeros((n, n))  # trans[a, b]: forwards that used b right after one that used a
        self.trans_n = np.zeros(n)
        self.total = np.zeros(n)
        self.shadow = np.zeros((k, n), bool)  # shadow[i]: candidate i's cache
        shared = {} if shared is None else shared
        self.gain = shared.setdefault("adaptive_gain", np.zeros(k))
        self.members = shared.setdefault("adaptive_members", [0])
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
        lfru = lambda: self.lfru[idx] / (1 + self.steps - self.lfru_step[idx])  # noqa: E731
        if len(rows) == len(self.gain):  # all candidates, in order
            return np.concatenate([self.count[:, idx], lfru()[None], self._markov()[:, idx]])
        return np.stack([self.count[i, idx] if i < nc else lfru() if i == nc else self._markov()[i - nc - 1, idx]
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
        """expert -> (count increments [len(COUNTS)], LFRU frequency) after this forward's accesses so far."""
        out: dict = {}
        for e in self.used:  # few: the experts accessed in this forward (each once, via SlotTable.passes)
            inc, lfru = out.get(e, (np.zeros(len(self.COUNTS)), self.lfru[e]))
            out[e] = (inc + (self.repeat_weight[:, 0] if e in self.prev else 1.0), 0.95 * lfru + 1.0)
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
        for e, (inc, lfru) in self._applied().items():  # counts and the LFRU
            self.count[:, e] += inc
            self.lfru[e] = lfru
            self.lfru_step[e] = self.steps
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
        decayed count, the ``lfru-vllm`` score (0.95-decayed frequency / (1 + age in forwards)) or Markov
        expectation."""
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
