"""ShardWriter's shards: read back with the official ``safetensors`` reader, whether the header was put in front
of the data in place (``output.insert_front``: no copy, so writing never needs more disk than the output) or the
data was copied behind it (filesystems without ``FALLOC_FL_INSERT_RANGE``)."""
from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

import nemojax.checkpoint.write as write_mod
from nemojax.checkpoint.output import insert_front
from nemojax.checkpoint.safetensors import ALIGN
from nemojax.checkpoint.write import ShardWriter


def _tensors(rng) -> dict[str, np.ndarray]:
    """Random tensors of several dtypes and sizes, a few of them too small to start aligned (held to the end)."""
    out = {}
    for i in range(int(rng.integers(8, 14))):
        shape = tuple(int(d) for d in rng.integers(1, 90, size=int(rng.integers(1, 4))))
        dt = [np.float32, np.uint8, np.int32, ml_dtypes.bfloat16][i % 4]
        a = rng.standard_normal(shape) * 3
        out[f"layers.{i}.w"] = (a.astype(dt) if dt != np.uint8 else rng.integers(0, 256, shape).astype(np.uint8))
    out["scale"] = np.asarray(rng.standard_normal(), np.float32).reshape(())
    return out


def _write(folder, tensors, max_bytes) -> list[str]:
    os.makedirs(folder)
    w = ShardWriter(str(folder), max_bytes)
    for name, a in tensors.items():
        w.add(name, a)
    return w.close()


def _check(folder, files, tensors, align: int) -> None:
    got = {}
    for f in files:
        path = os.path.join(folder, f)
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            json.loads(fh.read(n))  # the padded header is valid JSON
        assert (8 + n) % align == 0, (f, n)
        got.update(load_file(path))
    assert sorted(got) == sorted(tensors)
    for k, a in tensors.items():
        assert got[k].dtype == a.dtype and got[k].shape == a.shape
        np.testing.assert_array_equal(got[k].reshape(-1).view(np.uint8), a.reshape(-1).view(np.uint8), err_msg=k)
    assert not [f for f in os.listdir(folder) if f.startswith(".shard")]  # no data file left behind
    index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))
    assert set(index["weight_map"]) == set(tensors)


def _supports_insert(folder) -> bool:
    p = os.path.join(folder, "probe")
    with open(p, "wb") as f:
        f.write(b"x" * (2 * os.statvfs(folder).f_bsize))
    fd = os.open(p, os.O_RDWR)
    try:
        return insert_front(fd, os.statvfs(folder).f_bsize, p)
    finally:
        os.close(fd)
        os.remove(p)


def test_header_in_place_without_copying(tmp_path, monkeypatch):
    if not _supports_insert(tmp_path):
        pytest.skip("this filesystem has no FALLOC_FL_INSERT_RANGE")
    rng = np.random.default_rng()
    tensors = _tensors(rng)

    def no_copy(*a, **k):
        raise AssertionError("the shard's data was copied")

    monkeypatch.setattr(write_mod.shutil, "copyfileobj", no_copy)
    files = _write(tmp_path / "out", tensors, 6000)
    assert len(files) > 1
    _check(tmp_path / "out", files, tensors, os.statvfs(tmp_path).f_bsize)


def test_copy_where_the_filesystem_cannot(tmp_path, monkeypatch):
    rng = np.random.default_rng()
    tensors = _tensors(rng)
    monkeypatch.setattr(write_mod, "insert_front", lambda fd, n, where: False)
    files = _write(tmp_path / "out", tensors, 6000)
    assert len(files) > 1
    _check(tmp_path / "out", files, tensors, ALIGN)
