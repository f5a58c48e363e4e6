"""Dense squared-ReLU MLP (``-`` layers), also the shared expert of MoE layers."""
from __future__ import annotations

import jax

from ..config import Config
from ..ops import linear, relu2
from .base import BlockInput, BlockKind, Spec, register

__all__ = ["mlp", "mlp_params", "MLP"]


def mlp(p: dict, x: jax.Array) -> jax.Array:
    """``down_proj(relu(up_proj(x))^2)``; x [..., H] -> [..., H]."""
    return linear(relu2(linear(x, p["up_proj"])), p["down_proj"])


def mlp_params(p: str, hidden: int, inner: int) -> dict:
    """up_proj [inner, hidden], down_proj [hidden, inner] (``p``: the checkpoint prefix)."""
    return {"up_proj": Spec((inner, hidden), ("mlp", "embed"), p + "up_proj.weight"),
            "down_proj": Spec((hidden, inner), ("embed", "mlp"), p + "down_proj.weight")}


def _params(cfg: Config, p: str) -> dict:
    return mlp_params(p, cfg.hidden_size, cfg.intermediate_size)


def _mixer(p: dict, cfg: Config, x: jax.Array, inp: BlockInput):
    return mlp(p, x), {}


MLP = register(BlockKind(char="-", type_name="mlp", params=_params, mixer=_mixer, linears=("up_proj", "down_proj")))
