"""Sharding over a device mesh with JAX's own SPMD partitioner: data, expert and tensor parallelism.

A mesh has three axes, ``("data", "expert", "tensor")``. Every parameter and cache array has *logical* axis names,
declared with it (``Spec.axes`` of ``nemojax.params.spec_table``, a block kind's ``state_axes``; e.g.
``("expert", "mlp", "embed")`` for a routed-expert ``up_proj`` bank), and :data:`RULES` map logical names to
mesh axes: batch over ``data``; routed experts over ``expert``; attention heads, Mamba heads / inner channels,
MLP and expert intermediate channels and the vocabulary over ``tensor``; the hidden size replicated. A dimension
that the mesh axis does not divide is replicated instead (so any mesh works on any model), and a quantized
node's codes and scales follow the weight they encode, splitting the input dimension only at whole
quantization blocks (16 for NVFP4, 128 for HLWQ).

The routed-expert computation runs under ``shard_map`` when the expert or tensor axis is > 1
(:class:`nemojax.blocks.moe.ExpertParallel`, what ``forward(..., mesh=mesh)`` uses): each device computes the
assignments of its local experts on its intermediate-channel slice and one ``psum`` combines them -- the expert
bank is never gathered.

    mesh = make_mesh(data=2, expert=2, tensor=2)
    params = shard_params(params, cfg, mesh)   # or nemojax.checkpoint.load_sharded(path, cfg, mesh)
    logits = forward_jit(params, cfg, tokens, mesh=mesh)
    tokens = generate(params, cfg, prompts, 64, mesh=mesh)   # the cache is sharded too
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .blocks.base import BLOCKS
from .config import Config
from .formats import is_quantized
from .params import key_str, spec_table

__all__ = ["AXES", "RULES", "ShardingError", "make_mesh", "logical_axes", "param_shardings", "shard_params",
           "cache_shardings", "shard_cache", "mesh_axis_size", "expert_parallel",
           "parameter_bytes_per_device", "cache_bytes_per_device", "cache_specs", "leading_spec"]

AXES = ("data", "expert", "tensor")
RULES = {
    "batch": "data",
    "expert": "expert",
    "vocab": "tensor",
    "heads": "tensor",  # attention q heads, KV heads
    "mamba": "tensor",  # Mamba in_proj rows, conv channels, heads, inner channels
    "mlp": "tensor",  # MLP / shared-expert / routed-expert intermediate channels
    "embed": None,
}


class ShardingError(ValueError):
    """A mesh or sharding request that cannot work (message names the argument)."""


def make_mesh(data: int = 1, expert: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A ``("data", "expert", "tensor")`` mesh over ``devices`` (default: all), data-major."""
    devices = list(jax.devices() if devices is None else devices)
    for name, v in (("data", data), ("expert", expert), ("tensor", tensor)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ShardingError(f"{name}={v!r}: mesh axis sizes must be integers >= 1")
    if data * expert * tensor != len(devices):
        raise ShardingError(f"mesh {data}x{expert}x{tensor} needs {data * expert * tensor} devices, "
                            f"{len(devices)} are available")
    return Mesh(np.array(devices, dtype=object).reshape(data, expert, tensor), AXES)


def mesh_axis_size(mesh: Mesh | None, axis: str | None) -> int:
    return 1 if mesh is None or axis is None else int(mesh.shape[axis])


def logical_axes(cfg: Config, path: str, ndim: int) -> tuple:
    """Logical axis names of a float parameter of a ``cfg`` model (dot path as in ``params.tree_paths``), one per
    dimension: those its :class:`nemojax.blocks.base.Spec` declares (``params.spec_table``)."""
    return _declared_axes(spec_table(cfg), path, ndim)


def _declared_axes(table: dict, path: str, ndim: int) -> tuple:
    spec = table.get(path)
    if spec is None or len(spec.axes) != ndim:
        raise ShardingError(f"no sharding rule for parameter {path!r} with {ndim} dimension(s)")
    return spec.axes


def _spec(shape, logical, mesh: Mesh, block_dims: dict | None = None) -> P:
    """PartitionSpec for ``shape``: each logical axis -> its mesh axis when that divides the dimension (or, for
    a dimension listed in ``block_dims``, the number of whole blocks ``block_dims[i]``), else replicated."""
    out, used = [], set()
    for i, (n, name) in enumerate(zip(shape, logical)):
        ax = RULES.get(name) if name else None
        size = mesh_axis_size(mesh, ax)
        units = (block_dims or {}).get(i, n)
        if ax is None or size == 1 or ax in used or units % size:
            out.append(None)
        else:
            out.append(ax)
            used.add(ax)
    return P(*out)


def _node_specs(node, logical, mesh: Mesh):
    """PartitionSpecs for a quantized node's leaves from the logical axes of the float weight it encodes."""
    return node.partition_specs(logical, lambda shape, lg, blocks=None: _spec(shape, lg, mesh, blocks))


def _no_mlp_split(logical):
    return tuple(None if a == "mlp" else a for a in logical)


def _bank_logical(node, logical):
    """A routed-expert bank's logical axes: its intermediate channels whole when the format cannot split its input
    dimension inside the MoE's shard_map (both banks then keep them whole, see bank_specs)."""
    return logical if node.input_split_in_shard_map else _no_mlp_split(logical)


def _pspecs(params, cfg: Config, mesh: Mesh):
    table = spec_table(cfg)

    def one(kpath, leaf):
        path = ".".join(key_str(k) for k in kpath)
        if is_quantized(leaf):
            logical = _declared_axes(table, path, len(leaf.shape))
            if table[path].stacked:
                logical = _bank_logical(leaf, logical)  # see bank_specs
            return _node_specs(leaf, logical, mesh)
        return _spec(np.shape(leaf), _declared_axes(table, path, len(np.shape(leaf))), mesh)

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_quantized)


