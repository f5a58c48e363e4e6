"""The engine's compiled device steps over one batched cache of ``max_num_seqs`` rows (``pos`` [B]: each row at
its own position), each with fixed shapes so that nothing recompiles once warmed up (``TRACE_COUNTS``).

A row is a cache slot: :func:`prefill_chunk` runs one right-padded chunk of a prompt in one row,
:func:`decode_step` samples one token for every row (of the first ``n``) and feeds it back (inactive rows fully
masked: their state is unchanged), :func:`decode_steps` runs several such steps in one loop, :func:`reset_row` /
:func:`restore_row` start a row empty or from a prefix checkpoint and :func:`extract_row` reads a row's state
back for a checkpoint.

Each step is written once over :class:`StepPieces`: :data:`INLINE` (plain functions, traced into the compiled
step) or :func:`host_pieces` for a host-driven experts strategy (the host-offloaded expert cache), whose forward
runs eagerly layer by layer (``nemojax.model.STEPWISE``) with the row / sampling pieces jitted on their own:
:func:`prefill_chunk_with` and :func:`decode_once` called with those pieces, outside ``jit``.

The compiled decode steps run on the first ``n`` rows only (``n`` static: the engine keeps its running rows at
the front, :func:`move_row`, and compiles one program per bucket size), so a few running requests do not pay for
the whole batch.
"""
from __future__ import annotations

import collections
from functools import partial
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from ..cache import Cache
from ..config import Config
from ..model import forward
from ..ops import dynamic_slice, dynamic_update
from ..sampling import SamplingParams, sample_rows

__all__ = ["TRACE_COUNTS", "take_row", "put_row", "set_row", "sample_keyed", "StepPieces", "INLINE", "COMPILED",
           "host_pieces", "prefill_chunk_with", "forward_row", "prefill_chunk", "decode_once", "take_head", "put_head",
           "on_head", "decode_rows", "decode_step", "decode_rows_k", "decode_steps", "move_row", "reset_row",
           "restore_row", "extract_row"]

TRACE_COUNTS: collections.Counter = collections.Counter()  # traces of each step (compilations)


def take_row(cache: Cache, slot) -> Cache:
    """Row ``slot`` (a traced int) of a cache, as a cache of batch 1."""
    return jax.tree.map(lambda a: dynamic_slice(a, slot, 1, axis=0), cache)


def put_row(cache: Cache, row: Cache, slot) -> Cache:
    """``cache`` with row ``slot`` replaced by ``row`` (a cache of batch 1)."""
    return jax.tree.map(lambda a, r: dynamic_update(a, r, slot, axis=0), cache, row)


def set_row(logits, row, slot):
    """logits [B, V] with row ``slot`` set to ``row`` [1, V]."""
    return dynamic_update(logits, row, slot, axis=0)


def sample_keyed(logits, keys, n_gen, sp: SamplingParams):
    """One token per row from logits [B, V], row b with key ``fold_in(keys[b], n_gen[b])`` -> [B] int32."""
    return sample_rows(logits, jax.vmap(jax.random.fold_in)(keys, n_gen), sp)


class StepPieces(NamedTuple):
    """What a step calls: ``forward`` (``nemojax.model.forward``'s signature, the experts bound), ``sample``
    (:func:`sample_keyed`), ``take_row``, ``put_row`` and ``set_row``."""

    forward: Callable
    sample: Callable
    take_row: Callable
    put_row: Callable
    set_row: Callable


INLINE = StepPieces(forward, sample_keyed, take_row, put_row, set_row)  # inside the compiled steps
_JITTED = dict(sample=jax.jit(sample_keyed), take_row=jax.jit(take_row),
               put_row=jax.jit(put_row, donate_argnums=(0,)), set_row=jax.jit(set_row, donate_argnums=(0,)))


def host_pieces(experts) -> StepPieces:
    """The pieces for a host-driven experts strategy, run eagerly: its ``forward`` (``model.forward`` with those
    experts, e.g. ``OffloadedExperts.forward``), the other pieces jitted (the cache and logits donated)."""
    return StepPieces(forward=experts.forward, **_JITTED)


