"""The functional Nemotron-H forward pass: ``forward(params, config, tokens, ...)``, pure and jittable.

Every layer is a pre-norm residual block with one mixer: ``h = h + mixer(rmsnorm(h))``; then ``norm_f`` and
the untied ``lm_head``. Logits are returned in float32. How MoE blocks run their routed experts is a strategy
(``experts=``, see ``nemojax.blocks.moe.RoutedExperts``); a host-driven one (the host-offloaded expert cache) runs
the same pieces layer by layer, each jitted on its own (:data:`STEPWISE`).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from .blocks.base import BLOCKS, BlockInput, write_at
from .blocks.moe import MOE, RoutedExperts, moe_output, moe_route, resident_experts
from .cache import Cache
from .config import Config
from .formats import is_quantized
from .ops import linear, rms_norm, take_rows

__all__ = ["forward", "forward_jit", "block", "lm_head", "embed", "compute_dtype", "start", "head", "moe_input",
           "moe_residual", "pre_norm", "STEPWISE", "Pieces"]


def pre_norm(lp: dict, cfg: Config, h: jax.Array) -> jax.Array:
    """A block's normed input: ``rmsnorm(h)`` in the norm weight's dtype."""
    return rms_norm(h.astype(lp["norm"].dtype), lp["norm"], cfg.layer_norm_epsilon)


def block(lp: dict, cfg: Config, kind: str, h: jax.Array, mask=None, state=None, pos=None, kv_mask=None,
          experts: RoutedExperts | None = None, layer: int = 0):
    """One residual block of ``kind`` (a pattern character: its mixer is ``BLOCKS[kind].mixer``).
    lp = {"norm", "mixer"}; h [B, T, H] -> (h [B, T, H], new layer state).

    ``state`` is the layer's cache entry (see ``nemojax.cache``) or None for a cache-free forward. ``experts``: how an
    MoE block runs its routed experts (default grouped); ``layer``: the block's index (passed to ``experts``).
    """
    x = pre_norm(lp, cfg, h)
    out, new_state = BLOCKS[kind].mixer(lp["mixer"], cfg, x, BlockInput(mask, state, pos, kv_mask, experts, layer))
    return h + out.astype(h.dtype), new_state


def moe_input(lp: dict, cfg: Config, h: jax.Array):
    """An MoE block up to its routed experts: h [B, T, H] -> (normed x [B, T, H], weights [B*T, k], ids [B*T, k])."""
    x = pre_norm(lp, cfg, h)
    return (x, *moe_route(lp["mixer"], cfg, x))


def moe_residual(lp: dict, h: jax.Array, x: jax.Array, routed: jax.Array) -> jax.Array:
    """An MoE block after its routed experts (their sum [B*T, H] fp32): shared expert and residual -> h."""
    return h + moe_output(lp["mixer"], x, routed).astype(h.dtype)


def compute_dtype(params: dict):
    """The model's activation dtype: that of the final norm weight (embeddings may be quantized)."""
    return params["norm_f"].dtype


def embed(params: dict, tokens: jax.Array) -> jax.Array:
    """Embedding rows [B, T, H] in the compute dtype (a quantized table dequantizes only the rows taken)."""
    w = params["embeddings"]
    if is_quantized(w):  # gather the stored rows, dequantize only those
        return w.take_rows(tokens).dequantize(compute_dtype(params))
    return take_rows(w, tokens).astype(compute_dtype(params))  # no copy of the table (ops.take_rows)


def lm_head(params: dict, cfg: Config, h: jax.Array) -> jax.Array:
    """Final norm and projection: h [..., H] -> logits [..., V] float32."""
    h = rms_norm(h.astype(compute_dtype(params)), params["norm_f"], cfg.layer_norm_epsilon)
    w = params["embeddings"] if cfg.tie_word_embeddings else params["lm_head"]
    return linear(h, w).astype(jnp.float32)


