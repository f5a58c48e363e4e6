"""Loading a safetensors checkpoint straight into shards over a device mesh (the placement of
``nemojax.sharding.param_shardings``: every parameter where the mesh rules put it)."""
from __future__ import annotations

import os

import jax
from jax.sharding import Mesh

from ..config import Config
from ..formats import QuantError
from ..formats.base import check_run_options
from ..sharding import param_shardings
from .plan import PlanItem, flat_params, nest
from .read import Reader, progress_bar, read_region, resolve_dtype
from .source import CheckpointError

__all__ = ["load_sharded"]


def _placement(mesh: Mesh, cfg: Config, path: str, leaf):
    """The ``NamedSharding`` (a node of them for a quantized node) of parameter ``path`` (an array, a node or
    their ``ShapeDtypeStruct``s) under the mesh rules."""
    return flat_params(param_shardings(nest({path: leaf}), cfg, mesh))[0][1]


def load_sharded(path: str | os.PathLike, cfg: Config, mesh: Mesh, dtype="bfloat16", *, progress: bool = False,
                 nvfp4_mode: str = "w4a16", hlwq_path: str = "dequant", base=None, read_log: list | None = None,
                 **run_options):
    """Load a safetensors checkpoint straight into shards: every device's slice of a float parameter, or of a
    quantized node whose leaves are its tensors as stored (NVFP4; ``QuantFormat.stored_fields``), is read from the
    memory-mapped file by ``jax.make_array_from_callback`` (a device reads only its rows / its experts). Other
    quantized nodes (HLWQ: packed layouts differ per checkpoint) are read whole on the host, then placed.

    ``read_log`` (optional list) receives ``(path, index)`` for every slice read (for tests and diagnostics).
    """
    dtype = resolve_dtype(dtype)
    options = {"nvfp4_mode": nvfp4_mode, "hlwq_path": hlwq_path, **run_options}
    check_run_options(**options)
    reader = Reader.open(path, cfg, base, options)
    ck = reader.ck

    def sliced(leaf_path, shape, sharding, get):
        """A global array from ``get(index) -> np.ndarray`` (index: a tuple of slices of ``shape``)."""
        def cb(index):
            if read_log is not None:
                read_log.append((leaf_path, index))
            return get(index)

        return jax.make_array_from_callback(tuple(shape), sharding, cb)

    def quantized(item: PlanItem):
        fields = item.fmt.stored_fields(ck, list(item.names), item.module_shape)
        if fields is None:  # built by converting the tensors: read whole on the host, then placed
            node = reader.node(item)
            return jax.device_put(node, _placement(mesh, cfg, item.path, node))
        # leaves = the tensors as stored: every device reads its slice of each
        lead = tuple(item.shape[:-2])
        try:
            node = item.fmt(**{f: jax.ShapeDtypeStruct((*lead, *shp), ck.dtype(item.names[0] + sfx))
                               for f, (sfx, shp) in fields.items()}).configure(**reader.run_options)
        except QuantError as e:
            raise CheckpointError(f"{ck.path}: {e}") from None
        shardings = _placement(mesh, cfg, item.path, node)
        leaves = {}
        for f, (sfx, shp) in fields.items():
            a = getattr(node, f)
            whole = (*lead, *shp)
            leaves[f] = sliced(f"{item.path}{sfx}", a.shape, getattr(shardings, f),
                               lambda idx, sfx=sfx, whole=whole, dt=a.dtype:
                               read_region(ck, item.names, whole, item.stacked, dt, idx, sfx))
        return node.replace(**leaves)

    flat: dict = {}
    bar = progress_bar(len(reader.items), f"loading {os.path.basename(os.path.abspath(ck.path))} into "
                                          f"{dict(mesh.shape)}", progress)
    for item in reader.items:
        if item.spec is None:  # FP8 KV scales
            scale = reader.float(item, dtype)
            flat[item.path] = jax.device_put(scale, _placement(mesh, cfg, item.path, scale))
        elif item.fmt is not None:
            flat[item.path] = quantized(item)
        else:
            abstract = jax.ShapeDtypeStruct(item.shape, reader.dtype_of(item, dtype))
            flat[item.path] = sliced(item.path, item.shape, _placement(mesh, cfg, item.path, abstract),
                                     lambda idx, item=item: reader.region(item, dtype, idx))
        bar.update(1)
    bar.close()
    return nest(flat)
