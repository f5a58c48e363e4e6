"""A checkpoint folder as a set of tensors: which safetensors files form the checkpoint (the Hugging Face
convention), where each tensor is, its naming, and the folder's quantization configs.

The files of a checkpoint are those of ``model.safetensors.index.json`` when it exists, else
``model.safetensors``, else one set of shards named ``PREFIX-NNNNN-of-NNNNN.safetensors``. Any other
``*.safetensors`` beside them (an adapter, a reference file, a stale copy) is not part of the checkpoint.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from .modelopt import read_quant_config
from .polar import read_polar_config
from .safetensors import SafeFile, SafetensorsError

__all__ = ["CheckpointError", "Checkpoint", "checkpoint_files", "hf5_name", "naming_function",
           "read_quant_configs", "INDEX"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_SHARD = re.compile(r"^(.+)-(\d{5})-of-(\d{5})\.safetensors$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, unexpected or mis-shaped tensors, bad files."""


def _shard_set(folder: str) -> list[str]:
    """The files of the one ``PREFIX-NNNNN-of-NNNNN.safetensors`` shard set of ``folder`` (sorted)."""
    names = sorted(os.listdir(folder))
    sets: dict[tuple[str, str], list[str]] = {}
    for f in names:
        m = _SHARD.match(f)
        if m:
            sets.setdefault((m.group(1), m.group(3)), []).append(f)
    if not sets:
        stray = [f for f in names if f.endswith(".safetensors")]
        ignored = f" (not part of a checkpoint: {', '.join(stray)})" if stray else ""
        raise CheckpointError(f"{folder}: no {SINGLE}, {INDEX} or *-NNNNN-of-NNNNN.safetensors shard set"
                              f"{ignored}")
    if len(sets) > 1:
        kinds = ", ".join(f"{p}-*-of-{n}.safetensors" for p, n in sorted(sets))
        raise CheckpointError(f"{folder}: several shard sets ({kinds}) and no {INDEX} to choose one")
    ((prefix, total), files), = sets.items()
    if len(files) != int(total):
        raise CheckpointError(f"{folder}: the shard set {prefix}-*-of-{total}.safetensors is incomplete "
                              f"({len(files)} of {int(total)} files: {', '.join(files)})")
    return files


def checkpoint_files(folder: str) -> tuple[str | None, list[str]]:
    """``(index file or None, the safetensors file names)`` of a checkpoint folder (see the module docstring)."""
    if os.path.exists(os.path.join(folder, INDEX)):
        return os.path.join(folder, INDEX), []
    if os.path.exists(os.path.join(folder, SINGLE)):
        return None, [SINGLE]
    return None, _shard_set(folder)


class Checkpoint:
    """All tensors of a checkpoint folder: ``names``, ``file_of(name)``, ``shape``, ``dtype``, ``get(name)``
    (memory-mapped) and ``naming``."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise CheckpointError(f"{self.path}: not a folder")
        self._files: dict[str, SafeFile] = {}
        self._where: dict[str, SafeFile] = {}
        index, files = checkpoint_files(self.path)
        if index is not None:
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (ValueError, KeyError, TypeError, RecursionError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
            if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                           for k, v in weight_map.items()):
                raise CheckpointError(f"{index}: 'weight_map' must map tensor names to file names (strings)")
            root = os.path.realpath(self.path)
            for name, fname in weight_map.items():
                fpath = os.path.realpath(os.path.join(self.path, fname))
                if fpath == root or os.path.commonpath([fpath, root]) != root:
                    raise CheckpointError(f"{index}: tensor {name!r} is listed in {fname!r}, which is not a file of "
                                          f"the checkpoint folder {self.path}")
                sf = self._open(fpath)
                if name not in sf:
                    raise CheckpointError(f"{index}: tensor {name!r} is listed in {fname} but that file does not "
                                          f"contain it")
                self._where[name] = sf
        for fname in files:
            sf = self._open(os.path.join(self.path, fname))
            for name in sf.keys():
                if name in self._where:
                    raise CheckpointError(f"{self.path}: tensor {name!r} appears in both "
                                          f"{os.path.basename(self._where[name].path)} and {fname}")
                self._where[name] = sf

    def _open(self, fpath: str) -> SafeFile:
        if fpath not in self._files:
            try:
                self._files[fpath] = SafeFile(fpath)
            except SafetensorsError as e:
                raise CheckpointError(str(e)) from None
        return self._files[fpath]

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name) -> bool:
        return name in self._where

    def file_of(self, name: str) -> str:
        return self._where[name].path

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self._where[name].dtype(name)

    def get(self, name: str) -> np.ndarray:
        return self._where[name].get(name)

    @property
    def naming(self) -> str:
        """'original' (``backbone.*``) or 'hf5' (``model.*``)."""
        if any(n.startswith("backbone.") for n in self._where):
            return "original"
        if any(n.startswith("model.") for n in self._where):
            return "hf5"
        raise CheckpointError(f"{self.path}: no 'backbone.*' or 'model.*' tensors: not a Nemotron-H checkpoint")


def hf5_name(name: str) -> str:
    """An original-naming tensor name (``backbone.*``) in transformers-5 naming (``model.*``)."""
    return "model." + name[len("backbone."):] if name.startswith("backbone.") else name


def naming_function(naming: str):
    """Original-naming name -> the name in ``naming`` ('original' | 'hf5')."""
    if naming not in ("original", "hf5"):
        raise ValueError(f"naming={naming!r}: expected 'original' or 'hf5'")
    return (lambda n: n) if naming == "original" else hf5_name


def read_quant_configs(folder: str) -> dict:
    """The parsed quantization configs of a checkpoint folder (validated; None where absent), as the formats'
    ``read`` takes them: ``{"modelopt": hf_quant_config.json or config.json's quantization_config, "polar":
    polar_config.json}``."""
    return {"modelopt": read_quant_config(folder), "polar": read_polar_config(folder)}
