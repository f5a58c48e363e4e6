"""The parameter pytree: its layout, abstract shapes, checkpoint names and random init.

Layout (all weights ``[out_features, in_features]`` as in the checkpoint, experts stacked ``[E, ...]``)::

    {"embeddings": [V, H], "norm_f": [H], "lm_head": [V, H] (absent when tied),
     "layers": [ {"norm": [H], "mixer": {...}}, ... one dict per layer ... ]}

Each layer's mixer is what its block kind declares (``nemojax.blocks.base.BLOCKS[c].params``; the shapes are in
the block modules' ``_params`` docstrings). Every leaf of :func:`param_specs` is a :class:`Spec`.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .blocks.base import BLOCKS, Normal, Spec, near_one
from .config import Config

__all__ = ["param_specs", "spec_table", "abstract_params", "init_params", "init_params_numpy", "count_params",
           "tree_paths", "key_str", "is_spec", "leaf_dtype"]


def is_spec(x) -> bool:
    return isinstance(x, Spec)


def param_specs(cfg: Config) -> dict:
    """The parameter tree with a :class:`Spec` at every leaf (original checkpoint names)."""
    V, H = cfg.vocab_size, cfg.hidden_size
    tree: dict[str, Any] = {
        "embeddings": Spec((V, H), ("vocab", "embed"), "backbone.embeddings.weight", init=Normal(1.0)),
        "layers": [
            {"norm": Spec((H,), ("embed",), f"backbone.layers.{i}.norm.weight", init=near_one),
             "mixer": BLOCKS[c].params(cfg, f"backbone.layers.{i}.mixer.")}
            for i, c in enumerate(cfg.pattern)
        ],
        "norm_f": Spec((H,), ("embed",), "backbone.norm_f.weight", init=near_one),
    }
    if not cfg.tie_word_embeddings:
        tree["lm_head"] = Spec((V, H), ("vocab", "embed"), "lm_head.weight")
    return tree


def spec_table(cfg: Config) -> dict[str, Spec]:
    """``{dot path: Spec}`` of every parameter a model of ``cfg`` may hold: those of :func:`param_specs` and the
    optional ones its block kinds declare (FP8 KV-cache scales)."""
    table = dict(tree_paths(param_specs(cfg)))
    for i, c in enumerate(cfg.pattern):
        extra = BLOCKS[c].optional(cfg, f"backbone.layers.{i}.mixer.")
        table.update((f"layers.{i}.mixer.{p}", s) for p, s in tree_paths(extra))
    return table


def leaf_dtype(spec: Spec, dtype) -> jnp.dtype:
    return jnp.dtype(jnp.float32) if spec.fp32 else jnp.dtype(dtype)


def abstract_params(cfg: Config, dtype="bfloat16") -> dict:
    """Shapes and dtypes only (``jax.ShapeDtypeStruct`` leaves); allocates nothing."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, leaf_dtype(s, dtype)), param_specs(cfg),
                        is_leaf=is_spec)


def count_params(cfg: Config) -> int:
    """Number of parameters (bias buffers included), computed from shapes alone."""
    return sum(math.prod(s.shape) for s in jax.tree.leaves(param_specs(cfg), is_leaf=is_spec))


def tree_paths(tree) -> list[tuple[str, Any]]:
    """``[("layers.3.mixer.in_proj", leaf), ...]`` in a stable order."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_spec)[0]:
        out.append((".".join(key_str(k) for k in path), leaf))
    return out


def key_str(k) -> str:
    """One pytree key-path entry as it appears in a dot path (a dict key, a list index, an attribute name)."""
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def init_params_numpy(cfg: Config, seed: int = 0, dtype="float32") -> dict:
    """Random parameters as NumPy arrays (``ml_dtypes`` for bf16), one PCG64 stream per tensor."""
    specs = param_specs(cfg)
    flat, treedef = jax.tree_util.tree_flatten(specs, is_leaf=is_spec)
    leaves = []
    for i, spec in enumerate(flat):  # each Spec's init: statistics that keep activations O(1)
        rng = np.random.Generator(np.random.PCG64([seed, i]))
        leaves.append(spec.init(rng, spec.shape).astype(leaf_dtype(spec, dtype)))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def init_params(cfg: Config, seed: int = 0, dtype="float32") -> dict:
    """Random parameters as jax arrays (for tests and benchmarks; never a trained model)."""
    return jax.tree.map(jnp.asarray, init_params_numpy(cfg, seed, dtype))
