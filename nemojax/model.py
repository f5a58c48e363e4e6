"""The functional Nemotron-H forward pass: ``forward(params, config, tokens, ...)``, pure and jittable.

Every layer is a pre-norm residual block with one mixer: ``h = h + mixer(rmsnorm(h))``; then ``norm_f`` and
the untied ``lm_head``. Logits are returned in float32.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from .cache import Cache
from .config import Config
from .formats import is_quantized
from .layers.attention import attention_mixer
from .layers.mamba import mamba_mixer
from .layers.mlp import mlp
from .layers.moe import moe_mixer
from .ops import linear, rms_norm

__all__ = ["forward", "forward_jit", "block", "lm_head", "embed", "compute_dtype"]


def block(lp: dict, cfg: Config, kind: str, h: jax.Array, mask=None, state=None, pos=None, kv_mask=None,
          moe_impl: str = "grouped", mesh=None):
    """One residual block. lp = {"norm", "mixer"}; h [B, T, H] -> (h [B, T, H], new layer state).

    ``state`` is the layer's cache entry (see ``nemojax.cache``) or None for a cache-free forward.
    """
    x = rms_norm(h.astype(lp["norm"].dtype), lp["norm"], cfg.layer_norm_epsilon)
    p = lp["mixer"]
    new_state = {}
    if kind == "M":
        out, new_state = mamba_mixer(p, cfg, x, mask, state)
    elif kind == "*":
        out, new_state = attention_mixer(p, cfg, x, mask, state, pos, kv_mask)
    elif kind == "E":
        out = moe_mixer(p, cfg, x, moe_impl, mesh)
    elif kind == "-":
        out = mlp(p, x)
    else:  # unreachable: Config validates the pattern
        raise ValueError(f"unknown block kind {kind!r}")
    return h + out.astype(h.dtype), new_state


def compute_dtype(params: dict):
    """The model's activation dtype: that of the final norm weight (embeddings may be quantized)."""
    return params["norm_f"].dtype


def embed(params: dict, tokens: jax.Array) -> jax.Array:
    """Embedding rows [B, T, H] in the compute dtype (a quantized table dequantizes only the rows taken)."""
    w = params["embeddings"]
    if is_quantized(w):  # gather the stored rows, dequantize only those
        return w.take_rows(tokens).dequantize(compute_dtype(params))
    return jnp.take(w, tokens, axis=0).astype(compute_dtype(params))


def lm_head(params: dict, cfg: Config, h: jax.Array) -> jax.Array:
    """Final norm and projection: h [..., H] -> logits [..., V] float32."""
    h = rms_norm(h, params["norm_f"], cfg.layer_norm_epsilon)
    w = params["embeddings"] if cfg.tie_word_embeddings else params["lm_head"]
    return linear(h, w).astype(jnp.float32)


def forward(params: dict, cfg: Config, tokens: jax.Array, attention_mask=None, cache: Cache | None = None, *,
            return_hidden_states: bool = False, last_only: bool = False, moe_impl: str = "grouped", mesh=None):
    """Forward over tokens [B, T] (int).

    attention_mask [B, T]: 1 = token, 0 = left pad (None: all tokens).
    Without a cache: returns logits [B, T, V] float32 (or [B, 1, V] with ``last_only``), and with
    ``return_hidden_states`` also a list of L+1 arrays [B, T, H]: the embeddings, the residual stream after
    blocks 0..L-2, and the final-normed output (transformers' ``output_hidden_states`` convention).
    With a cache: the tokens continue the cached sequences at ``cache.pos``; returns (logits, new cache).
    moe_impl: "grouped" (inference) or "dense" (every expert on every token; differentiable, for training).
    mesh: the ``nemojax.sharding`` mesh the params are sharded on (static): routed experts run expert-parallel
    under ``shard_map`` and the new cache keeps its shardings. Without it the SPMD partitioner still runs
    sharded inputs, but gathers each expert bank.
    """
    h = embed(params, tokens)
    if cfg.residual_in_fp32:
        h = h.astype(jnp.float32)
    kv_mask = pos = None
    if cache is not None:
        pos = cache.pos
        new = jnp.ones(tokens.shape, jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
        kv_mask = jax.lax.dynamic_update_slice_in_dim(cache.mask, new, pos, axis=1)
    hidden, states = [h], []
    for i, kind in enumerate(cfg.pattern):
        st = cache.layers[i] if cache is not None else None
        h, st = block(params["layers"][i], cfg, kind, h, attention_mask, st, pos, kv_mask, moe_impl, mesh)
        hidden.append(h)
        states.append(st)
    logits = lm_head(params, cfg, h[:, -1:] if last_only else h)
    if cache is not None:
        cache = Cache(layers=tuple(states), mask=kv_mask, pos=pos + tokens.shape[1])
        if mesh is not None:
            from .sharding import constrain_cache

            cache = constrain_cache(cache, cfg, mesh)
        return logits, cache
    if return_hidden_states:
        final = rms_norm(h, params["norm_f"], cfg.layer_norm_epsilon)
        return logits, hidden[:-1] + [final]
    return logits


forward_jit = jax.jit(forward, static_argnums=(1,),
                      static_argnames=("return_hidden_states", "last_only", "moe_impl", "mesh"))