def start(params: dict, cfg: Config, tokens: jax.Array, attention_mask=None, cache: Cache | None = None):
    """The residual stream's start (embeddings, fp32 with ``residual_in_fp32``) and, with a cache, the KV mask:
    the cache's mask with the new tokens' mask written at ``cache.pos`` (per row where ``pos`` is [B]).
    -> (h [B, T, H], kv_mask [B, S] or None)."""
    h = embed(params, tokens)
    if cfg.residual_in_fp32:
        h = h.astype(jnp.float32)
    if cache is None:
        return h, None
    new = jnp.ones(tokens.shape, jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
    return h, write_at(cache.mask, new, cache.pos)


def head(params: dict, cfg: Config, h: jax.Array, last_only: bool = False) -> jax.Array:
    """Logits [B, T, V] float32 of the final residual stream (of its last position only: [B, 1, V])."""
    return lm_head(params, cfg, h[:, -1:] if last_only else h)


class Pieces(NamedTuple):
    """The forward's pieces as one host-driven forward runs them, each jitted on its own (static: the config,
    the block kind, ``last_only``)."""

    start: Callable
    block: Callable
    moe_input: Callable
    moe_residual: Callable
    head: Callable


STEPWISE = Pieces(start=jax.jit(start, static_argnums=(1,)), block=jax.jit(block, static_argnums=(1, 2)),
                  moe_input=jax.jit(moe_input, static_argnums=(1,)), moe_residual=jax.jit(moe_residual),
                  head=jax.jit(head, static_argnums=(1, 3)))
_INLINE = Pieces(start, block, moe_input, moe_residual, head)  # inside the caller's trace


def forward(params: dict, cfg: Config, tokens: jax.Array, attention_mask=None, cache: Cache | None = None, *,
            return_hidden_states: bool = False, last_only: bool = False, experts: RoutedExperts | None = None,
            mesh=None, logits_at=None):
    """Forward over tokens [B, T] (int).

    attention_mask [B, T]: 1 = token, 0 = pad (None: all tokens). Pads come first (left padding) with a scalar
    ``cache.pos`` or no cache; with a per-row ``cache.pos`` [B] they come last (right padding: row b has its
    ``attention_mask[b].sum()`` real tokens first, written at ``pos[b]``, and advances by that many).
    Without a cache: returns logits [B, T, V] float32 (or [B, 1, V] with ``last_only``), and with
    ``return_hidden_states`` also a list of L+1 arrays [B, T, H]: the embeddings, the residual stream after
    blocks 0..L-2, and the final-normed output (transformers' ``output_hidden_states`` convention).
    With a cache: the tokens continue the cached sequences at ``cache.pos``; returns (logits, new cache).
    experts: how MoE blocks run their routed experts (``nemojax.blocks.moe``): ``GROUPED`` (inference), ``DENSE``
    (every expert on every token; differentiable, for training), ``ExpertParallel(mesh)``, or a host-driven
    strategy (``nemojax.experts.offload``: then ``forward`` runs eagerly, layer by layer, each piece jitted; not
    inside ``jit``). Default: expert-parallel over ``mesh`` where it splits the experts, else grouped.
    mesh: the ``nemojax.sharding`` mesh the params are sharded on (static): the new cache keeps its shardings.
    Without it the SPMD partitioner still runs sharded inputs, but gathers each expert bank.
    logits_at: [B] int32, the one position of each row whose logits to return (logits [B, 1, V]; e.g. the last
    real token of right-padded rows).
    """
    experts = resident_experts(cfg, mesh) if experts is None else experts
    stepwise = experts.host_driven
    if stepwise and mesh is not None:
        raise ValueError("a host-driven experts strategy runs on one device: mesh must be None")
    run = STEPWISE if stepwise else _INLINE
    if attention_mask is not None:
        attention_mask = jnp.asarray(attention_mask)  # once, not per jitted piece
    h, kv_mask = run.start(params, cfg, tokens, attention_mask, cache)
    pos = None if cache is None else cache.pos
    hidden, states = [h], []
    for i, kind in enumerate(cfg.pattern):
        lp = params["layers"][i]
        st = cache.layers[i] if cache is not None else None
        if not stepwise:
            h, st = block(lp, cfg, kind, h, attention_mask, st, pos, kv_mask, experts, i)
        elif kind == MOE.char:  # the host decides between the router and the routed experts
            x, w, idx = run.moe_input(lp, cfg, h)
            h, st = run.moe_residual(lp, h, x, experts(x, w, idx, lp["mixer"].get("experts"), i)), {}
            experts.after_moe(params, cfg, i, h)
        else:
            h, st = run.block(lp, cfg, kind, h, attention_mask, st, pos, kv_mask)
        hidden.append(h)
        states.append(st)
    if logits_at is not None:
        logits = run.head(params, cfg, jnp.take_along_axis(h, jnp.asarray(logits_at)[:, None, None], axis=1), False)
    else:
        logits = run.head(params, cfg, h, last_only)
    if cache is not None:
        if pos.ndim == 0 or attention_mask is None:
            pos = pos + tokens.shape[1]
        else:  # per row: the real tokens written
            pos = pos + attention_mask.astype(jnp.int32).sum(axis=1)
        cache = Cache(layers=tuple(states), mask=kv_mask, pos=pos)
        if mesh is not None:
            from .sharding import constrain_cache

            cache = constrain_cache(cache, cfg, mesh)
        return logits, cache
    if return_hidden_states:
        final = rms_norm(h, params["norm_f"], cfg.layer_norm_epsilon)
        return logits, hidden[:-1] + [final]
    return logits


forward_jit = jax.jit(forward, static_argnums=(1,),
                      static_argnames=("return_hidden_states", "last_only", "experts", "mesh"))
