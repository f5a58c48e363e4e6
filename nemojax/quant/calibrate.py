"""Calibration: activation amax of every linear that will be quantized (-> NVFP4 ``input_scale``) and of K/V
(-> FP8 ``k_scale`` / ``v_scale``), over calibration batches in one jitted pass per batch shape.

While a calibration forward is traced, :func:`record` appends ``(name, amax)`` pairs to a tape; the traced
function returns them, so the whole pass stays one jitted computation (no host callbacks).
"""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from flax import struct

__all__ = ["Observed", "record", "record_kv", "tape", "calibrate"]

_TAPE: list | None = None


@contextlib.contextmanager
def tape():
    global _TAPE
    prev, _TAPE = _TAPE, []
    try:
        yield _TAPE
    finally:
        _TAPE = prev


def record(name: str, x: jax.Array, where=None) -> None:
    """During a calibration trace, note ``max |x|`` (over entries where ``where`` is true) under ``name``."""
    if _TAPE is None:
        return
    a = jnp.abs(x.astype(jnp.float32))
    if where is not None:
        a = jnp.where(where, a, 0.0)
    _TAPE.append((name, jnp.max(a)))


def record_kv(p: dict, k: jax.Array, v: jax.Array) -> None:
    """Attention hook: K/V amax, keyed by the mixer's q_proj observation name."""
    if _TAPE is None or not isinstance(p.get("k_proj"), Observed):
        return
    base = p["k_proj"].name.rsplit(".", 1)[0]
    record(base + ".k_proj.k", k)
    record(base + ".v_proj.v", v)


@struct.dataclass
class Observed:
    """A float weight that records the amax of its inputs when used in a calibration forward."""

    w: jax.Array
    name: str = struct.field(pytree_node=False)

    @property
    def shape(self):
        return self.w.shape

    @property
    def dtype(self):
        return self.w.dtype

    def matmul(self, x: jax.Array) -> jax.Array:
        record(self.name, x)
        from ..ops import linear

        return linear(x, self.w)


def calibrate(params: dict, cfg, batches, observe: dict) -> dict:
    """Run ``batches`` (iterable of int token arrays [B, T], or (tokens, mask) pairs) through the model and
    return ``{name: amax}`` (float32 scalars) for every observed linear input and every attention K/V.

    observe: ``{param path: observation name}`` of the weights to watch (see ``nemojax.quant.apply``).
    """
    from ..layers.moe import DENSE
    from ..model import forward
    from ..params import tree_paths

    flat, treedef = jax.tree_util.tree_flatten(params)
    names = [n for n, _ in tree_paths(params)]
    wrapped = [Observed(leaf, observe[n]) if n in observe else leaf for n, leaf in zip(names, flat)]
    wparams = jax.tree_util.tree_unflatten(treedef, wrapped)

    @jax.jit
    def run(wp, tokens, mask):
        with tape() as t:
            forward(wp, cfg, tokens, mask, experts=DENSE)
            out: dict = {}
            for name, a in t:
                out[name] = jnp.maximum(out[name], a) if name in out else a
        return out

    result: dict = {}
    for b in batches:
        tokens, mask = b if isinstance(b, tuple) else (b, None)
        tokens = jnp.asarray(tokens, jnp.int32)
        mask = jnp.ones(tokens.shape, jnp.int32) if mask is None else jnp.asarray(mask, jnp.int32)
        got = run(wparams, tokens, mask)
        for k, v in got.items():
            result[k] = jnp.maximum(result[k], v) if k in result else v
    if not result:
        raise ValueError("calibrate: no calibration batches were given")
    return {k: float(v) for k, v in result.items()}
