"""Calibration: activation amax of every linear that will be quantized (-> its format's ``input_scale``) and of K/V
(-> FP8 ``k_scale`` / ``v_scale``), over calibration batches in one jitted pass per batch shape.

Calibration observes the forward from outside: :func:`calibrate` swaps the watched weights for :class:`Observed`
nodes, whose matmul notes the amax of its input (and, where asked, of its output: the K / V of ``k_proj`` /
``v_proj``) on a :class:`Tape` owned by that call, and runs the routed experts with its own strategy
(:class:`ObservedDense`). The traced pass returns the tape's amaxes, so it stays one jitted computation (no host
callbacks).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from ..blocks.moe import RoutedExperts, dense_hidden, dense_output, routing_matrix
from ..model import forward
from ..ops import linear
from ..params import tree_paths

__all__ = ["Tape", "Observed", "ObservedDense", "calibrate"]


class Tape:
    """``(name, amax)`` pairs noted while one calibration forward is traced (compared by identity)."""

    def __init__(self):
        self.entries: list = []

    def note(self, name: str, x: jax.Array, where=None) -> None:
        """Note ``max |x|`` (over entries where ``where`` is true) under ``name``."""
        a = jnp.abs(x.astype(jnp.float32))
        if where is not None:
            a = jnp.where(where, a, 0.0)
        self.entries.append((name, jnp.max(a)))

    def amaxes(self) -> dict:
        """``{name: amax}``, the maximum over every note of a name."""
        out: dict = {}
        for name, a in self.entries:
            out[name] = jnp.maximum(out[name], a) if name in out else a
        return out


@struct.dataclass
class Observed:
    """A float weight whose matmul notes the amax of its input under ``name`` and, with ``out_name``, of its
    output under ``out_name`` (either None: not noted) on ``tape``."""

    w: jax.Array
    name: str | None = struct.field(pytree_node=False)
    out_name: str | None = struct.field(pytree_node=False, default=None)
    tape: Tape | None = struct.field(pytree_node=False, default=None)

    @property
    def shape(self):
        return self.w.shape

    @property
    def dtype(self):
        return self.w.dtype

    def matmul(self, x: jax.Array) -> jax.Array:
        if self.name is not None:
            self.tape.note(self.name, x)
        y = linear(x, self.w)
        if self.out_name is not None:
            self.tape.note(self.out_name, y)
        return y


@dataclasses.dataclass(frozen=True, eq=False)
class ObservedDense(RoutedExperts):
    """The dense routed experts (``nemojax.blocks.moe.DENSE``), noting for observed banks the amax of the inputs of
    the routed (token, expert) pairs only: every token for ``up_proj``, the chosen experts' hidden activations for
    ``down_proj``."""

    tape: Tape

    def __call__(self, x, weights, idx, bank, layer):
        xf = x.reshape(-1, x.shape[-1])
        up, down = bank["up_proj"], bank["down_proj"]
        comb = routing_matrix(weights, idx, up.shape[0])
        if isinstance(up, Observed):
            self.tape.note(up.name, xf)
            up = up.w
        h = dense_hidden(xf, up)
        if isinstance(down, Observed):
            self.tape.note(down.name, h, where=(comb > 0)[:, :, None])
            down = down.w
        return dense_output(h, down, comb)


def calibrate(params: dict, cfg, batches, observe: dict, outputs: dict | None = None) -> dict:
    """Run ``batches`` (iterable of int token arrays [B, T], or (tokens, mask) pairs) through the model and
    return ``{name: amax}`` (float32 scalars) for every observed linear input and output.

    observe: ``{param path: observation name}`` of the weights whose inputs to watch (see ``nemojax.quant.apply``);
    outputs: ``{param path: observation name}`` of the weights whose outputs to watch (K / V of attention).
    """
    outputs = outputs or {}
    names = [n for n, _ in tree_paths(params)]

    @jax.jit
    def run(p, tokens, mask):
        tape = Tape()  # this trace's: the observed nodes and the experts strategy note on it
        leaves, treedef = jax.tree_util.tree_flatten(p)
        wrapped = [Observed(leaf, observe.get(n), outputs.get(n), tape) if n in observe or n in outputs else leaf
                   for n, leaf in zip(names, leaves)]
        forward(jax.tree_util.tree_unflatten(treedef, wrapped), cfg, tokens, mask, experts=ObservedDense(tape))
        return tape.amaxes()

    result: dict = {}
    for b in batches:
        tokens, mask = b if isinstance(b, tuple) else (b, None)
        tokens = jnp.asarray(tokens, jnp.int32)
        mask = jnp.ones(tokens.shape, jnp.int32) if mask is None else jnp.asarray(mask, jnp.int32)
        got = run(params, tokens, mask)
        for k, v in got.items():
            result[k] = jnp.maximum(result[k], v) if k in result else v
    if not result:
        raise ValueError("calibrate: no calibration batches were given")
    return {k: float(v) for k, v in result.items()}
