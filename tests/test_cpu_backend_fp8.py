"""The "cpu" backend's FP8 products (``formats.fp8.rows_product``): the one-byte codes decoded tile by tile, never
the whole weight.

The reference is independent of the jnp code: the codes are decoded by ml_dtypes, the product taken in float64.
"""
from __future__ import annotations

import re

import ml_dtypes
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from nemojax import quant
from nemojax.formats import is_quantized
from nemojax.formats.fp8 import FP8Weight, rows_product
from nemojax.kernels import CPU_ROWS, linear
from nemojax.params import init_params

from .conftest import assert_cpu_backend_matches, tiny_config


def _numpy_weight(node: FP8Weight) -> np.ndarray:
    codes = np.asarray(node.weight).view(np.uint8).view(ml_dtypes.float8_e4m3fn)
    return codes.astype(np.float64) * float(node.weight_scale)


def test_every_code_decodes_exactly():
    """Each of the 254 non-NaN E4M3 codes (subnormals, both zeros, +-448) times a one-element input is its value."""
    codes = np.array([c for c in range(256) if c & 0x7F != 0x7F], np.uint8)
    weight = jnp.asarray(codes.view(ml_dtypes.float8_e4m3fn).reshape(-1, 1))
    got = np.asarray(jax.jit(rows_product)(jnp.ones((1, 1), jnp.float32), weight, jnp.float32(1.0)))[0]
    want = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(got, want)
    assert np.signbit(got[codes == 0x80]).all() and got.min() == -448 and got.max() == 448


@pytest.mark.parametrize("n,k,m", [(64, 32, 1), (100, 48, 3), (13, 16, 2), (192, 256, CPU_ROWS), (72, 64, 7)])
def test_rows_product_equals_the_dequantized_product(n, k, m):
    rng = np.random.default_rng(n * 1000 + k + m)
    node = FP8Weight.from_float(jnp.asarray(rng.standard_normal((n, k)) * rng.uniform(0.01, 3), jnp.float32))
    x = rng.standard_normal((m, k)).astype(np.float32)
    ref = x.astype(np.float64) @ _numpy_weight(node).T
    got = np.asarray(jax.jit(rows_product)(jnp.asarray(x), node.weight, node.weight_scale))
    assert got.shape == (m, n) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_rows_product_never_materializes_the_weight():
    """The compiled product holds no float array of the weight's shape (nor its transpose): only 64-row tiles."""
    n, k = 256, 512
    node = FP8Weight.from_float(jnp.asarray(np.random.default_rng(0).standard_normal((n, k)), jnp.float32))
    hlo = jax.jit(rows_product).lower(jnp.ones((1, k), jnp.bfloat16), node.weight,
                                      node.weight_scale).compile().as_text()
    shapes = set(re.findall(r"(?:f32|bf16|f16)\[([\d,]+)\]", hlo))
    assert f"{n},{k}" not in shapes and f"{k},{n}" not in shapes, shapes
    assert f"64,{k}" in shapes  # the decoded tiles
    # nor a byte copy of the whole weight (a bitcast to u8 outside the loop is one on XLA:CPU)
    assert not re.search(rf"= u8\[(?:{n},{k}|{n // 64},64,{k})\]\S* (?:fusion|copy)\(", hlo)


@pytest.mark.parametrize("mode", ["w8a16", "w8a8"])
def test_cpu_backend_model_matches_the_reference(mode):
    """Every linear in FP8 (routed experts included): the cpu backend's logits (a prefill of 7 tokens: within
    CPU_ROWS) match the xla reference's in fp32, and generate's decode loop gives the same greedy tokens."""
    cfg = tiny_config(hidden_size=128, moe_intermediate_size=64, moe_shared_expert_intermediate_size=64,
                      intermediate_size=128, hybrid_override_pattern="M*E")
    q = quant.apply(init_params(cfg, 5, dtype="float32"), cfg, "fp8-all")
    if mode == "w8a8":
        q = jax.tree.map(lambda x: x.replace(mode="w8a8", input_scale=jnp.full(x.weight_scale.shape, 0.02,
                                                                               jnp.float32))
                         if isinstance(x, FP8Weight) else x, q, is_leaf=is_quantized)
    nodes = [x for x in jax.tree.leaves(q, is_leaf=is_quantized) if isinstance(x, FP8Weight)]
    assert len(nodes) >= 6 and any(x.weight.ndim == 3 for x in nodes)  # the routed experts' banks too
    assert_cpu_backend_matches(q, cfg)


def test_cpu_backend_keeps_the_reference_errors():
    node = quant.set_backend({"w": FP8Weight.from_float(jnp.ones((16, 32), jnp.float32))}, "cpu")["w"]
    assert node.backend == "cpu"
    with pytest.raises(ValueError, match="does not match weight"):
        linear(jnp.ones((1, 16), jnp.float32), node)
    with pytest.raises(ValueError, match="w8a8 mode needs input_scale"):
        linear(jnp.ones((1, 32), jnp.float32), node.replace(mode="w8a8"))
