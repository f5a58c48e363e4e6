"""tools/make_random_checkpoint.py: random-weight checkpoints of a config, in every format, on the tiny config and
at the real widths (hidden 2688, the real Mamba / attention / expert shapes; 8 experts and a 2048-token vocabulary
instead of 128 and 131072, so the test stays fast and small)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

import nemojax
from nemojax.checkpoint import Checkpoint, convert_checkpoint, inspect_checkpoint, verify_checkpoint
from nemojax.model import block, embed, head, pre_norm
from nemojax.blocks.moe import moe_route

from .conftest import TINY

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "make_random_checkpoint.py")
REAL = os.path.join(REPO, "tests", "fixtures", "nemotron3_nano_30b_a3b_config.json")
FORMATS = ("bf16", "nvfp4", "fp8", "hlwq-q5")
PATTERN = "MEM*E-"  # every block kind; the Mamba layer before attention stays BF16 in the nvfp4 / fp8 recipes
STORED = {"bf16": "bf16", "nvfp4": "nvfp4", "fp8": "fp8", "hlwq-q5": "hlwq"}  # what inspect calls the format


def _tool():
    spec = importlib.util.spec_from_file_location("make_random_checkpoint", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write_json(path, d):
    with open(path, "w") as f:
        json.dump(d, f)
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("random")
    conf = _write_json(root / "config.json", dict(TINY, hybrid_override_pattern=PATTERN, num_hidden_layers=6,
                                                  time_step_min=0.002, time_step_max=0.05, time_step_floor=1e-4))
    tool = _tool()
    out = {"root": root, "config": conf, "tool": tool}
    for fmt in FORMATS:
        out[fmt] = tool.make_checkpoint(conf, str(root / fmt), fmt, max_shard_bytes=200_000, seed=3, progress=False)
    return out


def _layer_walk(p, cfg, ids):
    """The forward of ``ids`` block by block: (logits, residual std after each layer, expert ids per MoE layer)."""
    h, stds, idx = embed(p, ids), [], {}
    for i, c in enumerate(cfg.pattern):
        if c == "E":
            idx[i] = moe_route(p["layers"][i]["mixer"], cfg, pre_norm(p["layers"][i], cfg, h))[1]
        h, _ = block(p["layers"][i], cfg, c, h)
        stds.append(h.std())
    return head(p, cfg, h), stds, idx


def _logits_and_routing(folder, tokens=256, seed=0):
    """Logits [2, T, V] of random tokens, the residual std after every layer, and per MoE layer the fraction of
    experts selected and the max expert load over the mean (on the real hidden states)."""
    m = nemojax.load(folder)
    ids = jnp.asarray(np.random.default_rng(seed).integers(0, m.config.vocab_size, (2, tokens // 2)), jnp.int32)
    logits, stds, idx = jax.jit(_layer_walk, static_argnums=1)(m.params, m.config, ids)
    routing = {}
    for i, ix in idx.items():
        load = np.bincount(np.asarray(ix).ravel(), minlength=m.config.n_routed_experts)
        routing[i] = (float(np.mean(load > 0)), float(load.max() / load.mean()))
    return np.asarray(logits, np.float32), [float(s) for s in stds], routing


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_loads_verifies_and_routes(tiny, fmt):
    folder, res = tiny[fmt]["output"], tiny[fmt]
    files = set(os.listdir(folder))
    assert {"config.json", "model.safetensors.index.json"} <= files
    assert ("hf_quant_config.json" in files) == (fmt in ("nvfp4", "fp8"))
    assert ("polar_config.json" in files) == (fmt == "hlwq-q5")
    assert "tokenizer.json" not in files and not res["tokenizer"]  # 1024 tokens do not fit a vocab of 512
    assert inspect_checkpoint(folder)["format"] == STORED[fmt]
    v = verify_checkpoint(folder)
    assert v["ok"] and v["finite"] and 0.3 < v["logits_std"] < 3.0, v
    assert res["routing_min_used"] > 0.9 and res["routing_max_over_mean"] < 3.0, res["routing"]


def test_activations_and_routing_through_the_layers(tiny):
    """On the real hidden states of random tokens (the router is high precision in every recipe, so the BF16
    checkpoint stands for all formats): logits std sane, residual O(1), routing spread over the experts."""
    logits, stds, routing = _logits_and_routing(tiny["bf16"]["output"])
    assert np.isfinite(logits).all() and 0.3 < logits.std() < 3.0, logits.std()
    assert max(stds) < 4.0, stds  # the residual stream stays O(1)
    assert sorted(routing) == [1, 4]
    assert all(used > 0.9 and ratio < 3.0 for used, ratio in routing.values()), routing


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8", "hlwq-q5"])
def test_quantized_equals_converting_the_bf16_checkpoint(tiny, tmp_path, fmt):
    """Drawing + quantizing in one stream gives the same bytes as ``nemojax convert --to FMT`` of the BF16 output."""
    ref = tmp_path / "ref"
    convert_checkpoint(tiny["bf16"]["output"], ref, fmt, max_shard_bytes=200_000, progress=False)
    a, b = Checkpoint(tiny[fmt]["output"]), Checkpoint(str(ref))
    assert sorted(a.names) == sorted(b.names)
    for n in a.names:
        assert a.dtype(n) == b.dtype(n) and np.asarray(a.get(n)).tobytes() == np.asarray(b.get(n)).tobytes(), n
    for f in ("hf_quant_config.json", "polar_config.json"):
        if os.path.exists(ref / f):
            with open(ref / f) as x, open(os.path.join(tiny[fmt]["output"], f)) as y:
                jx, jy = json.load(x), json.load(y)
            assert jx == jy, f


def _check_index(folder: str, max_shard: int) -> None:
    """The index against the shards, read with the official safetensors package."""
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        index = json.load(f)
    wm, total, seen = index["weight_map"], 0, set()
    shards = sorted(set(wm.values()))
    assert shards == sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    assert shards == [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    for fname in shards:
        with safe_open(os.path.join(folder, fname), "np") as sf:
            keys = list(sf.keys())
            assert all(wm[k] == fname for k in keys)
            seen.update(keys)
            nbytes = 0
            for k in keys:
                sl = sf.get_slice(k)
                bits = {"F8_E4M3": 8, "BF16": 16, "F32": 32, "U8": 8, "F16": 16, "I8": 8, "I64": 64}[sl.get_dtype()]
                nbytes += math.prod(sl.get_shape()) * bits // 8
        total += nbytes
        assert nbytes <= max_shard or len(keys) == 1, (fname, nbytes)  # a larger tensor gets a shard of its own
    assert seen == set(wm) and index["metadata"]["total_size"] == total


@pytest.mark.parametrize("fmt", FORMATS)
def test_shards_and_index(tiny, fmt):
    assert tiny[fmt]["shards"] > 1
    _check_index(tiny[fmt]["output"], 200_000)


def test_values_like_a_trained_model(tiny):
    ck, cfg = Checkpoint(tiny["bf16"]["output"]), nemojax.Config.from_json(tiny["bf16"]["output"])
    g = lambda n: np.asarray(ck.get(n), np.float64)  # noqa: E731
    L, K, H = len(PATTERN), cfg.conv_kernel, cfg.hidden_size
    norms = np.concatenate([g(n) for n in ck.names if n.endswith("norm.weight") or n.endswith("norm_f.weight")])
    assert abs(norms.mean() - 1) < 0.01 and abs(norms.std() - 0.05) < 0.01
    A = np.exp(np.concatenate([g(n) for n in ck.names if n.endswith("A_log")]))
    assert A.min() >= 1 and A.max() <= 16 and A.max() - A.min() > 7
    dt = np.log1p(np.exp(np.concatenate([g(n) for n in ck.names if n.endswith("dt_bias")])))  # softplus
    assert dt.min() >= 0.002 * 0.99 and dt.max() <= 0.05 * 1.01
    conv = np.concatenate([g(n).ravel() for n in ck.names if n.endswith("conv1d.weight")])
    assert abs(conv.std() - 1 / math.sqrt(K)) < 0.05
    assert abs(g("backbone.embeddings.weight").std() - 1) < 0.02
    assert abs(g("lm_head.weight").std() - 1 / math.sqrt(H)) < 0.01
    up = g("backbone.layers.1.mixer.experts.3.up_proj.weight")
    down = g("backbone.layers.1.mixer.experts.3.down_proj.weight")
    assert abs(up.std() * math.sqrt(H) - 1) < 0.05
    assert abs(down.std() * math.sqrt(up.shape[0] * L) - 1) < 0.1  # residual writers: also / sqrt(layers)
    bias = g("backbone.layers.1.mixer.gate.e_score_correction_bias")
    assert ck.dtype("backbone.layers.1.mixer.gate.e_score_correction_bias") == np.float32 and bias.std() < 0.05


def test_layers_keeps_the_first_layers(tiny, tmp_path):
    out = tiny["tool"].make_checkpoint(tiny["config"], str(tmp_path / "two"), "bf16", layers=4, seed=3,
                                       progress=False)
    with open(os.path.join(out["output"], "config.json")) as f:
        conf = json.load(f)
    assert conf["hybrid_override_pattern"] == "MEM*" and conf["num_hidden_layers"] == 4
    assert conf["time_step_min"] == 0.002  # the input's fields are kept
    small, full = Checkpoint(out["output"]), Checkpoint(tiny["bf16"]["output"])
    assert set(small.names) < set(full.names)
    for n in small.names:  # each tensor from its own stream: the first layers of the full model
        assert np.asarray(small.get(n)).tobytes() == np.asarray(full.get(n)).tobytes(), n
    with pytest.raises(SystemExit, match="--layers 10"):
        tiny["tool"].make_checkpoint(tiny["config"], str(tmp_path / "x"), "bf16", layers=10, progress=False)
    with pytest.raises(SystemExit, match="--format 'int3'"):
        tiny["tool"].make_checkpoint(tiny["config"], str(tmp_path / "x"), "int3", progress=False)


def test_real_widths(tmp_path):
    """Two layers ("ME") of the real model at hidden 2688 (8 experts, vocab 2048): its own process, so the peak
    RSS is the tool's."""
    with open(REAL) as f:
        conf = json.load(f)
    conf.update(vocab_size=2048, n_routed_experts=8)
    cfg_path = _write_json(tmp_path / "config.json", conf)
    out = tmp_path / "real"
    r = subprocess.run([sys.executable, TOOL, cfg_path, str(out), "--layers", "2", "--max-shard-size", "50MB",
                        "--seed", "1", "--json"], capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr
    assert "33/33 tensors" in r.stderr and "GB written" in r.stderr  # progress on stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["pattern"] == "ME" and res["tensor_bytes"] > 250e6 and res["tokenizer"]
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    _check_index(str(out), 50_000_000)
    # peak memory: about one shard / the largest tensor above what the process held before, never the model
    grew = res["peak_rss_bytes"] - res["baseline_rss_bytes"]
    assert grew < 3 * max(res["largest_shard_bytes"], res["largest_tensor_bytes"]) and grew < res["tensor_bytes"] / 2
    cfg = nemojax.Config.from_json(out)
    assert cfg.hidden_size == 2688 and cfg.mamba_in_proj_dim == 10304 and cfg.moe_intermediate_size == 1856
    logits, stds, routing = _logits_and_routing(str(out), tokens=128)
    assert np.isfinite(logits).all() and 0.3 < logits.std() < 3.0 and max(stds) < 4.0
    assert routing[1][0] > 0.9 and routing[1][1] < 3.0, routing
