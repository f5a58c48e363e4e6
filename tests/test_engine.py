"""The continuous-batching engine: per-row cache positions against the cache-free forward, each request's tokens in
a mix equal to those it gets alone (and to ``generate``), stops, lengths, cancel, queue limits, no compilation
after warm-up, and prefix-cache hits exact against the engine without a prefix cache."""
from __future__ import annotations

import threading

import jax.numpy as jnp
import numpy as np
import pytest

import nemojax
from nemojax.cache import init_cache
from nemojax.generate import generate
from nemojax.model import forward_jit
from nemojax.params import init_params
from nemojax.serve import Engine, QueueFull, Request
from nemojax.serve import steps

from .conftest import tiny_config

CHUNK, SLOTS, MAX_LEN = 8, 4, 128


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config(hybrid_override_pattern="M*EM-*")  # every block kind, few layers: quick compiles
    return nemojax.Model(cfg, init_params(cfg, seed=5))


@pytest.fixture(scope="module")
def engines(model):
    """(with prefix cache, without, the trace counts after warm-up): the same shapes, so compiled once."""
    cached = Engine(model, max_num_seqs=SLOTS, max_model_len=MAX_LEN, chunk=CHUNK, prefix_cache_bytes=1 << 26)
    cached.start()
    warm = dict(steps.TRACE_COUNTS)
    plain = Engine(model, max_num_seqs=SLOTS, max_model_len=MAX_LEN, chunk=CHUNK, prefix_cache_bytes=0)
    plain.start()
    yield cached, plain, warm
    cached.stop()
    plain.stop()


def run(engine, reqs, on_first=None, start=False):
    """Submit every request (then start the engine with ``start``), wait for all to finish
    -> {id: (tokens, final Output, [Output...])}."""
    got, done, lock = {}, threading.Event(), threading.Lock()

    def cb(o):
        with lock:
            got.setdefault(o.request_id, []).append(o)
            if on_first is not None and len(got[o.request_id]) == 1:
                on_first(o)
            if sum(outs[-1].finish_reason is not None for outs in got.values()) == len(reqs):
                done.set()

    for r in reqs:
        engine.submit(r, cb)
    if start:
        engine.start()
    assert done.wait(120), "engine did not finish"
    return {k: ([t for o in v for t in o.token_ids], v[-1], v) for k, v in got.items()}


def prompts(rng, lengths, vocab=512):
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


def test_per_row_positions_match_the_full_forward(model):
    """Two rows fed right-padded chunks at their own positions (each row fully masked in one chunk), then one
    token each: every real position's logits equal the cache-free forward of that row alone."""
    cfg, params = model.config, model.params
    rng = np.random.default_rng(1)
    rows = prompts(rng, [22, 22])  # the last token of each is fed as the decode step
    full = [np.asarray(forward_jit(params, cfg, jnp.asarray([r])))[0] for r in rows]
    cache = init_cache(cfg, 2, 40, jnp.float32, per_row=True)
    feeds = [[8, 8, 5, 0], [5, 0, 8, 8]]
    got, start = [[], []], [0, 0]
    for c in range(4):
        ids, mask = np.zeros((2, 8), np.int32), np.zeros((2, 8), np.int32)
        for b in range(2):
            n = feeds[b][c]
            ids[b, :n] = rows[b][start[b]:start[b] + n]
            mask[b, :n] = 1
        logits, cache = forward_jit(params, cfg, jnp.asarray(ids), jnp.asarray(mask), cache)
        for b in range(2):
            got[b].append(np.asarray(logits)[b, :feeds[b][c]])
            start[b] += feeds[b][c]
        if c == 1:
            np.testing.assert_array_equal(np.asarray(cache.pos), [16, 5])
    logits, cache = forward_jit(params, cfg, jnp.asarray([[rows[0][21]], [rows[1][21]]]), jnp.ones((2, 1), jnp.int32),
                                cache)
    for b in range(2):
        got[b].append(np.asarray(logits)[b])
        np.testing.assert_allclose(np.concatenate(got[b]), full[b], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.asarray(cache.pos), [22, 22])