def prefill_chunk_with(run: StepPieces, params, cfg: Config, cache: Cache, logits, slot, tokens, n):
    """The next ``n`` (1..C) prompt tokens of row ``slot``: tokens [C] int32 (right-padded), written at the row's
    position. Returns (cache, logits [B, V] float32 with row ``slot`` set to the logits after the last token)."""
    mask = (jnp.arange(tokens.shape[0]) < n).astype(jnp.int32)[None]
    out, row = run.forward(params, cfg, tokens[None], mask, run.take_row(cache, slot),
                           logits_at=jnp.reshape(n - 1, (1,)))
    return run.put_row(cache, row, slot), run.set_row(logits, out[:, 0], slot)


@partial(jax.jit, static_argnums=(1,), donate_argnums=(4,))
def forward_row(params, cfg: Config, ids, mask, cache: Cache, logits_at):
    """``nemojax.model.forward`` of one row's chunk (the row's cache donated), compiled."""
    TRACE_COUNTS["prefill_chunk"] += 1
    return forward(params, cfg, ids, mask, cache, logits_at=logits_at)


COMPILED = StepPieces(forward=forward_row, **_JITTED)  # a prefill chunk as separate programs


def prefill_chunk(params, cfg: Config, cache: Cache, logits, slot, tokens, n):
    """:func:`prefill_chunk_with` the :data:`COMPILED` pieces: the row taken out, its chunk run and the row written
    back in place as separate programs (a slice and an update of the same donated buffer inside one program make
    XLA copy the whole cache)."""
    return prefill_chunk_with(COMPILED, params, cfg, cache, logits, slot, tokens, n)


def decode_once(params, cfg: Config, cache: Cache, logits, active, keys, n_gen, sp: SamplingParams,
                run: StepPieces = INLINE):
    """One token for each row: sampled from ``logits`` [B, V] with the row's key ``fold_in(keys[b], n_gen[b])``
    (keys [B, 2] uint32, n_gen [B] int32) and setting (``sp`` fields [B]), then fed back where ``active`` [B].
    Returns (tokens [B] int32, cache, next logits [B, V] float32)."""
    tok = run.sample(logits, keys, n_gen, sp)
    out, cache = run.forward(params, cfg, tok[:, None], active.astype(jnp.int32)[:, None], cache, last_only=True)
    return tok, cache, out[:, 0]


@partial(jax.jit, static_argnums=(1,))
def take_head(tree, n: int):
    """The first ``n`` (static) rows of every array of a pytree (a cache, logits [B, V]), as new arrays."""
    TRACE_COUNTS["take_head"] += 1
    return jax.tree.map(lambda a: a[:n], tree)


@partial(jax.jit, donate_argnums=(0,))
def put_head(tree, head):
    """``tree`` (donated) with its first rows replaced by ``head`` (same structure, fewer rows), in place."""
    TRACE_COUNTS["put_head"] += 1
    return jax.tree.map(lambda a, h: dynamic_update(a, h, 0, axis=0), tree, head)


def on_head(step, n: int, cache: Cache, logits, *args):
    """``step(cache, logits, *args) -> (tokens, cache, logits)`` run on the first ``n`` rows only: those rows are
    taken out (:func:`take_head`), stepped and written back (:func:`put_head`). Three programs rather than one, as
    a slice and an update of the same donated buffer inside one program make XLA copy the whole cache."""
    if n == cache.mask.shape[0]:
        return step(cache, logits, *args)
    tok, sub, lg = step(*take_head((cache, logits), n), *args)
    cache, logits = put_head((cache, logits), (sub, lg))
    return tok, cache, logits


@partial(jax.jit, static_argnums=(1,), donate_argnames=("cache", "logits"))
def decode_rows(params, cfg: Config, cache: Cache, logits, active, keys, n_gen, sp: SamplingParams):
    """:func:`decode_once`, compiled."""
    TRACE_COUNTS["decode_step"] += 1
    return decode_once(params, cfg, cache, logits, active, keys, n_gen, sp)


