"""The "cpu" backend: NVFP4 products of decode size read the packed bytes tile by tile (``nvfp4.rows_product``).

The reference here is independent of the jnp code: the nibbles are decoded in NumPy through the E2M1 value table,
the FP8 scales through ml_dtypes, and the product is taken in float64.
"""
from __future__ import annotations

import re

import ml_dtypes
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from nemojax import quant
from nemojax.cli import main
from nemojax.formats import is_quantized
from nemojax.formats.nvfp4 import E2M1_VALUES, NVFP4Weight, rows_product
from nemojax.kernels import CPU_ROWS, resolve_backend
from nemojax.params import init_params

from .conftest import assert_cpu_backend_matches, tiny_config


def _numpy_weight(node: NVFP4Weight) -> np.ndarray:
    """W [N, K] float64 from the node's bytes: low nibble = even input, value table x block scale x global."""
    p = np.asarray(node.packed)
    codes = np.stack([p & 15, p >> 4], axis=-1).reshape(p.shape[0], -1)
    s = np.asarray(node.scale).view(np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    return E2M1_VALUES[codes].astype(np.float64) * np.repeat(s, 16, axis=1) * float(node.scale_2)


@pytest.mark.parametrize("n,k,m", [(64, 32, 1), (100, 48, 3), (13, 16, 2), (192, 256, CPU_ROWS), (72, 64, 7)])
def test_rows_product_equals_the_dequantized_product(n, k, m):
    rng = np.random.default_rng(n * 1000 + k + m)
    node = NVFP4Weight.from_float(jnp.asarray(rng.standard_normal((n, k)) * rng.uniform(0.01, 3), jnp.float32))
    x = rng.standard_normal((m, k)).astype(np.float32)
    ref = x.astype(np.float64) @ _numpy_weight(node).T
    got = np.asarray(jax.jit(rows_product)(jnp.asarray(x), node.packed, node.scale, node.scale_2))
    assert got.shape == (m, n) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_rows_product_never_materializes_the_weight():
    """The compiled product holds no float array of the weight's shape (nor its transpose): only 64-row tiles."""
    n, k = 256, 512
    node = NVFP4Weight.from_float(jnp.asarray(np.random.default_rng(0).standard_normal((n, k)), jnp.float32))
    hlo = jax.jit(rows_product).lower(jnp.ones((1, k), jnp.float32), node.packed, node.scale,
                                      node.scale_2).compile().as_text()
    shapes = set(re.findall(r"(?:f32|bf16|f16)\[([\d,]+)\]", hlo))
    assert f"{n},{k}" not in shapes and f"{k},{n}" not in shapes and f"{n},{k // 2}" not in shapes, shapes
    assert f"64,{k // 2}" in shapes  # the decoded tiles (low and high nibbles)


def _model_cfg():
    return tiny_config(hidden_size=128, moe_intermediate_size=64, moe_shared_expert_intermediate_size=64,
                       intermediate_size=128, hybrid_override_pattern="M*E")


@pytest.mark.parametrize("mode", ["w4a16", "w4a4"])
def test_cpu_backend_model_matches_the_reference(mode):
    """Every linear in NVFP4 (routed experts included): the cpu backend's logits (prefill of 7 tokens: within
    CPU_ROWS) match the xla reference's in fp32, and generate's decode loop gives the same greedy tokens."""
    cfg = _model_cfg()
    q = quant.apply(init_params(cfg, 3, dtype="float32"), cfg, "nvfp4-all")
    if mode == "w4a4":
        q = jax.tree.map(lambda x: x.replace(mode="w4a4", input_scale=jnp.full(x.scale_2.shape, 0.01, jnp.float32))
                         if isinstance(x, NVFP4Weight) else x, q, is_leaf=is_quantized)
    qc = quant.set_backend(q, "cpu")
    assert {x.backend for x in jax.tree.leaves(qc, is_leaf=is_quantized) if is_quantized(x)} == {"cpu"}
    assert_cpu_backend_matches(q, cfg, seed=1)


def test_auto_backend():
    assert resolve_backend("auto") == ("cpu" if jax.default_backend() == "cpu" else "xla")
    assert resolve_backend("pallas") == "pallas"
    q = quant.set_backend(quant.apply(init_params(_model_cfg(), 0, dtype="float32"), _model_cfg(), "nvfp4-all"),
                          "auto")
    assert {x.backend for x in jax.tree.leaves(q, is_leaf=is_quantized) if is_quantized(x)} == {
        resolve_backend("auto")}


def test_cli_takes_the_cpu_backend(capsys):
    assert main(["generate", "--prompt", "What is 2 + 3?", "--max-new-tokens", "2", "--backend", "cpu"]) == 0
    assert main(["generate", "--prompt", "hi", "--max-new-tokens", "1", "--backend", "gpu"]) == 2
    assert "--backend" in capsys.readouterr().err
