"""Streaming checkpoint conversion (nemojax.checkpoint.convert_checkpoint) and the convert / inspect / verify
subcommands, on a tiny checkpoint built here."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from nemojax import quant
from nemojax.checkpoint import ConvertError, convert_checkpoint, dequantize_checkpoint
from nemojax.cli import main as cli_main
from nemojax.params import init_params_numpy
from nemojax.checkpoint import Checkpoint, load_params, save_params

from .conftest import folder_files, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _same_tensors(a: str, b: str) -> None:
    ca, cb = Checkpoint(a), Checkpoint(b)
    assert sorted(ca.names) == sorted(cb.names)
    for n in ca.names:
        assert ca.dtype(n) == cb.dtype(n), n
        assert tuple(ca.shape(n)) == tuple(cb.shape(n)), n
        assert np.asarray(ca.get(n)).tobytes() == np.asarray(cb.get(n)).tobytes(), n


def _json(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    cfg = tiny_config()
    params = init_params_numpy(cfg, seed=7, dtype="bfloat16")
    src = root / "src"
    save_params(params, cfg, src)
    (src / "tokenizer_config.json").write_text('{"chat_template": "x"}')
    out = {"root": root, "cfg": cfg, "params": params, "src": str(src)}
    for to in ("nvfp4", "hlwq-q5"):
        out[to] = str(root / to)
        convert_checkpoint(src, out[to], to, progress=False)
    return out


@pytest.mark.parametrize("to", ["nvfp4", "hlwq-q5"])
def test_streaming_equals_apply_and_save(ck, to):
    ref = ck["root"] / f"ref-{to}"
    save_params(quant.apply(ck["params"], ck["cfg"], to), ck["cfg"], ref)
    _same_tensors(ck[to], str(ref))
    for f in ("config.json", "hf_quant_config.json", "polar_config.json"):
        assert os.path.exists(os.path.join(ck[to], f)) == os.path.exists(ref / f), f
        if os.path.exists(ref / f):
            assert _json(os.path.join(ck[to], f)) == _json(ref / f), f
    assert os.path.exists(os.path.join(ck[to], "tokenizer_config.json"))
    assert os.path.exists(os.path.join(ck[to], "model.safetensors.index.json"))
    if to == "nvfp4":
        q = _json(os.path.join(ck[to], "hf_quant_config.json"))["quantization"]
        assert q["quant_algo"] == "W4A16_NVFP4" and q["kv_cache_quant_algo"] is None
        assert not [n for n in Checkpoint(ck[to]).names if n.endswith(("input_scale", "k_scale", "v_scale"))]
    p = load_params(ck[to], ck["cfg"])  # loads (checks every shape)
    assert p is not None
    assert not [n for n in os.listdir(ck["root"]) if ".partial-" in n]


def test_converged_codebook(ck, tmp_path):
    out = tmp_path / "conv"
    convert_checkpoint(ck["src"], out, "hlwq-q5-converged", progress=False)
    ref = tmp_path / "ref"
    save_params(quant.apply(ck["params"], ck["cfg"], "hlwq-q5-converged"), ck["cfg"], ref)
    _same_tensors(str(out), str(ref))


@pytest.mark.parametrize("frm", ["nvfp4", "hlwq-q5"])
def test_to_bf16_gives_dequantized_weights(ck, tmp_path, frm):
    out = tmp_path / "bf16"
    res = convert_checkpoint(ck[frm], out, "bf16", progress=False)
    assert res["from"] == ("hlwq" if frm.startswith("hlwq") else "nvfp4") and res["to"] == "bf16"
    want = load_params(ck[frm], ck["cfg"], "bfloat16", dequantize=True)
    got = load_params(out, ck["cfg"], "bfloat16")
    import jax

    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    ref = tmp_path / "ref"  # the same tensors as the in-memory dequantize_checkpoint
    dequantize_checkpoint(ck[frm], ref)
    _same_tensors(str(out), str(ref))
    assert not os.path.exists(out / "hf_quant_config.json") and not os.path.exists(out / "polar_config.json")
    assert "quantization_config" not in _json(out / "config.json")
    assert Checkpoint(str(out)).dtype("backbone.embeddings.weight") == jnp.bfloat16


def test_sharding(ck, tmp_path):
    out = tmp_path / "sharded"
    res = convert_checkpoint(ck["src"], out, "nvfp4", max_shard_bytes=60_000, progress=False)
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert res["shards"] == len(shards) > 2
    assert shards == [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    idx = _json(out / "model.safetensors.index.json")
    assert set(idx["weight_map"].values()) == set(shards)
    assert idx["metadata"]["total_size"] == res["tensor_bytes"]
    for s in shards:  # each shard respects the limit unless it holds one tensor only
        sf = Checkpoint(str(out))._open(str(out / s))
        size = sum(int(np.prod(sf.shape(n))) * sf.dtype(n).itemsize for n in sf.keys())
        assert size <= 60_000 or len(sf.keys()) == 1
    _same_tensors(str(out), ck["nvfp4"])
    assert not [f for f in os.listdir(out) if f.startswith(".")]


def test_exclude_keeps_more_modules_in_high_precision(ck, tmp_path):
    out = tmp_path / "ex"
    assert cli_main(["convert", ck["src"], str(out), "--to", "nvfp4", "--exclude", "backbone.layers.1.*",
                     "--exclude", "*.down_proj", "--no-progress"]) == 0
    names = Checkpoint(str(out)).names
    assert not [n for n in names if n.endswith("weight_scale_2") and (".layers.1." in n or ".down_proj." in n)]
    assert [n for n in names if n.endswith("up_proj.weight_scale_2")]  # the recipe's other modules stay NVFP4
    excl = _json(out / "hf_quant_config.json")["quantization"]["exclude_modules"]
    assert "backbone.layers.1.mixer.experts.0.up_proj" in excl and "backbone.layers.5.mixer.down_proj" in excl
    with pytest.raises(ConvertError, match="applies to a quantizing conversion only"):
        convert_checkpoint(ck["nvfp4"], tmp_path / "x", "bf16", exclude=("*",), progress=False)


def test_errors(ck, tmp_path):
    with pytest.raises(ConvertError, match="supported conversions"):
        convert_checkpoint(ck["src"], tmp_path / "x", "bf16", progress=False)
    with pytest.raises(ConvertError, match="cannot convert a nvfp4 checkpoint to hlwq-q5"):
        convert_checkpoint(ck["nvfp4"], tmp_path / "x", "hlwq-q5", progress=False)
    with pytest.raises(ConvertError, match="unknown target"):
        convert_checkpoint(ck["src"], tmp_path / "x", "int8", progress=False)
    assert not os.path.exists(tmp_path / "x")
    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        convert_checkpoint(ck["src"], old, "nvfp4", progress=False)
    assert os.listdir(old) == ["keep.txt"]
    assert cli_main(["convert", ck["src"], str(old), "--to", "nvfp4", "--no-progress"]) == 2
    assert os.listdir(old) == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["old"]


@pytest.mark.parametrize("to", ["nvfp4", "bf16", "orbax"])
def test_output_never_is_holds_or_lies_inside_the_source(ck, tmp_path, capsys, to):
    """``convert models/mymodel models --force`` once deleted the source and everything beside it: an output that is,
    holds or lies inside the source is refused even with --force (exit 2, one line), and nothing is lost."""
    import shutil

    models = tmp_path / "models"
    src = models / "mymodel"
    shutil.copytree(ck["src"] if to != "bf16" else ck["nvfp4"], src)
    (models / "notes.txt").write_text("mine")
    before = folder_files(models)
    for dst in (models, tmp_path, src / "out", src):
        with pytest.raises(ConvertError, match="source checkpoint"):
            convert_checkpoint(src, dst, to, force=True, progress=False)
        capsys.readouterr()
        assert cli_main(["convert", str(src), str(dst), "--to", to, "--force", "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "source checkpoint" in err[0], err
        assert folder_files(models) == before
    if to == "bf16":
        with pytest.raises(ConvertError, match="source checkpoint"):
            dequantize_checkpoint(src, models, force=True)
        assert folder_files(models) == before


def test_force_replaces_only_a_previous_output(ck, tmp_path):
    """--force onto a folder of other things, a regular file or a link refuses and keeps it; onto a previous output
    it replaces it, once the new output is complete."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    (other / "sub").mkdir()
    afile = tmp_path / "afile"
    afile.write_text("mine too")
    link = tmp_path / "link"
    link.symlink_to(other)
    for dst in (other, afile, link):
        with pytest.raises(ConvertError, match="not a checkpoint folder"):
            convert_checkpoint(ck["src"], dst, "nvfp4", force=True, progress=False)
    assert folder_files(other) == {"keep.txt": b"mine"} and afile.read_text() == "mine too" and link.is_symlink()
    prev = tmp_path / "prev"
    convert_checkpoint(ck["src"], prev, "hlwq-q5", progress=False)
    convert_checkpoint(ck["src"], prev, "nvfp4", force=True, progress=False)
    assert _json(prev / "hf_quant_config.json")["quantization"]["quant_algo"] == "W4A16_NVFP4"
    assert not os.path.exists(prev / "polar_config.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "link", "other", "prev"]  # no stray .partial


def test_inspect(ck, capsys):
    from nemojax.checkpoint import inspect_checkpoint

    r = inspect_checkpoint(ck["src"])
    assert r["format"] == "bf16" and r["hlwq_layout"] is None and r["config"]["pattern"] == "MEM*E-M*E"
    assert {"embeddings", "lm_head", "mamba", "attention", "routed experts", "shared experts", "router",
            "norms/other", "mlp"} <= set(r["components"])
    assert sum(c["bytes"] for c in r["components"].values()) == r["bytes"]
    assert sum(c["tensors"] for c in r["dtypes"].values()) == r["tensors"]
    assert cli_main(["inspect", ck["nvfp4"], "--json"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["format"] == "nvfp4" and j["nvfp4_modules"] > 0 and j["quantization"]["quant_algo"] == "W4A16_NVFP4"
    assert "float8_e4m3fn" in j["dtypes"] and "uint8" in j["dtypes"]
    assert cli_main(["inspect", ck["hlwq-q5"], "--json"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["format"] == "hlwq" and j["hlwq_layout"] == "B" and j["polar"]["bits"] == 5
    assert cli_main(["inspect", ck["hlwq-q5"]]) == 0
    out = capsys.readouterr().out
    assert "hlwq (layout B)" in out and "routed experts" in out
    assert cli_main(["inspect", str(ck["root"] / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_verify(ck, tmp_path, capsys):
    for d in (ck["src"], ck["nvfp4"], ck["hlwq-q5"]):
        assert cli_main(["verify", d, "--json"]) == 0
        j = json.loads(capsys.readouterr().out)
        assert j["ok"] and j["finite"] and j["logits_shape"] == [1, 8, 512] and j["error"] is None
    assert cli_main(["verify", ck["nvfp4"]]) == 0
    assert capsys.readouterr().out.startswith("OK ")
    # a broken checkpoint (a tensor with the wrong shape) is unusable input: exit code 2 with the message
    bad = tmp_path / "bad"
    params = dict(ck["params"])
    params["embeddings"] = params["embeddings"][:, :32]
    save_params(params, ck["cfg"], bad)
    assert cli_main(["verify", str(bad)]) == 2
    assert "embeddings" in capsys.readouterr().err
    # non-finite weights: the check fails, exit code 1
    nan = tmp_path / "nan"
    params = dict(ck["params"])
    params["norm_f"] = np.full_like(params["norm_f"], np.nan)
    save_params(params, ck["cfg"], nan)
    assert cli_main(["verify", str(nan), "--json"]) == 1
    j = json.loads(capsys.readouterr().out)
    assert not j["ok"] and "non-finite" in j["error"]


def test_tools_entry_point(ck, tmp_path):
    out = tmp_path / "o"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert.py"), ck["nvfp4"], str(out), "--to",
                        "bf16", "--no-progress", "--json"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["to"] == "bf16"
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert.py"), ck["nvfp4"], str(out), "--to",
                        "bf16"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "nemojax convert: error:" in r.stderr and "already exists" in r.stderr
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert.py"), "--help"], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0 and "no input_scale" in r.stdout and "FP8 KV" in r.stdout
