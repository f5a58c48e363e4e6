"""A small safetensors reader/writer on NumPy + ml_dtypes (handles F8_E4M3 etc., which safetensors' own
numpy loader cannot), with memory-mapped, zero-copy tensor access and errors that name file and tensor.

Format: 8-byte little-endian header length n, n bytes of JSON ``{name: {dtype, shape, data_offsets:[b, e]},
"__metadata__": {...}}``, then the data buffer; offsets are relative to the buffer start.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

from .output import check_size, write_array

__all__ = ["SafetensorsError", "SafeFile", "save_file", "DTYPES", "DTYPE_NAMES", "tensor_entry", "encode_header", "array_shape_ok",
           "ALIGN", "aligned_first"]

SMALL_TENSOR = 1 << 20  # bytes: below this a tensor's mapping reads no more than its own pages (SafeFile.get)

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_), "F8_E4M3FNUZ": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "F8_E5M2FNUZ": np.dtype(ml_dtypes.float8_e5m2fnuz), "C64": np.dtype(np.complex64),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}  # NumPy dtype -> safetensors dtype name
_MAX_HEADER = 100_000_000  # the official reader's limit (bytes)
# every dtype the official reader knows, with its size in bits (F4 / F6 are packed: readable header, no array)
_BITS = {**{k: 8 * v.itemsize for k, v in DTYPES.items()}, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
_USIZE = 2 ** 64 - 1  # the official reader's usize: larger shapes / offsets / byte counts are an overflow
_MAX_DEPTH = 127  # serde_json's nesting limit: 127 nested arrays / objects parse, 128 do not
_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')
_SURROGATE = re.compile("[\ud800-\udfff]")


class SafetensorsError(ValueError):
    """A missing, truncated or corrupt safetensors file or tensor; the message names the file and tensor."""


class SafeFile:
    """Lazily opened safetensors file: ``keys()``, ``shape(name)``, ``dtype(name)``, ``get(name)`` (a read-only
    memory map, no copy). Exactly as strict as the official Rust reader (``safetensors`` 0.8): every file it
    rejects is a SafetensorsError naming the file (and tensor), every file it accepts opens."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise SafetensorsError(f"{self.path}: corrupt safetensors header (file shorter than 8 bytes)")
                (n,) = struct.unpack("<Q", head)
                if n > _MAX_HEADER:
                    raise SafetensorsError(f"{self.path}: corrupt safetensors header (header length {n} exceeds "
                                           f"the limit of {_MAX_HEADER} bytes)")
                if n > size - 8:
                    raise SafetensorsError(f"{self.path}: corrupt safetensors header (header length {n} exceeds "
                                           f"the file size {size})")
                raw = f.read(n)
        except FileNotFoundError:
            raise SafetensorsError(f"{self.path}: file not found") from None
        except OSError as e:
            raise SafetensorsError(f"{self.path}: cannot read ({e})") from None
        metadata, entries = _parse_header(self.path, raw)
        self.metadata = metadata or {}
        self._base = 8 + n
        self._data_size = size - self._base
        self._info = {name: (e[0], e[1], e[2][0]) for name, e in entries.items()}
        _check_layout(self.path, entries, self._data_size)

    def keys(self) -> list[str]:
        return list(self._info)

    def __contains__(self, name) -> bool:
        return name in self._info

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1]

    def dtype(self, name: str) -> np.dtype:
        dt = self._entry(name)[0]
        if dt not in DTYPES:
            raise SafetensorsError(f"{self.path}: tensor {name!r} has dtype {dt}, which has no NumPy array form "
                                   f"(packed sub-byte elements)")
        return DTYPES[dt]

    def _entry(self, name):
        try:
            return self._info[name]
        except KeyError:
            raise SafetensorsError(f"{self.path}: no tensor {name!r}") from None

    def get(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view of the tensor (no copy).

        A tensor under ``SMALL_TENSOR`` bytes is mapped with ``MADV_RANDOM``: reading it faults in its own pages
        only, not the kernel's read-around window (``read_ahead_kb``, megabytes on some disks), which for the
        thousands of small tensors between the experts of a large checkpoint would read the whole file."""
        dt, shape, b = self.dtype(name), self.shape(name), self._entry(name)[2]
        if math.prod(shape) == 0:
            if not array_shape_ok(shape, dt.itemsize):
                raise SafetensorsError(f"{self.path}: tensor {name!r} is empty but its shape {list(shape)} has "
                                       f"dimensions no NumPy array can have")
            return np.zeros(shape, dt)
        a = np.memmap(self.path, dtype=dt, mode="r", offset=self._base + b, shape=shape)
        mm = getattr(a, "_mmap", None)  # numpy's mmap.mmap of the view
        if a.nbytes < SMALL_TENSOR and mm is not None and hasattr(mmap, "MADV_RANDOM"):
            mm.madvise(mmap.MADV_RANDOM)
        return a


def array_shape_ok(shape, itemsize: int) -> bool:
    """Whether NumPy can make an array of ``shape`` (its sizes are signed 64-bit, zero dimensions included)."""
    return math.prod(d for d in shape if d) * itemsize < 2 ** 63


class _Obj(list):
    """A JSON object as its (key, value) pairs in order, duplicates kept (the rules for duplicates differ)."""


class _Num:
    """A JSON number that is not a usize (negative, fractional, exponent or beyond 2**64 - 1)."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self):
        return self.text


def _parse_int(text: str):
    if text.startswith("-") or len(text) > 20 or int(text) > _USIZE:
        return _parse_float(text)  # serde_json reads these as i64 or f64: never a usize
    return int(text)


def _parse_float(text: str):
    if math.isinf(float(text)):
        raise ValueError(f"number out of range: {text[:40]}")
    return _Num(text)


def _no_constant(text: str):
    raise ValueError(f"{text} is not JSON")


def _load_json(path: str, raw: bytes):
    """The header as plain JSON under the official reader's rules: an object, UTF-8, no NaN / Infinity, no
    number out of the f64 range, no lone surrogate, at most ``_MAX_DEPTH`` levels deep."""
    try:
        text = raw.decode("utf-8")
        depth = 0
        for m in _TOKENS.finditer(text):
            c = m.group()
            if c in "[{":
                depth += 1
                if depth > _MAX_DEPTH:
                    raise ValueError(f"nested deeper than {_MAX_DEPTH} levels")
            elif c in "]}":
                depth -= 1
        value = json.loads(text, object_pairs_hook=_Obj, parse_int=_parse_int, parse_float=_parse_float,
                           parse_constant=_no_constant)
        stack = [value]
        while stack:
            v = stack.pop()
            if isinstance(v, str):
                if _SURROGATE.search(v):
                    raise ValueError("lone surrogate in a string")
            elif isinstance(v, _Obj):
                stack.extend(x for kv in v for x in kv)
            elif isinstance(v, list):
                stack.extend(v)
        if not isinstance(value, _Obj):
            raise ValueError("not a JSON object")
        return value
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise SafetensorsError(f"{path}: corrupt safetensors header ({e})") from None


def _usizes(v) -> bool:
    return type(v) is list and all(type(x) is int for x in v)  # _parse_int made every int a usize; no _Obj, bool


def _tensor_info(path: str, name: str, v) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    """(dtype name, shape, (begin, end)) of one header entry; serde's forms: an object with the three fields
    (unknown fields ignored, a repeated one an error) or a 3-element array; the dtype a name or {name: null}."""
    where = f"{path}: corrupt header entry for tensor {name!r}"
    if isinstance(v, _Obj):
        fields = {}
        for k, x in v:
            if k in ("dtype", "shape", "data_offsets"):
                if k in fields:
                    raise SafetensorsError(f"{where} (duplicate field {k!r})")
                fields[k] = x
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in fields]
        if missing:
            raise SafetensorsError(f"{where} (missing {missing[0]!r})")
        dt, shape, offsets = fields["dtype"], fields["shape"], fields["data_offsets"]
    elif isinstance(v, list) and len(v) == 3:
        dt, shape, offsets = v
    else:
        raise SafetensorsError(f"{where} (not an object with dtype, shape and data_offsets: {str(v)[:80]})")
    if isinstance(dt, _Obj) and len(dt) == 1 and dt[0][1] is None:
        dt = dt[0][0]
    if not isinstance(dt, str) or dt not in _BITS:
        raise SafetensorsError(f"{where} (missing or unknown dtype {str(dt)[:40]!r})")
    if not _usizes(shape):
        raise SafetensorsError(f"{where} (shape {str(shape)[:80]} is not a list of non-negative integers)")
    if not (_usizes(offsets) and len(offsets) == 2):
        raise SafetensorsError(f"{where}: data_offsets {str(offsets)[:80]} do not hold two non-negative "
                               f"integer byte offsets")
    return dt, tuple(shape), tuple(offsets)


