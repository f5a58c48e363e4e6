"""Small shared ops: the linear map every weight goes through, RMSNorm, activations."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from . import kernels
from .formats import is_quantized

__all__ = ["linear", "rms_norm", "relu2"]


def linear(x: jax.Array, w) -> jax.Array:
    """``x [..., K] @ w[N, K]^T -> [..., N]`` in x's dtype, accumulated in fp32.

    ``w`` is a plain array in checkpoint layout ``[out, in]`` or a quantized weight node (``nemojax.formats``),
    whose matmul runs on its backend's kernel where ``nemojax.kernels`` has one, else its XLA reference.
    """
    if is_quantized(w):
        return kernels.linear(x, w)
    if hasattr(w, "matmul"):  # a wrapper computing its own product (calibration's Observed)
        return w.matmul(x)
    y = jax.lax.dot_general(x, w.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis; statistics and the weight multiply in fp32, result in x's dtype."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (w.astype(jnp.float32) * y).astype(x.dtype)


def relu2(x: jax.Array) -> jax.Array:
    """Squared ReLU (``relu2`` in config.json)."""
    r = jnp.maximum(x, 0)
    return r * r
