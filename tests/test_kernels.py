"""Pallas kernels (pallas_kernels/) against their pure-jnp references: interpret mode on CPU with poisoned
outputs, lowering for an H100 on the CPU host, compiled on a GPU when one is present, and the model-level
backend switch."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax import quant
from nemojax.generate import generate
from nemojax.model import forward_jit
from nemojax.params import init_params
from nemojax.quant.hlwq import HLWQWeight
from nemojax.quant.nvfp4 import NVFP4Weight
from pallas_kernels import hlwq as HK
from pallas_kernels import nvfp4 as NK
from pallas_kernels.lowering import lower_for_h100

from .conftest import tiny_config

ON_GPU = jax.default_backend() == "gpu"
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a GPU (compiled Pallas)")
KS = [2688, 1856, 4096, 10304]


def _rand(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def _nvfp4_case(m, n, k, seed):
    node = NVFP4Weight.from_float(_rand((n, k), seed))
    return _rand((m, k), seed + 1), node, NK.to_planar(node.packed)


@pytest.mark.parametrize("k,m", [(2688, 1), (1856, 5), (4096, 1), (10304, 3)])
def test_nvfp4_kernel_interpret(k, m):
    x, node, planar = _nvfp4_case(m, 48, k, k + m)
    ref = NK.nvfp4_matmul_reference(x, planar, node.scale, node.scale_2)
    np.testing.assert_array_equal(np.asarray(ref), np.asarray(node.matmul(x)))  # the layout round trip is exact
    got = NK.nvfp4_matmul(x, planar, node.scale, node.scale_2, interpret=True, poison=True, block_n=16)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-4 * float(jnp.abs(ref).max()))


def _hlwq_case(m, n, k, seed):
    node = HLWQWeight.from_float(_rand((n, k), seed), 5, path="rotated")
    xr = node.rotate(_rand((m, k), seed + 1))
    return xr, node, HK.to_planar(node.codes(), 5)


@pytest.mark.parametrize("k", KS)
def test_hlwq_kernel_interpret(k):
    xr, node, planar = _hlwq_case(3, 32, k, k)
    ref = HK.hlwq_matmul_reference(xr, planar, node.norms, node.table, 5)
    np.testing.assert_allclose(np.asarray(ref), np.asarray(node.matmul_rotated(xr)), rtol=1e-5, atol=1e-3)
    got = HK.hlwq_matmul(xr, planar, node.norms, node.table, 5, interpret=True, poison=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-4 * float(jnp.abs(ref).max()))


@pytest.mark.parametrize("k", [1920, 4096])
def test_fwht_kernel_interpret(k):
    x = _rand((5, k), k)
    got = HK.fwht(x, interpret=True, poison=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(HK.fwht_reference(x)), rtol=1e-5, atol=1e-5)


def test_poison_catches_an_unwritten_tile(monkeypatch):
    from jax.experimental import pallas as pl

    x, node, planar = _nvfp4_case(1, 32, 128, 0)
    orig = NK._kernel

    def skips_second_tile(*refs, n_k):
        @pl.when(pl.program_id(1) == 0)
        def _():
            orig(*refs, n_k=n_k)

    monkeypatch.setattr(NK, "_kernel", skips_second_tile)
    out = np.asarray(NK.nvfp4_matmul(x, planar, node.scale, node.scale_2, interpret=True, poison=True, block_n=16))
    assert np.isnan(out[:, 16:]).all() and not np.isnan(out[:, :16]).any()


def test_errors():
    x, node, planar = _nvfp4_case(1, 32, 128, 0)
    with pytest.raises(ValueError, match="K % 64"):
        NK.nvfp4_matmul(x[:, :96], planar[:, :48], node.scale[:, :6], node.scale_2, interpret=True)
    with pytest.raises(ValueError, match="backend='triton'.*not implemented"):
        quant.set_backend({}, "triton")


S = jax.ShapeDtypeStruct


@pytest.mark.parametrize("kernel", ["nvfp4", "hlwq", "fwht"])
def test_lowers_for_h100(kernel):
    """Cross-lowering on the CPU host: ops the Triton backend rejects (gathers, value slices) fail here."""
    if kernel == "nvfp4":
        txt = lower_for_h100(lambda x, p, s, s2: NK.nvfp4_matmul(x, p, s, s2), S((1, 2688), jnp.bfloat16),
                             S((1856, 1344), jnp.uint8), S((1856, 168), jnp.float8_e4m3fn), S((), jnp.float32))
    elif kernel == "hlwq":
        txt = lower_for_h100(lambda x, p, n, t: HK.hlwq_matmul(x, p, n, t, 5), S((4, 1920), jnp.bfloat16),
                             S((2688, 15 * 80), jnp.uint8), S((2688, 15), jnp.float16), S((32,), jnp.float32))
    else:
        txt = lower_for_h100(lambda x: HK.fwht(x), S((4, 2688), jnp.bfloat16))
    assert "triton" in txt.lower() or "__gpu$xla.gpu.triton" in txt


def test_backend_switch_model():
    """One switch per model: logits and greedy tokens of the pallas backend equal the xla reference."""
    cfg = tiny_config(hidden_size=128, moe_intermediate_size=64, moe_shared_expert_intermediate_size=64,
                      intermediate_size=128)
    p = init_params(cfg, 2, dtype="float32")
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 9))
    for recipe in ("nvfp4-all", "hlwq-q5"):
        q = quant.apply(p, cfg, recipe)
        qp = quant.set_backend(q, "pallas")
        assert {x.backend for x in jax.tree.leaves(qp, is_leaf=lambda a: hasattr(a, "backend"))
                if hasattr(x, "backend")} == {"pallas"}
        np.testing.assert_allclose(np.asarray(forward_jit(qp, cfg, ids)), np.asarray(forward_jit(q, cfg, ids)),
                                   rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(generate(qp, cfg, ids.tolist(), 6), generate(q, cfg, ids.tolist(), 6))


@gpu_only
@pytest.mark.parametrize("k", KS)
def test_compiled_on_gpu(k):
    x, node, planar = _nvfp4_case(4, 256, k, k)
    xb = x.astype(jnp.bfloat16)
    ref = NK.nvfp4_matmul_reference(xb.astype(jnp.float32), planar, node.scale, node.scale_2)
    got = NK.nvfp4_matmul(xb, planar, node.scale, node.scale_2)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref), rtol=2e-2,
                               atol=2e-2 * float(jnp.abs(ref).max()))
    xr, hnode, hplanar = _hlwq_case(4, 256, k, k)
    href = HK.hlwq_matmul_reference(xr, hplanar, hnode.norms, hnode.table, 5)
    hgot = HK.hlwq_matmul(xr, hplanar, hnode.norms, hnode.table, 5)
    np.testing.assert_allclose(np.asarray(hgot), np.asarray(href), rtol=1e-3, atol=1e-3 * float(jnp.abs(href).max()))
    xp = jnp.pad(x, ((0, 0), (0, -k % 128)))
    np.testing.assert_allclose(np.asarray(HK.fwht(xp)), np.asarray(HK.fwht_reference(xp)), rtol=1e-3, atol=1e-3)
