"""Dense squared-ReLU MLP (``-`` layers), also the shared expert of MoE layers."""
from __future__ import annotations

import jax

from ..ops import linear, relu2

__all__ = ["mlp"]


def mlp(p: dict, x: jax.Array) -> jax.Array:
    """``down_proj(relu(up_proj(x))^2)``; x [..., H] -> [..., H]."""
    return linear(relu2(linear(x, p["up_proj"])), p["down_proj"])
