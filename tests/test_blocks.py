"""The block kinds: their registry and declarations, and block-level numerics against independent float64 NumPy
references (no torch needed)."""
from __future__ import annotations

import numpy as np
import pytest
import jax.numpy as jnp

from nemojax.blocks.mamba import causal_conv, gated_rms_norm, ssd_chunked, ssd_step
from nemojax.blocks.moe import grouped_experts, route

from .conftest import tiny_config


def ssd_reference(x, dt, A, B, C, S0):
    """Sequential float64 recurrence: S_t = exp(dt A) S + dt x B^T ; y_t = S_t C_t (head h uses group h // r)."""
    b, T, nh, P = x.shape
    G = B.shape[2]
    r = nh // G
    S = S0.astype(np.float64).copy()
    y = np.zeros((b, T, nh, P))
    for t in range(T):
        for h in range(nh):
            g = h // r
            S[:, h] = np.exp(dt[:, t, h] * A[h])[:, None, None] * S[:, h] + \
                (dt[:, t, h][:, None] * x[:, t, h])[:, :, None] * B[:, t, g][:, None, :]
            y[:, t, h] = np.einsum("bpn,bn->bp", S[:, h], C[:, t, g])
    return y, S


def _ssd_inputs(rng, b, T, nh, P, G, N):
    x = rng.standard_normal((b, T, nh, P))
    dt = np.exp(rng.uniform(np.log(1e-3), np.log(0.5), (b, T, nh)))
    A = -np.exp(rng.uniform(0, 2.5, nh))
    B = rng.standard_normal((b, T, G, N))
    C = rng.standard_normal((b, T, G, N))
    S0 = rng.standard_normal((b, nh, P, N))
    return x, dt, A, B, C, S0


@pytest.mark.parametrize("T,chunk", [(1, 8), (5, 8), (16, 8), (37, 8), (37, 16), (64, 64)])
def test_chunked_ssd_matches_float64_recurrence(T, chunk):
    rng = np.random.default_rng(T * 100 + chunk)
    x, dt, A, B, C, S0 = _ssd_inputs(rng, 2, T, 4, 3, 2, 5)
    y_ref, S_ref = ssd_reference(x, dt, A, B, C, S0)
    f = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    y, S = ssd_chunked(f(x), f(dt), f(A), f(B), f(C), chunk, f(S0))
    np.testing.assert_allclose(np.asarray(y), y_ref, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(S), S_ref, atol=2e-4, rtol=1e-4)
    # and from a zero state
    y0, _ = ssd_chunked(f(x), f(dt), f(A), f(B), f(C), chunk)
    y0_ref, _ = ssd_reference(x, dt, A, B, C, np.zeros_like(S0))
    np.testing.assert_allclose(np.asarray(y0), y0_ref, atol=2e-4, rtol=1e-4)


def test_ssd_step_matches_recurrence():
    rng = np.random.default_rng(5)
    x, dt, A, B, C, S0 = _ssd_inputs(rng, 3, 1, 8, 4, 4, 6)
    y_ref, S_ref = ssd_reference(x, dt, A, B, C, S0)
    y, S = ssd_step(jnp.asarray(S0, jnp.float32), jnp.asarray(x[:, 0], jnp.float32), jnp.asarray(dt[:, 0]),
                    jnp.asarray(A), jnp.asarray(B[:, 0]), jnp.asarray(C[:, 0]))
    np.testing.assert_allclose(np.asarray(y), y_ref[:, 0], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(S), S_ref, atol=1e-4, rtol=1e-4)


def test_causal_conv_matches_numpy_and_carries_window():
    rng = np.random.default_rng(6)
    b, T, C, K = 2, 9, 5, 4
    xbc = rng.standard_normal((b, T, C))
    w = rng.standard_normal((C, K))
    bias = rng.standard_normal(C)
    pad = np.concatenate([np.zeros((b, K - 1, C)), xbc], 1)
    ref = np.stack([sum(pad[:, t + j] * w[:, j] for j in range(K)) + bias for t in range(T)], 1)
    ref = ref / (1 + np.exp(-ref))
    u, win = causal_conv(jnp.asarray(xbc, jnp.float32), jnp.zeros((b, K - 1, C)), jnp.asarray(w), jnp.asarray(bias))
    np.testing.assert_allclose(np.asarray(u), ref, atol=1e-5)
    np.testing.assert_allclose(np.asarray(win), xbc[:, -(K - 1):], atol=0)
    # splitting the sequence and carrying the window gives the same outputs
    u1, w1 = causal_conv(jnp.asarray(xbc[:, :4], jnp.float32), jnp.zeros((b, K - 1, C)), jnp.asarray(w),
                         jnp.asarray(bias))
    u2, _ = causal_conv(jnp.asarray(xbc[:, 4:], jnp.float32), w1, jnp.asarray(w), jnp.asarray(bias))
    np.testing.assert_allclose(np.concatenate([u1, u2], 1), ref, atol=1e-5)


