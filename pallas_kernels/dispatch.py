"""Glue from the quantized weight nodes (``backend="pallas"``) to the kernels: reshape activations to 2-D,
repack codes into the kernel layouts, pad N to the kernels' 16-row multiple, interpret mode on CPU.

The repacking runs inside the jitted forward on every call (one pass over the codes, same bytes); a serving
deployment would store the planar layouts instead.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from . import hlwq as _hlwq
from . import nvfp4 as _nvfp4

__all__ = ["nvfp4_linear", "hlwq_linear", "hlwq_linear_rotated", "interpret"]


def interpret() -> bool:
    """Pallas runs compiled on GPU, interpreted elsewhere."""
    return jax.default_backend() != "gpu"


def _rows(x):
    return x.reshape(-1, x.shape[-1]), x.shape[:-1]


def nvfp4_linear(x, node):
    """``x [..., K] @ W^T`` for a 2-D NVFP4 node via :func:`pallas_kernels.nvfp4.nvfp4_matmul`."""
    n, kh = node.packed.shape
    k = kh * 2
    if k % _nvfp4.BK:  # the kernel's K step; the XLA reference handles the rest
        w = node.dequantize(x.dtype)
        return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32).astype(x.dtype)
    x2, lead = _rows(x)
    pad = -n % 16
    packed = jnp.pad(node.packed, ((0, pad), (0, 0))) if pad else node.packed
    scale = jnp.pad(node.scale, ((0, pad), (0, 0))) if pad else node.scale
    y = _nvfp4.nvfp4_matmul(x2, _nvfp4.to_planar(packed), scale, node.scale_2, interpret=interpret())
    return y[:, :n].reshape(*lead, n)


def hlwq_linear_rotated(xr, node):
    """``xr [..., K_pad]`` (rotated) @ ``(W H)^T`` for a 2-D HLWQ node via :func:`pallas_kernels.hlwq.hlwq_matmul`."""
    x2, lead = _rows(xr)
    n = node.packed.shape[0]
    pad = -n % 16
    codes = node.codes()
    norms = node.norms
    if pad:
        codes, norms = jnp.pad(codes, ((0, pad), (0, 0))), jnp.pad(norms, ((0, pad), (0, 0)))
    y = _hlwq.hlwq_matmul(x2, _hlwq.to_planar(codes, node.bits), norms, node.table, node.bits,
                          interpret=interpret())
    return y[:, :n].reshape(*lead, n)


def hlwq_linear(x, node):
    """``x [..., in_features] @ W^T``: FWHT kernel on the zero-padded input, then the rotated matmul kernel."""
    x2, lead = _rows(x)
    xp = jnp.pad(x2, ((0, 0), (0, node.k_pad - x2.shape[1])))
    y = hlwq_linear_rotated(_hlwq.fwht(xp, interpret=interpret()), node)
    return y.reshape(*lead, y.shape[-1])
