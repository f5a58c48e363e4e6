"""Orbax checkpoints (nemojax.checkpoint.orbax): `nemojax convert --to orbax [--quant R]`, save_orbax, reading back."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax import api, quant
from nemojax.checkpoint import ConvertError, convert_checkpoint, inspect_checkpoint
from nemojax.cli import main as cli_main
from nemojax.formats import is_quantized
from nemojax.checkpoint.orbax import META, OrbaxError, load_orbax, save_orbax
from nemojax.params import init_params_numpy
from nemojax.checkpoint import CheckpointError, load_params, save_params

from .conftest import tiny_config

def _assert_same_tree(a, b):
    """Same structure, node types, static fields, dtypes and bytes."""
    fa, ta = jax.tree_util.tree_flatten(a)
    fb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb  # includes NVFP4Weight/HLWQWeight static fields
    for x, y in zip(fa, fb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("orbax")
    cfg = tiny_config()
    params = init_params_numpy(cfg, seed=11, dtype="bfloat16")
    s = root / "src"
    save_params(params, cfg, s)
    (s / "tokenizer_config.json").write_text('{"chat_template": "x"}')
    return {"root": root, "cfg": cfg, "src": str(s), "params": load_params(s, cfg, "bfloat16")}


@pytest.mark.parametrize("q", [None, "nvfp4", "hlwq-q5"])
def test_convert_to_orbax_equals_in_memory(src, q):
    out = src["root"] / f"orbax-{q}"
    res = convert_checkpoint(src["src"], out, "orbax", quant=q, progress=False)
    assert res["to"].startswith("orbax")
    assert sorted(os.listdir(out)) == sorted(["config.json", META, "params", "tokenizer_config.json"])
    want = src["params"] if q is None else quant.apply(src["params"], src["cfg"], q)
    got = load_params(out, src["cfg"], "bfloat16")
    _assert_same_tree(got, want)
    if q is not None:
        n_q = sum(is_quantized(x) for x in jax.tree.leaves(got, is_leaf=is_quantized))
        assert n_q == len(quant.quantized_modules(src["cfg"], q))
    # the same model through the public API: identical logits
    ids = np.random.default_rng(0).integers(0, src["cfg"].vocab_size, (2, 9))
    m = api.load(out, progress=False)
    ref = api.Model(src["cfg"], want).logits(ids)
    np.testing.assert_array_equal(np.asarray(m.logits(ids)), np.asarray(ref))
    assert not [n for n in os.listdir(src["root"]) if ".partial-" in n]


def test_dtype_and_modes_on_restore(src, tmp_path):
    out = tmp_path / "o"
    save_orbax(quant.apply(src["params"], src["cfg"], "nvfp4"), src["cfg"], out)
    p32 = load_orbax(out, src["cfg"], jnp.float32)
    assert p32["norm_f"].dtype == jnp.float32 and p32["embeddings"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(p32["embeddings"]),
                                  np.asarray(src["params"]["embeddings"], np.float32))
    nodes = [x for x in jax.tree.leaves(p32, is_leaf=is_quantized) if is_quantized(x)]
    assert nodes and all(n.packed.dtype == jnp.uint8 and n.mode == "w4a16" for n in nodes)
    deq = load_orbax(out, src["cfg"], jnp.bfloat16, dequantize=True)
    assert not [x for x in jax.tree.leaves(deq, is_leaf=is_quantized) if is_quantized(x)]
    i = src["cfg"].pattern.index("E")
    np.testing.assert_array_equal(
        np.asarray(deq["layers"][i]["mixer"]["experts"]["up_proj"], np.float32),
        np.asarray(p32["layers"][i]["mixer"]["experts"]["up_proj"].dequantize(jnp.bfloat16), np.float32))


def test_quantized_source_stays_quantized(src, tmp_path):
    hl = tmp_path / "hl"
    convert_checkpoint(src["src"], hl, "hlwq-q5", progress=False)
    out = tmp_path / "o"
    convert_checkpoint(hl, out, "orbax", base=src["src"], progress=False)
    _assert_same_tree(load_params(out, src["cfg"]), load_params(hl, src["cfg"], base=src["src"]))
    with pytest.raises(ConvertError, match="needs a BF16 checkpoint"):
        convert_checkpoint(hl, tmp_path / "x", "orbax", quant="nvfp4", base=src["src"], progress=False)


def test_errors(src, tmp_path):
    out = tmp_path / "o"
    convert_checkpoint(src["src"], out, "orbax", progress=False)
    with pytest.raises(FileExistsError):
        convert_checkpoint(src["src"], out, "orbax", progress=False)
    with pytest.raises(ConvertError, match="--quant: recipe='bogus'"):
        convert_checkpoint(src["src"], tmp_path / "b", "orbax", quant="bogus", progress=False)
    with pytest.raises(ConvertError, match="applies to --to orbax only"):
        convert_checkpoint(src["src"], tmp_path / "b", "nvfp4", quant="nvfp4", progress=False)
    assert not (tmp_path / "b").exists()
    # wrong model for the checkpoint: a shape mismatch names the tensor
    other = tiny_config(hidden_size=src["cfg"].hidden_size * 2)
    with pytest.raises(OrbaxError, match="embeddings"):
        load_orbax(out, other)
    # corrupt description / missing params folder -> CheckpointError naming the file
    meta = json.loads((out / META).read_text())
    bad = dict(meta, version=99)
    (out / META).write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_params(out, src["cfg"])
    (out / META).write_text(json.dumps(meta))
    os.rename(out / "params", out / "params.x")
    with pytest.raises(CheckpointError, match="no params/ folder"):
        load_params(out, src["cfg"])
    os.rename(out / "params.x", out / "params")
    drop = dict(meta, leaves={k: v for k, v in meta["leaves"].items() if k != "norm_f"})
    (out / META).write_text(json.dumps(drop))
    with pytest.raises(CheckpointError, match="missing parameter.*norm_f"):
        load_params(out, src["cfg"])


def test_failure_leaves_nothing(src, tmp_path, monkeypatch):
    import nemojax.checkpoint.orbax as ox

    def boom(*a, **k):
        raise RuntimeError("disk went away")

    monkeypatch.setattr(ox, "_write", boom)
    with pytest.raises(RuntimeError, match="disk went away"):
        convert_checkpoint(src["src"], tmp_path / "o", "orbax", progress=False)
    assert os.listdir(tmp_path) == []


def test_cli_convert_inspect_verify(src, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli_main(["convert", src["src"], str(out), "--to", "orbax", "--quant", "nvfp4", "--no-progress",
                     "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["to"] == "orbax (nvfp4)" and res["tensor_bytes"] > 0
    r = inspect_checkpoint(str(out))
    assert r["format"] == "orbax nvfp4" and r["nvfp4_modules"] == len(quant.quantized_modules(src["cfg"], "nvfp4"))
    assert r["components"]["routed experts"]["bytes"] > 0 and r["bytes"] == res["tensor_bytes"]
    assert cli_main(["verify", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert cli_main(["convert", src["src"], str(out), "--to", "orbax"]) == 2  # exists, no --force
    assert "already exists" in capsys.readouterr().err


def test_generate_from_orbax_default_model(tmp_path, capsys):
    """The bundled model converted to orbax generates exactly what the safetensors original generates."""
    from nemojax.cli import main

    default = os.path.join(os.path.dirname(api.__file__), "default_model")
    out = tmp_path / "orbax"
    convert_checkpoint(default, out, "orbax", progress=False)
    runs = []
    for model in (default, str(out)):
        assert main(["generate", "--model", model, "--chat", "--prompt", "What is 31 + 45?", "--json"]) == 0
        runs.append(json.loads(capsys.readouterr().out))
    assert runs[0]["content"] == runs[1]["content"] == "The answer is 76."
    assert runs[0]["reasoning"] == runs[1]["reasoning"]
