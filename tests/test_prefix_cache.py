"""Prefix cache store: random operation sequences against a brute-force list model, and the serving cases."""
from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from nemojax.serve.prefix_cache import PrefixCache


class ListModel:
    """The same rules written as plainly as possible: a list of (prefix, entry, nbytes), linear scans, and an
    explicit recency list (least recent first) in which a touch moves the checkpoint, then each node above it
    from the deepest up, to the end."""

    def __init__(self, capacity: int, block: int):
        self.cap, self.b = capacity, block
        self.items: list[list] = []  # [prefix tuple, entry, nbytes]
        self.recent: list[tuple] = []
        self.queries = self.hits = self.evictions = 0

    def find(self, p):
        return next((it for it in self.items if it[0] == p), None)

    def above(self, p):  # prefixes of the nodes above p, deepest first
        return [p[:j * self.b] for j in range((len(p) - 1) // self.b, 0, -1)]

    def touch(self, p):
        for q in [p] + self.above(p):
            self.recent.remove(q)
            self.recent.append(q)

    def lookup(self, tokens):
        tokens = tuple(tokens)
        self.queries += len(tokens)
        hits = [it[0] for it in self.items if len(it[0]) <= len(tokens) - 1 and tokens[:len(it[0])] == it[0]]
        if not hits:
            return 0, []
        p = max(hits, key=len)
        self.hits += len(p)
        self.touch(p)
        return len(p), [self.find(q)[1] for q in reversed([p] + self.above(p))]

    def insert(self, tokens, n, entry, nbytes):
        p = tuple(tokens[:n])
        if nbytes > self.cap or any(self.find(q) is None for q in self.above(p)):
            return False
        it = self.find(p)
        if it is None:
            self.items.append([p, entry, nbytes])
            self.recent.append(p)
        else:
            it[1], it[2] = entry, nbytes
        self.touch(p)
        while sum(it[2] for it in self.items) > self.cap:
            v = self.recent[0]
            gone = [it[0] for it in self.items
                    if it[0] == v or (len(v) % self.b == 0 and len(it[0]) > len(v) and it[0][:len(v)] == v)]
            self.items = [it for it in self.items if it[0] not in gone]
            self.recent = [q for q in self.recent if q not in gone]
            self.evictions += len(gone)
        return self.find(p) is not None

    def stats(self):
        return {"queries": self.queries, "hits": self.hits, "entries": len(self.items),
                "bytes": sum(it[2] for it in self.items), "evictions": self.evictions}


SEQ = st.lists(st.integers(0, 2), max_size=12)  # a 3-token alphabet so prefixes collide often
BASE = st.one_of(st.none(), st.integers(0, 1000))  # None, or: extend the i-th sequence used so far
OPS = st.lists(st.one_of(
    st.tuples(st.just("lookup"), BASE, SEQ),
    st.tuples(st.just("insert"), BASE, SEQ, st.integers(1, 24), st.integers(1, 6)),
    st.tuples(st.just("chain"), BASE, SEQ, st.integers(1, 6)),  # as the engine does: each node, then the end
    st.tuples(st.just("every"), BASE, SEQ, st.integers(1, 6)),  # a checkpoint at every n: tails of each length
), min_size=4, max_size=30)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(block=st.integers(1, 4), capacity=st.integers(0, 80), ops=OPS)
def test_matches_list_model(block, capacity, ops):
    cache, model = PrefixCache(capacity, block), ListModel(capacity, block)
    serial, used = 0, []
    for op in ops:
        base, seq = op[1], op[2]
        seq = ((used[base % len(used)] if base is not None and used else []) + seq)[:30]
        used.append(seq)
        if op[0] == "lookup":
            assert cache.lookup(seq) == model.lookup(seq)
            continue
        if op[0] == "insert":
            points = [1 + op[3] % len(seq)] if seq else []
        elif op[0] == "every":
            points = list(range(1, len(seq) + 1))
        else:
            points = list(range(block, len(seq) + 1, block))
            if len(seq) % block:
                points.append(len(seq))
        for n in points:
            serial += 1
            entry = ("entry", serial, tuple(seq[:n]))  # a fresh object: the cache must hand back this very one
            assert cache.insert(seq, n, entry, op[-1]) == model.insert(seq, n, entry, op[-1])
        st_ = cache.stats()
        assert {k: st_[k] for k in model.stats()} == model.stats()
        assert st_["bytes"] <= capacity
        stored = {it[0] for it in model.items}
        # nothing unreachable: every stored checkpoint's nodes above it are stored too
        assert all(q in stored for p in stored for q in model.above(p))


def fill_chain(cache, seq, nbytes=10, end=None):
    """Insert every node of seq[:end] and its end (the engine's pattern); returns the entries by n."""
    end = len(seq) if end is None else end
    points = list(range(cache.block, end + 1, cache.block)) + ([end] if end % cache.block else [])
    entries = {}
    for n in points:
        entries[n] = object()
        assert cache.insert(seq, n, entries[n], nbytes)
    return entries


def test_identical_resend_hits_the_prompt_end_tail():
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, 1000, size=150).tolist()
    cache = PrefixCache(1 << 20, 64)
    e = fill_chain(cache, prompt, end=len(prompt) - 1)  # the engine checkpoints before the last prompt token
    n, entries = cache.lookup(prompt)
    assert n == 149 and entries == [e[64], e[128], e[149]]
    assert cache.stats()["hits"] == 149 and cache.stats()["queries"] == 150


def test_resend_never_returns_the_whole_prompt():
    """A checkpoint at the full length L is not usable for a resend of the same L tokens: the deepest one below is."""
    rng = np.random.default_rng(2)
    cache = PrefixCache(1 << 20, 64)
    p1 = rng.integers(0, 1000, size=128).tolist()  # ends on a node
    e = fill_chain(cache, p1)
    assert cache.lookup(p1) == (64, [e[64]])
    p2 = rng.integers(0, 1000, size=100).tolist()  # ends on a tail
    e = fill_chain(cache, p2)
    assert cache.lookup(p2) == (64, [e[64]])
    assert cache.lookup(p2 + [5]) == (100, [e[64], e[100]])
    p3 = rng.integers(0, 1000, size=30).tolist()  # a tail under the root only
    fill_chain(cache, p3)
    assert cache.lookup(p3) == (0, [])
    assert cache.lookup([]) == (0, []) and cache.lookup(p3[:1]) == (0, [])


def test_shared_system_prompt_hits_the_deepest_block_node():
    rng = np.random.default_rng(3)
    system = rng.integers(0, 1000, size=200).tolist()
    cache = PrefixCache(1 << 20, 64)
    e = fill_chain(cache, system + rng.integers(0, 1000, size=40).tolist())
    n, entries = cache.lookup(system + rng.integers(0, 1000, size=57).tolist())
    assert n == 192 and entries == [e[64], e[128], e[192]]


def test_multi_turn_hits_the_first_prompt_end_and_deeper_answer_nodes():
    rng = np.random.default_rng(4)
    turn1 = rng.integers(0, 1000, size=90).tolist()
    answer = rng.integers(0, 1000, size=70).tolist()
    cache = PrefixCache(1 << 20, 64)
    e = fill_chain(cache, turn1)
    turn2 = turn1 + answer + rng.integers(0, 1000, size=20).tolist()
    assert cache.lookup(turn2) == (90, [e[64], e[90]])
    e2 = fill_chain(cache, turn1 + answer)  # nodes the engine stores while decoding: 64 refreshed, 128 new
    assert cache.lookup(turn2) == (160, [e2[64], e2[128], e2[160]])
    assert cache.stats()["entries"] == 4  # 64, 90-tail, 128, 160-tail: the re-insert of 64 kept one copy


def test_capacity_zero_stores_nothing_and_oversized_entries_are_refused():
    cache = PrefixCache(0, 4)
    assert not cache.insert([1, 2, 3, 4, 5], 4, object(), 1)
    assert cache.lookup([1, 2, 3, 4, 5]) == (0, []) and cache.stats()["entries"] == 0
    cache = PrefixCache(100, 4)
    keep = object()
    assert cache.insert([1, 2, 3, 4, 5], 4, keep, 60)
    assert not cache.insert([1, 2, 3, 4, 5], 4, object(), 101)  # too big: the stored copy stays
    assert cache.lookup([1, 2, 3, 4, 5]) == (4, [keep]) and cache.stats()["bytes"] == 60


def test_eviction_takes_the_least_recent_leaf_and_keeps_chains_whole():
    cache = PrefixCache(30, 2)
    a, b = [1, 1, 1, 1, 9], [1, 1, 2, 2, 9]
    ea, eb4 = fill_chain(cache, a, end=4), object()  # nodes (1,1) and (1,1,1,1)
    assert cache.insert(b, 4, eb4, 10)  # node (1,1,2,2) beside (1,1,1,1)
    assert cache.stats()["bytes"] == 30
    cache.lookup(a)  # a's leaf is now more recent than b's
    assert cache.insert([3, 3], 2, object(), 10)  # over by 10: b's leaf goes, their shared node stays
    assert cache.lookup(b) == (2, [ea[2]])
    assert cache.lookup(a) == (4, [ea[2], ea[4]])
    assert cache.stats()["evictions"] == 1


def test_deepest_of_several_tails_under_the_node():
    cache = PrefixCache(1000, 8)
    seq = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
    node = object()
    assert cache.insert(seq, 8, node, 1)
    tails = {n: object() for n in (9, 11, 10)}
    for n, e in tails.items():
        assert cache.insert(seq, n, e, 1)
    assert cache.insert(seq[:8] + [99, 98, 97], 11, object(), 1)  # same length, other tokens
    assert cache.lookup(seq) == (11, [node, tails[11]])
    assert cache.lookup(seq[:11]) == (10, [node, tails[10]])
    assert cache.lookup(seq[:10] + [0, 0]) == (10, [node, tails[10]])
    assert cache.lookup(seq[:9] + [0, 0]) == (9, [node, tails[9]])


def test_a_full_budget_keeps_the_first_part_of_a_long_chain():
    rng = np.random.default_rng(7)
    seq = rng.integers(0, 1000, size=5 * 16 + 3).tolist()
    cache = PrefixCache(35, 16)
    assert [cache.insert(seq, n, object(), 10) for n in (16, 32, 48, 64, 80, 83)] == [True] * 3 + [False] * 3
    n, entries = cache.lookup(seq)
    assert n == 48 and len(entries) == 3
    assert cache.stats() == {"queries": 83, "hits": 48, "entries": 3, "bytes": 30, "evictions": 1,
                             "capacity_bytes": 35}


def test_evicting_a_node_takes_everything_below_it():
    """The recency rule keeps parents more recent than their descendants, so eviction normally takes leaves; here a
    node is made the least recent by hand to check that its subtree goes with it and the byte count stays exact."""
    cache = PrefixCache(100, 2)
    e = fill_chain(cache, [1, 2, 3, 4, 5], nbytes=10)  # nodes 2, 4, tail 5
    assert cache.insert([1, 2, 3, 3], 4, object(), 10)
    other = fill_chain(cache, [7, 7, 7], nbytes=10)  # node (7,7), tail 3
    node2 = next(c for c in cache._lru if c.n == 2 and c.key == (1, 2))
    cache._lru.move_to_end(node2, last=False)
    assert cache.insert([8, 8], 2, object(), 50)  # 110 bytes: node (1,2) is the victim, with its 3 descendants
    assert cache.stats()["entries"] == 3 and cache.stats()["bytes"] == 70 and cache.stats()["evictions"] == 4
    assert cache.lookup([1, 2, 3, 4, 5, 6]) == (0, [])
    assert cache.lookup([7, 7, 7, 0]) == (3, [other[2], other[3]])
    assert all(c.n in (2, 3) for c in cache._lru)


def test_insert_needs_the_chain_above_and_names_bad_arguments():
    cache = PrefixCache(100, 4)
    assert not cache.insert(list(range(8)), 8, object(), 1)  # node 4 missing
    assert not cache.insert(list(range(6)), 6, object(), 1)  # tail under the missing node 4
    assert cache.stats()["entries"] == 0
    with pytest.raises(ValueError, match="n=9 is past the end"):
        cache.insert(list(range(8)), 9, object(), 1)
    with pytest.raises(ValueError, match="nbytes"):
        cache.insert(list(range(8)), 4, object(), 0)
    with pytest.raises(ValueError, match="n must be"):
        cache.insert(list(range(8)), 0, object(), 1)
    with pytest.raises(ValueError, match="block"):
        PrefixCache(10, 0)
    with pytest.raises(ValueError, match="capacity_bytes"):
        PrefixCache(-1, 4)


def test_numpy_tokens_match_lists():
    rng = np.random.default_rng(5)
    seq = rng.integers(0, 50_000, size=300)
    cache = PrefixCache(1 << 20, 64)
    e = fill_chain(cache, seq.tolist())
    assert cache.lookup(np.concatenate([seq, [7]])) == (300, [e[n] for n in (64, 128, 192, 256, 300)])


def test_long_prompt_lookup_is_linear():
    """32k tokens, block 64: a full-chain hit costs about as much as building the token tuples once."""
    rng = np.random.default_rng(6)
    seq = rng.integers(0, 131_072, size=32_768).tolist()
    cache = PrefixCache(1 << 40, 64)
    fill_chain(cache, seq, nbytes=1 << 20)
    t = time.perf_counter()
    for _ in range(20):
        n, entries = cache.lookup(seq)
    per = (time.perf_counter() - t) / 20
    assert n == 32_768 - 64 and len(entries) == 511
    assert per < 0.05, f"lookup of 32k tokens took {per * 1e3:.1f} ms"
