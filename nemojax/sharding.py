"""Sharding over a device mesh with JAX's own SPMD partitioner: data, expert and tensor parallelism.

A mesh has three axes, ``("data", "expert", "tensor")``. Every parameter gets *logical* axis names from its path
(``("expert", "mlp", "embed")`` for a routed-expert ``up_proj`` bank), and :data:`RULES` map logical names to
mesh axes: batch over ``data``; routed experts over ``expert``; attention heads, Mamba heads / inner channels,
MLP and expert intermediate channels and the vocabulary over ``tensor``; the hidden size replicated. A dimension
that the mesh axis does not divide is replicated instead (so any mesh works on any model), and a quantized
node's codes and scales follow the weight they encode, splitting the input dimension only at whole
quantization blocks (16 for NVFP4, 128 for HLWQ).

The routed-expert computation runs under ``shard_map`` when the expert or tensor axis is > 1
(:class:`nemojax.layers.moe.ExpertParallel`, what ``forward(..., mesh=mesh)`` uses): each device computes the
assignments of its local experts on its intermediate-channel slice and one ``psum`` combines them -- the expert
bank is never gathered.

    mesh = make_mesh(data=2, expert=2, tensor=2)
    params = shard_params(params, cfg, mesh)                # or load_sharded(path, cfg, mesh)
    logits = forward_jit(params, cfg, tokens, mesh=mesh)
    tokens = generate(params, cfg, prompts, 64, mesh=mesh)   # the cache is sharded too
"""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .config import Config
from .params import _key_str, is_spec, leaf_dtype, param_specs
from .quant.hlwq import BLOCK as HLWQ_BLOCK
from .quant.hlwq import HLWQWeight
from .quant.nvfp4 import BLOCK as NVFP4_BLOCK
from .quant.nvfp4 import NVFP4Weight

__all__ = ["AXES", "RULES", "ShardingError", "make_mesh", "logical_axes", "param_shardings", "shard_params",
           "cache_shardings", "shard_cache", "load_sharded", "mesh_axis_size", "expert_parallel",
           "parameter_bytes_per_device", "cache_bytes_per_device", "cache_specs"]

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


def logical_axes(path: str, ndim: int) -> tuple:
    """Logical axis names of a float parameter (dot path as in ``params.tree_paths``), one per dimension."""
    leaf = path.rsplit(".", 1)[-1]
    if path in ("embeddings", "lm_head"):
        return ("vocab", "embed")
    if leaf in ("norm", "norm_f") and ".mixer." not in path:
        return ("embed",)
    if ".mixer.experts." in path:
        return ("expert", "mlp", "embed") if leaf == "up_proj" else ("expert", "embed", "mlp")
    table = {
        "in_proj": ("mamba", "embed"), "conv1d": ("mamba", None), "conv1d_bias": ("mamba",),
        "dt_bias": ("mamba",), "A_log": ("mamba",), "D": ("mamba",), "norm": ("mamba",),
        "out_proj": ("embed", "mamba"),
        "q_proj": ("heads", "embed"), "k_proj": ("heads", "embed"), "v_proj": ("heads", "embed"),
        "o_proj": ("embed", "heads"),
        "up_proj": ("mlp", "embed"), "down_proj": ("embed", "mlp"),
        "gate": (None, "embed"), "e_score_correction_bias": (None,), "k_scale": (), "v_scale": (),
    }
    axes = table.get(leaf)
    if axes is None or len(axes) != ndim:
        raise ShardingError(f"no sharding rule for parameter {path!r} with {ndim} dimension(s)")
    return axes


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
    lead, k_axis = logical[:-2], len(logical) - 1
    if isinstance(node, NVFP4Weight):
        blocks = node.scale.shape[-1]  # K / 16
        s = _spec(node.packed.shape, logical, mesh, {k_axis: blocks})
        return node.replace(packed=s, scale=_spec(node.scale.shape, logical, mesh, {k_axis: blocks}),
                            scale_2=P(*s[:len(lead)]) if node.scale_2.ndim else P(),
                            input_scale=None if node.input_scale is None else
                            (P(*s[:len(lead)]) if node.input_scale.ndim else P()))
    blocks = node.norms.shape[-1]  # K_pad / 128
    s = _spec(node.packed.shape, logical, mesh, {k_axis: blocks})
    return node.replace(packed=s, norms=_spec(node.norms.shape, logical, mesh, {k_axis: blocks}),
                        table=P(*s[:len(lead)], None))