def _parse_header(path: str, raw: bytes):
    """(metadata or None, {name: (dtype name, shape, (begin, end))}) of a header, the official reader's rules:
    ``__metadata__`` absent, null or a string -> string map, given once; a repeated tensor name keeps its last
    entry (each is checked)."""
    metadata, seen, entries = None, False, {}
    for name, v in _load_json(path, raw):
        if name == "__metadata__":
            if seen:
                raise SafetensorsError(f"{path}: corrupt safetensors header (duplicate __metadata__)")
            seen = True
            if v is None:
                continue
            if not (isinstance(v, _Obj) and all(isinstance(x, str) for _, x in v)):
                raise SafetensorsError(f"{path}: corrupt safetensors header (__metadata__ is not a map of "
                                       f"strings to strings: {str(v)[:80]})")
            metadata = dict(v)
        else:
            entries[name] = _tensor_info(path, name, v)
    return metadata, entries


def _check_layout(path: str, entries: dict, data_size: int) -> None:
    """Sorted by offsets the tensors tile the data buffer exactly: each begins where the previous one ends
    (the first at 0), holds prod(shape) x dtype size bytes, and the last one ends at the end of the file."""
    start = 0
    for name, (dt, shape, (b, e)) in sorted(entries.items(), key=lambda kv: kv[1][2]):
        if b != start or e < b:
            what = "overlap" if b < start else "gap" if b > start else "end before begin"
            raise SafetensorsError(f"{path}: corrupt header entry for tensor {name!r}: data_offsets {b}..{e} "
                                   f"do not follow the previous tensor, which ends at {start} ({what})")
        start = e
        nbits = 1
        for d in shape + (_BITS[dt],):
            nbits *= d
            if nbits > _USIZE:
                raise SafetensorsError(f"{path}: corrupt header entry for tensor {name!r}: the byte size of "
                                       f"{dt}{list(shape)} overflows")
        if nbits % 8 or e - b != nbits // 8:
            raise SafetensorsError(f"{path}: corrupt header entry for tensor {name!r}: offsets {b}..{e} do not "
                                   f"hold {dt}{list(shape)}")
    if start > data_size:
        last = max(entries, key=lambda k: entries[k][2])
        raise SafetensorsError(f"{path}: truncated file: tensor {last!r} needs bytes up to {start} of the data "
                               f"section but the file has only {data_size}")
    if start < data_size:
        raise SafetensorsError(f"{path}: corrupt file: {data_size - start} trailing bytes after the last tensor "
                               f"(the data section holds {start} bytes)")