def test_gated_norm_is_grouped():
    rng = np.random.default_rng(7)
    y, z, w = rng.standard_normal((3, 12)), rng.standard_normal((3, 12)), rng.standard_normal(12)
    g = y * z / (1 + np.exp(-z))
    gg = g.reshape(3, 4, 3)
    ref = (gg / np.sqrt((gg ** 2).mean(-1, keepdims=True) + 1e-5)).reshape(3, 12) * w
    out = gated_rms_norm(jnp.asarray(y), jnp.asarray(z), jnp.asarray(w), 4, 1e-5, jnp.float32)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
    whole = g / np.sqrt((g ** 2).mean(-1, keepdims=True) + 1e-5) * w
    assert np.abs(np.asarray(out) - whole).max() > 1e-2  # a single RMS over all channels is different


def route_reference(x, gate, bias, k, n_group, topk_group, scale, norm=True):
    s = 1 / (1 + np.exp(-(x @ gate.T)))
    choice = s + bias
    T, E = s.shape
    if n_group > 1:
        grp = choice.reshape(T, n_group, E // n_group)
        gs = np.sort(grp, -1)[..., -2:].sum(-1)
        keep = np.argsort(-gs, -1)[:, :topk_group]
        m = np.zeros((T, n_group), bool)
        np.put_along_axis(m, keep, True, 1)
        choice = np.where(np.repeat(m, E // n_group, 1), choice, -np.inf)
    idx = np.argsort(-choice, -1)[:, :k]
    w = np.take_along_axis(s, idx, 1)
    if norm:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return w * scale, idx


@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 2), (8, 3)])
def test_router_matches_numpy(n_group, topk_group):
    cfg = tiny_config(hybrid_override_pattern="E", n_routed_experts=16, num_experts_per_tok=4, n_group=n_group,
                      topk_group=topk_group, routed_scaling_factor=2.5)
    rng = np.random.default_rng(n_group)
    x, gate, bias = rng.standard_normal((50, 64)), rng.standard_normal((16, 64)) * 0.2, rng.normal(0, 0.3, 16)
    w, idx = route(jnp.asarray(gate, jnp.float32), jnp.asarray(bias, jnp.float32), cfg, jnp.asarray(x, jnp.float32))
    w_ref, idx_ref = route_reference(x, gate, bias, 4, n_group, topk_group, 2.5)
    o, o_ref = np.argsort(np.asarray(idx), 1), np.argsort(idx_ref, 1)  # order within the top-k is irrelevant
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(idx), o, 1), np.take_along_axis(idx_ref, o_ref, 1))
    np.testing.assert_allclose(np.take_along_axis(np.asarray(w), o, 1), np.take_along_axis(w_ref, o_ref, 1),
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(w).sum(1), 2.5, atol=1e-5)
    if n_group > 1:  # every selected expert lies in one of the topk_group kept groups
        assert (np.unique(np.asarray(idx) // (16 // n_group), axis=None).size >= 1)
        groups = np.asarray(idx) // (16 // n_group)
        assert max(len(set(r)) for r in groups.tolist()) <= topk_group


def experts_reference(x, w, idx, up, down):
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = idx[t, j]
            out[t] += w[t, j] * (down[e] @ np.maximum(up[e] @ x[t], 0) ** 2)
    return out


@pytest.mark.parametrize("T,E,k,block", [(1, 128, 6, None), (7, 16, 3, None), (40, 8, 2, 4), (33, 32, 4, 1),
                                         (64, 4, 2, None)])
def test_grouped_experts_match_loop(T, E, k, block):
    rng = np.random.default_rng(T + E)
    H, F = 24, 12
    x = rng.standard_normal((T, H))
    up, down = rng.standard_normal((E, F, H)) / 5, rng.standard_normal((E, H, F)) / 3
    # skewed routing so some experts are empty and some get many rows
    idx = np.stack([rng.choice(min(E, 6) if t % 2 else E, size=k, replace=False) for t in range(T)])
    w = rng.uniform(0.1, 1.0, (T, k))
    out = grouped_experts(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(idx, jnp.int32),
                          jnp.asarray(up, jnp.float32), jnp.asarray(down, jnp.float32), block)
    np.testing.assert_allclose(np.asarray(out), experts_reference(x, w, idx, up, down), atol=1e-4, rtol=1e-4)


def _dot_shapes(jaxpr, out):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append(tuple(tuple(v.aval.shape) for v in eqn.invars))
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _dot_shapes(inner, out)
    return out


def test_moe_never_multiplies_by_all_experts():
    """The traced MoE contains no contraction over the stacked [E, F, H] bank: per-token work is top-k, not E."""
    import jax
    from nemojax.blocks.moe import moe_mixer
    from nemojax.params import abstract_params

    cfg = tiny_config(hybrid_override_pattern="E", n_routed_experts=128, num_experts_per_tok=6,
                      moe_intermediate_size=40, hidden_size=48)
    p = abstract_params(cfg, "float32")["layers"][0]["mixer"]
    x = jax.ShapeDtypeStruct((2, 16, 48), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda p, x: moe_mixer(p, cfg, x))(p, x)
    shapes = _dot_shapes(jaxpr.jaxpr, [])
    assert shapes, "no matmul found"
    assert all(128 not in s for ops in shapes for s in ops if len(s) == 3), shapes
    # the expert matmuls see one expert's [F, H] / [H, F] slice at a time
    # (an operand of the product: a few-row fp32 product on CPU takes the weight as its left operand)
    assert any((40, 48) in ops[:2] for ops in shapes) and any((48, 40) in ops[:2] for ops in shapes), shapes


def test_dense_experts_equal_grouped_and_differentiate():
    import jax
    from nemojax.blocks.moe import dense_experts

    rng = np.random.default_rng(9)
    T, E, k, H, F = 3, 12, 2, 16, 10
    x = jnp.asarray(rng.standard_normal((T, H)), jnp.float32)
    up = jnp.asarray(rng.standard_normal((E, F, H)) / 4, jnp.float32)
    down = jnp.asarray(rng.standard_normal((E, H, F)) / 3, jnp.float32)
    idx = jnp.asarray(np.stack([rng.choice(E, k, replace=False) for _ in range(T)]), jnp.int32)
    w = jnp.asarray(rng.uniform(0.1, 1, (T, k)), jnp.float32)
    np.testing.assert_allclose(np.asarray(dense_experts(x, w, idx, up, down)),
                               np.asarray(grouped_experts(x, w, idx, up, down)), atol=1e-4, rtol=1e-4)
    g = jax.grad(lambda u: dense_experts(x, w, idx, u, down).sum())(up)
    used = np.zeros(E, bool)
    used[np.asarray(idx).ravel()] = True
    assert np.abs(np.asarray(g)[used]).max() > 0 and np.abs(np.asarray(g)[~used]).max() == 0


# ------------------------------------------------------------------------------------------------ the registry
def test_registry_is_the_config_block_table():
    from nemojax.blocks.base import BLOCKS
    from nemojax.config import BLOCK_TYPES

    assert {c: k.type_name for c, k in BLOCKS.items()} == BLOCK_TYPES
    assert all(k.char == c for c, k in BLOCKS.items())


def test_register_refuses_a_taken_or_unknown_character():
    from nemojax.blocks.base import BLOCKS, BlockKind, register

    with pytest.raises(ValueError, match="registered twice"):
        register(BLOCKS["M"])
    with pytest.raises(ValueError, match="not in nemojax.config.BLOCK_TYPES"):
        register(BlockKind(char="X", type_name="new", params=lambda cfg, p: {}, mixer=lambda *a: None))
    assert "X" not in BLOCKS


def test_declarations_fit_their_kind():
    """Every kind's linears are parameters of it; its cache state has exactly the arrays its state axes name, one
    logical axis per dimension; a declared parameter's axes have one name per dimension."""
    import jax
    from nemojax.blocks.base import BLOCKS, Spec
    from nemojax.params import tree_paths

    cfg = tiny_config()
    with pytest.raises(ValueError, match="1 logical axes for shape"):
        Spec((2, 3), ("embed",), "w")
    for c, kind in BLOCKS.items():
        declared = dict(tree_paths(kind.params(cfg, "p.")))
        assert set(kind.linears) <= set(declared), c
        assert all(len(declared[n].shape) == 2 or declared[n].stacked for n in kind.linears), c
        state = jax.eval_shape(lambda: kind.init_state(cfg, 2, 8, jnp.bfloat16, jnp.bfloat16))
        assert state.keys() == kind.state_axes.keys(), c
        assert all(len(kind.state_axes[n]) == a.ndim for n, a in state.items()), c
        assert not set(dict(tree_paths(kind.optional(cfg, "p.")))) & set(declared), c