def test_greedy_mix_equals_generate_alone(model, engines):
    """Six concurrent greedy requests of mixed lengths (one of four chunks) and max_tokens, more than the slots:
    each gets what ``generate`` gives its prompt alone; the long prompt's first logits equal the full forward."""
    eng = engines[1]
    rng = np.random.default_rng(2)
    ps = prompts(rng, [5, 30, 17, 3, 26, 12])
    maxt = [9, 16, 4, 12, 7, 16]
    out = run(eng, [Request(f"g{i}", p, n, return_logits=(i == 1)) for i, (p, n) in enumerate(zip(ps, maxt))])
    for i, (p, n) in enumerate(zip(ps, maxt)):
        toks, last, _ = out[f"g{i}"]
        ref = generate(model.params, model.config, [p], 16)[0, :n]
        np.testing.assert_array_equal(toks, ref)
        assert last.finish_reason == "length" and last.prompt_tokens == len(p) and last.cached_tokens == 0
    first = out["g1"][2][0].logits[0]
    full = np.asarray(forward_jit(model.params, model.config, jnp.asarray([ps[1]])))[0, -1]
    np.testing.assert_allclose(first, full, atol=1e-4, rtol=0)


def test_sampled_requests_do_not_depend_on_their_neighbours(model, engines, monkeypatch):
    """Sampled requests (own temperature / top_k / top_p / seed) give the same tokens alone (decoded several steps
    per call) and in a mix with greedy ones, and the same as ``generate`` with that seed."""
    eng = engines[1]
    rng = np.random.default_rng(3)
    ps = prompts(rng, [7, 20, 11, 26, 4, 14, 9])
    sets = [dict(temperature=1.0, seed=11), dict(temperature=0.7, top_k=5, seed=12), dict(),
            dict(temperature=1.3, top_p=0.8, seed=13), dict(temperature=1.0, top_k=3, top_p=0.9, seed=14), dict(),
            dict(temperature=0.9, seed=15)]
    reqs = [Request(f"s{i}", p, 10, **kw) for i, (p, kw) in enumerate(zip(ps, sets))]
    mixed = run(eng, reqs)
    calls, multi = [], steps.decode_steps
    monkeypatch.setattr(steps, "decode_steps", lambda *a: calls.append(a[2]) or multi(*a))
    for i, r in enumerate(reqs):
        alone = run(eng, [r])[r.request_id][0]
        assert mixed[r.request_id][0] == alone
        kw = {k: v for k, v in sets[i].items()}
        ref = generate(model.params, model.config, [r.prompt_ids], 16, **kw)[0, :10]
        np.testing.assert_array_equal(alone, ref)
    assert calls and set(calls) == {eng.decode_steps}
    assert mixed["s0"][0] != run(eng, [Request("s0", ps[0], 10, temperature=1.0, seed=99)])["s0"][0]