def tensor_entry(name: str, a, offset: int, where: str) -> tuple[dict, int]:
    """The header entry of array ``a`` stored at ``offset`` of the data section, and its byte count
    (SafetensorsError naming ``where`` and the tensor for a dtype safetensors cannot hold)."""
    dt = np.dtype(a.dtype)
    if dt not in DTYPE_NAMES:
        raise SafetensorsError(f"{where}: tensor {name!r} has unsupported dtype {dt}")
    nb = math.prod(a.shape) * dt.itemsize
    return {"dtype": DTYPE_NAMES[dt], "shape": list(a.shape), "data_offsets": [offset, offset + nb]}, nb


ALIGN = 64  # XLA:CPU aliases a host buffer (``load(..., mmap=True)``) only at this alignment


def encode_header(header: dict, metadata: Mapping[str, str] | None, align: int = ALIGN) -> bytes:
    """The bytes before the data section: the 8-byte length, then the JSON header padded with spaces so that the
    data section starts at a multiple of ``align`` bytes (default ``ALIGN``; the header length stays a multiple
    of 8)."""
    if metadata:
        header = {**header, "__metadata__": dict(metadata)}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % align)
    return struct.pack("<Q", len(raw)) + raw


def aligned_first(sizes: list[int]) -> list[int]:
    """The order to store tensors of byte ``sizes`` in: those whose size is a multiple of ``ALIGN`` first (each
    then starts ``ALIGN``-aligned), the others after them, each group in its given order."""
    return sorted(range(len(sizes)), key=lambda i: sizes[i] % ALIGN != 0)


def save_file(tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]], path: str | os.PathLike,
              metadata: Mapping[str, str] | None = None) -> None:
    """Write NumPy arrays (any dtype in ``DTYPES``, ml_dtypes included) as a safetensors file, one tensor at a
    time (the arrays may be memory maps). The header lists them in the given order; the data section holds
    them in :func:`aligned_first` order, so that every tensor of a size in whole ``ALIGN`` blocks starts
    aligned."""
    items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
    entries = [tensor_entry(name, a, 0, os.fspath(path)) for name, a in items]
    order, off = aligned_first([nb for _, nb in entries]), 0
    for i in order:
        entries[i][0]["data_offsets"] = [off, off + entries[i][1]]
        off += entries[i][1]
    head = encode_header({name: e for (name, _), (e, _) in zip(items, entries)}, metadata)
    with open(path, "wb") as f:
        f.write(head)
        for i in order:
            write_array(f, items[i][1], os.fspath(path))
        check_size(f, len(head) + off, os.fspath(path))
