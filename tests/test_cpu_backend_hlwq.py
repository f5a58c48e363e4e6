"""The "cpu" backend's HLWQ products (``formats.hlwq.rows``): the input rotated once, the packed codes decoded tile by
tile, never the whole weight.

The reference is independent of the jnp code: the codes are unpacked in NumPy with ``np.unpackbits`` (LSB-first
groups of 8 codes), the weight rebuilt in float64 with an explicit Sylvester Hadamard matrix, the product taken
in float64.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from nemojax import quant
from nemojax.formats import is_quantized
from nemojax.formats.hlwq import HLWQWeight
from nemojax.formats.hlwq.rows import rows_product
from nemojax.kernels import CPU_ROWS
from nemojax.params import init_params

from .conftest import assert_cpu_backend_matches, tiny_config


def _numpy_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    n, nb = packed.shape
    b = np.unpackbits(packed.reshape(n, nb // bits, bits), axis=-1, bitorder="little")  # [n, G, 8*bits]
    b = b.reshape(n, nb // bits, 8, bits).astype(np.int64)
    return (b << np.arange(bits)).sum(-1).reshape(n, -1)  # code i of a group: bits i*bits .. i*bits+bits-1


def _numpy_weight(node: HLWQWeight) -> np.ndarray:
    """W [N, in_features] float64: blocks of table[code] / sqrt(128) times the Hadamard matrix, times the norm."""
    h = np.array([[1.0]])
    while h.shape[0] < 128:
        h = np.block([[h, h], [h, -h]])
    h /= np.sqrt(128)
    codes = _numpy_codes(np.asarray(node.packed), node.bits)
    table = np.asarray(node.table, np.float64).reshape(-1)
    n = codes.shape[0]
    v = (table[codes] / np.sqrt(128)).reshape(n, -1, 128) @ h
    v = v * np.asarray(node.norms, np.float64)[..., None]
    return v.reshape(n, -1)[:, :node.in_features]


@pytest.mark.parametrize("n,k,m,bits", [(64, 256, 1, 5), (100, 200, 3, 5), (13, 128, 2, 3), (192, 384, CPU_ROWS, 5),
                                        (72, 130, 7, 8), (40, 256, 1, 2), (24, 256, 2, 4), (33, 384, 1, 6)])
def test_rows_product_equals_the_dequantized_product(n, k, m, bits):
    rng = np.random.default_rng(n * 1000 + k + m + bits)
    node = HLWQWeight.from_float(jnp.asarray(rng.standard_normal((n, k)) * rng.uniform(0.01, 3), jnp.float32), bits)
    x = rng.standard_normal((m, k)).astype(np.float32)
    ref = x.astype(np.float64) @ _numpy_weight(node).T
    xr = node.rotate(jnp.asarray(x))
    got = np.asarray(jax.jit(rows_product, static_argnums=4)(xr, node.packed, node.norms, node.table, bits))
    assert got.shape == (m, n) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_rows_product_never_materializes_the_weight():
    n, k = 256, 512
    node = HLWQWeight.from_float(jnp.asarray(np.random.default_rng(0).standard_normal((n, k)), jnp.float32))
    hlo = jax.jit(rows_product, static_argnums=4).lower(jnp.ones((1, k), jnp.float32), node.packed, node.norms,
                                                          node.table, 5).compile().as_text()
    shapes = set(re.findall(r"(?:f32|bf16|f16)\[([\d,]+)\]", hlo))
    assert f"{n},{k}" not in shapes and f"{k},{n}" not in shapes, shapes
    assert f"64,{k // 8}" in shapes  # the decoded tiles: one per code position of a group


def test_rows_product_names_a_mismatched_input():
    node = HLWQWeight.from_float(jnp.asarray(np.random.default_rng(1).standard_normal((16, 256)), jnp.float32))
    with pytest.raises(ValueError, match=r"packed \(16, 160\).*input \(1, 128\)"):
        rows_product(jnp.ones((1, 128)), node.packed, node.norms, node.table, 5)


@pytest.mark.parametrize("path", ["dequant", "rotated"])
def test_cpu_backend_model_matches_the_reference(path):
    """Every matrix in HLWQ Q5 (the polarengine recipe: routed experts, lm_head): the cpu backend's logits (prefill
    of 7 tokens: within CPU_ROWS) match the xla reference's in fp32, and the greedy tokens of generate agree."""
    cfg = tiny_config(hidden_size=128, moe_intermediate_size=64, moe_shared_expert_intermediate_size=64,
                      intermediate_size=128, hybrid_override_pattern="M*E")
    q = quant.apply(init_params(cfg, 5, dtype="float32"), cfg, "hlwq-q5")
    q = jax.tree.map(lambda x: x.replace(path=path) if isinstance(x, HLWQWeight) else x, q, is_leaf=is_quantized)
    qc = quant.set_backend(q, "cpu")
    nodes = [x for x in jax.tree.leaves(qc, is_leaf=is_quantized) if isinstance(x, HLWQWeight)]
    assert nodes and {x.backend for x in nodes} == {"cpu"}
    assert_cpu_backend_matches(q, cfg)