def decode_step(params, cfg: Config, n: int, cache: Cache, logits, active, keys, n_gen, sp: SamplingParams):
    """:func:`decode_rows` over the first ``n`` rows of the cache and logits (``active``, ``keys``, ``n_gen``,
    ``sp`` of those rows: [n]); the other rows are untouched. Returns (tokens [n], cache, logits)."""
    return on_head(partial(decode_rows, params, cfg), n, cache, logits, active, keys, n_gen, sp)


@partial(jax.jit, static_argnums=(1, 2), donate_argnames=("cache", "logits"))
def decode_rows_k(params, cfg: Config, k: int, cache: Cache, logits, active, keys, n_gen, sp: SamplingParams, left):
    """``k`` :func:`decode_once` steps in one loop; row b takes part in its first ``left[b]`` of them (its tokens
    left before max_tokens), then sits out. Returns (tokens [B, k] int32, -1 where the row sat out; cache, next
    logits [B, V])."""
    TRACE_COUNTS["decode_steps"] += 1

    def body(i, c):
        cache, logits, out = c
        live = active & (i < left)
        tok, cache, logits = decode_once(params, cfg, cache, logits, live, keys, n_gen + i, sp)
        return cache, logits, out.at[:, i].set(jnp.where(live, tok, -1))

    out0 = jnp.full((active.shape[0], k), -1, jnp.int32)
    cache, logits, out = jax.lax.fori_loop(0, k, body, (cache, logits, out0))
    return out, cache, logits


def decode_steps(params, cfg: Config, k: int, n: int, cache: Cache, logits, active, keys, n_gen, sp: SamplingParams,
                 left):
    """:func:`decode_rows_k` over the first ``n`` rows (the row arguments [n]) -> (tokens [n, k], cache,
    logits)."""
    return on_head(partial(decode_rows_k, params, cfg, k), n, cache, logits, active, keys, n_gen, sp, left)


@partial(jax.jit, donate_argnames=("cache", "logits"))
def move_row(cache: Cache, logits, src, dst):
    """Row ``src`` of the cache and logits [B, V] copied to row ``dst`` (``src`` left as it was)."""
    TRACE_COUNTS["move_row"] += 1
    return put_row(cache, take_row(cache, src), dst), set_row(logits, dynamic_slice(logits, src, 1), dst)


@partial(jax.jit, donate_argnames=("cache",))
def reset_row(cache: Cache, slot) -> Cache:
    """Row ``slot`` emptied: zero state, nothing written, position 0."""
    TRACE_COUNTS["reset_row"] += 1
    return put_row(cache, jax.tree.map(jnp.zeros_like, take_row(cache, slot)), slot)


@partial(jax.jit, donate_argnames=("cache",))
def restore_row(cache: Cache, slot, layers: tuple, n) -> Cache:
    """Row ``slot`` set to a checkpoint of its first ``n`` positions: ``layers`` the row's state (batch 1,
    positional arrays over all S positions, real up to n), mask 1 on [0, n), position n."""
    TRACE_COUNTS["restore_row"] += 1
    S = cache.mask.shape[1]
    row = Cache(layers=layers, mask=(jnp.arange(S) < n).astype(jnp.int32)[None], pos=jnp.reshape(n, (1,)))
    return put_row(cache, row, slot)


@partial(jax.jit, static_argnums=(1, 2))
def extract_row(cache: Cache, positional: tuple, size: int, slot, start) -> tuple:
    """Row ``slot``'s layer states (batch 1) with each positional array (``positional[i]``: the names of layer i)
    cut to positions [start, start + size)."""
    TRACE_COUNTS["extract_row"] += 1
    row = take_row(cache, slot)
    return tuple({k: dynamic_slice(a, start, size, axis=1) if k in names else a
                  for k, a in st.items()} for st, names in zip(row.layers, positional))
