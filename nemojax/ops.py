"""Small shared ops: the linear map every weight goes through, RMSNorm, activations."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from . import kernels
from .formats import is_quantized

__all__ = ["linear", "dense_dot", "rms_norm", "relu2", "dynamic_slice", "dynamic_index", "dynamic_update", "as_bits",
           "from_bits"]


def linear(x: jax.Array, w) -> jax.Array:
    """``x [..., K] @ w[N, K]^T -> [..., N]`` in x's dtype, accumulated in fp32.

    ``w`` is a plain array in checkpoint layout ``[out, in]`` or a quantized weight node (``nemojax.formats``),
    whose matmul runs on its backend's kernel where ``nemojax.kernels`` has one, else its XLA reference.
    """
    if is_quantized(w):
        return kernels.linear(x, w)
    if hasattr(w, "matmul"):  # a wrapper computing its own product (calibration's Observed)
        return w.matmul(x)
    return dense_dot(x, w.astype(x.dtype)).astype(x.dtype)


def dense_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x [..., K] @ w[N, K]^T -> [..., N]`` fp32, for plain arrays of one dtype.

    XLA:CPU runs a single-row product of 16-bit operands by converting the whole weight to fp32 first (~1 GB/s);
    from two rows on it calls its packed GEMM library. A single row is therefore computed as two (behind an
    optimization barrier, else the simplifier slices the second row away again).
    """
    dims = (((x.ndim - 1,), (1,)), ((), ()))
    if x.dtype != jnp.float32 and x.size == x.shape[-1] and jax.default_backend() == "cpu":
        x2 = jax.lax.optimization_barrier(jnp.concatenate([x.reshape(1, -1)] * 2))  # kept as two rows
        return jax.lax.dot_general(x2, w, (((1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32)[:1].reshape(*x.shape[:-1], w.shape[0])
    return jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)


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
