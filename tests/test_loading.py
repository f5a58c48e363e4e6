"""Checkpoint loading: sharded vs single file in both namings, the dtype policy, errors that name tensor and
file, abstract params, and the memory-mapped safetensors reader (against the official writer too)."""
from __future__ import annotations

import json
import os
import re
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import nemojax
from nemojax import CheckpointError, ConfigError
from nemojax.params import is_spec, leaf_dtype, param_specs, tree_paths
from nemojax.checkpoint import (Checkpoint, SafeFile, SafetensorsError, checkpoint_tensors, load_params,
                                save_file, save_params)

from .conftest import tiny_config

BF16 = np.dtype(ml_dtypes.bfloat16)
FP32_LEAVES = ("A_log", "D", "e_score_correction_bias")  # the parameters kept in float32 whatever the dtype


# ----------------------------------------------------------------------------------------------- helpers
def random_params(cfg, rng: np.random.Generator, dtype=np.float32) -> dict:
    """Random NumPy parameters (never zeros): weights in ``dtype``, the FP32_LEAVES in float32."""
    def leaf(spec):
        a = rng.standard_normal(spec.shape) * 0.7 + rng.choice([-1.0, 1.0], spec.shape) * 0.05
        return a.astype(leaf_dtype(spec, dtype))

    return jax.tree.map(leaf, param_specs(cfg), is_leaf=is_spec)


def flat(params) -> dict[str, np.ndarray]:
    return {path: np.asarray(leaf) for path, leaf in tree_paths(params)}


def bits(a: np.ndarray) -> np.ndarray:
    """The raw bytes, so that comparisons are exact (NaN payloads, -0.0, bf16 included)."""
    a = np.ascontiguousarray(a)
    return a.view(np.uint8).reshape(-1)


def assert_same(got: dict, want: dict):
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert got[k].shape == want[k].shape, k
        assert np.array_equal(bits(got[k]), bits(want[k])), k


