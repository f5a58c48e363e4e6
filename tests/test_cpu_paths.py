"""What the CPU decode step compiles to: 16-bit weights are never converted to fp32 copies, whole expert banks are
never copied per step, and the raw-bits moves of ``nemojax.ops`` equal XLA's own slicing bit for bit."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from nemojax import cache as cache_mod
from nemojax import model, ops, params as params_mod
from nemojax.blocks.moe import grouped_experts
from nemojax.formats.base import dot_rows

from .conftest import tiny_config

DTYPES = [jnp.bfloat16, jnp.float16, jnp.float8_e4m3fn, jnp.float8_e5m2, jnp.float32, jnp.int32]


def random_bits(rng, shape, dtype):
    """Arrays of ``dtype`` with random bit patterns (NaN payloads, infinities, subnormals included)."""
    dtype = jnp.dtype(dtype)
    if dtype.itemsize == 4:
        return jnp.asarray(rng.integers(-2 ** 31, 2 ** 31, shape, dtype=np.int64).astype(np.int32)).view(dtype) \
            if dtype != jnp.int32 else jnp.asarray(rng.integers(-2 ** 31, 2 ** 31, shape).astype(np.int32))
    raw = rng.integers(0, 2 ** (8 * dtype.itemsize), shape).astype(np.uint16 if dtype.itemsize == 2 else np.uint8)
    return jax.lax.bitcast_convert_type(jnp.asarray(raw), dtype)


def bits(a):
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_raw_bit_moves_preserve_every_bit(dtype):
    """Against NumPy slicing of the bits (XLA's own fp8 slice is not a reference: its fp32 round trip rewrites NaNs)."""
    rng = np.random.default_rng()
    a = random_bits(rng, (5, 7, 3), dtype)
    upd = random_bits(rng, (5, 2, 3), dtype)
    A, U = bits(a), bits(upd)
    for start in (0, 3, 5, 6, -1):  # a negative start counts from the end, then starts clamp (jax.lax's rules)
        s = min(start % 7, 7 - 2)
        got = jax.jit(lambda a, i: ops.dynamic_slice(a, i, 2, axis=1))(a, jnp.int32(start))
        assert got.dtype == a.dtype
        np.testing.assert_array_equal(bits(got), A[:, s:s + 2])
        got = jax.jit(lambda a, u, i: ops.dynamic_update(a, u, i, axis=1))(a, upd, jnp.int32(start))
        want = A.copy()
        want[:, s:s + 2] = U
        np.testing.assert_array_equal(bits(got), want)
        got = jax.jit(lambda a, i: ops.dynamic_index(a, i, 0))(a, jnp.int32(start % 5))
        np.testing.assert_array_equal(bits(got), A[start % 5])
    if jnp.dtype(dtype).itemsize < 4 and jnp.issubdtype(dtype, jnp.floating):
        assert ops.as_bits(a).dtype == {1: jnp.uint8, 2: jnp.uint16}[jnp.dtype(dtype).itemsize]
        np.testing.assert_array_equal(bits(ops.from_bits(ops.as_bits(a), dtype)), A)


def test_single_row_bf16_linear_equals_fp32_reference():
    """The one-row product (computed as two rows on CPU) gives the row of the plain product."""
    rng = np.random.default_rng()
    w = jnp.asarray(rng.standard_normal((96, 80)).astype(ml_dtypes.bfloat16))
    x = jnp.asarray(rng.standard_normal((1, 1, 80)).astype(ml_dtypes.bfloat16))
    ref = np.asarray(x, np.float64).reshape(1, 80) @ np.asarray(w, np.float64).T
    got = jax.jit(dot_rows)(x, w)
    assert got.shape == (1, 1, 96) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got).reshape(1, 96), ref, rtol=1e-5, atol=1e-4)
    many = jnp.concatenate([x.reshape(1, 80), jnp.asarray(rng.standard_normal((3, 80)), jnp.bfloat16)])
    np.testing.assert_allclose(np.asarray(dot_rows(many, w))[:1], np.asarray(got).reshape(1, 96), rtol=1e-6,
                               atol=1e-6)


def compiled_decode_step(dtype: str, batch: int):
    cfg = tiny_config(hidden_size=128, moe_intermediate_size=96, vocab_size=1024)
    p = jax.tree.map(jnp.asarray, params_mod.init_params_numpy(cfg, seed=0, dtype=dtype))
    cache = cache_mod.init_cache(cfg, batch, 64, dtype=dtype)
    step = jax.jit(lambda p, t, c: model.forward(p, cfg, t, None, c, last_only=True))
    tok = jnp.ones((batch, 1), jnp.int32)
    return cfg, p, step.lower(p, tok, cache).compile().as_text()


