"""A small safetensors reader/writer on NumPy + ml_dtypes (handles F8_E4M3 etc., which safetensors' own
numpy loader cannot), with memory-mapped, zero-copy tensor access and errors that name file and tensor.

Format: 8-byte little-endian header length n, n bytes of JSON ``{name: {dtype, shape, data_offsets:[b, e]},
"__metadata__": {...}}``, then the data buffer; offsets are relative to the buffer start.
"""
from __future__ import annotations

import json
import math
import os
import struct
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

__all__ = ["SafetensorsError", "SafeFile", "save_file", "DTYPES", "DTYPE_NAMES", "tensor_entry", "encode_header"]

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}  # NumPy dtype -> safetensors dtype name
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A missing, truncated or corrupt safetensors file or tensor; the message names the file and tensor."""


class SafeFile:
    """Lazily opened safetensors file: ``keys()``, ``shape(name)``, ``dtype(name)``, ``get(name)`` (a read-only
    memory map, no copy)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise SafetensorsError(f"{self.path}: corrupt safetensors header (file shorter than 8 bytes)")
                (n,) = struct.unpack("<Q", head)
                if n > min(size - 8, _MAX_HEADER):
                    raise SafetensorsError(f"{self.path}: corrupt safetensors header (header length {n} exceeds "
                                           f"the file size {size})")
                raw = f.read(n)
        except FileNotFoundError:
            raise SafetensorsError(f"{self.path}: file not found") from None
        try:
            header = json.loads(raw.decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError("not a JSON object")
        except (UnicodeDecodeError, ValueError) as e:
            raise SafetensorsError(f"{self.path}: corrupt safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._base = 8 + n
        self._data_size = size - self._base
        self._info = {}
        for name, info in header.items():
            try:
                dt = DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                b, e = (int(v) for v in info["data_offsets"])
            except KeyError as ex:
                raise SafetensorsError(f"{self.path}: corrupt header entry for tensor {name!r} "
                                       f"(missing or unknown {ex})") from None
            except (TypeError, ValueError) as ex:
                raise SafetensorsError(f"{self.path}: corrupt header entry for tensor {name!r} ({ex})") from None
            if e - b != math.prod(shape) * dt.itemsize or b < 0:
                raise SafetensorsError(f"{self.path}: corrupt header entry for tensor {name!r}: offsets {b}..{e} "
                                       f"do not hold {info['dtype']}{list(shape)}")
            if e > self._data_size:
                raise SafetensorsError(f"{self.path}: truncated file: tensor {name!r} needs bytes up to {e} of the "
                                       f"data section but the file has only {self._data_size}")
            self._info[name] = (dt, shape, b)

    def keys(self) -> list[str]:
        return list(self._info)

    def __contains__(self, name) -> bool:
        return name in self._info

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1]

    def dtype(self, name: str) -> np.dtype:
        return self._entry(name)[0]

    def _entry(self, name):
        try:
            return self._info[name]
        except KeyError:
            raise SafetensorsError(f"{self.path}: no tensor {name!r}") from None

    def get(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view of the tensor (no copy)."""
        dt, shape, b = self._entry(name)
        if math.prod(shape) == 0:
            return np.zeros(shape, dt)
        return np.memmap(self.path, dtype=dt, mode="r", offset=self._base + b, shape=shape)


def tensor_entry(name: str, a, offset: int, where: str) -> tuple[dict, int]:
    """The header entry of array ``a`` stored at ``offset`` of the data section, and its byte count
    (SafetensorsError naming ``where`` and the tensor for a dtype safetensors cannot hold)."""
    dt = np.dtype(a.dtype)
    if dt not in DTYPE_NAMES:
        raise SafetensorsError(f"{where}: tensor {name!r} has unsupported dtype {dt}")
    nb = math.prod(a.shape) * dt.itemsize
    return {"dtype": DTYPE_NAMES[dt], "shape": list(a.shape), "data_offsets": [offset, offset + nb]}, nb


def encode_header(header: dict, metadata: Mapping[str, str] | None) -> bytes:
    """The bytes before the data section: the 8-byte length, then the JSON header padded to 8 bytes."""
    if metadata:
        header = {**header, "__metadata__": dict(metadata)}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def save_file(tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]], path: str | os.PathLike,
              metadata: Mapping[str, str] | None = None) -> None:
    """Write NumPy arrays (any dtype in ``DTYPES``, ml_dtypes included) as a safetensors file, one tensor at a
    time (the arrays may be memory maps)."""
    items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
    header, off = {}, 0
    for name, a in items:
        header[name], nb = tensor_entry(name, a, off, os.fspath(path))
        off += nb
    with open(path, "wb") as f:
        f.write(encode_header(header, metadata))
        for _, a in items:
            np.ascontiguousarray(a).reshape(-1).tofile(f)
