"""What a block kind is, and the registry of kinds.

A Nemotron-H layer is a pre-norm residual block ``h + mixer(rmsnorm(h))``; its *kind* (a pattern character of
``Config.pattern``) says which mixer. A kind is one :class:`BlockKind`, declared in its own module (``mamba.py``
``M``, ``moe.py`` ``E``, ``attention.py`` ``*``, ``mlp.py`` ``-``) and registered with :func:`register`
(``BLOCKS[kind.char] = kind``); ``nemojax/blocks/__init__.py`` imports the block modules, so importing anything
from ``nemojax.blocks`` fills the registry. Generic code never switches on a kind's character: the parameter tree
(``nemojax.params``), the cache (``nemojax.cache``), the forward (``nemojax.model.block``), the sharding rules
(``nemojax.sharding``) and the quantization recipes (``nemojax.quant``) all read ``BLOCKS``.

A kind declares, in one place:

* ``params(cfg, prefix)``: its mixer's parameters, ``{name: Spec | nested dict}`` (``prefix``: the layer's
  checkpoint prefix ``backbone.layers.{i}.mixer.``); each :class:`Spec` carries the shape, the dtype policy
  (``fp32``), the logical sharding axes, the checkpoint name and how random init draws it;
* ``optional(cfg, prefix)``: parameters a model *may* add to the mixer later (FP8 KV-cache scales), same form;
* ``mixer(p, cfg, x, inp)``: the mixer on the block-normed input ``x`` [B, T, H] with the :class:`BlockInput`
  ``inp``; returns ``(out [B, T, H], the layer's new cache state)``;
* ``init_state(cfg, batch, max_len, dtype, kv_dtype)``: the layer's empty cache state (``{}``: stateless),
  ``state_axes``: the logical axes of each state array, and ``positional``: the names of those indexed by cache
  position along axis 1 (attention's K/V; the rest, e.g. Mamba's conv window and SSM state, is the state after
  the last position);
* ``linears``: the mixer-relative paths of its linear layers a quantization recipe may select.

A new kind: its pattern character and config.json type name in ``nemojax.config.BLOCK_TYPES`` (with the config
fields it reads and their validation), a module here that declares and registers its :class:`BlockKind`, and that
module on the import line of ``nemojax/blocks/__init__.py``; a logical axis name not yet in
``nemojax.sharding.RULES`` gets a rule there.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import numpy as np

from ..config import BLOCK_TYPES, Config
from ..ops import dynamic_update

__all__ = ["Spec", "BlockKind", "BlockInput", "BLOCKS", "register", "fan_in", "Normal", "near_one", "no_state",
           "no_params", "write_at"]

Init = Callable[[np.random.Generator, tuple], np.ndarray]  # (rng, shape) -> float64 values


def fan_in(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    """N(0, 1/fan_in), fan_in the last dimension (a ``[out, in]`` weight: keeps activations O(1))."""
    return rng.normal(0.0, 1.0 / math.sqrt(shape[-1]), shape)


@dataclasses.dataclass(frozen=True)
class Normal:
    """N(mean, std) init."""

    std: float
    mean: float = 0.0

    def __call__(self, rng: np.random.Generator, shape: tuple) -> np.ndarray:
        return rng.normal(self.mean, self.std, shape)


def near_one(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    """``1 + 0.1 N(0, 1)``: an RMSNorm weight."""
    return 1.0 + 0.1 * rng.standard_normal(shape)


@dataclasses.dataclass(frozen=True)
class Spec:
    """One parameter: its shape, logical sharding axes (one per dimension, names of ``nemojax.sharding.RULES`` or
    None: replicated), checkpoint name(s), dtype policy and random init.

    ``ckpt`` is the original-naming tensor name; for stacked experts it contains ``{e}`` (``stacked``: one
    checkpoint tensor per expert along axis 0). ``ckpt_shape`` is the per-tensor shape in the checkpoint when it
    differs (conv1d: [C, 1, K]). ``fp32``: kept in float32 whatever dtype the weights are loaded in.
    ``init(rng, shape)`` draws random values (``nemojax.params.init_params``).
    """

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    ckpt: str
    fp32: bool = False
    ckpt_shape: tuple[int, ...] | None = None
    stacked: bool = False
    init: Init = fan_in

    def __post_init__(self):
        if len(self.axes) != len(self.shape):
            raise ValueError(f"{self.ckpt}: {len(self.axes)} logical axes for shape {self.shape}")


class BlockInput(NamedTuple):
    """What a mixer may read besides its parameters and normed input (each kind reads what it needs)."""

    mask: Any = None  # [B, T]: 1 = token, 0 = pad (left pads, or right pads with a per-row pos; None: all tokens)
    state: Any = None  # the layer's cache state (``nemojax.cache``), None for a cache-free forward
    pos: Any = None  # [] or [B] int32: the cache's write position (of the batch, or of each row)
    kv_mask: Any = None  # [B, S]: cache slots holding real tokens, the new ones included
    experts: Any = None  # how routed experts run (``nemojax.blocks.moe.RoutedExperts``; None: grouped)
    layer: int = 0  # the block's index


def no_state(cfg: Config, batch: int, max_len: int, dtype, kv_dtype) -> dict:
    """A stateless kind's cache state."""
    return {}


def no_params(cfg: Config, prefix: str) -> dict:
    return {}


@dataclasses.dataclass(frozen=True)
class BlockKind:
    """One kind of block (see the module docstring). ``char``: its pattern character; ``type_name``: its
    config.json block type (``layers_block_type``, ``nemojax.config.BLOCK_TYPES``)."""

    char: str
    type_name: str
    params: Callable[[Config, str], dict]
    mixer: Callable[..., tuple]
    init_state: Callable[..., dict] = no_state
    state_axes: Mapping[str, tuple] = dataclasses.field(default_factory=dict)
    linears: tuple[str, ...] = ()
    positional: tuple[str, ...] = ()
    optional: Callable[[Config, str], dict] = no_params


BLOCKS: dict[str, BlockKind] = {}


def register(kind: BlockKind) -> BlockKind:
    """``BLOCKS[kind.char] = kind``; the character and type name must be those of ``nemojax.config.BLOCK_TYPES``
    (the config validates patterns against that table)."""
    if kind.char in BLOCKS:
        raise ValueError(f"block kind {kind.char!r} is registered twice")
    if BLOCK_TYPES.get(kind.char) != kind.type_name:
        raise ValueError(f"block kind {kind.char!r} ({kind.type_name!r}) is not in nemojax.config.BLOCK_TYPES "
                         f"{BLOCK_TYPES}: add it there (the config validates layer patterns against it)")
    BLOCKS[kind.char] = kind
    return kind


def write_at(buf: jax.Array, new: jax.Array, pos: jax.Array) -> jax.Array:
    """buf [B, S, ...] with new [B, T, ...] written at positions pos..pos+T-1 along axis 1: pos [] (every row at
    the same position) or [B] (row b at pos[b]). The caller keeps pos + T <= S (a write past the end is clamped)."""
    if pos.ndim == 0:
        return dynamic_update(buf, new, pos, axis=1)
    return jax.vmap(lambda b, n, p: dynamic_update(b, n, p, axis=0))(buf, new, pos)