def produced_shapes(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, shape) of every array the optimized module materializes: instructions outside fusion bodies
    (what a fusion computes internally is never stored), parameters and views excluded."""
    fused = set(re.findall(r"kind=k\w+, calls=(%[\w.-]+)", hlo))
    out, skip = [], False
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?(%[\w.-]+) .*\{$", line)
        if head:
            skip = head.group(1) in fused
            continue
        m = re.search(r"= (\w+)\[([\d,]*)\]\{[^}]*\} ([\w-]+)\(", line)
        if skip or not m or m.group(3) in ("parameter", "get-tuple-element", "bitcast", "tuple"):
            continue
        out.append((m.group(1), tuple(int(d) for d in m.group(2).split(",") if d)))
    return out


@pytest.mark.parametrize("batch", [1, 4])
def test_bf16_decode_step_makes_no_fp32_or_full_copies_of_weights(batch):
    cfg, p, hlo = compiled_decode_step("bfloat16", batch)
    # matmul weights; the router gate runs in fp32 by design and the conv1d taps are elementwise
    weights = {tuple(a.shape) for path, a in params_mod.tree_paths(p)
               if a.ndim >= 2 and not path.endswith(("gate", "conv1d"))}
    banks = {tuple(a.shape) for a in jax.tree.leaves(p) if a.ndim == 3}  # stacked experts [E, out, in]
    made = produced_shapes(hlo)
    f32_weights = sorted({s for d, s in made if d == "f32" and s in weights})
    assert not f32_weights, f"the bf16 decode step converts weights of shapes {f32_weights} to fp32"
    bank_copies = sorted({(d, s) for d, s in made if s in banks})
    assert not bank_copies, f"the bf16 decode step copies whole expert banks: {bank_copies}"
    if batch == 1 and jax.default_backend() == "cpu":
        assert not re.search(r"f32\[1,\d+\]\{1,0\} dot\(", hlo), "a single-row bf16 product runs as an fp32 GEMV"


def test_grouped_experts_bf16_matches_float64_reference():
    """The bank slicing through raw bits inside the experts' loop computes the same experts (float64 NumPy)."""
    rng = np.random.default_rng()
    E, F, H, T, k = 8, 24, 32, 5, 3
    up = rng.standard_normal((E, F, H)).astype(ml_dtypes.bfloat16)
    down = rng.standard_normal((E, H, F)).astype(ml_dtypes.bfloat16)
    x = rng.standard_normal((T, H)).astype(ml_dtypes.bfloat16)
    idx = np.stack([rng.choice(E, k, replace=False) for _ in range(T)]).astype(np.int32)
    w = rng.random((T, k)).astype(np.float32)
    got = np.asarray(jax.jit(grouped_experts)(jnp.asarray(x), jnp.asarray(w), jnp.asarray(idx), jnp.asarray(up),
                                              jnp.asarray(down)))
    ref = np.zeros((T, H))
    for t in range(T):
        for j in range(k):
            e = idx[t, j]
            h = np.maximum(np.asarray(up[e], np.float64) @ np.asarray(x[t], np.float64), 0) ** 2
            h = np.asarray(h.astype(ml_dtypes.bfloat16), np.float64)  # the hidden activations are bf16
            ref[t] += w[t, j] * (np.asarray(down[e], np.float64) @ h)
    np.testing.assert_allclose(got, ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())


def test_block_rows_give_each_used_expert_one_block_at_decode_sizes():
    """Decode batches: one block per used expert (each block copies its expert); prefill: the 128 cap."""
    from nemojax.blocks.moe import block_rows

    rng = np.random.default_rng()
    for E, k, T in ((16, 6, 1), (16, 6, 8), (128, 6, 8), (128, 6, 1)):
        b = block_rows(T * k, E)
        counts = np.bincount(np.concatenate([rng.choice(E, k, replace=False) for _ in range(T)]), minlength=E)
        blocks = int(np.sum((counts + b - 1) // b))
        assert blocks <= 1.5 * np.count_nonzero(counts), (E, k, T, b, counts)
        assert b <= max(1, 2 * counts.max())  # and not much wider than the busiest expert needs
    assert block_rows(512 * 6, 16) == 128 and block_rows(4096 * 6, 128) == 128


def test_bf16_decode_loop_hoists_no_copy_of_the_embedding_table_or_banks(monkeypatch):
    """Across the jitted decode loop the weights are loop-invariant: XLA would hoist a converted copy of the
    embedding table (and of every expert bank) out of the loop, once per call, without the barriers."""
    import nemojax.generate as gen

    cfg = tiny_config(hidden_size=128, moe_intermediate_size=96, vocab_size=1024)
    p = jax.tree.map(jnp.asarray, params_mod.init_params_numpy(cfg, seed=0, dtype="bfloat16"))
    seen = {}
    real = gen.decode

    def spy(*a, **k):
        seen["hlo"] = real.lower(*a, **k).compile().as_text()
        return real(*a, **k)
    monkeypatch.setattr(gen, "decode", spy)
    list(gen.generate_stream(p, cfg, np.random.default_rng().integers(3, 1000, (1, 16)), max_new_tokens=8, chunk=4))
    hlo = seen["hlo"]
    entry = hlo[hlo.index("\nENTRY"):]
    entry = entry[:entry.index("\n}") + 1]
    big = {tuple(p["embeddings"].shape)} | {tuple(a.shape) for a in jax.tree.leaves(p) if a.ndim == 3}
    hoisted = sorted({(d, s) for d, s in produced_shapes(entry) if s in big})
    assert not hoisted, f"the decode loop starts by copying {hoisted}"