def param_shardings(params, cfg: Config, mesh: Mesh):
    """A pytree like ``params`` of a ``cfg`` model (arrays, quantized nodes or ``ShapeDtypeStruct``s) of
    ``NamedSharding``s."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), _pspecs(params, cfg, mesh),
                        is_leaf=lambda x: isinstance(x, P))


def shard_params(params, cfg: Config, mesh: Mesh):
    """``params`` placed on ``mesh`` per :data:`RULES` (one ``device_put`` of the tree)."""
    return jax.device_put(params, param_shardings(params, cfg, mesh))


def expert_parallel(mesh: Mesh | None, n_experts: int) -> bool:
    """Whether the routed experts run under ``shard_map`` on this mesh."""
    return mesh is not None and (mesh_axis_size(mesh, "expert") > 1 or mesh_axis_size(mesh, "tensor") > 1)


def _bank_specs(bank, logical, mesh):
    if is_quantized(bank):
        return _node_specs(bank, _bank_logical(bank, logical), mesh)
    return _spec(bank.shape, logical, mesh)


def leading_spec(spec) -> tuple:
    """The PartitionSpec (as a tuple) of a bank's main array: the spec itself for a plain array, the first leaf's
    for a node of specs (its bank and row axes are the float weight's)."""
    return tuple(jax.tree.leaves(spec, is_leaf=lambda x: isinstance(x, P))[0] if is_quantized(spec) else spec)


def bank_specs(up, down, mesh: Mesh):
    """PartitionSpecs of a layer's routed-expert banks (arrays or nodes) inside the MoE ``shard_map``: experts over
    ``expert``; the intermediate channels over ``tensor`` only when both banks can split them."""
    lu, ld = ("expert", "mlp", "embed"), ("expert", "embed", "mlp")
    su, sd = _bank_specs(up, lu, mesh), _bank_specs(down, ld, mesh)
    fu, fd = leading_spec(su), leading_spec(sd)
    if (fu[1] == "tensor") != (fd[2] == "tensor") or fu[0] != fd[0]:
        su, sd = _bank_specs(up, _no_mlp_split(lu), mesh), _bank_specs(down, _no_mlp_split(ld), mesh)
    return su, sd


# ------------------------------------------------------------------------------------------------ cache
def cache_specs(cache, cfg: Config, mesh):
    """PartitionSpecs for a :class:`nemojax.cache.Cache` (arrays or ``ShapeDtypeStruct``s): batch over data; KV
    heads and Mamba heads / conv channels over tensor (replicated where the axis does not divide them), as each block
    kind's ``state_axes`` declare."""
    def layer(kind, st):  # the axes the layer's block kind declares for its state
        return {name: _spec(a.shape, BLOCKS[kind].state_axes[name], mesh) for name, a in st.items()}

    return cache.replace(layers=tuple(layer(k, st) for k, st in zip(cfg.pattern, cache.layers)),
                         mask=_spec(cache.mask.shape, ("batch", None), mesh), pos=P())


def cache_shardings(cache, cfg: Config, mesh: Mesh):
    """NamedShardings for a cache (see :func:`cache_specs`)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), cache_specs(cache, cfg, mesh),
                        is_leaf=lambda x: isinstance(x, P))


def shard_cache(cache, cfg: Config, mesh: Mesh):
    return jax.device_put(cache, cache_shardings(cache, cfg, mesh))


def constrain_cache(cache, cfg: Config, mesh: Mesh):
    """Inside jit: keep the new cache on the cache shardings (so donation and the next step see the same)."""
    return jax.lax.with_sharding_constraint(cache, cache_shardings(cache, cfg, mesh))


# ------------------------------------------------------------------------------------------------ memory
def parameter_bytes_per_device(params_abstract, cfg: Config, mesh_shape: dict) -> int:
    """Bytes of parameters (of a ``cfg`` model) one device holds for a mesh of ``mesh_shape`` ({"data": d,
    "expert": e, "tensor": t}); ``params_abstract`` may hold ``ShapeDtypeStruct``s (nothing is allocated)."""
    return _bytes_per_device(params_abstract, _pspecs(params_abstract, cfg, _FakeMesh(mesh_shape)), mesh_shape)


def cache_bytes_per_device(cfg: Config, batch: int, max_len: int, mesh_shape: dict, dtype=jnp.bfloat16) -> int:
    """Bytes of a generation cache one device holds (batch over data, heads over tensor); allocates nothing."""
    from .cache import init_cache

    abstract = jax.eval_shape(lambda: init_cache(cfg, batch, max_len, dtype))
    return _bytes_per_device(abstract, cache_specs(abstract, cfg, _FakeMesh(mesh_shape)), mesh_shape)


def _bytes_per_device(tree, specs, mesh_shape: dict) -> int:
    total = 0
    leaves = jax.tree.leaves(tree)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    assert len(leaves) == len(spec_leaves)
    for a, s in zip(leaves, spec_leaves):
        n = math.prod(a.shape) * jnp.dtype(a.dtype).itemsize
        for ax in s:
            if ax is not None:
                n //= int(mesh_shape.get(ax, 1))
        total += n
    return total


class _FakeMesh:
    """Enough of a Mesh (``.shape``) to compute specs without devices."""

    def __init__(self, shape: dict):
        self.shape = {a: int(shape.get(a, 1)) for a in AXES}