def test_bucketed_decode_rows_finish_join_and_move(model, engines, monkeypatch):
    """Rows that finish early, a queued request joining a freed row and the last row moved forward (a smaller
    decode bucket): every request, greedy or sampled with top-k / top-p, gets the tokens it gets alone (and
    ``generate``'s), and the decode steps ran on fewer rows than the batch."""
    eng = engines[1]
    rng = np.random.default_rng(8)
    ps = prompts(rng, [9, 14, 6, 21, 11])
    kws = [dict(), dict(temperature=0.8, top_k=7, seed=21), dict(), dict(temperature=1.1, top_p=0.85, seed=22),
           dict()]
    reqs = [Request(f"b{i}", p, n, return_logits=True, **kw)  # logits too: a moved row must carry its logits
            for i, (p, n, kw) in enumerate(zip(ps, [2, 24, 3, 24, 4], kws))]
    sizes, moves = [], []
    one, multi, move = steps.decode_step, steps.decode_steps, steps.move_row
    monkeypatch.setattr(steps, "decode_step", lambda *a: sizes.append(a[2]) or one(*a))
    monkeypatch.setattr(steps, "decode_steps", lambda *a: sizes.append(a[3]) or multi(*a))
    monkeypatch.setattr(steps, "move_row", lambda *a: moves.append((int(a[2]), int(a[3]))) or move(*a))
    mixed = run(eng, reqs)
    # which rows move depends on when each request is admitted (the engine thread runs alongside): at least one
    # moved forward, into a lower row, and the decode ran on fewer rows than the batch
    assert moves and all(src > dst for src, dst in moves), moves
    assert SLOTS in sizes and min(sizes) < SLOTS, sizes
    for r, kw in zip(reqs, kws):
        alone, _, outs = run(eng, [r])[r.request_id]
        assert mixed[r.request_id][0] == alone, r.request_id
        if r.return_logits:
            np.testing.assert_allclose(np.concatenate([o.logits for o in mixed[r.request_id][2]]),
                                       np.concatenate([o.logits for o in outs]), atol=1e-4, rtol=0)
        ref = generate(model.params, model.config, [r.prompt_ids], 24, **kw)[0, :r.max_tokens]
        np.testing.assert_array_equal(alone, ref)
    assert set(sizes[-r.max_tokens:]) == {1}  # a request alone decodes in the 1-row program


def test_stop_tokens_and_lengths(engines):
    eng = engines[1]
    p = prompts(np.random.default_rng(4), [10])[0]
    free = run(eng, [Request("f", p, 12)])["f"][0]
    stop = free[4]
    k = free.index(stop)
    other = next(t for t in range(3, 512) if t not in free)
    toks, last, _ = run(eng, [Request("s", p, 12, stop_token_ids=(other, stop))])["s"]
    assert toks == free[:k] and last.finish_reason == "stop"
    toks, last, outs = run(eng, [Request("l", p, 3)])["l"]
    assert toks == free[:3] and last.finish_reason == "length" and [len(o.token_ids) for o in outs] == [1, 1, 1]


def test_cancel_frees_the_slot_for_a_queued_request(model, engines):
    eng = Engine(model, max_num_seqs=SLOTS, max_model_len=MAX_LEN, chunk=CHUNK, prefix_cache_bytes=0)
    rng = np.random.default_rng(5)
    ps = prompts(rng, [6] * (SLOTS + 2))
    reqs = [Request(f"c{i}", p, 100) for i, p in enumerate(ps)]
    seen = {}

    def on_first(o):  # while every slot is busy and two wait: cancel one running and one waiting request
        if o.request_id == "c0":
            seen.update(eng.stats())
            eng.cancel("c0")
            eng.cancel(f"c{SLOTS + 1}")

    out = run(eng, reqs, on_first, start=True)  # all queued before the loop starts
    assert seen["running"] == SLOTS and seen["waiting"] == 2
    assert out["c0"][1].finish_reason == "abort" and len(out["c0"][0]) < 100
    assert out[f"c{SLOTS + 1}"][1].finish_reason == "abort" and out[f"c{SLOTS + 1}"][0] == []
    assert out[f"c{SLOTS}"][1].finish_reason == "length" and len(out[f"c{SLOTS}"][0]) == 100
    assert eng.stats()["running"] == 0 and eng.stats()["waiting"] == 0
    eng.stop()


def test_a_failed_step_aborts_its_requests_and_serving_goes_on(engines, monkeypatch):
    eng = engines[1]
    p = prompts(np.random.default_rng(7), [20])[0]
    good = run(eng, [Request("ok", p, 5)])["ok"][0]
    chunk = steps.prefill_chunk

    def broken(*a):
        raise RuntimeError("device lost")

    monkeypatch.setattr(steps, "prefill_chunk", broken)
    out = run(eng, [Request("bad", p, 5), Request("bad2", p[:7], 5)])
    assert out["bad"][1].finish_reason == out["bad2"][1].finish_reason == "abort"
    monkeypatch.setattr(steps, "prefill_chunk", chunk)
    assert run(eng, [Request("again", p, 5)])["again"][0] == good