_is_q = lambda x: isinstance(x, (NVFP4Weight, HLWQWeight))  # noqa: E731


def _no_mlp_split(logical):
    return tuple(None if a == "mlp" else a for a in logical)


def _pspecs(params, mesh: Mesh):
    def one(kpath, leaf):
        path = ".".join(_key_str(k) for k in kpath)
        if _is_q(leaf):
            logical = logical_axes(path, len(leaf.shape))
            if isinstance(leaf, HLWQWeight) and ".mixer.experts." in path:
                logical = _no_mlp_split(logical)  # see bank_specs
            return _node_specs(leaf, logical, mesh)
        return _spec(np.shape(leaf), logical_axes(path, len(np.shape(leaf))), mesh)

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_q)


def param_shardings(params, mesh: Mesh):
    """A pytree like ``params`` (arrays, quantized nodes or ``ShapeDtypeStruct``s) of ``NamedSharding``s."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), _pspecs(params, mesh),
                        is_leaf=lambda x: isinstance(x, P))


def shard_params(params, cfg: Config, mesh: Mesh):
    """``params`` placed on ``mesh`` per :data:`RULES` (one ``device_put`` of the tree)."""
    del cfg  # the rules read the parameter paths and shapes
    return jax.device_put(params, param_shardings(params, mesh))


def expert_parallel(mesh: Mesh | None, n_experts: int) -> bool:
    """Whether the routed experts run under ``shard_map`` on this mesh."""
    return mesh is not None and (mesh_axis_size(mesh, "expert") > 1 or mesh_axis_size(mesh, "tensor") > 1)


def _bank_specs(bank, logical, mesh):
    if isinstance(bank, HLWQWeight):  # intermediate channels whole: the static in_features describes the row
        return _node_specs(bank, _no_mlp_split(logical), mesh)
    return _node_specs(bank, logical, mesh) if _is_q(bank) else _spec(bank.shape, logical, mesh)


def _first(spec):
    return tuple(spec.packed if _is_q(spec) else spec)


def bank_specs(up, down, mesh: Mesh):
    """PartitionSpecs of a layer's routed-expert banks (arrays or nodes) inside the MoE ``shard_map``: experts over
    ``expert``; the intermediate channels over ``tensor`` only when both banks can split them."""
    lu, ld = ("expert", "mlp", "embed"), ("expert", "embed", "mlp")
    su, sd = _bank_specs(up, lu, mesh), _bank_specs(down, ld, mesh)
    if (_first(su)[1] == "tensor") != (_first(sd)[2] == "tensor") or _first(su)[0] != _first(sd)[0]:
        su, sd = _bank_specs(up, _no_mlp_split(lu), mesh), _bank_specs(down, _no_mlp_split(ld), mesh)
    return su, sd


# ------------------------------------------------------------------------------------------------ cache
def cache_specs(cache, cfg: Config, mesh):
    """PartitionSpecs for a :class:`nemojax.cache.Cache` (arrays or ``ShapeDtypeStruct``s): batch over data; KV
    heads and Mamba heads / conv channels over tensor (replicated where the axis does not divide them)."""
    def layer(kind, st):
        if kind == "*":
            s = _spec(st["k"].shape, ("batch", None, "heads", None), mesh)
            return {"k": s, "v": s}
        if kind == "M":
            return {"conv": _spec(st["conv"].shape, ("batch", None, "mamba"), mesh),
                    "ssm": _spec(st["ssm"].shape, ("batch", "mamba", None, None), mesh)}
        return {}

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


# ------------------------------------------------------------------------------------------------ loading
def load_sharded(path: str | os.PathLike, cfg: Config, mesh: Mesh, dtype="bfloat16", *, progress: bool = False,
                 nvfp4_mode: str = "w4a16", hlwq_path: str = "dequant", base=None, read_log: list | None = None):
    """Load a safetensors checkpoint straight into shards: every device's slice of a float or NVFP4 parameter is
    read from the memory-mapped file by ``jax.make_array_from_callback`` (a device reads only its rows / its
    experts). HLWQ nodes (packed layouts differ per checkpoint) are read whole on the host, then placed.

    ``read_log`` (optional list) receives ``(path, index)`` for every slice read (for tests and diagnostics).
    """
    from .quant.modelopt import read_quant_config
    from .quant.polar import read_polar_config
    from .weights import Checkpoint, _progress, plan, read_hlwq_param, resolve_dtype

    dtype = resolve_dtype(dtype)
    ck = Checkpoint(path)
    read_quant_config(ck.path)
    pc = read_polar_config(ck.path)
    base_ck = Checkpoint(base) if base is not None else None
    items = plan(ck, cfg, base_ck)
    flat: dict = {}

    def sliced(leaf_path, shape, np_dtype, get, logical, block_dims=None):
        """A global array from ``get(index) -> np.ndarray`` (index: a tuple of slices of ``shape``)."""
        sharding = NamedSharding(mesh, _spec(shape, logical, mesh, block_dims))

        def cb(index):
            if read_log is not None:
                read_log.append((leaf_path, index))
            # an owned copy: on CPU a device array may alias (zero-copy) the file's memory map otherwise
            return np.array(get(index), dtype=np_dtype, copy=True, order="C")

        return jax.make_array_from_callback(tuple(shape), sharding, cb)

    def expert_reader(names, per_expert, sfx=""):
        def get(index):
            lo, hi, _ = index[0].indices(len(names))
            return np.stack([per_expert(names[e] + sfx)[index[1:]] for e in range(lo, hi)])
        return get

    bar = _progress(len(items), f"loading {os.path.basename(os.path.abspath(ck.path))} into {dict(mesh.shape)}",
                    progress)
    for path, spec, kind, names in items:
        if kind == "scalar":
            flat[path] = jax.device_put(np.array(ck.get(names[0]), np.float32).reshape(()),
                                        NamedSharding(mesh, P()))
        elif kind.startswith("hlwq"):
            node = jax.tree.map(np.asarray, read_hlwq_param(ck, spec, kind, names, pc, hlwq_path, np.stack))
            flat[path] = jax.device_put(node, jax.tree.map(lambda s: NamedSharding(mesh, s),
                                                           _node_specs(node, logical_axes(path, len(spec.shape)),
                                                                       mesh),
                                                           is_leaf=lambda x: isinstance(x, P)))
        elif kind.startswith("nvfp4"):
            logical = logical_axes(path, len(spec.shape))
            stacked = kind == "nvfp4_experts"
            N, K = spec.shape[-2:]
            lead = spec.shape[:-2]
            blocks = {len(logical) - 1: K // NVFP4_BLOCK}

            def part(sfx, shape, np_dtype, lg, bd):
                get = (expert_reader(names, ck.get, sfx) if stacked else (lambda idx, n=names[0] + sfx:
                                                                          ck.get(n)[idx]))
                if not shape[len(lead):]:  # per-tensor scalars: stacked per expert
                    get = (lambda idx: np.array([np.asarray(ck.get(names[e] + sfx)).reshape(())
                                                 for e in range(*idx[0].indices(len(names)))])) if stacked else \
                        (lambda idx: np.asarray(ck.get(names[0] + sfx)).reshape(()))
                return sliced(f"{path}{sfx}", shape, np_dtype, get, lg, bd)

            import ml_dtypes

            node = NVFP4Weight(
                part(".weight", (*lead, N, K // 2), np.uint8, logical, blocks),
                part(".weight_scale", (*lead, N, K // NVFP4_BLOCK), ml_dtypes.float8_e4m3fn, logical, blocks),
                part(".weight_scale_2", tuple(lead), np.float32, logical[:len(lead)], None),
                part(".input_scale", tuple(lead), np.float32, logical[:len(lead)], None)
                if all(m + ".input_scale" in ck for m in names) else None,
                nvfp4_mode)
            flat[path] = node
        else:
            np_dtype = np.dtype(leaf_dtype(spec, dtype))
            src = base_ck if kind == "base" else ck
            logical = logical_axes(path, len(spec.shape))
            if kind == "experts":
                get = expert_reader(names, src.get)
            else:  # one tensor (an hf5 stacked bank too); conv1d is stored [C, 1, K]
                get = (lambda idx, n=names[0], shape=spec.shape: src.get(n).reshape(shape)[idx])
            flat[path] = sliced(path, spec.shape, np_dtype, get, logical)
        bar.update(1)
    bar.close()
    from .orbax_io import _nest

    return _nest(flat)


# ------------------------------------------------------------------------------------------------ memory
def parameter_bytes_per_device(params_abstract, mesh_shape: dict) -> int:
    """Bytes of parameters one device holds for a mesh of ``mesh_shape`` ({"data": d, "expert": e, "tensor":
    t}); ``params_abstract`` may hold ``ShapeDtypeStruct``s (nothing is allocated)."""
    return _bytes_per_device(params_abstract, _pspecs(params_abstract, _FakeMesh(mesh_shape)), mesh_shape)


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
