"""The parameter pytree -> a Hugging Face safetensors checkpoint: tensor names (:func:`param_tensors`, the
formats' own tensors for quantized nodes), the quantization configs (ModelOpt / polarengine), config.json, and
the streaming shard writer (:class:`ShardWriter`, sharded safetensors with an index)."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Iterator

import jax
import numpy as np

from ..config import Config
from ..formats import QuantFormat, is_quantized
from ..params import Spec, param_specs, tree_paths
from .modelopt import config_quantization, hf_quant_config, linear_modules
from .output import ConvertError, DiskFullError, check_size, insert_front, write_array
from .plan import flat_params
from .safetensors import ALIGN, SafetensorsError, encode_header, save_file, tensor_entry
from .source import INDEX, hf5_name, naming_function

__all__ = ["ShardWriter", "checkpoint_tensors", "param_tensors", "expert_spec", "quant_modules",
           "write_quant_configs", "write_config", "save_params"]

_TAIL_MAX = 1 << 16  # bytes: larger unaligned tensors are written in place


class ShardWriter:
    """Streams ``(name, array)`` pairs into safetensors shards of at most ``max_shard_bytes`` (a tensor larger
    than that gets a shard of its own). Tensor bytes go straight to a per-shard data file, so memory holds no
    more than the tensor being written; when a shard is full the final file is header + the data copied over.
    ``close()`` names the shards ``model-0000k-of-0000N.safetensors`` and writes ``model.safetensors.index.json``;
    ``abort()`` closes the open file after an error (the caller removes the folder). Small tensors whose size is
    not a multiple of ``ALIGN`` bytes (scalar scales) are held back and stored at the end of their shard, so the
    others start aligned (``load(..., mmap=True)`` can alias them).
    """

    def __init__(self, folder: str, max_shard_bytes: int):
        self.folder = folder
        self.max = int(max_shard_bytes)
        self.shards: list[tuple[str, list[str]]] = []  # (temp file, tensor names)
        self.total = 0
        self._data = None
        self._header: dict = {}
        self._size = 0
        self._written = 0
        self._tail: list = []

    def _open(self):
        k = len(self.shards) + 1
        self._data_path = os.path.join(self.folder, f".shard-{k:05d}.data")
        self._data = open(self._data_path, "wb")
        self._header, self._size, self._written, self._tail = {}, 0, 0, []

    def _write(self, name: str, a: np.ndarray, nb: int) -> None:
        self._header[name]["data_offsets"] = [self._written, self._written + nb]
        write_array(self._data, a, self._data_path)
        self._written += nb

    def add(self, name: str, a: np.ndarray) -> None:
        a = np.asarray(a)
        try:
            entry, nb = tensor_entry(name, a, 0, self.folder)
        except SafetensorsError as e:
            raise ConvertError(str(e)) from None
        if self._data is not None and self._size and self._size + nb > self.max:
            self._flush()
        if self._data is None:
            self._open()
        self._header[name] = entry
        if nb % ALIGN and nb <= _TAIL_MAX:
            self._tail.append((name, np.array(a), nb))
        else:
            self._write(name, a, nb)
        self._size += nb
        self.total += nb

    def _flush(self) -> None:
        for name, a, nb in self._tail:
            self._write(name, a, nb)
        self._tail = []
        self._data.close()
        self._data = None
        k = len(self.shards) + 1
        path = os.path.join(self.folder, f".shard-{k:05d}.safetensors")
        if not self._header_in_place(path):  # header + a copy of the data: a shard's worth of extra disk for a moment
            with open(path, "wb") as out, open(self._data_path, "rb") as src:
                head = encode_header(self._header, {"format": "pt"})
                out.write(head)
                shutil.copyfileobj(src, out, 16 << 20)
                check_size(out, len(head) + self._size, path)
            os.remove(self._data_path)
        self.shards.append((path, list(self._header)))

    def _header_in_place(self, path: str) -> bool:
        """Put the header in front of the data file without copying the data (``output.insert_front``; the header
        padded to the filesystem's block size), so writing never needs more disk than the output; False (nothing
        changed) where the filesystem cannot."""
        block = os.statvfs(self.folder).f_bsize
        if block <= 0 or block % ALIGN:
            return False
        head = encode_header(self._header, {"format": "pt"}, align=block)
        fd = os.open(self._data_path, os.O_RDWR)
        try:
            if not insert_front(fd, len(head), path):
                return False
            if os.pwrite(fd, head, 0) != len(head):
                raise DiskFullError(path, need=len(head), what="writing the header")
            have, size = os.fstat(fd).st_size, len(head) + self._size
            if have < size:
                raise DiskFullError(path, need=size - have, what=f"writing ({have} of {size} bytes on disk)")
        finally:
            os.close(fd)
        os.replace(self._data_path, path)
        return True

    def abort(self) -> None:
        if self._data is not None:
            self._data.close()
            self._data = None

    def close(self) -> list[str]:
        if self._data is not None:
            self._flush()
        n = len(self.shards)
        weight_map, files = {}, []
        for k, (tmp, names) in enumerate(self.shards, 1):
            fname = f"model-{k:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, os.path.join(self.folder, fname))
            files.append(fname)
            weight_map.update({name: fname for name in names})
        with open(os.path.join(self.folder, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": self.total}, "weight_map": weight_map}, f, indent=2)
        return files


def expert_spec(spec: Spec, e: int) -> Spec:
    """The spec of expert ``e`` of a stacked bank, as a parameter of its own (its checkpoint tensor's name)."""
    return dataclasses.replace(spec, shape=spec.shape[1:], axes=spec.axes[1:], ckpt=spec.ckpt.format(e=e),
                               stacked=False)


def _module_nodes(spec: Spec, node: QuantFormat, conv=lambda n: n) -> list[tuple[str, QuantFormat]]:
    """``(module name, 2-D node with NumPy leaves)`` pairs of a quantized leaf (one per expert for a bank)."""
    host = jax.tree.map(np.asarray, node)
    if not spec.stacked:
        return [(conv(spec.ckpt.removesuffix(".weight")), host)]
    return [(conv(spec.ckpt.format(e=e).removesuffix(".weight")), jax.tree.map(lambda a: a[e], host))
            for e in range(spec.shape[0])]


def param_tensors(path: str, spec: Spec | None, leaf, naming: str = "original") -> Iterator[tuple[str, np.ndarray]]:
    """``(checkpoint name, array)`` pairs of one parameter ``leaf`` at ``path`` (``spec`` None: an FP8 KV-cache
    scale ``layers.i.mixer.k_scale`` -> ``k_proj.k_scale``): per-expert tensors for 'original' naming, the stacked
    ``mixer.experts.*`` tensor for 'hf5'; conv1d gets its [C, 1, K] checkpoint shape back; a quantized node its
    format's tensors (``QuantFormat.checkpoint_tensors``, always per expert)."""
    conv = naming_function(naming)
    if spec is None:
        i, key = path.split(".")[1], path.rsplit(".", 1)[1]
        yield conv(f"backbone.layers.{i}.mixer.{key[0]}_proj.{key}"), np.asarray(leaf, np.float32).reshape(())
    elif is_quantized(leaf):
        for mod, node in _module_nodes(spec, leaf, conv):
            yield from node.checkpoint_tensors(mod)
    elif spec.stacked:
        a = np.asarray(leaf)
        if naming == "hf5":
            yield hf5_name(spec.ckpt.replace(".{e}", "").removesuffix(".weight")), a
        else:
            for e in range(a.shape[0]):
                yield spec.ckpt.format(e=e), a[e]
    else:
        a = np.asarray(leaf)
        yield conv(spec.ckpt), a.reshape(spec.ckpt_shape) if spec.ckpt_shape else a


def checkpoint_tensors(params: dict, cfg: Config, naming: str = "original") -> Iterator[tuple[str, np.ndarray]]:
    """The parameter pytree as ``(checkpoint name, array)`` pairs (:func:`param_tensors` of every leaf)."""
    naming_function(naming)  # a bad naming fails before anything is produced
    specs = dict(tree_paths(param_specs(cfg)))
    for path, leaf in flat_params(params):
        yield from param_tensors(path, None if path.endswith((".k_scale", ".v_scale")) else specs[path], leaf, naming)


def quant_modules(params: dict, cfg: Config) -> Iterator[tuple[str, QuantFormat]]:
    """``(module name, 2-D node)`` of every quantized module of a pytree (experts one by one), original naming."""
    specs = dict(tree_paths(param_specs(cfg)))
    for path, leaf in flat_params(params):
        if is_quantized(leaf):
            yield from _module_nodes(specs[path], leaf)


def write_quant_configs(folder: str, conf: dict, cfg: Config, entries: dict, kv_fp8: bool) -> None:
    """The quantization configs of a checkpoint whose quantized modules are ``entries`` (``{format: {module:
    QuantFormat.config_entry()}}``): ModelOpt formats write ``hf_quant_config.json`` and set ``conf``'s (config.json)
    ``quantization_config`` (every other linear excluded; ``kv_fp8``: the FP8 KV-cache scales), polarengine
    writes ``polar_config.json``."""
    modelopt = None
    for fmt, mods in entries.items():
        family, qc = fmt.quant_config(mods)
        if family == "modelopt":
            if modelopt is not None:
                raise ValueError(f"a checkpoint holds one ModelOpt format, got {modelopt} and {fmt.name}")
            modelopt = fmt.name
            exclude = [m for m in linear_modules(cfg) if m not in mods]
            conf["quantization_config"] = config_quantization(qc, exclude, kv_fp8)
            with open(os.path.join(folder, "hf_quant_config.json"), "w") as f:
                json.dump(hf_quant_config(qc, exclude, kv_fp8), f, indent=4)
        elif family == "polar":
            with open(os.path.join(folder, "polar_config.json"), "w") as f:
                json.dump(qc, f, indent=2)
        else:
            raise ValueError(f"{fmt.name}: unknown quantization config family {family!r}")


def write_config(folder: str, cfg: Config, entries: dict, kv_fp8: bool) -> None:
    """config.json and the quantization configs (:func:`write_quant_configs`) of a checkpoint."""
    conf = cfg.to_dict()
    write_quant_configs(folder, conf, cfg, entries, kv_fp8)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(conf, f, indent=2)


def save_params(params: dict, cfg: Config, folder: str | os.PathLike, *, naming: str = "original",
                max_shard_bytes: int | None = None) -> None:
    """Write config.json and safetensors (sharded with an index when ``max_shard_bytes`` is set).

    A quantized pytree is written in its formats' layouts with their configs (NVFP4: ModelOpt's
    ``hf_quant_config.json`` and a ``quantization_config`` in config.json, so vLLM / SGLang /
    transformers+ModelOpt read it; HLWQ: polarengine layout B and ``polar_config.json``)."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    entries: dict = {}
    for mod, node in quant_modules(params, cfg):
        entries.setdefault(type(node), {})[mod] = node.config_entry()
    kv = any("k_scale" in params["layers"][i]["mixer"] for i in cfg.layer_indices("*"))
    write_config(folder, cfg, entries, kv)
    tensors = checkpoint_tensors(params, cfg, naming)
    if not max_shard_bytes:
        save_file(list(tensors), os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return
    writer = ShardWriter(folder, max_shard_bytes)
    try:
        for name, a in tensors:
            writer.add(name, a)
        writer.close()
    finally:
        writer.abort()
