"""Generation state: KV for attention layers, conv window and SSM state for Mamba layers.

A :class:`Cache` is a ``flax.struct`` pytree (jit, donation and sharding see its arrays). ``layers[i]`` is the
state layer ``i``'s block kind declares (``nemojax.blocks.base.BLOCKS[c].init_state``):

* attention ``*``: ``{"k": [B, S, nkv, Dh], "v": [B, S, nkv, Dh]}`` (model dtype, or the KV dtype);
* Mamba ``M``: ``{"conv": [B, K-1, C]`` (model dtype, the last K-1 conv inputs), ``"ssm": [B, nh, P, N]`` (always
  float32)``}``;
* ``{}`` for MoE and MLP layers (stateless).

``pos`` is the next write index: a scalar (``[]``: sequences left-padded to a common length, one position for the
batch, as ``nemojax.generate`` runs them) or one per row (``[B]``: each row's new tokens right-padded and written at
its own position, as the serving engine runs them; a row advances by its number of real tokens). ``mask[b, s]``
says whether cache slot ``s`` of row ``b`` holds a real token (0 for pads).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from .blocks.base import BLOCKS
from .config import Config

__all__ = ["Cache", "init_cache"]


@struct.dataclass
class Cache:
    layers: tuple  # one dict per layer (see module docstring)
    mask: jax.Array  # [B, S] int32: 1 where a real token was written
    pos: jax.Array  # [] or [B] int32: the next write index (of the batch, or of each row)

    @property
    def max_len(self) -> int:
        return self.mask.shape[1]

    @property
    def batch(self) -> int:
        return self.mask.shape[0]


def init_cache(cfg: Config, batch: int, max_len: int, dtype=jnp.bfloat16, kv_dtype=None,
               per_row: bool = False) -> Cache:
    """An empty cache for ``batch`` sequences of up to ``max_len`` positions (zeros; nothing written).
    ``per_row``: one write position per row (``pos`` [B]) instead of one for the batch (``pos`` [])."""
    kv_dtype = kv_dtype or dtype
    layers = tuple(BLOCKS[c].init_state(cfg, batch, max_len, dtype, kv_dtype) for c in cfg.pattern)
    pos = jnp.zeros((batch,) if per_row else (), jnp.int32)
    return Cache(layers=layers, mask=jnp.zeros((batch, max_len), jnp.int32), pos=pos)