def write_single(folder, cfg, tensors) -> str:
    """config.json + model.safetensors from ``(name, array)`` pairs; returns the safetensors path."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f)
    path = os.path.join(folder, "model.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def read_header(path) -> tuple[dict, bytes]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    return header, data


def write_raw(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


@pytest.fixture(scope="module")
def cfg():
    return tiny_config()


@pytest.fixture(scope="module")
def fp32_ckpt(cfg, tmp_path_factory):
    """A single-file float32 checkpoint in original naming and the parameters it holds."""
    params = random_params(cfg, np.random.default_rng(1234))
    # edge cases of the casts: bf16 ties (round to even), values past the bf16 / fp16 range, subnormals, -0.0
    special = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 3.4e38, -3.4e38, 7e4, 1e-40, 3e-8,
                        -0.0, np.inf, -np.inf, np.nan, 65504.0, 2 ** -24, 1 + 2 ** -9, 0.1], np.float32)
    params["embeddings"][0, : special.size] = special
    folder = tmp_path_factory.mktemp("fp32")
    save_params(params, cfg, folder)
    return str(folder), flat(params)


# ----------------------------------------------------------------------------------------------- 1. sharding
@pytest.mark.parametrize("naming", ["original", "hf5"])
def test_sharded_checkpoint_loads_like_single_file(cfg, tmp_path, naming):
    params = random_params(cfg, np.random.default_rng(7 if naming == "original" else 8))
    want = flat(params)
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    save_params(params, cfg, single, naming=naming)
    save_params(params, cfg, sharded, naming=naming, max_shard_bytes=200_000)

    shards = sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))
    assert len(shards) >= 3
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", f) for f in shards)
    assert not (sharded / "model.safetensors").exists()
    with open(sharded / "model.safetensors.index.json") as f:
        index = json.load(f)
    names = [n for n, _ in checkpoint_tensors(params, cfg, naming)]
    assert sorted(index["weight_map"]) == sorted(names)
    assert set(index["weight_map"].values()) == set(shards)
    prefix = "backbone." if naming == "original" else "model."
    assert all(n.startswith(prefix) or n == "lm_head.weight" for n in names)

    ck = Checkpoint(sharded)
    assert ck.naming == naming
    assert {os.path.basename(ck.file_of(n)) for n in ck.names} == set(shards)

    a = flat(load_params(single, cfg, "float32"))
    b = flat(load_params(sharded, cfg, "float32"))
    assert_same(a, want)
    assert_same(b, want)
    m = nemojax.load(sharded, dtype="float32")  # the public entry point reads the same config + shards
    assert_same(flat(m.params), want)

    # experts: stacked [E, F, H] / [E, H, F] equal to the tensors in the files, read back without the loader
    E, F, H = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    files = {f: SafeFile(sharded / f) for f in shards}

    def stored(name):
        return np.asarray(files[index["weight_map"][name]].get(name))

    for i in cfg.layer_indices("E"):
        for proj, shape in (("up_proj", (E, F, H)), ("down_proj", (E, H, F))):
            got = b[f"layers.{i}.mixer.experts.{proj}"]
            assert got.shape == shape
            if naming == "original":
                per = [stored(f"backbone.layers.{i}.mixer.experts.{e}.{proj}.weight") for e in range(E)]
                assert all(p.shape == shape[1:] for p in per)
                assert np.array_equal(got, np.stack(per))
                assert not np.array_equal(per[0], per[1])  # really distinct experts
            else:
                whole = stored(f"model.layers.{i}.mixer.experts.{proj}")
                assert whole.shape == shape
                assert np.array_equal(got, whole)
    # conv1d is stored [C, 1, K] and loaded [C, K]
    i = cfg.layer_indices("M")[0]
    conv = stored(f"{prefix}layers.{i}.mixer.conv1d.weight")
    assert conv.shape == (cfg.mamba_conv_dim, 1, cfg.conv_kernel)
    assert np.array_equal(b[f"layers.{i}.mixer.conv1d"], conv[:, 0, :])


def test_original_checkpoint_with_stacked_experts_and_loose_shards(cfg, tmp_path):
    """Per-expert and stacked expert tensors are both accepted; a shard set (*-NNNNN-of-NNNNN) needs no index."""
    params = random_params(cfg, np.random.default_rng(99))
    tensors = list(checkpoint_tensors(params, cfg, "original"))
    i = cfg.layer_indices("E")[0]
    pre = f"backbone.layers.{i}.mixer.experts."
    tensors = [(n, a) for n, a in tensors if not (n.startswith(pre) and ".up_proj" in n)]
    tensors.append((pre + "up_proj", params["layers"][i]["mixer"]["experts"]["up_proj"]))
    write_single(tmp_path, cfg, tensors[: len(tensors) // 2])
    os.rename(tmp_path / "model.safetensors", tmp_path / "model-00001-of-00002.safetensors")
    save_file(tensors[len(tensors) // 2:], tmp_path / "model-00002-of-00002.safetensors")
    assert_same(flat(nemojax.load(tmp_path, dtype="float32").params), flat(params))


# ----------------------------------------------------------------------------------------------- 2. dtypes
def test_bfloat16_policy_rounds_like_numpy_and_keeps_fp32_leaves(fp32_ckpt):
    folder, stored = fp32_ckpt
    m = nemojax.load(folder, dtype="bfloat16")
    got = flat(m.params)
    assert got.keys() == stored.keys()
    n_fp32 = n_rounded = 0
    for path, want in stored.items():
        leaf = path.rsplit(".", 1)[-1]
        if leaf in FP32_LEAVES:
            n_fp32 += 1
            assert got[path].dtype == np.float32, path
            assert np.array_equal(got[path], want), path
        else:
            assert got[path].dtype == BF16, path
            ref = want.astype(BF16)  # ml_dtypes' round-to-nearest-even
            assert np.array_equal(bits(got[path]), bits(ref)), path
            n_rounded += int(np.sum(ref.astype(np.float32) != want))
    n_mamba, n_moe = len(m.config.layer_indices("M")), len(m.config.layer_indices("E"))
    assert n_fp32 == 2 * n_mamba + n_moe  # A_log + D per Mamba layer, e_score_correction_bias per MoE layer
    n_weights = sum(v.size for k, v in stored.items() if k.rsplit(".", 1)[-1] not in FP32_LEAVES)
    assert n_rounded > 0.99 * n_weights  # the values really needed rounding
    # the jax arrays carry the same dtypes as the abstract tree
    assert m.params["embeddings"].dtype == jnp.bfloat16
    assert m.params["layers"][0]["mixer"]["A_log"].dtype == jnp.float32


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # 3.4e38 -> fp16 inf
@pytest.mark.parametrize("dtype,np_dtype", [("float16", np.float16), ("fp16", np.float16),
                                            ("float32", np.float32), (jnp.float32, np.float32),
                                            (jnp.bfloat16, BF16), ("BF16", BF16)])
def test_other_dtypes(fp32_ckpt, dtype, np_dtype):
    folder, stored = fp32_ckpt
    got = flat(nemojax.load(folder, dtype=dtype).params)
    for path, want in stored.items():
        if path.rsplit(".", 1)[-1] in FP32_LEAVES:
            assert got[path].dtype == np.float32 and np.array_equal(got[path], want), path
        else:
            assert got[path].dtype == np.dtype(np_dtype), path
            assert np.array_equal(bits(got[path]), bits(want.astype(np_dtype))), path


def test_bf16_checkpoint_upcasts_exactly(cfg, tmp_path):
    params = random_params(cfg, np.random.default_rng(21), dtype=BF16)
    save_params(params, cfg, tmp_path)
    got = flat(nemojax.load(tmp_path, dtype="float32").params)
    for path, want in flat(params).items():
        assert got[path].dtype == np.float32
        assert np.array_equal(got[path], want.astype(np.float32)), path


@pytest.mark.parametrize("bad", ["int8", "foo", "float64", np.int8, "", 3])
def test_unsupported_dtype_is_a_value_error_naming_dtype(fp32_ckpt, bad):
    folder, _ = fp32_ckpt
    with pytest.raises(ValueError, match=r"\bdtype=") as ei:
        nemojax.load(folder, dtype=bad)
    assert not isinstance(ei.value, CheckpointError)
    assert repr(bad) in str(ei.value) or str(bad) in str(ei.value)
    with pytest.raises(ValueError, match=r"\bdtype="):  # checked before the folder is even looked at
        nemojax.load(os.path.join(folder, "does-not-exist"), dtype=bad)


# ----------------------------------------------------------------------------------------------- 3. errors
@pytest.fixture
def tensors(cfg):
    """A fresh random original-naming checkpoint as an ordered dict of tensors (bf16 weights)."""
    return dict(checkpoint_tensors(random_params(cfg, np.random.default_rng(5), dtype=BF16), cfg, "original"))


IN_PROJ = "backbone.layers.0.mixer.in_proj.weight"


def _load_error(folder, cls=CheckpointError) -> str:
    with pytest.raises(cls) as ei:
        nemojax.load(folder)
    return str(ei.value)


def test_missing_tensor(cfg, tmp_path, tensors):
    del tensors[IN_PROJ]
    write_single(tmp_path, cfg, tensors)
    msg = _load_error(tmp_path)
    assert repr(IN_PROJ) in msg and str(tmp_path) in msg
    assert "missing tensor" in msg and "MEM*E-M*E" in msg


def test_missing_expert(cfg, tmp_path, tensors):
    name = "backbone.layers.4.mixer.experts.5.down_proj.weight"
    assert name in tensors
    del tensors[name]
    write_single(tmp_path, cfg, tensors)
    msg = _load_error(tmp_path)
    assert repr(name) in msg and str(tmp_path) in msg and "missing tensor" in msg
    assert "experts.4." not in msg and "experts.6." not in msg  # only the absent one is named


def test_many_missing_tensors_are_summarised(cfg, tmp_path, tensors):
    gone = [n for n in tensors if ".layers.1.mixer.experts." in n]
    for n in gone:
        del tensors[n]
    write_single(tmp_path, cfg, tensors)
    msg = _load_error(tmp_path)
    assert repr(gone[0]) in msg and f"(and {len(gone) - 5} more)" in msg


def test_unexpected_tensor(cfg, tmp_path, tensors):
    extra = "backbone.layers.3.mixer.rotary.inv_freq"
    tensors[extra] = np.random.default_rng(0).standard_normal(8).astype(np.float32)
    path = write_single(tmp_path, cfg, tensors)
    msg = _load_error(tmp_path)
    assert repr(extra) in msg and path in msg and "unexpected tensor" in msg


def test_misshaped_tensor(cfg, tmp_path, tensors):
    a = tensors[IN_PROJ]
    tensors[IN_PROJ] = a[:-1]
    path = write_single(tmp_path, cfg, tensors)
    msg = _load_error(tmp_path)
    assert repr(IN_PROJ) in msg and path in msg
    assert f"shape {[a.shape[0] - 1, a.shape[1]]}" in msg and f"expected {list(a.shape)}" in msg


def test_misshaped_expert(cfg, tmp_path, tensors):
    name = "backbone.layers.1.mixer.experts.2.up_proj.weight"
    tensors[name] = tensors[name].T.copy()
    path = write_single(tmp_path, cfg, tensors)
    msg = _load_error(tmp_path)
    assert repr(name) in msg and path in msg and "expected [32, 64]" in msg


def test_integer_weight(cfg, tmp_path, tensors):
    name = "backbone.layers.2.mixer.out_proj.weight"
    tensors[name] = np.random.default_rng(3).integers(1, 255, tensors[name].shape, dtype=np.uint8)
    path = write_single(tmp_path, cfg, tensors)
    msg = _load_error(tmp_path)
    assert repr(name) in msg and path in msg and "uint8" in msg and "floating-point" in msg


def test_mtp_tensors_are_ignored(cfg, tmp_path, tensors):
    rng = np.random.default_rng(11)
    want = {k: v for k, v in tensors.items()}
    tensors["mtp.layers.0.eh_proj.weight"] = rng.standard_normal((64, 128)).astype(BF16)
    tensors["backbone.mtp.layers.0.norm.weight"] = rng.standard_normal(64).astype(BF16)
    write_single(tmp_path, cfg, tensors)
    m = nemojax.load(tmp_path)
    got = dict(checkpoint_tensors(m.params, cfg, "original"))
    assert got.keys() == want.keys()
    for k in want:
        assert np.array_equal(bits(got[k]), bits(want[k])), k


def test_truncated_file(cfg, tmp_path, tensors):
    path = write_single(tmp_path, cfg, tensors)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 3)
    header, _ = read_header(path)  # the writer stores aligned-size tensors first: the last one by offset
    last = max(tensors, key=lambda n: header[n]["data_offsets"][0])
    msg = _load_error(tmp_path)
    assert path in msg and "truncated" in msg and repr(last) in msg


def test_garbage_header(cfg, tmp_path, tensors):
    path = write_single(tmp_path, cfg, tensors)
    _, data = read_header(path)
    junk = b'{"backbone.norm_f.weight": {"dtype": "BF16", "shape": [64], "data_offsets": [0, 128]'
    junk += b" " * (-len(junk) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(junk)) + junk + data)
    msg = _load_error(tmp_path)
    assert path in msg and "corrupt safetensors header" in msg


def test_header_not_an_object(cfg, tmp_path, tensors):
    path = write_single(tmp_path, cfg, tensors)
    _, data = read_header(path)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 8) + b"[1, 2]  " + data)
    msg = _load_error(tmp_path)
    assert path in msg and "not a JSON object" in msg


def test_header_length_beyond_file(cfg, tmp_path, tensors):
    path = write_single(tmp_path, cfg, tensors)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", size + 1000))
    msg = _load_error(tmp_path)
    assert path in msg and f"header length {size + 1000}" in msg and f"file size {size}" in msg


def test_file_shorter_than_length_field(cfg, tmp_path, tensors):
    path = write_single(tmp_path, cfg, tensors)
    with open(path, "wb") as f:
        f.write(b"\x01\x02\x03")
    msg = _load_error(tmp_path)
    assert path in msg and "shorter than 8 bytes" in msg


@pytest.mark.parametrize("edit", ["end", "shape", "dtype", "negative"])
def test_header_entry_inconsistent_with_dtype_and_shape(cfg, tmp_path, tensors, edit):
    path = write_single(tmp_path, cfg, tensors)
    header, data = read_header(path)
    entry = header[IN_PROJ]
    b, e = entry["data_offsets"]
    if edit == "end":
        entry["data_offsets"] = [b, e - 2]
    elif edit == "shape":
        entry["shape"] = [entry["shape"][0] + 1, entry["shape"][1]]
    elif edit == "dtype":
        entry["dtype"] = "F32"
    else:
        entry["data_offsets"] = [b - (e - b) - 10 ** 9, b - 10 ** 9]
    write_raw(path, header, data)
    msg = _load_error(tmp_path)
    assert path in msg and repr(IN_PROJ) in msg and "corrupt header entry" in msg
    assert "do not hold" in msg


def test_header_entry_unknown_dtype(cfg, tmp_path, tensors):
    path = write_single(tmp_path, cfg, tensors)
    header, data = read_header(path)
    header[IN_PROJ]["dtype"] = "Q4_K"
    write_raw(path, header, data)
    msg = _load_error(tmp_path)
    assert path in msg and repr(IN_PROJ) in msg and "'Q4_K'" in msg


def test_index_names_tensor_missing_from_its_shard(cfg, tmp_path):
    params = random_params(cfg, np.random.default_rng(17), dtype=BF16)
    save_params(params, cfg, tmp_path, max_shard_bytes=100_000)
    index_path = tmp_path / "model.safetensors.index.json"
    with open(index_path) as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    wrong = shards[0] if index["weight_map"][IN_PROJ] != shards[0] else shards[-1]
    index["weight_map"][IN_PROJ] = wrong
    with open(index_path, "w") as f:
        json.dump(index, f)
    msg = _load_error(tmp_path)
    assert str(index_path) in msg and repr(IN_PROJ) in msg and wrong in msg
    assert "does not contain it" in msg


def test_index_names_missing_shard_file(cfg, tmp_path):
    params = random_params(cfg, np.random.default_rng(18), dtype=BF16)
    save_params(params, cfg, tmp_path, max_shard_bytes=100_000)
    shard = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))[1]
    os.remove(tmp_path / shard)
    msg = _load_error(tmp_path)
    assert str(tmp_path / shard) in msg and "file not found" in msg


def test_invalid_index_json(cfg, tmp_path):
    params = random_params(cfg, np.random.default_rng(19), dtype=BF16)
    save_params(params, cfg, tmp_path, max_shard_bytes=100_000)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": ')
    msg = _load_error(tmp_path)
    assert str(tmp_path / "model.safetensors.index.json") in msg and "not a valid safetensors index" in msg


def test_index_entries_stay_inside_the_folder(cfg, tmp_path):
    """An index entry naming a file outside the checkpoint folder (``../x.safetensors``, an absolute path) is refused,
    even when that file exists and holds the tensor; a weight_map that is a list or has non-string values too."""
    params = random_params(cfg, np.random.default_rng(20), dtype=BF16)
    ck = tmp_path / "ck"
    save_params(params, cfg, ck, max_shard_bytes=100_000)
    index = ck / "model.safetensors.index.json"
    good = json.loads(index.read_text())
    shard = sorted(set(good["weight_map"].values()))[0]
    os.replace(ck / shard, tmp_path / shard)  # the shard now lies beside the folder
    for where in (f"../{shard}", str(tmp_path / shard)):
        index.write_text(json.dumps({"weight_map": {k: (where if v == shard else v)
                                                    for k, v in good["weight_map"].items()}}))
        msg = _load_error(ck)
        assert str(index) in msg and "not a file of the checkpoint folder" in msg, msg
    for bad in ([["a", "b"]], {"backbone.norm_f.weight": 3}):
        index.write_text(json.dumps({"weight_map": bad}))
        msg = _load_error(ck)
        assert str(index) in msg and "'weight_map' must map tensor names to file names" in msg, msg


def test_tensor_in_two_shards_without_index(cfg, tmp_path, tensors):
    path = write_single(tmp_path, cfg, tensors)
    os.rename(path, tmp_path / "model-00001-of-00002.safetensors")
    save_file({IN_PROJ: tensors[IN_PROJ]}, tmp_path / "model-00002-of-00002.safetensors")
    msg = _load_error(tmp_path)
    assert repr(IN_PROJ) in msg and "model-00001-of-00002.safetensors" in msg
    assert "model-00002-of-00002.safetensors" in msg


# which files form the checkpoint: the index's, else model.safetensors, else one shard set; nothing else
def _stray(folder, tensors, name: str) -> None:
    """A safetensors file beside the checkpoint that is not part of it: a LoRA adapter with foreign names, a
    reference copy of one tensor with other values, and a tensor no pattern uses."""
    save_file({"base_model.model.lm_head.lora_A.weight": np.ones((4, 8), np.float32),
               IN_PROJ: np.zeros_like(tensors[IN_PROJ]), "backbone.layers.0.mixer.bogus": np.ones(3, np.float32)},
              os.path.join(folder, name))


@pytest.mark.parametrize("layout", ["single", "index", "shards"])
@pytest.mark.parametrize("stray", ["adapter_model.safetensors", "reference.safetensors",
                                   "model-00001-of-00003.safetensors"])
def test_files_beside_the_checkpoint_are_ignored(cfg, tmp_path, tensors, layout, stray):
    params = random_params(cfg, np.random.default_rng(23), dtype=BF16)
    if layout == "single":
        save_params(params, cfg, tmp_path)
    else:
        save_params(params, cfg, tmp_path, max_shard_bytes=100_000)
        shards = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
        assert len(shards) >= 2 and not shards[0].endswith("-of-00003.safetensors")
        if layout == "shards":
            os.remove(tmp_path / "model.safetensors.index.json")
    if layout == "shards" and stray.startswith("model-"):  # a second shard set needs an index to choose one
        _stray(tmp_path, tensors, stray)
        msg = _load_error(tmp_path)
        assert str(tmp_path) in msg and "several shard sets" in msg and "-of-00003.safetensors" in msg
        return
    _stray(tmp_path, tensors, stray)
    assert_same(flat(nemojax.load(tmp_path, dtype="bfloat16").params), flat(params))
    ck = Checkpoint(tmp_path)
    assert not any("lora" in n or n.endswith(".bogus") for n in ck.names)
    assert all(os.path.basename(ck.file_of(n)) != stray for n in ck.names)


def test_folder_with_only_a_stray_file(cfg, tmp_path, tensors):
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    save_file(tensors, tmp_path / "adapter_model.safetensors")  # even one holding every model tensor
    msg = _load_error(tmp_path)
    assert str(tmp_path) in msg and "no model.safetensors" in msg and "adapter_model.safetensors" in msg
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_params(tmp_path, cfg)


def test_incomplete_shard_set(cfg, tmp_path):
    params = random_params(cfg, np.random.default_rng(24), dtype=BF16)
    save_params(params, cfg, tmp_path, max_shard_bytes=100_000)
    os.remove(tmp_path / "model.safetensors.index.json")
    shards = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    os.remove(tmp_path / shards[-1])
    msg = _load_error(tmp_path)
    assert str(tmp_path) in msg and "incomplete" in msg and f"{len(shards) - 1} of {len(shards)}" in msg


@pytest.mark.parametrize("folder", ["dequant_bf16", "layout_a", "layout_b", "layout_c", "source"])
def test_polarengine_folders_name_their_files(folder):
    """The polarengine test folders: an index over model-00000-of-00001 (+ model-extra-buffers) or one file."""
    d = os.path.join(os.path.dirname(__file__), "data", "hlwq", "nemotronh", folder)
    ck = Checkpoint(d)
    files = {os.path.basename(ck.file_of(n)) for n in ck.names}
    on_disk = {f for f in os.listdir(d) if f.endswith(".safetensors")}
    assert files == on_disk and len(ck.names) > 100


def test_empty_folder(cfg, tmp_path):
    with pytest.raises(CheckpointError, match="no model.safetensors") as ei:
        load_params(tmp_path, cfg)
    assert str(tmp_path) in str(ei.value)
    # through nemojax.load the folder needs a config.json first ...
    with pytest.raises(FileNotFoundError, match="config.json"):
        nemojax.load(tmp_path)
    # ... and with one, the missing weights are a CheckpointError naming the folder
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    msg = _load_error(tmp_path)
    assert str(tmp_path) in msg and "no model.safetensors" in msg


def test_path_that_is_not_a_folder(cfg, tmp_path, tensors):
    path = write_single(tmp_path, cfg, tensors)
    for p in (path, str(tmp_path / "config.json"), str(tmp_path / "nope")):
        with pytest.raises(CheckpointError, match="not a folder") as ei:
            load_params(p, cfg)
        assert p in str(ei.value)
        assert p in _load_error(p)  # nemojax.load must not parse the file as a config


def test_not_a_nemotron_checkpoint(cfg, tmp_path):
    write_single(tmp_path, cfg, {"transformer.wte.weight": np.ones((4, 4), np.float32) * 0.5})
    msg = _load_error(tmp_path)
    assert str(tmp_path) in msg and "not a Nemotron-H checkpoint" in msg


def test_config_problem_is_a_config_error(cfg, tmp_path, tensors):
    write_single(tmp_path, cfg, tensors)
    d = cfg.to_dict()
    d["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(d))
    msg = _load_error(tmp_path, ConfigError)
    assert str(tmp_path / "config.json") in msg and "'num_hidden_layers'" in msg
    (tmp_path / "config.json").write_text("{not json")
    msg = _load_error(tmp_path, ConfigError)
    assert str(tmp_path / "config.json") in msg and "not valid JSON" in msg


def test_config_mismatching_checkpoint(cfg, tmp_path, tensors):
    """A config with more experts than the checkpoint: the first mis-shaped tensor is named."""
    write_single(tmp_path, cfg, tensors)
    d = cfg.to_dict()
    d["n_routed_experts"] = 10
    (tmp_path / "config.json").write_text(json.dumps(d))
    msg = _load_error(tmp_path)
    assert "'backbone.layers.1.mixer.gate.e_score_correction_bias' has shape [8], expected [10]" in msg
    assert str(tmp_path / "model.safetensors") in msg


# ----------------------------------------------------------------------------------------------- loaded memory
def test_loaded_params_do_not_alias_the_file(cfg, tmp_path, tensors):
    """On CPU, jax.device_put zero-copies 64-byte-aligned NumPy buffers, memory maps included; the loader
    must copy, or rewriting the checkpoint would change (and truncating it would crash) loaded parameters."""
    path = write_single(tmp_path, cfg, tensors)
    for pad in range(64):  # make the data section 64-byte aligned so that aliasing is possible
        if SafeFile(path)._base % 64 == 0:
            break
        save_file(tensors, path, metadata={"format": "pt", "pad": "x" * (pad + 1)})
    assert SafeFile(path)._base % 64 == 0
    meta = SafeFile(path).metadata
    m = nemojax.load(tmp_path)

    def current():  # read the buffers through XLA (np.asarray on a jax.Array caches its first result)
        return dict(checkpoint_tensors(jax.tree.map(jnp.copy, m.params), cfg, "original"))

    assert_same(current(), tensors)
    rng = np.random.default_rng(6)
    save_file([(n, rng.standard_normal(a.shape).astype(a.dtype)) for n, a in tensors.items()], path,
              metadata=meta)
    assert_same(current(), tensors)


# ----------------------------------------------------------------------------------------------- 4. abstract
def test_abstract_params_match_loaded(fp32_ckpt, cfg):
    folder, _ = fp32_ckpt
    loaded = nemojax.load(folder, dtype="bfloat16").params
    abstract = nemojax.abstract_params(cfg, "bfloat16")
    assert jax.tree.structure(abstract) == jax.tree.structure(loaded)
    leaves = jax.tree.leaves(abstract)
    assert all(type(x) is jax.ShapeDtypeStruct for x in leaves)
    for (path, a), (_, l) in zip(tree_paths(abstract), tree_paths(loaded)):
        assert a.shape == l.shape and a.dtype == l.dtype, path
    assert sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in leaves) == \
        sum(x.nbytes for x in jax.tree.leaves(loaded))
    f32 = nemojax.abstract_params(cfg, "float32")
    assert {x.dtype for x in jax.tree.leaves(f32)} == {jnp.dtype(jnp.float32)}


def test_abstract_params_allocate_nothing():
    """The 30B-parameter Nemotron-3 Nano config: ~60 GB in bf16, abstracted instantly."""
    here = os.path.dirname(__file__)
    cfg = nemojax.Config.from_json(os.path.join(here, "fixtures", "nemotron3_nano_30b_a3b_config.json"))
    abstract = nemojax.abstract_params(cfg, "bfloat16")
    leaves = jax.tree.leaves(abstract)
    assert all(type(x) is jax.ShapeDtypeStruct for x in leaves)
    total = sum(int(np.prod(x.shape)) for x in leaves)
    assert total == nemojax.count_params(cfg) and total > 25e9
    assert abstract["layers"][1]["mixer"]["experts"]["up_proj"].shape == \
        (cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size)


# ----------------------------------------------------------------------------------------------- 5. reader
def test_safefile_round_trip_is_bit_exact(tmp_path):
    rng = np.random.default_rng(2024)
    tensors = {
        "f8": rng.integers(0, 256, (17, 33), dtype=np.uint8).view(ml_dtypes.float8_e4m3fn),  # NaNs included
        "bf16": rng.integers(0, 1 << 16, (5, 7, 9), dtype=np.uint16).view(ml_dtypes.bfloat16),
        "u8": rng.integers(0, 256, (1000,), dtype=np.uint8),
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "i64": rng.integers(-2 ** 62, 2 ** 62, (6,), dtype=np.int64),
        "scalar": np.array(rng.standard_normal(), np.float32),
        "empty": np.zeros((0, 4), np.float16),
        "strided": rng.standard_normal((8, 6)).astype(np.float32)[::2, ::3],  # non-contiguous input
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "note": "round trip"})
    sf = SafeFile(path)
    assert sf.keys() == list(tensors)
    assert sf.metadata == {"format": "pt", "note": "round trip"}
    assert sf.dtype("f8") == np.dtype(ml_dtypes.float8_e4m3fn) and sf.dtype("bf16") == BF16
    for name, want in tensors.items():
        got = sf.get(name)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert np.array_equal(bits(got), bits(want)), name
        if want.size:
            assert isinstance(got, np.memmap) and not got.flags.writeable, name  # a read-only map, no copy
    with pytest.raises(SafetensorsError, match=r"no tensor 'nope'"):
        sf.get("nope")
    with pytest.raises(SafetensorsError, match="file not found"):
        SafeFile(tmp_path / "absent.safetensors")


def test_safefile_reads_official_writer_and_vice_versa(tmp_path):
    import safetensors.numpy as stnp

    rng = np.random.default_rng(77)
    tensors = {
        "w.bf16": rng.standard_normal((31, 16)).astype(BF16),
        "w.f32": rng.standard_normal((4, 5, 6)).astype(np.float32),
        "b.f32": rng.standard_normal((7,)).astype(np.float32),
    }
    official = tmp_path / "official.safetensors"
    stnp.save_file(tensors, official, metadata={"format": "np"})
    sf = SafeFile(official)
    assert sorted(sf.keys()) == sorted(tensors) and sf.metadata == {"format": "np"}
    for name, want in tensors.items():
        got = sf.get(name)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert np.array_equal(bits(got), bits(want)), name

    ours = tmp_path / "ours.safetensors"
    f32 = {k: v for k, v in tensors.items() if v.dtype == np.float32}
    f32["u8"] = rng.integers(0, 256, (9, 3), dtype=np.uint8)
    save_file(f32, ours)
    back = stnp.load_file(ours)
    assert back.keys() == f32.keys()
    for name, want in f32.items():
        assert back[name].dtype == want.dtype and np.array_equal(back[name], want), name