def test_queue_full_and_bad_requests(model):
    eng = Engine(model, max_num_seqs=SLOTS, max_model_len=MAX_LEN, chunk=CHUNK, max_waiting=2)  # not started
    eng.submit(Request("a", [5, 6], 4), print)
    with pytest.raises(ValueError, match="request_id"):
        eng.submit(Request("a", [5, 6], 4), print)
    eng.submit(Request("b", [5, 6], 4), print)
    with pytest.raises(QueueFull):
        eng.submit(Request("c", [5, 6], 4), print)
    for kw, match in [(dict(prompt_ids=[]), "prompt_ids"), (dict(prompt_ids=[5, 512]), "prompt_ids"),
                      (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=MAX_LEN), "max_model_len"),
                      (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
                      (dict(seed=-3), "seed"), (dict(stop_token_ids=(900,)), "stop_token_ids")]:
        args = dict(request_id="x", prompt_ids=[5, 6], max_tokens=4)
        args.update(kw)
        with pytest.raises(ValueError, match=match):
            eng.submit(Request(**args), print)
    with pytest.raises(ValueError, match="max_model_len"):
        Engine(model, max_model_len=10 ** 6)


def test_prefix_cache_hits_are_exact(model, engines):
    """An identical resend, a shared system prompt with different suffixes and a second turn (turn-1 prompt +
    answer + new message) all restore a checkpoint and give the logits and greedy tokens of a cold prefill."""
    cached, plain, _ = engines
    rng = np.random.default_rng(6)
    before = cached.stats()
    system = prompts(rng, [35])[0]
    turn1 = prompts(rng, [22])[0]
    resend = prompts(rng, [40])[0]
    first = [Request("r0", resend, 6, return_logits=True), Request("t1", turn1, 8, return_logits=True),
             Request("sys0", system + prompts(rng, [6])[0], 6, return_logits=True)]
    out = run(cached, first)
    assert all(out[r.request_id][1].cached_tokens == 0 for r in first)
    answer = out["t1"][0]
    second = [Request("r1", resend, 6, return_logits=True),
              Request("t2", turn1 + answer + prompts(rng, [9])[0], 8, return_logits=True)]
    second += [Request(f"sys{i}", system + prompts(rng, [n])[0], 6, return_logits=True)
               for i, n in ((1, 3), (2, 11))]
    hit = run(cached, second)
    ref = run(plain, second)
    expect = {"r1": 32, "t2": 22, "sys1": 32, "sys2": 32}
    for r in second:
        toks, last, outs = hit[r.request_id]
        assert last.cached_tokens == expect[r.request_id], r.request_id
        assert toks == ref[r.request_id][0]
        np.testing.assert_allclose(outs[0].logits, ref[r.request_id][2][0].logits, atol=1e-4, rtol=0)
    after = cached.stats()
    asked = first + second
    assert after["prefix_cache_queries_total"] - before["prefix_cache_queries_total"] == sum(
        len(r.prompt_ids) for r in asked)
    assert after["prefix_cache_hits_total"] - before["prefix_cache_hits_total"] == sum(expect.values())
    assert after["prompt_tokens_total"] - before["prompt_tokens_total"] == sum(len(r.prompt_ids) for r in asked)
    assert after["generation_tokens_total"] - before["generation_tokens_total"] == sum(
        r.max_tokens for r in asked)
    assert after["prefix_cache_entries"] > 0 and after["prefix_cache_bytes"] > 0


def test_no_compilation_after_warm_up(engines):
    """Everything above (every mix of rows, prompt lengths, sampling settings, prefix restores) ran on the
    programs compiled at start()."""
    assert dict(steps.TRACE_COUNTS) == engines[2]
    assert engines[0].prefill_sizes == [CHUNK // 4, CHUNK // 2, CHUNK]  # a prompt's last piece: the smallest fit
    assert set(engines[2]) == {"prefill_chunk", "decode_step", "decode_steps", "take_head", "put_head",
                               "move_row", "reset_row", "restore_row", "extract_row"}
