"""Jitted generation: bucketed prefill, then a decode loop that runs entirely inside one jit per chunk of
tokens (no retrace and no host round trip per token), with donated cache buffers.

``generate`` returns new tokens ``[B, max_new_tokens]`` (pad id after a sequence stops); ``generate_stream``
yields them in chunks. Prompts of different lengths are left-padded to a bucketed length, so the number of
compilations stays bounded (``TRACE_COUNTS`` counts them).

With a host-driven experts strategy (``experts=``, e.g. ``nemojax.experts.offload``) the same loop runs the
strategy's own ``prefill`` / ``decode``, which have the signatures and results of :func:`prefill` / :func:`decode`.
"""
from __future__ import annotations

import collections
import warnings
from functools import partial
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .cache import Cache, init_cache
from .config import Config
from .model import compute_dtype, forward
from .formats.kv import FP8
from .sampling import SamplingParams, sample

__all__ = ["generate", "generate_stream", "prefill", "decode", "next_token", "DecodeState", "bucket", "pad_prompts",
           "pad_to_bucket", "TRACE_COUNTS"]

TRACE_COUNTS: collections.Counter = collections.Counter()  # how many times each jitted function was traced
_MAX_STOP = 8
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")  # CPU cannot donate


def bucket(n: int, minimum: int = 16) -> int:
    """Round a length up: powers of two up to 1024, then multiples of 1024."""
    if n <= 1024:
        b = minimum
        while b < n:
            b *= 2
        return b
    return -(-n // 1024) * 1024


@struct.dataclass
class DecodeState:
    logits: jax.Array  # [B, V] float32: logits for the next token
    done: jax.Array  # [B] bool
    step: jax.Array  # [] int32: tokens emitted so far
    key: jax.Array  # PRNG key


@partial(jax.jit, static_argnums=(1,), static_argnames=("mesh", "experts"), donate_argnames=("cache",))
def prefill(params, cfg: Config, tokens, mask, cache: Cache, mesh=None, experts=None):
    """tokens, mask [B, T] (left-padded) -> (last-position logits [B, V] float32, filled cache)."""
    TRACE_COUNTS["prefill"] += 1
    logits, cache = forward(params, cfg, tokens, mask, cache, last_only=True, experts=experts, mesh=mesh)
    return logits[:, -1], cache


def next_token(state: DecodeState, sp: SamplingParams, stop_ids, pad_id):
    """Sample each sequence's next token from ``state.logits`` (pad id once done) -> (tokens [B] int32, done [B]:
    done before or stopped by this token)."""
    tok = sample(state.logits, jax.random.fold_in(state.key, state.step), sp)
    tok = jnp.where(state.done, pad_id, tok)
    return tok, state.done | jnp.any(tok[:, None] == stop_ids[None, :], axis=1)


@partial(jax.jit, static_argnums=(1, 2), static_argnames=("mesh", "experts"), donate_argnames=("cache",))
def decode(params, cfg: Config, n_steps: int, cache: Cache, state: DecodeState, sp: SamplingParams, limit,
           stop_ids, pad_id, mesh=None, experts=None):
    """Up to ``n_steps`` tokens in one ``while_loop``: sample, record, feed back. Stops early when every
    sequence is done or ``limit`` tokens were emitted. Returns (tokens [B, n_steps], cache, state)."""
    TRACE_COUNTS["decode"] += 1
    B = state.done.shape[0]
    out0 = jnp.full((B, n_steps), pad_id, jnp.int32)

    def cond(c):
        i, _, _, st = c
        return (i < n_steps) & (st.step < limit) & ~jnp.all(st.done)

    def body(c):
        i, out, cache, st = c
        tok, done = next_token(st, sp, stop_ids, pad_id)
        out = jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], i, axis=1)
        logits, cache = forward(params, cfg, tok[:, None], None, cache, last_only=True, experts=experts, mesh=mesh)
        return i + 1, out, cache, DecodeState(logits[:, -1], done, st.step + 1, st.key)

    _, out, cache, state = jax.lax.while_loop(cond, body, (jnp.int32(0), out0, cache, state))
    return out, cache, state


