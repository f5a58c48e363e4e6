"""Generation: cache exactness, greedy parity with transformers, sampling statistics, compile counts, errors."""
from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp

import nemojax
from nemojax.cache import init_cache
from nemojax.generate import TRACE_COUNTS, generate, prefill
from nemojax.model import forward_jit
from nemojax.params import init_params, init_params_numpy
from nemojax.sampling import SamplingParams, filter_logits, sample
from nemojax.checkpoint import save_params

from .conftest import requires_torch, tiny_config


@pytest.fixture(scope="module")
def tiny_model():
    cfg = tiny_config()
    return nemojax.Model(cfg, init_params(cfg, seed=21))


def test_prefill_then_decode_reproduces_full_forward(tiny_model):
    cfg, params = tiny_model.config, tiny_model.params
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, size=(2, 45))
    mask = np.ones_like(ids, dtype=np.int32)
    mask[1, :7] = 0  # left pad in row 1
    full = np.asarray(forward_jit(params, cfg, jnp.asarray(ids), jnp.asarray(mask)))
    cache = init_cache(cfg, 2, 64, jnp.float32)
    logits, cache = forward_jit(params, cfg, jnp.asarray(ids[:, :21]), jnp.asarray(mask[:, :21]), cache)
    got = [np.asarray(logits)]
    for t in range(21, 45):  # single-token recurrence steps
        logits, cache = forward_jit(params, cfg, jnp.asarray(ids[:, t:t + 1]), None, cache)
        got.append(np.asarray(logits))
    got = np.concatenate(got, 1)
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], full[valid], atol=1e-4, rtol=0)
    assert int(cache.pos) == 45 and cache.layers[0]["ssm"].dtype == jnp.float32


def test_jitted_prefill_returns_last_logits(tiny_model):
    cfg, params = tiny_model.config, tiny_model.params
    ids = np.random.default_rng(1).integers(3, cfg.vocab_size, size=(1, 16))
    full = np.asarray(forward_jit(params, cfg, jnp.asarray(ids)))
    last, _ = prefill(params, cfg, jnp.asarray(ids, jnp.int32), jnp.ones((1, 16), jnp.int32),
                      init_cache(cfg, 1, 32, jnp.float32))
    np.testing.assert_allclose(np.asarray(last), full[:, -1], atol=1e-5)


@requires_torch
@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_tokens_equal_transformers_generate(tmp_path, batch):
    import torch

    from .hf_reference import hf_model

    cfg = tiny_config()
    save_params(init_params_numpy(cfg, seed=30 + batch), cfg, tmp_path)
    model = nemojax.load(tmp_path, dtype="float32")
    rng = np.random.default_rng(batch)
    prompts = [rng.integers(3, cfg.vocab_size, 24).tolist(), rng.integers(3, cfg.vocab_size, 13).tolist()][:batch]
    out = model.generate(prompts, 64)
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    am = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        ref = hf_model(tmp_path).generate(ids, attention_mask=am, max_new_tokens=64, min_new_tokens=64,
                                          do_sample=False, eos_token_id=None, pad_token_id=0)[:, T:].numpy()
    np.testing.assert_array_equal(out, ref)


def test_stop_tokens_per_sequence_and_streaming(tiny_model):
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 512, 9).tolist(), rng.integers(3, 512, 17).tolist()]
    free = tiny_model.generate(prompts, 40)
    stop = int(free[0, 5])
    first = [int(np.argmax(r == stop)) if (r == stop).any() else None for r in free]
    out = tiny_model.generate(prompts, 40, stop_token_ids=[stop])
    for b in range(2):
        k = first[b]
        if k is None:
            np.testing.assert_array_equal(out[b], free[b])
        else:  # identical up to and including the stop token, pad after
            np.testing.assert_array_equal(out[b, :k + 1], free[b, :k + 1])
            assert (out[b, k + 1:] == 0).all()
    chunks = []
    streamed = tiny_model.generate(prompts, 40, callback=chunks.append, chunk=16)
    np.testing.assert_array_equal(streamed, free)
    assert [c.shape[1] for c in chunks] == [16, 16, 8]
    parts = list(tiny_model.generate_stream(prompts, 40, chunk=8))
    np.testing.assert_array_equal(np.concatenate(parts, 1), free)


