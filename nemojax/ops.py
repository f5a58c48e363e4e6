"""Small shared ops: the linear map every weight goes through, RMSNorm, activations."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from . import kernels
from .formats import is_quantized
from .formats.base import dot_rows

__all__ = ["linear", "rms_norm", "relu2", "dynamic_slice", "dynamic_index", "dynamic_update", "as_bits",
           "from_bits", "take_rows"]


def linear(x: jax.Array, w) -> jax.Array:
    """``x [..., K] @ w[N, K]^T -> [..., N]`` in x's dtype, accumulated in fp32.

    ``w`` is a plain array in checkpoint layout ``[out, in]`` or a quantized weight node (``nemojax.formats``),
    whose matmul runs on its backend's kernel where ``nemojax.kernels`` has one, else its XLA reference.
    """
    if is_quantized(w):
        return kernels.linear(x, w)
    if hasattr(w, "matmul"):  # a wrapper computing its own product (calibration's Observed)
        return w.matmul(x)
    return dot_rows(x, w.astype(x.dtype), weight_major=True).astype(x.dtype)


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis; statistics and the weight multiply in fp32, result in x's dtype."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (w.astype(jnp.float32) * y).astype(x.dtype)


def relu2(x: jax.Array) -> jax.Array:
    """Squared ReLU (``relu2`` in config.json)."""
    r = jnp.maximum(x, 0)
    return r * r


# XLA:CPU has no native 16- or 8-bit float dynamic-slice / dynamic-update-slice / scatter: it converts the whole
# operand to fp32 and back around each one (for an expert bank, the whole bank every step; for a KV cache, the
# whole cache every token). The same bytes viewed as unsigned integers move natively, so these do that.
_BITS = {2: jnp.uint16, 1: jnp.uint8}


def as_bits(a: jax.Array) -> jax.Array:
    """A sub-32-bit float array's bytes viewed as unsigned integers of the same width (other arrays unchanged)."""
    if jnp.issubdtype(a.dtype, jnp.floating) and a.dtype.itemsize in _BITS:
        return jax.lax.bitcast_convert_type(a, _BITS[a.dtype.itemsize])
    return a


def from_bits(b: jax.Array, dtype) -> jax.Array:
    """Inverse of :func:`as_bits` for an array that was ``dtype``."""
    return b if b.dtype == jnp.dtype(dtype) else jax.lax.bitcast_convert_type(b, dtype)


def dynamic_slice(a: jax.Array, start, size: int, axis: int = 0) -> jax.Array:
    """``jax.lax.dynamic_slice_in_dim`` moving raw bits (see :func:`as_bits`)."""
    return from_bits(jax.lax.dynamic_slice_in_dim(as_bits(a), start, size, axis), a.dtype)


def dynamic_index(a: jax.Array, index, axis: int = 0, keepdims: bool = False) -> jax.Array:
    """``jax.lax.dynamic_index_in_dim`` moving raw bits: e.g. expert ``index`` of a stacked bank."""
    return from_bits(jax.lax.dynamic_index_in_dim(as_bits(a), index, axis, keepdims), a.dtype)


def dynamic_update(a: jax.Array, update: jax.Array, start, axis: int = 0) -> jax.Array:
    """``jax.lax.dynamic_update_slice_in_dim(a, update.astype(a.dtype), start, axis)`` moving raw bits."""
    upd = as_bits(update.astype(a.dtype))
    return from_bits(jax.lax.dynamic_update_slice_in_dim(as_bits(a), upd, start, axis), a.dtype)


def take_rows(table: jax.Array, ids: jax.Array) -> jax.Array:
    """``jnp.take(table, ids, axis=0)`` moving raw bits, behind a barrier tied to ``ids``: inside a decode loop XLA
    would otherwise hoist a converted copy of the whole table out of the loop (once per call)."""
    t, ids = jax.lax.optimization_barrier((table, ids))
    return from_bits(jnp.take(as_bits(t), ids, axis=0), table.dtype)
