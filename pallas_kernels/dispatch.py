"""Glue from the quantized weight nodes (``backend="pallas"`` or ``"triton"``, see ``nemojax.quant.set_backend``)
to the kernels: activations reshaped to 2-D, interpret mode off a GPU, the MoE's routed experts through the
grouped kernels. The kernels read the checkpoint bytes as stored (no repacking per call). Shapes a kernel does
not take (N % 16, NVFP4 K % 32) run the XLA reference instead.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from . import hlwq as _hlwq
from . import nvfp4 as _nvfp4

__all__ = ["nvfp4_linear", "hlwq_linear", "hlwq_linear_rotated", "grouped_experts", "interpret", "GEMV_ROWS"]

GEMV_ROWS = 8  # up to this many rows the "triton" backend uses the jax-triton decode GEMVs


def interpret() -> bool:
    """Pallas runs compiled on GPU, interpreted elsewhere."""
    return jax.default_backend() != "gpu"


def _rows(x):
    return x.reshape(-1, x.shape[-1]), x.shape[:-1]


def nvfp4_linear(x, node):
    """``x [..., K] @ W^T`` for a 2-D NVFP4 node (activations already fake-quantized in W4A4 mode)."""
    n, k = node.shape
    if not _nvfp4.supported(n, k):
        w = node.dequantize(x.dtype)
        return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32).astype(x.dtype)
    x2, lead = _rows(x)
    if node.backend == "triton" and x2.shape[0] <= GEMV_ROWS:
        from .triton_gemv import nvfp4_gemv

        y = nvfp4_gemv(x2, node.packed, node.scale, node.scale_2)
    else:
        y = _nvfp4.nvfp4_matmul(x2, node.packed, node.scale, node.scale_2, interpret=interpret())
    return y.reshape(*lead, n)


def hlwq_linear_rotated(xr, node):
    """``xr [..., K_pad]`` (rotated) @ ``(W H)^T`` for a 2-D HLWQ node."""
    n = node.packed.shape[0]
    if n % 16:
        from nemojax.quant.hlwq import _matmul_rotated

        return _matmul_rotated(node, xr, jnp.dtype(xr.dtype))
    x2, lead = _rows(xr)
    if node.backend == "triton" and x2.shape[0] <= GEMV_ROWS and node.bits <= _hlwq.GEMV_MAX_BITS:
        from .triton_gemv import hlwq_gemv

        y = hlwq_gemv(x2, node.packed, node.norms, node.table, node.bits)
    else:
        y = _hlwq.hlwq_matmul(x2, node.packed, node.norms, node.table, node.bits, interpret=interpret())
    return y.reshape(*lead, n)


def _rotate(x2, node):
    xp = jnp.pad(x2, ((0, 0), (0, node.k_pad - x2.shape[1])))
    return _hlwq.fwht(xp, interpret=interpret())


def hlwq_linear(x, node):
    """``x [..., in_features] @ W^T``: FWHT kernel on the zero-padded input, then the rotated matmul kernel."""
    x2, lead = _rows(x)
    y = hlwq_linear_rotated(_rotate(x2, node), node)
    return y.reshape(*lead, y.shape[-1])


def _grouped(xs, node, se, counts):
    """Sorted rows ``xs [R, K]`` through the expert bank ``node`` (rows of expert ``e``: ``counts[e]``)."""
    from nemojax.quant.hlwq import HLWQWeight
    from nemojax.quant.nvfp4 import fake_quant

    if isinstance(node, HLWQWeight):
        y = _hlwq.hlwq_grouped_matmul(_rotate(xs, node), node.packed, node.norms, node.table, counts, node.bits,
                                      interpret=interpret())
        return y.astype(xs.dtype)
    if node.mode == "w4a4":  # per-expert static activation scale, row by row
        s = jnp.take(node.input_scale, jnp.minimum(se, counts.shape[0] - 1))
        xs = fake_quant(xs, s[:, None, None])
    return _nvfp4.nvfp4_grouped_matmul(xs, node.packed, node.scale, node.scale_2, counts, interpret=interpret())


def _kernel_shapes(node) -> bool:
    from nemojax.quant.hlwq import HLWQWeight
    from nemojax.quant.nvfp4 import NVFP4Weight

    if isinstance(node, HLWQWeight):
        return node.packed.ndim == 3 and node.packed.shape[1] % 16 == 0
    return isinstance(node, NVFP4Weight) and node.packed.ndim == 3 and _nvfp4.supported(*node.shape[1:])


def grouped_experts(x, weights, idx, up, down):
    """The MoE's routed experts with the grouped kernels (same contract as ``nemojax.layers.moe.grouped_experts``:
    x [T, H]; weights, idx [T, k]; ids >= E are dropped) -> [T, H] fp32, or None if a bank's shape or type is not
    one the kernels take (the caller then runs its XLA loop)."""
    if not (_kernel_shapes(up) and _kernel_shapes(down)):
        return None
    from nemojax.ops import relu2

    T, _ = x.shape
    k = idx.shape[1]
    E = up.packed.shape[0]
    flat_e = idx.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)
    se = flat_e[order]
    tok = (jnp.arange(T * k, dtype=jnp.int32) // k)[order]
    sw = weights.reshape(-1)[order].astype(jnp.float32)
    counts = jnp.bincount(flat_e, length=E).astype(jnp.int32)
    h = relu2(_grouped(x[tok], up, se, counts))
    y = _grouped(h, down, se, counts).astype(jnp.float32)
    return jnp.zeros((T, y.shape[1]), jnp.float32).at[tok].add(y * sw[:, None])
