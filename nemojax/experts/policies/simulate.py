"""Trace-driven evaluation of the eviction policies: a cache simulator and synthetic routing traces."""
from __future__ import annotations

import time

import numpy as np

from .slots import SlotTable

__all__ = ["simulate", "synthetic_trace"]


def simulate(trace: list[list[list[int]]], n_experts: int, n_slots: int, policy: str) -> dict:
    """Replay ``trace[token][layer] = expert ids`` through one cache per layer; hit rate, misses per token and the
    policy's host time per token: ``decide_us`` (choosing the passes and victims, between a layer's router and its
    experts) and ``settle_us`` (its bookkeeping at the end of a forward, which can overlap the experts' compute)."""
    n_layers = len(trace[0]) if trace else 0
    shared: dict = {}  # one model: its layers' policies share evidence (``adaptive``)
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