def pad_to_bucket(ids: np.ndarray, mask: np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad (ids, mask) [B, T] to [B, bucket(T)]: a bounded number of prompt shapes, hence compilations."""
    extra = bucket(ids.shape[1]) - ids.shape[1]
    return (np.concatenate([np.full((ids.shape[0], extra), pad_id, ids.dtype), ids], 1),
            np.concatenate([np.zeros((mask.shape[0], extra), np.int32), mask], 1))


def pad_prompts(input_ids, attention_mask=None, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A list of token lists (any lengths) or an array [B, T] (+ mask) -> left-padded (ids, mask) [B, T]."""
    if isinstance(input_ids, (list, tuple)) and input_ids and isinstance(input_ids[0], (list, tuple, np.ndarray)):
        rows = [np.asarray(r, np.int64).reshape(-1) for r in input_ids]
        if attention_mask is not None:
            raise ValueError("attention_mask must not be given with a list of prompts (they are padded here)")
        T = max(len(r) for r in rows)
        ids = np.full((len(rows), T), pad_id, np.int64)
        mask = np.zeros((len(rows), T), np.int32)
        for i, r in enumerate(rows):
            if len(r):
                ids[i, T - len(r):] = r
                mask[i, T - len(r):] = 1
    else:
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask, np.int32)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}")
        if np.any(np.diff(mask, axis=1) < 0):
            raise ValueError("attention_mask must be left-padded (zeros only before the tokens of each row)")
    if ids.ndim != 2 or ids.size == 0:
        raise ValueError(f"input_ids must be a non-empty batch of prompts, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integers, got dtype {ids.dtype}")
    if np.any(mask.sum(1) == 0):
        raise ValueError("every prompt needs at least one token")
    return ids, mask


def _validate(cfg: Config, ids, mask, max_new_tokens, seed, stop_token_ids):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    real = ids[mask.astype(bool)]
    if real.min() < 0 or real.max() >= cfg.vocab_size:
        raise ValueError(f"input_ids must lie in [0, {cfg.vocab_size}), got values in [{real.min()}, {real.max()}]")
    longest = int(mask.sum(1).max())
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's context "
                         f"length of {cfg.max_position_embeddings} tokens (max_position_embeddings)")
    stops = list(stop_token_ids or [])
    if len(stops) > _MAX_STOP:
        raise ValueError(f"at most {_MAX_STOP} stop_token_ids are supported, got {len(stops)}")
    if any((not isinstance(s, (int, np.integer))) or s < 0 or s >= cfg.vocab_size for s in stops):
        raise ValueError(f"stop_token_ids must be token ids in [0, {cfg.vocab_size}), got {stops}")
    return np.array(stops + [-1] * (_MAX_STOP - len(stops)), np.int32)


