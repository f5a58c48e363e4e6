"""FP8 (E4M3) KV cache with per-tensor scales: ``stored = e4m3(clip(x / scale, ±448))``, ``x ≈ stored * scale``,
``scale = amax / 448`` (ModelOpt's ``k_scale`` / ``v_scale``)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["fp8_store", "fp8_load", "fp8_fake_quant", "FP8"]

FP8 = jnp.dtype(jnp.float8_e4m3fn)


def fp8_store(x: jax.Array, scale) -> jax.Array:
    """x (any float) -> float8_e4m3fn codes of x / scale, saturated at ±448."""
    s = jnp.asarray(scale, jnp.float32)
    q = x.astype(jnp.float32) / jax.lax.optimization_barrier(jnp.broadcast_to(s, x.shape))
    return jnp.clip(q, -448.0, 448.0).astype(FP8)


def fp8_load(q: jax.Array, scale, dtype) -> jax.Array:
    """float8 codes -> values in ``dtype``."""
    return (q.astype(jnp.float32) * jnp.asarray(scale, jnp.float32)).astype(dtype)


def fp8_fake_quant(x: jax.Array, scale) -> jax.Array:
    """Round trip through the FP8 cache format (what attention sees when K/V are cached in FP8)."""
    return fp8_load(fp8_store(x, scale), scale, x.dtype)
