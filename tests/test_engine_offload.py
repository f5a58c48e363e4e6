"""The engine over a model whose routed experts are offloaded (``Model.offload``: 3 device slots of 8 experts per MoE
layer): concurrent greedy requests give the tokens of ``generate`` on the resident model, only real tokens route
through the expert cache (not the chunk padding, not idle rows), ``stats`` reports the cache, prefix-cache hits
are exact, a sampled request equals ``generate`` with its seed; a host-driven strategy without ``forward`` is
refused; over experts memory-mapped from the files, the engine reads them in place and serves the same tokens."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import nemojax
from nemojax.blocks.moe import RoutedExperts
from nemojax.generate import generate
from nemojax.model import forward_jit
from nemojax.params import init_params
from nemojax.serve import Engine, Request

from .conftest import tiny_config
from .test_engine import prompts, run

CHUNK, SLOTS, MAX_LEN, N_SLOTS = 8, 3, 96, 3


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config(hybrid_override_pattern="ME*EM")  # two MoE layers: the prefetch of the next one runs
    return nemojax.Model(cfg, init_params(cfg, seed=8))


@pytest.fixture(scope="module")
def engine(model):
    off = model.offload(N_SLOTS, "lru")
    eng = Engine(off, max_num_seqs=SLOTS, max_model_len=MAX_LEN, chunk=CHUNK, prefix_cache_bytes=1 << 26)
    eng.start()
    yield eng
    eng.stop()


def test_greedy_mix_equals_generate_and_only_real_tokens_route(model, engine):
    """Five concurrent greedy requests (more than the rows; prompts of one to four chunks): each gets what
    ``generate`` gives its prompt alone on the resident model; the long prompt's first logits equal the resident
    full forward; every MoE layer routed exactly the prompt tokens and the fed-back tokens."""
    experts = engine.model.experts
    assert engine.decode_steps == 1 and experts.n_slots < model.config.n_routed_experts
    rng = np.random.default_rng(2)
    ps = prompts(rng, [5, 27, 13, 3, 19])
    maxt = [9, 14, 4, 12, 7]
    experts.trace = []
    before = engine.stats()
    try:
        out = run(engine, [Request(f"g{i}", p, n, return_logits=(i == 1)) for i, (p, n) in enumerate(zip(ps, maxt))])
        trace = experts.trace
    finally:
        experts.trace = None
    for i, (p, n) in enumerate(zip(ps, maxt)):
        toks, last, _ = out[f"g{i}"]
        np.testing.assert_array_equal(toks, generate(model.params, model.config, [p], 16)[0, :n])
        assert last.finish_reason == "length" and last.cached_tokens == 0
    first = out["g1"][2][0].logits[0]
    full = np.asarray(forward_jit(model.params, model.config, jnp.asarray([ps[1]])))[0, -1]
    np.testing.assert_allclose(first, full, atol=1e-4, rtol=0)
    moe = [i for i, c in enumerate(model.config.pattern) if c == "E"]
    for layer in moe:
        rows = sum(len(ids) for lay, ids in trace if lay == layer)
        assert rows == sum(map(len, ps)) + sum(maxt), layer
    after = engine.stats()
    assert after["generation_tokens_total"] - before["generation_tokens_total"] == sum(maxt)
    assert 0 < after["expert_cache_hit_rate"] < 1
    assert after["expert_cache_misses_total"] > 0 and after["expert_cache_hits_total"] > 0
    hr = after["expert_cache_hits_total"] / (after["expert_cache_hits_total"] + after["expert_cache_misses_total"])
    assert after["expert_cache_hit_rate"] == pytest.approx(hr)
    assert after["expert_cache_bytes_moved_total"] > 0
    assert after["expert_cache_bytes_per_token"] == pytest.approx(
        after["expert_cache_bytes_moved_total"] / after["generation_tokens_total"])


def test_prefix_cache_hits_are_exact(model, engine):
    """A resend and a second turn restore a checkpoint and give the tokens of ``generate`` and the first logits of
    the cold request."""
    rng = np.random.default_rng(6)
    p = prompts(rng, [20])[0]
    cold = run(engine, [Request("c", p, 6, return_logits=True)])["c"]
    turn2 = p + cold[0] + prompts(rng, [5])[0]
    hot = run(engine, [Request("h", p, 6, return_logits=True), Request("t", turn2, 6)])
    assert cold[1].cached_tokens == 0 and hot["h"][1].cached_tokens == 16 and hot["t"][1].cached_tokens == 20
    assert hot["h"][0] == cold[0] == generate(model.params, model.config, [p], 6)[0].tolist()
    np.testing.assert_allclose(hot["h"][2][0].logits, cold[2][0].logits, atol=1e-5, rtol=0)
    assert hot["t"][0] == generate(model.params, model.config, [turn2], 6)[0].tolist()
    assert 0 < engine.stats()["expert_cache_hit_rate"] <= 1


def test_sampled_request_equals_generate_with_its_seed(model, engine):
    p = prompts(np.random.default_rng(9), [11])[0]
    got = run(engine, [Request("s", p, 8, temperature=1.0, top_k=20, seed=11)])["s"][0]
    ref = generate(model.params, model.config, [p], 8, temperature=1.0, top_k=20, seed=11)[0]
    np.testing.assert_array_equal(got, ref)


def test_a_host_driven_strategy_without_forward_is_refused(model):
    class Remote(RoutedExperts):
        host_driven = True

    with pytest.raises(ValueError, match="model.experts.*forward"):
        Engine(nemojax.Model(model.config, model.params, Remote()), max_num_seqs=1, max_model_len=32, chunk=8)


def test_mapped_experts_read_in_place_serve_the_same_tokens(model, tmp_path):
    """A CPU engine over experts memory-mapped from the files: prompts of several chunks (more rows than
    ``IN_PLACE_ROWS``: each expert on its own rows) and the running rows read the experts in place, no slot is made,
    and every request gets what ``generate`` gives it on the resident model."""
    from nemojax.checkpoint import save_params
    from nemojax.experts.offload import IN_PLACE_ROWS

    save_params(model.params, model.config, tmp_path)
    off = nemojax.load(str(tmp_path), dtype="float32", mmap=True).offload(N_SLOTS)
    eng = Engine(off, max_num_seqs=SLOTS, max_model_len=MAX_LEN, chunk=16)
    eng.start()
    try:
        ps = prompts(np.random.default_rng(4), [21, 6, 33, 12])
        assert max(len(p) for p in ps) > 2 * IN_PLACE_ROWS
        out = run(eng, [Request(f"m{i}", p, 8) for i, p in enumerate(ps)])
    finally:
        eng.stop()
    for i, p in enumerate(ps):
        np.testing.assert_array_equal(out[f"m{i}"][0], generate(model.params, model.config, [p], 8)[0])
    st = off.experts.stats
    assert st.in_place > 0 and st.misses == 0 and off.experts.slot_bytes == 0
