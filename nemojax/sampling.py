"""Token sampling: greedy, temperature, top-k and top-p (nucleus), with traced parameters so one compiled
decode loop serves every setting."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

__all__ = ["SamplingParams", "sample", "sample_rows", "filter_logits", "check_sampling"]


@struct.dataclass
class SamplingParams:
    temperature: jax.Array  # [] f32; 0 = greedy
    top_k: jax.Array  # [] int32; 0 = off
    top_p: jax.Array  # [] f32; 1 = off

    @classmethod
    def make(cls, temperature=0.0, top_k=0, top_p=1.0) -> "SamplingParams":
        check_sampling(temperature, top_k, top_p)
        return cls(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))


def check_sampling(temperature, top_k, top_p) -> None:
    """Raise ValueError naming the argument for invalid sampling values."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not (0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")


def filter_logits(logits: jax.Array, top_k, top_p) -> jax.Array:
    """Set logits outside the top-k / top-p (nucleus) set to -inf. logits [B, V] float32."""
    V = logits.shape[-1]
    srt = -jnp.sort(-logits, axis=-1)  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    kth = jnp.take_along_axis(srt, jnp.broadcast_to(k - 1, srt.shape[:-1] + (1,)).astype(jnp.int32), axis=-1)
    srt = jnp.where(srt >= kth, srt, -jnp.inf)
    probs = jax.nn.softmax(srt, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted entry
    keep_sorted = before < top_p  # the smallest prefix whose mass reaches top_p
    thresh = jnp.min(jnp.where(keep_sorted & (srt > -jnp.inf), srt, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= jnp.maximum(thresh, kth), logits, -jnp.inf)


def sample(logits: jax.Array, key: jax.Array, sp: SamplingParams) -> jax.Array:
    """logits [B, V] float32 -> token ids [B] int32."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(_):
        scaled = logits / jnp.maximum(sp.temperature, 1e-6)
        filtered = jax.lax.cond((sp.top_k > 0) | (sp.top_p < 1.0), lambda l: filter_logits(l, sp.top_k, sp.top_p),
                                lambda l: l, scaled)
        return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)

    return jax.lax.cond(sp.temperature > 0, draw, lambda _: greedy, None)


def sample_rows(logits: jax.Array, keys: jax.Array, sp: SamplingParams) -> jax.Array:
    """Each row with its own key and setting: logits [B, V] float32, keys [B, 2] uint32, ``sp`` fields [B]
    -> token ids [B] int32. Row b's token is ``sample(logits[b:b+1], keys[b], sp[b])`` whatever the other rows.
    The vocabulary sort of top-k / top-p runs only when some sampled row asks for one, and draws only when some
    row samples (scalar conditions outside the per-row map)."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    hot = sp.temperature > 0
    filt = hot & ((sp.top_k > 0) | (sp.top_p < 1.0))

    def draw(_):
        scaled = logits / jnp.maximum(sp.temperature, 1e-6)[:, None]
        filtered = jax.lax.cond(
            jnp.any(filt),
            lambda l: jnp.where(filt[:, None], jax.vmap(lambda r, k, p: filter_logits(r[None], k, p)[0])(
                l, sp.top_k, sp.top_p), l),
            lambda l: l, scaled)
        drawn = jax.vmap(lambda lg, k: jax.random.categorical(k, lg[None], axis=-1)[0])(filtered, keys)
        return jnp.where(hot, drawn.astype(jnp.int32), greedy)

    return jax.lax.cond(jnp.any(hot), draw, lambda _: greedy, None)