def generate_stream(params, cfg: Config, input_ids, max_new_tokens: int, *, temperature=0.0, top_k=0, top_p=1.0,
                    seed=0, attention_mask=None, stop_token_ids: Sequence[int] | None = None,
                    pad_id: int | None = None, chunk: int = 16, timings: dict | None = None,
                    kv_dtype=None, warmup: bool = False, mesh=None, experts=None) -> Iterator[np.ndarray]:
    """Yield new tokens in chunks of up to ``chunk`` columns ([B, n] int32 arrays), pad id after a stop.

    ``mesh``: the ``nemojax.sharding`` mesh ``params`` are sharded on; the cache is created sharded on it too.
    ``experts``: how MoE blocks run their routed experts (``nemojax.model.forward``); a host-driven strategy
    (``nemojax.experts.offload``) brings its own prefill and decode steps, run by this same loop.

    ``timings`` (optional dict) receives prefill/decode seconds and token counts. ``warmup=True`` compiles and
    runs prefill and one decode step with exactly the shapes of the real call, yielding nothing.
    """
    import time

    sp = SamplingParams.make(temperature, top_k, top_p)
    pad_id = cfg.pad_token_id if pad_id is None else pad_id
    pad_id = 0 if pad_id is None else pad_id
    ids, mask = pad_prompts(input_ids, attention_mask, pad_id)
    stops = _validate(cfg, ids, mask, max_new_tokens, seed, stop_token_ids)
    if getattr(experts, "host_driven", False):
        if mesh is not None:
            raise ValueError("a host-driven experts strategy runs on one device: mesh must be None")
        run_prefill, run_decode = experts.prefill, experts.decode
    else:
        run_prefill, run_decode = partial(prefill, mesh=mesh, experts=experts), partial(decode, mesh=mesh,
                                                                                         experts=experts)
    B = ids.shape[0]
    ids, mask = pad_to_bucket(ids, mask, pad_id)
    Tb = ids.shape[1]
    new_b = bucket(max_new_tokens, minimum=chunk) if chunk else bucket(max_new_tokens)
    n_steps = min(chunk, new_b) if chunk else new_b
    dtype = compute_dtype(params)
    if kv_dtype is None and any("k_scale" in params["layers"][i]["mixer"] for i in cfg.layer_indices("*")):
        kv_dtype = FP8  # calibrated FP8 KV scales: cache K/V in float8_e4m3fn
    cache = init_cache(cfg, B, Tb + new_b, dtype, kv_dtype)
    if mesh is not None:
        from .sharding import shard_cache

        cache = shard_cache(cache, cfg, mesh)
    t0 = time.perf_counter()
    logits, cache = run_prefill(params, cfg, jnp.asarray(ids, jnp.int32), jnp.asarray(mask), cache)
    logits.block_until_ready()
    t1 = time.perf_counter()
    state = DecodeState(logits, jnp.zeros((B,), bool), jnp.int32(0), jax.random.PRNGKey(seed))
    emitted = 0
    stop_arr, pad_arr, limit = jnp.asarray(stops), jnp.int32(pad_id), jnp.int32(max_new_tokens)
    if warmup:
        out, cache, state = run_decode(params, cfg, n_steps, cache, state, sp, jnp.int32(1), stop_arr, pad_arr)
        jax.block_until_ready(out)
        return
    while emitted < max_new_tokens:
        out, cache, state = run_decode(params, cfg, n_steps, cache, state, sp, limit, stop_arr, pad_arr)
        n = min(n_steps, max_new_tokens - emitted)
        emitted += n
        yield np.asarray(out[:, :n])
        if bool(jnp.all(state.done)):
            if emitted < max_new_tokens:
                yield np.full((B, max_new_tokens - emitted), pad_id, np.int32)
            break
    if timings is not None:
        t2 = time.perf_counter()
        timings.update(prefill_s=t1 - t0, decode_s=t2 - t1, prompt_tokens=int(mask.sum()),
                       new_tokens=int(state.step) * B, batch=B)


def generate(params, cfg: Config, input_ids, max_new_tokens: int, *, callback: Callable | None = None,
             chunk: int | None = None, **kw) -> np.ndarray:
    """New token ids [B, max_new_tokens] (int32; pad id after a sequence stops).

    Keyword arguments as :func:`generate_stream`. Without ``callback`` the whole decode runs as one jitted
    loop; with one, ``callback(chunk [B, n])`` is called per chunk (default 16 tokens).
    """
    if callback is not None and chunk is None:
        chunk = 16
    parts = []
    for part in generate_stream(params, cfg, input_ids, max_new_tokens, chunk=chunk or 0, **kw):
        parts.append(part)
        if callback is not None:
            callback(part)
    return np.concatenate(parts, axis=1)