def test_seeded_sampling_is_reproducible(tiny_model):
    p = [[5, 6, 7, 8, 9]]
    a = tiny_model.generate(p, 24, temperature=1.0, top_p=0.9, seed=7)
    b = tiny_model.generate(p, 24, temperature=1.0, top_p=0.9, seed=7)
    c = tiny_model.generate(p, 24, temperature=1.0, top_p=0.9, seed=8)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def _freqs(logits, sp, n=40000):
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    draws = jax.vmap(lambda k: sample(logits[None], k, sp)[0])(keys)
    return np.bincount(np.asarray(draws), minlength=logits.shape[0]) / n


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.5, 0, 1.0), (2.0, 0, 1.0), (1.0, 3, 1.0),
                                                     (1.0, 0, 0.7), (0.8, 4, 0.9)])
def test_sampling_matches_known_distribution(temperature, top_k, top_p):
    logits = np.array([2.0, 1.5, 1.0, 0.7, 0.2, -0.5, -1.0, -3.0], np.float32)
    p = np.exp(logits / temperature)
    p /= p.sum()
    order = np.argsort(-p)
    keep = np.zeros(8, bool)
    keep[order[:top_k or 8]] = True
    if top_p < 1:  # smallest prefix (by probability, after top-k renormalisation) reaching top_p
        q = np.where(keep, p, 0) / np.where(keep, p, 0).sum()
        cum = np.cumsum(q[order])
        n_keep = int(np.searchsorted(cum, top_p) + 1)
        keep2 = np.zeros(8, bool)
        keep2[order[:n_keep]] = True
        keep &= keep2
    expect = np.where(keep, p, 0)
    expect /= expect.sum()
    got = _freqs(jnp.asarray(logits), SamplingParams.make(temperature, top_k, top_p))
    assert (got[~keep] == 0).all()
    # 40k draws: standard error <= 0.0025; allow 5 sigma
    np.testing.assert_allclose(got, expect, atol=0.0125)


def test_greedy_sampling_and_filter_edge_cases():
    logits = jnp.asarray([[0.1, 3.0, -1.0, 2.9]], jnp.float32)
    assert int(sample(logits, jax.random.PRNGKey(0), SamplingParams.make(0.0))[0]) == 1
    f = np.asarray(filter_logits(logits, jnp.int32(1), jnp.float32(1.0)))
    assert np.isfinite(f).sum() == 1 and np.isfinite(f[0, 1])
    f = np.asarray(filter_logits(logits, jnp.int32(0), jnp.float32(1e-6)))  # nucleus keeps at least the top token
    assert np.isfinite(f).sum() == 1


def test_compilations_are_bounded(tiny_model):
    cfg = tiny_config(vocab_size=509)  # a config no other test compiled for
    params = init_params(cfg, seed=2)
    before = dict(TRACE_COUNTS)
    rng = np.random.default_rng(4)
    for n, (L, new, temp) in enumerate([(5, 10, 0.0), (9, 16, 1.0), (16, 3, 0.7), (12, 12, 0.0)]):
        generate(params, cfg, [rng.integers(3, 509, L).tolist()], new, temperature=temp, top_k=n, seed=n)
    # one prompt bucket (16) and one decode-chunk shape: one trace each, whatever the lengths and sampling
    assert TRACE_COUNTS["prefill"] - before.get("prefill", 0) == 1
    assert TRACE_COUNTS["decode"] - before.get("decode", 0) == 1
    generate(params, cfg, [rng.integers(3, 509, 20).tolist()], 5)  # next bucket (32): one more prefill
    assert TRACE_COUNTS["prefill"] - before.get("prefill", 0) == 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-2), "top_k"), (dict(top_k=1.5), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(stop_token_ids=[600]), "stop_token_ids"),
    (dict(seed="x"), "seed"), (dict(max_new_tokens=5000), "context length"),
])
def test_invalid_generation_arguments(tiny_model, kwargs, match):
    kw = dict(max_new_tokens=4)
    kw.update(kwargs)
    n = kw.pop("max_new_tokens")
    with pytest.raises(ValueError, match=match):
        tiny_model.generate([[5, 6, 7]], n, **kw)


def test_invalid_prompts(tiny_model):
    with pytest.raises(ValueError, match="left-padded"):
        tiny_model.generate(np.array([[5, 6, 0]]), 2, attention_mask=np.array([[1, 1, 0]]))
    with pytest.raises(ValueError, match=r"\[0, 512\)"):
        tiny_model.generate([[5, 900]], 2)
    with pytest.raises(ValueError, match="at least one token"):
        tiny_model.generate([[5], []], 2)
