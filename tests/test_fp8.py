"""FP8 weights (nemojax.formats.fp8) against NVIDIA ModelOpt 0.47's own exports (golden data made by
tools/make_fp8_golden.py, read with the official ``safetensors`` package) and against float64 NumPy."""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import nemojax
from nemojax import quant
from nemojax.checkpoint import TARGETS, CheckpointError, save_params
from nemojax.formats import FORMATS, QuantError, is_quantized
from nemojax.formats.fp8 import FP8Weight, activation_multiplier, dequantize, fake_quant, quantize
from nemojax.params import param_specs, tree_paths
from nemojax.checkpoint.modelopt import linear_modules, quant_algos

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(__file__), "data", "fp8")
SOURCE = os.path.join(os.path.dirname(__file__), "data", "nvfp4", "nemotronh", "source")
E4M3 = ml_dtypes.float8_e4m3fn
golden = pytest.mark.skipif(not os.path.isdir(DATA), reason="golden data missing (tools/make_fp8_golden.py)")


DTYPES = {"F8_E4M3": E4M3, "BF16": ml_dtypes.bfloat16, "F32": np.float32}


def load(path):
    """{name: NumPy array} of a safetensors file, parsed by the official package (``safetensors.deserialize``;
    its NumPy loader cannot read F8_E4M3 / BF16): float8 as ml_dtypes.float8_e4m3fn, bf16 as ml_dtypes.bfloat16."""
    import safetensors

    with open(path, "rb") as f:
        items = safetensors.deserialize(f.read())
    return {k: np.frombuffer(bytes(v["data"]), DTYPES[v["dtype"]]).reshape(v["shape"]) for k, v in items}


def bytes_of(a):
    return np.atleast_1d(np.asarray(a)).view(np.uint8)


def np_export(w, export_dtype=ml_dtypes.bfloat16):
    """NumPy transcription of ModelOpt's FP8 export: s = f32(amax)/448, codes = e4m3(export_dtype(f32(w)/s))."""
    w32 = np.asarray(w, np.float32)
    s = np.float32(np.abs(w32).max()) / np.float32(448)
    q = (np.asarray(w32.astype(export_dtype), np.float32) / s)
    return (q.astype(export_dtype) if export_dtype != np.float32 else q).astype(E4M3), s


def np_fake_quant(x, amax):
    """NumPy transcription of ModelOpt's _fp8_eager: m = 448 * (1/amax); e4m3(clip(x*m)) * (1/m) (float32)."""
    m = np.float32(448) * (np.float32(1) / np.float32(amax))
    q = np.clip(np.asarray(x, np.float32) * m, -448, 448).astype(E4M3)
    return q.astype(np.float32) * (np.float32(1) / m)


@pytest.fixture(scope="module")
def seq():
    return load(os.path.join(DATA, "seq", "model.safetensors")), np.load(os.path.join(DATA, "seq", "reference.npz"))


@pytest.fixture(scope="module")
def nemotronh():
    exp = load(os.path.join(DATA, "nemotronh", "export", "model.safetensors"))
    src = load(os.path.join(SOURCE, "model.safetensors"))
    ref = np.load(os.path.join(DATA, "nemotronh", "reference.npz"))
    with open(os.path.join(DATA, "nemotronh", "export", "hf_quant_config.json")) as f:
        hfq = json.load(f)
    return exp, src, ref, hfq


# ---------------------------------------------------------------------------------------------------------------
# bit-exact against ModelOpt
# ---------------------------------------------------------------------------------------------------------------
@golden
def test_seq_export_bytes_and_scales_bit_exact(seq):
    exp, ref = seq
    for i in ("0", "2"):
        w = jnp.asarray(ref[f"w_bf16.{i}.weight"].astype(ml_dtypes.bfloat16))
        for fn in (quantize, jax.jit(quantize)):
            q, s = fn(w)
            assert q.dtype == jnp.float8_e4m3fn and s.shape == () and s.dtype == jnp.float32
            np.testing.assert_array_equal(bytes_of(q), bytes_of(exp[f"{i}.weight"]))
            assert np.float32(s) == exp[f"{i}.weight_scale"]
        amax_in = np.float32(ref[f"{i}.input_quantizer._amax"]).reshape(())
        assert jnp.float32(amax_in) / jnp.float32(448) == exp[f"{i}.input_scale"]
        assert exp[f"{i}.weight_scale"].shape == () and exp[f"{i}.input_scale"].shape == ()


@golden
def test_seq_crafted_rows(seq):
    """amax -> 0x7E/0xFE; the 2^-10 tie -> +0, tiny negatives and -0.0 -> 0x80; the bf16 double rounding
    rows: ModelOpt's bytes are NOT the float32 quotient cast once (so the exactness test above has teeth)."""
    exp, ref = seq
    b0 = bytes_of(exp["0.weight"])
    assert list(b0[0, :2]) == [0x7E, 0xFE]
    assert list(b0[3, :8]) == [0x00, 0x80, 0x01, 0x81, 0x80, 0x80, 0x80, 0x00]
    w2 = ref["w_bf16.2.weight"]
    once = (w2 / np.float32(exp["2.weight_scale"])).astype(E4M3)
    assert (bytes_of(once)[0, :16] != bytes_of(exp["2.weight"])[0, :16]).all()
    assert (bytes_of(once) != bytes_of(exp["2.weight"])).sum() > 100
    twice, _ = np_export(w2)
    np.testing.assert_array_equal(bytes_of(twice), bytes_of(exp["2.weight"]))


@golden
def test_seq_activation_fake_quant_bit_exact(seq):
    """From the checkpoint's input_scale alone, ModelOpt's fake-quantized activations, bit for bit (zero,
    saturating and subnormal rows of x_test included)."""
    exp, ref = seq
    for i in ("0", "2"):
        x = jnp.asarray(ref[f"{i}.input"].astype(ml_dtypes.bfloat16))
        s = jnp.asarray(exp[f"{i}.input_scale"])
        for fn in (fake_quant, jax.jit(fake_quant)):
            np.testing.assert_array_equal(np.asarray(fn(x, s), np.float32), ref[f"{i}.input_fq"])
        amax = np.float32(ref[f"{i}.input_quantizer._amax"]).reshape(())
        assert np.float32(activation_multiplier(s)) == np.float32(448) * (np.float32(1) / amax)
    # x_test row 1 goes past the calibrated range: it saturates at 448 / m; row 0 is zero
    m = np.float32(activation_multiplier(jnp.asarray(exp["0.input_scale"])))
    sat = (np.float32(448) * (np.float32(1) / m)).astype(ml_dtypes.bfloat16).astype(np.float32)
    assert np.abs(ref["0.input_fq"][1]).max() == sat and not ref["0.input_fq"][0].any()


@golden
def test_seq_w8a8_layer_matches_modelopt(seq):
    """FP8Weight in w8a8 mode on layer 2's input vs ModelOpt's fake-quant output. ModelOpt's weight fake quant
    rounds once (x * 448/amax) where its export rounds twice (via bf16): ~3% of the weights sit one e4m3 step
    apart, so the layer outputs agree to ~1%; each side is its own (fake-quantized input) x (weight) product."""
    exp, ref = seq
    node = FP8Weight.from_arrays(exp["2.weight"], exp["2.weight_scale"], exp["2.input_scale"], mode="w8a8")
    y = np.asarray(node.matmul(jnp.asarray(ref["2.input"].astype(ml_dtypes.bfloat16))), np.float32)
    y_mo = ref["y_fakequant"]
    x_fq = ref["2.input_fq"].astype(np.float64)
    ours = x_fq @ np.asarray(node.dequantize(jnp.bfloat16), np.float64).T
    theirs = x_fq @ ref["2.weight_fq"].astype(np.float64).T
    bf16_ulp = 2.0 ** -7 * np.abs(theirs).max()
    np.testing.assert_allclose(y, ours, rtol=2 ** -7, atol=bf16_ulp)
    np.testing.assert_allclose(y_mo, theirs, rtol=2 ** -7, atol=bf16_ulp)
    assert np.linalg.norm(y - y_mo) / np.linalg.norm(y_mo) < 0.02


def _export_names(exp):
    return sorted(k.removesuffix(".weight_scale") for k in exp if k.endswith(".weight_scale"))


@golden
def test_nemotronh_every_quantized_tensor_bit_exact(nemotronh):
    """Every FP8 linear of ModelOpt's Nemotron-H export: codes and weight_scale from the BF16 source; routed
    experts quantized as one stacked bank (one scale per expert); input_scale = calibrated amax / 448."""
    exp, src, ref, _ = nemotronh
    names = _export_names(exp)
    assert len(names) == 64
    qj = jax.jit(quantize)
    for name in names:
        q, s = qj(jnp.asarray(src[name + ".weight"]))
        np.testing.assert_array_equal(bytes_of(q), bytes_of(exp[name + ".weight"]), err_msg=name)
        assert np.float32(s) == exp[name + ".weight_scale"], name
        assert exp[name + ".weight_scale"].shape == () == exp[name + ".input_scale"].shape
    banks = sorted({n.rsplit(".", 2)[0] + "." + n.rsplit(".", 1)[1] for n in names
                    if ".experts." in n and ".shared_experts." not in n})
    assert len(banks) == 6
    for bank in banks:
        head, proj = bank.rsplit(".", 1)
        members = [f"{head}.{e}.{proj}" for e in range(8)]
        q, s = qj(jnp.asarray(np.stack([src[m + ".weight"] for m in members])))
        assert q.shape[0] == 8 and s.shape == (8,)
        np.testing.assert_array_equal(bytes_of(q), np.stack([bytes_of(exp[m + ".weight"]) for m in members]))
        np.testing.assert_array_equal(np.asarray(s), np.stack([exp[m + ".weight_scale"] for m in members]))
        # one input quantizer per fused bank in transformers 5: every expert carries the same input_scale
        amax = np.float32(ref[f"amax.model.{head.removeprefix('backbone.')}.{proj}_input_quantizer._amax"])
        for m in members:
            assert jnp.float32(amax) / jnp.float32(448) == exp[m + ".input_scale"], m
    for name in names:
        if ".experts." in name and ".shared_experts." not in name:
            continue
        amax = np.float32(ref[f"amax.model.{name.removeprefix('backbone.')}.input_quantizer._amax"])
        assert jnp.float32(amax) / jnp.float32(448) == exp[name + ".input_scale"], name


@golden
def test_nemotronh_exclusions_and_unquantized_tensors(nemotronh):
    """A linear is FP8 (has weight_scale) iff no exclude_modules pattern (fnmatch, checkpoint naming) matches it;
    q/k/v keep their own weight_scale (ModelOpt merges nothing for FP8); KV scales are 0-d float32."""
    exp, src, _, hfq = nemotronh
    q = hfq["quantization"]
    assert (q["quant_algo"], q["kv_cache_quant_algo"]) == ("FP8", "FP8") and "group_size" not in q
    excl = q["exclude_modules"]
    quantized = set(_export_names(exp))
    linears = {k.removesuffix(".weight") for k in exp if k.endswith(".weight") and exp[k].ndim == 2
               and "embeddings" not in k and "norm" not in k}
    for m in sorted(linears):
        assert (m in quantized) != any(fnmatch.fnmatchcase(m, p) for p in excl), m
    assert "backbone.layers.3.mixer.q_proj" not in quantized and "backbone.layers.7.mixer.q_proj" in quantized
    assert "backbone.layers.2.mixer.in_proj" not in quantized and "backbone.layers.6.mixer.in_proj" in quantized
    assert len({float(exp[f"backbone.layers.7.mixer.{p}_proj.weight_scale"]) for p in "qkv"}) == 3
    for k, t in exp.items():
        if k.endswith((".k_scale", ".v_scale")):
            assert t.dtype == np.float32 and t.shape == (), k
        elif k.rsplit(".", 1)[0] not in quantized:  # bf16, except the router's bias (kept float32)
            assert t.dtype == (np.float32 if k.endswith("e_score_correction_bias") else ml_dtypes.bfloat16), k
            np.testing.assert_array_equal(t, src[k].astype(t.dtype), err_msg=k)
    assert sorted(k for k in exp if k.endswith("_scale") and "proj." in k and k.endswith(("k_scale", "v_scale"))) \
        == [f"backbone.layers.{i}.mixer.{p}_proj.{p}_scale" for i in (3, 7) for p in "kv"]


@golden
def test_nemotronh_activation_fake_quant_bit_exact(nemotronh):
    exp, _, ref, _ = nemotronh
    acts = sorted(k.removeprefix("act.").removesuffix(".input") for k in ref.files
                  if k.startswith("act.") and k.endswith(".input"))
    assert len(acts) == 7
    fq = jax.jit(fake_quant)
    for n in acts:
        ck = "backbone." + n.removeprefix("model.")
        if ck.endswith("mixer.experts.down_proj"):
            ck = ck.replace("experts.", "experts.0.")
        x = jnp.asarray(ref[f"act.{n}.input"].astype(ml_dtypes.bfloat16))
        got = np.asarray(fq(x, jnp.asarray(exp[ck + ".input_scale"])), np.float32)
        np.testing.assert_array_equal(got, ref[f"act.{n}.input_fq"], err_msg=n)
    # the multiplier recovered from input_scale is ModelOpt's 448 * (1/amax) for every calibrated input
    amaxes = [k for k in ref.files if k.startswith("amax.") and "input_quantizer" in k]
    assert len(amaxes) == 22
    for k in amaxes:
        a = np.float32(ref[k]).reshape(())
        s = jnp.float32(a) / jnp.float32(448)
        assert np.float32(activation_multiplier(s)) == np.float32(448) * (np.float32(1) / a), k


# ---------------------------------------------------------------------------------------------------------------
# the registered format: ModelOpt's export loaded, run, reproduced by quantize / convert
# ---------------------------------------------------------------------------------------------------------------
EXPORT = os.path.join(DATA, "nemotronh", "export")
BF16_KEPT = ("backbone.layers.2.*", "backbone.layers.3.*")  # the golden export's first attention layer + Mamba before


def node_paths(params):
    """``{param path: leaf}`` with quantized nodes as leaves."""
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]
    return {".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in kp): leaf for kp, leaf in flat}


def modelopt_amaxes(ref):
    """ModelOpt's calibrated activation amaxes in nemojax's calibration naming (quant.calibrate_model)."""
    out = {}
    for k in ref.files:
        if k.startswith("amax.") and "weight_quantizer" not in k:
            name = k.removeprefix("amax.model.").removesuffix("._amax")
            name = name.replace(".input_quantizer", "").replace("_input_quantizer", "")
            name = name.replace(".k_bmm_quantizer", ".k_proj.k").replace(".v_bmm_quantizer", ".v_proj.v")
            out[name] = float(np.asarray(ref[k]).reshape(()))
    return out


def modelopt_weight_fake_quant(node, mods, ref, source):
    """``node`` with ModelOpt's in-memory weight fake quant (one rounding, ``e4m3(clip(w * m)) * (1/m)``,
    ``m = 448 * (1/weight amax)``) as codes and scales: the weights ModelOpt's fake-quant logits were computed
    with; its export rounds via bf16 instead (test_seq_crafted_rows)."""
    codes, scales = [], []
    for mod in mods:
        n = mod.removeprefix("backbone.")
        if ".experts." in n and ".shared_experts." not in n:
            head, e, proj = n.rsplit(".", 2)
            key = f"amax.model.{head}.{proj}_weight_quantizers.{e}._amax"
        else:
            key = f"amax.model.{n}.weight_quantizer._amax"
        m = np.float32(448) * (np.float32(1) / np.float32(ref[key]).reshape(()))
        codes.append(np.clip(source[mod + ".weight"].astype(np.float32) * m, -448, 448).astype(E4M3))
        scales.append(np.float32(1) / m)
    stack = len(mods) > 1
    return node.replace(weight=jnp.asarray(np.stack(codes) if stack else codes[0]),
                        weight_scale=jnp.asarray(np.stack(scales) if stack else scales[0]))


def with_modelopt_weights(params, cfg, ref, source):
    specs = dict(tree_paths(param_specs(cfg)))
    out = {}
    for path, leaf in node_paths(params).items():
        if isinstance(leaf, FP8Weight):
            spec = specs[path]
            mods = ([spec.ckpt.format(e=e) for e in range(spec.shape[0])] if spec.stacked else [spec.ckpt])
            leaf = modelopt_weight_fake_quant(leaf, [m.removesuffix(".weight") for m in mods], ref, source)
        out[path] = leaf
    leaves, treedef = jax.tree_util.tree_flatten(params, is_leaf=is_quantized)
    return jax.tree_util.tree_unflatten(treedef, list(out.values()))


def logits(model, params, ids, mode):
    return np.asarray(model.replace(params=quant.set_mode(params, mode)).logits(ids))


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def load_dir(folder):
    """``load`` of every safetensors file of a checkpoint folder."""
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(load(os.path.join(folder, f)))
    return out


def assert_tensors_equal_export(out_dir, exp, missing=()):
    """Every tensor of ``out_dir`` (read with the official safetensors package) is the export's, byte for byte
    (A_log / D: ModelOpt exports them in bf16, nemojax keeps float32 -- equal after rounding); the export's
    other tensors are ``missing``'s."""
    ours = load_dir(out_dir)
    assert sorted(set(exp) - set(ours)) == sorted(missing) and not set(ours) - set(exp)
    for k, a in ours.items():
        b = exp[k]
        if k.endswith((".A_log", ".D")):
            assert a.dtype == np.float32 and b.dtype == ml_dtypes.bfloat16, k
            np.testing.assert_array_equal(a.astype(ml_dtypes.bfloat16), b, err_msg=k)
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, k
        assert bytes_of(a).tobytes() == bytes_of(b).tobytes(), k


def run_cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "nemojax", *args], capture_output=True, text=True, env=env,
                       cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_registered_with_recipes():
    assert FORMATS["fp8"] is FP8Weight and list(FORMATS)[-1] == "fp8"
    assert quant_algos()["FP8"] is FP8Weight
    assert {"fp8", "fp8-all"} <= set(quant.RECIPES) and {"fp8", "fp8-all"} <= set(TARGETS)
    r = quant.RECIPES["fp8"]
    assert r.format == "fp8" and r.kv_cache == "fp8" and r.keep_mamba_before_attention
    assert quant.format_options("fp8") == {"mode": "w8a16"} and quant.format_options("fp8", "w8a8") == {"mode": "w8a8"}
    assert "fp8-all" in run_cli("convert", "--help")


@golden
def test_load_modelopt_export(nemotronh):
    """nemojax.load reads ModelOpt's FP8 export: every FP8 linear a node whose leaves are the stored bytes
    (experts stacked, one weight_scale / input_scale per expert), the BF16-kept layers plain arrays, the FP8 KV
    scales read; runs W8A16 by default."""
    exp, *_ = nemotronh
    m = nemojax.load(EXPORT, dtype="float32")
    specs = dict(tree_paths(param_specs(m.config)))
    nodes = {p: x for p, x in node_paths(m.params).items() if isinstance(x, FP8Weight)}
    n_mods = 0
    for path, node in nodes.items():
        spec = specs[path]
        mods = [spec.ckpt.format(e=e) for e in range(spec.shape[0])] if spec.stacked else [spec.ckpt]
        n_mods += len(mods)
        assert node.mode == "w8a16" and node.shape == spec.shape and node.input_scale is not None, path
        for i, mod in enumerate(m.removesuffix(".weight") for m in mods):
            pick = (lambda a, i=i: np.asarray(a)[i]) if spec.stacked else np.asarray
            for leaf in ("weight", "weight_scale", "input_scale"):
                assert bytes_of(pick(getattr(node, leaf))).tobytes() == bytes_of(exp[f"{mod}.{leaf}"]).tobytes(), mod
    assert n_mods == len(_export_names(exp)) == 64
    for i in (3, 7):
        mixer = m.params["layers"][i]["mixer"]
        for p in "kv":
            assert np.float32(mixer[f"{p}_scale"]) == exp[f"backbone.layers.{i}.mixer.{p}_proj.{p}_scale"]
    assert not is_quantized(m.params["layers"][3]["mixer"]["q_proj"]) and isinstance(
        m.params["layers"][7]["mixer"]["q_proj"], FP8Weight)
    assert not is_quantized(m.params["layers"][2]["mixer"]["in_proj"])
    info = json.loads(run_cli("inspect", EXPORT, "--json"))
    assert info["format"] == "fp8" and info["fp8_modules"] == 64 and info["quantization"]["quant_algo"] == "FP8"


@golden
def test_load_time_mode(nemotronh):
    """``nemojax.load(..., fp8_mode="w8a8")`` (a run option the format declares) equals switching the loaded model's
    mode afterwards; an option no registered format has is a named error."""
    ids = np.random.default_rng(11).integers(3, 200, (2, 8))
    m = nemojax.load(EXPORT, dtype="float32", fp8_mode="w8a8")
    assert {x.mode for x in node_paths(m.params).values() if isinstance(x, FP8Weight)} == {"w8a8"}
    ref = nemojax.load(EXPORT, dtype="float32")
    np.testing.assert_array_equal(np.asarray(m.logits(ids)), logits(ref, ref.params, ids, "w8a8"))
    with pytest.raises(ValueError, match="fp8_mode='w8a4'"):
        nemojax.load(EXPORT, fp8_mode="w8a4")
    with pytest.raises(ValueError, match=r"unknown run option\(s\) \['fp9_mode'\]"):
        nemojax.load(EXPORT, fp9_mode="w8a8")


@golden
def test_w8a16_and_w8a8_logits_equal_modelopt_fake_quant_f32(nemotronh):
    """The loaded export run in float32 against ModelOpt's fake-quant logits (FP8 KV on in both): given the weights
    ModelOpt's fake-quant model computes with (its weight fake quant rounds once where its export rounds twice),
    W8A16 and W8A8 match to 1e-4 (measured 3e-6: fp32 summation order). With the export's own codes the model is
    a different one -- measured relative logit differences 0.20 (W8A16) and 0.26 (W8A8), as large as the
    quantization error itself on this tiny random model (ModelOpt's W8A16 vs float32: 0.22) -- so the export's
    codes are checked byte for byte instead (test_load_modelopt_export)."""
    exp, src, ref, _ = nemotronh
    ids = ref["input_ids"]
    m = nemojax.load(EXPORT, dtype="float32")
    mo = with_modelopt_weights(m.params, m.config, ref, src)
    for mode, key in (("w8a16", "logits_w8a16_f32"), ("w8a8", "logits_fakequant_f32")):
        np.testing.assert_allclose(logits(m, mo, ids, mode), ref[key], atol=1e-4, rtol=0, err_msg=mode)
        assert 0.1 < rel(logits(m, m.params, ids, mode), ref[key]) < 0.4, mode  # the export's codes
    w16, w8 = logits(m, mo, ids, "w8a16"), logits(m, mo, ids, "w8a8")
    assert np.abs(w16 - w8).max() > 1e-2  # activation quantization is on in W8A8 only


@golden
def test_bf16_logits_within_modelopt_own_bf16_gap(nemotronh):
    """In bf16 the FP8 model is very sensitive to rounding (the FP8 KV cache and W8A8 activations re-round every
    perturbation): ModelOpt's own bf16 logits differ from its float32 ones by 0.16 (W8A16) / 0.17 (W8A8), where
    the unquantized model's differ by 0.013. Stated tolerance: ours (with ModelOpt's weights) within 1.25 x that
    gap of ModelOpt's bf16 logits (measured 0.159 / 0.076), top-1 agreeing on >= 75% of the tokens."""
    _, src, ref, _ = nemotronh
    ids = ref["input_ids"]
    m = nemojax.load(EXPORT, dtype="bfloat16")
    mo = with_modelopt_weights(m.params, m.config, ref, src)
    for mode, key in (("w8a16", "logits_w8a16"), ("w8a8", "logits_fakequant")):
        got = logits(m, mo, ids, mode)
        assert rel(got, ref[key]) <= 1.25 * rel(ref[key], ref[key + "_f32"]), mode
        assert (got.argmax(-1) == ref[key].argmax(-1)).mean() >= 0.75, mode


@golden
def test_fp8_recipe_with_modelopt_calibration_reproduces_the_export(nemotronh, tmp_path):
    """The BF16 source quantized with the fp8-all recipe less the export's BF16 layers and ModelOpt's calibrated
    amaxes (input_scale = amax / 448, k/v_scale = amax / 448), written by nemojax: every tensor is the export's,
    byte for byte; the quantization configs say the same."""
    exp, _, ref, hfq = nemotronh
    src = nemojax.load(SOURCE, dtype="bfloat16")
    recipe = dataclasses.replace(quant.RECIPES["fp8-all"], exclude=quant.RECIPES["fp8-all"].exclude + BF16_KEPT)
    q = quant.apply(src.params, src.config, recipe, calibration=modelopt_amaxes(ref))
    save_params(q, src.config, tmp_path)
    assert_tensors_equal_export(str(tmp_path), exp)
    ours = json.loads((tmp_path / "hf_quant_config.json").read_text())["quantization"]
    assert (ours["quant_algo"], ours["kv_cache_quant_algo"]) == ("FP8", "FP8") and "group_size" not in ours
    theirs = hfq["quantization"]["exclude_modules"]
    for mod in linear_modules(src.config):  # ModelOpt writes globs, nemojax names: the same modules excluded
        assert (mod in ours["exclude_modules"]) == any(fnmatch.fnmatchcase(mod, g) for g in theirs), mod
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    with open(os.path.join(EXPORT, "config.json")) as f:
        qc_mo = json.load(f)["quantization_config"]
    for k in ("config_groups", "quant_algo", "kv_cache_scheme", "quant_method"):
        assert qc[k] == qc_mo[k], k
    # it runs W8A8 as the export does (given the same A_log / D: ModelOpt rounded those to bf16)
    back = nemojax.load(str(tmp_path), dtype="float32")
    theirs = nemojax.load(EXPORT, dtype="float32").params
    for i in back.config.layer_indices("M"):
        theirs["layers"][i]["mixer"].update({k: back.params["layers"][i]["mixer"][k] for k in ("A_log", "D")})
    ids = ref["input_ids"]
    np.testing.assert_array_equal(logits(back, back.params, ids, "w8a8"), logits(back, theirs, ids, "w8a8"))


@golden
def test_own_calibration_gives_w8a8(nemotronh):
    """Without ModelOpt: nemojax's calibration (the same batches) gives ModelOpt's activation amaxes to within the
    bf16 forwards' differences (as for NVFP4: median < 1%, each < 5%, identical for the first linear), and
    ``quant.apply`` with them a W8A8 model with FP8 KV scales."""
    _, _, ref, _ = nemotronh
    src = nemojax.load(SOURCE, dtype="bfloat16")
    ours = quant.calibrate_model(src.params, src.config, list(ref["calib_ids"]), "fp8-all")
    theirs = modelopt_amaxes(ref)
    assert set(theirs) <= set(ours)
    d = {k: abs(ours[k] - v) / v for k, v in theirs.items()}
    assert np.median(list(d.values())) < 0.01 and max(d.values()) < 0.05, d
    assert d["layers.0.mixer.in_proj"] < 1e-6
    q = quant.apply(src.params, src.config, "fp8", calibration=ours, mode="w8a8")
    bank = q["layers"][1]["mixer"]["experts"]["up_proj"]
    assert bank.mode == "w8a8" and bank.input_scale.shape == (8,) and len(set(np.asarray(bank.input_scale))) == 1
    assert np.float32(bank.input_scale[0]) == np.float32(ours["layers.1.mixer.experts.up_proj"]) / np.float32(448)
    assert "k_scale" in q["layers"][7]["mixer"]
    y8, y16 = logits(src, q, ref["input_ids"], "w8a8"), logits(src, q, ref["input_ids"], "w8a16")
    assert np.isfinite(y8).all() and np.abs(y8 - y16).max() > 1e-2


@golden
def test_convert_to_fp8_equals_the_export_bytes(nemotronh, tmp_path):
    """``nemojax convert SRC OUT --to fp8-all --exclude <the export's BF16 layers>`` writes ModelOpt's export
    byte for byte, less what needs calibration: convert is weight-only (W8A16; no input_scale, no FP8 KV
    scales; config.json's quantization_config without input_activations). It loads back and runs W8A16;
    W8A8 refuses. ``--to fp8`` gives the published selective layout."""
    exp, *_ = nemotronh
    out = tmp_path / "fp8"
    excl = [a for g in BF16_KEPT for a in ("--exclude", g)]
    run_cli("convert", SOURCE, str(out), "--to", "fp8-all", *excl, "--no-progress")
    calibrated = [k for k in exp if k.endswith((".input_scale", ".k_scale", ".v_scale"))]
    assert len(calibrated) == 64 + 4
    assert_tensors_equal_export(str(out), exp, missing=calibrated)
    q = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert (q["quant_algo"], q["kv_cache_quant_algo"]) == ("FP8", None)
    assert "input_activations" not in json.loads((out / "config.json").read_text())["quantization_config"][
        "config_groups"]["group_0"]
    m = nemojax.load(str(out), dtype="float32")
    ids = np.arange(8)[None] * 7 % 512
    np.testing.assert_array_equal(logits(m, m.params, ids, "w8a16"), np.asarray(m.logits(ids)))
    with pytest.raises(QuantError, match="fp8_mode='w8a8' needs input_scale"):
        quant.set_mode(m.params, "w8a8")
    nano = tmp_path / "nano"
    run_cli("convert", SOURCE, str(nano), "--to", "fp8", "--no-progress")
    got = load_dir(nano)
    want = set()
    for mod in quant.quantized_modules(m.config, "fp8").values():  # stacked banks named by expert 0
        want |= {mod.replace(".experts.0.", f".experts.{e}.") for e in range(8)} if ".experts.0." in mod else {mod}
    fp8_mods = {k.removesuffix(".weight_scale") for k in got if k.endswith(".weight_scale")}
    kept = tuple(f"backbone.layers.{i}." for i in (2, 3, 6, 7))  # attention layers 3, 7 and the Mamba before each
    assert fp8_mods == want and not [k for k in want if k.startswith(kept)]
    for mod in fp8_mods:  # the modules FP8 in both: ModelOpt's bytes
        for sfx in (".weight", ".weight_scale"):
            assert bytes_of(got[mod + sfx]).tobytes() == bytes_of(exp[mod + sfx]).tobytes()


@golden
def test_orbax_round_trip(tmp_path):
    out = tmp_path / "orbax"
    run_cli("convert", EXPORT, str(out), "--to", "orbax", "--no-progress")
    a, b = nemojax.load(EXPORT, dtype="float32"), nemojax.load(str(out), dtype="float32")
    na, nb = node_paths(a.params), node_paths(b.params)
    assert na.keys() == nb.keys()
    for p in na:
        for x, y in zip(jax.tree.leaves(na[p]), jax.tree.leaves(nb[p])):
            assert x.dtype == y.dtype and bytes_of(x).tobytes() == bytes_of(y).tobytes(), p
        assert type(na[p]) is type(nb[p])
    ids = np.arange(8)[None] * 5 % 512
    np.testing.assert_array_equal(logits(a, a.params, ids, "w8a8"), logits(b, b.params, ids, "w8a8"))


def save_dir(folder, tensors):
    """A checkpoint folder: the export's config files and ``tensors`` written by the official safetensors package."""
    import safetensors

    os.makedirs(folder)
    for f in ("config.json", "hf_quant_config.json"):
        with open(os.path.join(EXPORT, f)) as src, open(os.path.join(folder, f), "w") as dst:
            dst.write(src.read())
    arrays = {k: np.ascontiguousarray(a) for k, a in tensors.items()}  # alive while serialize_file reads them
    specs = {k: safetensors.TensorSpec(dtype=a.dtype.name, shape=list(a.shape), data_ptr=a.ctypes.data,
                                       data_len=a.nbytes) for k, a in arrays.items()}
    safetensors.serialize_file(specs, os.path.join(folder, "model.safetensors"))
    return str(folder)


@golden
def test_checkpoint_errors_are_named(nemotronh, tmp_path):
    exp, *_ = nemotronh
    mod = "backbone.layers.0.mixer.in_proj"
    cases = [(lambda t: t.pop(mod + ".weight"), "in_proj.*has weight_scale but no .*in_proj.weight'"),
             (lambda t: t.update({mod + ".weight": t[mod + ".weight"].astype(ml_dtypes.bfloat16)}),
              "in_proj.weight.*dtype bfloat16; expected F8_E4M3 codes"),
             (lambda t: t.update({mod + ".weight_scale": np.float32([1, 2])}), r"in_proj.weight_scale.*shape \[2\]"),
             (lambda t: t.update({mod + ".weight": np.full((328, 64), 0x7F, np.uint8).view(E4M3)}),
              r"model.safetensors: backbone.layers.0.mixer.in_proj.weight: contains NaN codes"),
             (lambda t: t.update({mod + ".input_scale": np.float32(0)}), "in_proj.input_scale: scales must be finite")]
    for i, (edit, msg) in enumerate(cases):
        t = dict(exp)
        edit(t)
        with pytest.raises(CheckpointError, match=msg):
            nemojax.load(save_dir(tmp_path / str(i), t))
    bank = "backbone.layers.1.mixer.experts.5.up_proj.input_scale"
    partial = save_dir(tmp_path / "partial", {k: a for k, a in exp.items() if k != bank})
    m = nemojax.load(partial)  # a bank without every expert's input_scale: weight-only
    assert m.params["layers"][1]["mixer"]["experts"]["up_proj"].input_scale is None
    with pytest.raises(QuantError, match="fp8_mode='w8a8' needs input_scale"):
        quant.set_mode(m.params, "w8a8")


SHARDED = """
import json, sys
import jax, numpy as np
import nemojax
from nemojax import sharding as S
from nemojax.checkpoint import load_sharded
from nemojax.config import Config
path = sys.argv[1]
cfg = Config.from_json(path)
log = []
mesh = S.make_mesh(1, 4, 1)
sp = load_sharded(path, cfg, mesh, "float32", read_log=log)
ref = nemojax.load(path, dtype="float32").params
same = jax.tree.structure(sp) == jax.tree.structure(ref) and all(
    x.dtype == y.dtype and np.asarray(x).tobytes() == np.asarray(y).tobytes()
    for x, y in zip(jax.tree.leaves(sp), jax.tree.leaves(ref)))
up = sp["layers"][1]["mixer"]["experts"]["up_proj"]
reads = sorted({idx[0].indices(8)[1] - idx[0].indices(8)[0] for p, idx in log if p.endswith("up_proj.weight")
                and ".experts." in p})
from nemojax import quant
from nemojax.model import forward_jit
ids = jax.numpy.asarray(np.arange(16).reshape(2, 8) * 7 % 512, jax.numpy.int32)
sp, ref = quant.set_mode(sp, "w8a8"), quant.set_mode(ref, "w8a8")
diff = float(np.abs(np.asarray(forward_jit(sp, cfg, ids, mesh=mesh)) - np.asarray(forward_jit(ref, cfg, ids))).max())
print(json.dumps({"same": same, "type": type(up).__name__, "spec": str(up.weight.sharding.spec),
                  "experts_per_read": reads, "forward_max_abs": diff}))
"""


@golden
def test_sharded_load_reads_each_devices_experts():
    """``checkpoint.load_sharded`` on 4 CPU devices (a subprocess: the device count is fixed before JAX starts):
    the stored FP8 tensors read slice by slice, equal to ``nemojax.load``'s, the same W8A8 forward."""
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, "-c", SHARDED, EXPORT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["same"] and got["type"] == "FP8Weight" and got["spec"] == "P('expert', None, None)", got
    assert got["experts_per_read"] == [2], got  # 8 experts over 4 devices: each read 2
    assert got["forward_max_abs"] == 0.0, got  # W8A8, experts split only: every sum computed whole on one device


# ---------------------------------------------------------------------------------------------------------------
# against float64 NumPy on fresh inputs
# ---------------------------------------------------------------------------------------------------------------
def test_quantize_matches_numpy_transcription_random():
    rng = np.random.default_rng(7)
    for dt in (ml_dtypes.bfloat16, np.float16, np.float32):
        w = (rng.standard_normal((37, 53)) * 0.03).astype(dt)
        q, s = jax.jit(quantize)(jnp.asarray(w))
        rq, rs = np_export(w, dt)
        np.testing.assert_array_equal(bytes_of(q), bytes_of(rq), err_msg=str(dt))
        assert np.float32(s) == rs
    # a float32 in-memory weight exported in bf16: amax of the float32 weight, the bf16 weight divided
    w = (rng.standard_normal((16, 24)) * 0.1).astype(np.float32)
    q, s = quantize(jnp.asarray(w), export_dtype=jnp.bfloat16)
    assert np.float32(s) == np.float32(np.abs(w).max()) / np.float32(448)
    ref = (w.astype(ml_dtypes.bfloat16).astype(np.float32) / np.float32(s)).astype(ml_dtypes.bfloat16).astype(E4M3)
    np.testing.assert_array_equal(bytes_of(q), bytes_of(ref))


def test_dequantize_and_matmul_against_float64():
    rng = np.random.default_rng(11)
    w = jnp.asarray((rng.standard_normal((3, 40, 24)) * np.array([0.01, 0.2, 3.0])[:, None, None])
                    .astype(ml_dtypes.bfloat16))
    node = FP8Weight.from_float(w)
    assert node.shape == (3, 40, 24) and node.weight_scale.shape == (3,)
    codes64 = np.asarray(node.weight).astype(np.float64)
    w64 = codes64 * np.asarray(node.weight_scale, np.float64)[:, None, None]
    # the float32 product of a 4-bit and a 24-bit significand is exact: dequantize == float64, rounded once
    np.testing.assert_array_equal(np.asarray(node.dequantize(jnp.float32)), w64.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(dequantize(node.weight, node.weight_scale, jnp.bfloat16), np.float32),
                                  w64.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float32))
    assert float(np.abs(w64 - np.asarray(w, np.float64)).max() / np.abs(np.asarray(w, np.float64)).max()) < 2 ** -4
    x = rng.standard_normal((5, 7, 24)).astype(np.float32)
    # a stacked bank computes every expert: [..., E, N], in W8A8 each with its own input_scale
    for mode, ins in (("w8a16", None), ("w8a8", np.float32([0.004, 0.002, 0.001]))):
        bank = node.replace(mode=mode, input_scale=None if ins is None else jnp.asarray(ins))
        y = np.asarray(bank.matmul(jnp.asarray(x)))
        assert y.shape == (5, 7, 3, 40)
        for e in range(3):
            np.testing.assert_allclose(y[..., e, :], np.asarray(jax.tree.map(lambda a, e=e: a[e], bank).matmul(
                jnp.asarray(x))), rtol=1e-6, atol=1e-6 * np.abs(y).max())  # fp32 summation order only
    for e in range(3):
        one = jax.tree.map(lambda a, e=e: a[e], node)  # one expert of the bank, as the MoE code takes it
        y = np.asarray(jax.jit(lambda n, x: n.matmul(x))(one, jnp.asarray(x)))
        ref = x.astype(np.float64) @ w64[e].T
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        yb = np.asarray(one.matmul(jnp.asarray(x.astype(ml_dtypes.bfloat16))), np.float32)
        refb = x.astype(ml_dtypes.bfloat16).astype(np.float64) @ w64[e].T
        np.testing.assert_allclose(yb, refb, rtol=1e-2, atol=1e-2 * np.abs(refb).max())


def test_w8a8_matmul_against_float64():
    rng = np.random.default_rng(3)
    w = jnp.asarray((rng.standard_normal((32, 48)) * 0.05).astype(ml_dtypes.bfloat16))
    x = (rng.standard_normal((6, 48)) * 2).astype(ml_dtypes.bfloat16)
    x[0, :5] = [0, 100, -100, 1e-5, -1e-5]  # saturating and underflowing activations
    amax = np.float32(np.abs(x[1:].astype(np.float32)).max())  # "calibrated" on the other rows (a bf16 value)
    input_scale = np.float32(amax) / np.float32(448)
    node = FP8Weight.from_float(w, input_scale=input_scale, mode="w8a8")
    x_fq = np_fake_quant(x, amax)
    np.testing.assert_array_equal(np.asarray(fake_quant(jnp.asarray(x).astype(jnp.float32), input_scale)), x_fq)
    m = np.float32(448) * (np.float32(1) / amax)
    assert x_fq[0, 1] == -x_fq[0, 2] == np.float32(448) * (np.float32(1) / m)  # saturated
    assert x_fq[0, 3] == x_fq[0, 4] == 0  # below half the smallest e4m3 subnormal
    w64 = np.asarray(node.dequantize(), np.float64)
    ref = x_fq.astype(ml_dtypes.bfloat16).astype(np.float64) @ w64.T
    y = np.asarray(jax.jit(lambda n, x: n.matmul(x))(node, jnp.asarray(x)), np.float32)
    np.testing.assert_allclose(y, ref, rtol=1e-2, atol=1e-2 * np.abs(ref).max())
    y32 = np.asarray(node.matmul(jnp.asarray(x).astype(jnp.float32)))
    np.testing.assert_allclose(y32, x_fq.astype(np.float64) @ w64.T, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # w8a16 ignores input_scale
    y16 = np.asarray(node.replace(mode="w8a16").matmul(jnp.asarray(x).astype(jnp.float32)))
    np.testing.assert_allclose(y16, x.astype(np.float64) @ w64.T, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_pytree_node():
    node = FP8Weight.from_float(jnp.ones((8, 16), jnp.bfloat16), input_scale=0.5, mode="w8a8")
    leaves, tree = jax.tree.flatten(node)
    assert len(leaves) == 3 and jax.tree.unflatten(tree, leaves).mode == "w8a8"
    assert node.nbytes == 8 * 16 + 4 + 4 and node.shape == (8, 16)
    bank = FP8Weight.from_float(jnp.ones((2, 8, 16)), input_scale=0.5)
    assert bank.nbytes == 2 * 8 * 16 + 2 * 4 + 2 * 4 and bank.input_scale.shape == (2,)
    assert np.all(np.asarray(node.weight).astype(np.float32) == 448) and np.float32(node.weight_scale) == 1 / 448
    # all-zero matrix: scale 1.0 and zero codes (ModelOpt itself would write scale 0 and NaN codes)
    z = FP8Weight.from_float(jnp.zeros((2, 4, 8)).at[1].set(1.0))
    np.testing.assert_array_equal(np.asarray(z.weight_scale), np.float32([1.0, 1 / 448]))
    assert not bytes_of(z.weight)[0].any() and not np.asarray(z.dequantize()[0]).any()


# ---------------------------------------------------------------------------------------------------------------
# error cases
# ---------------------------------------------------------------------------------------------------------------
def test_error_nan_or_inf_weight_is_named():
    for bad in (np.nan, np.inf):
        w = np.ones((4, 8), np.float32)
        w[1, 2] = bad
        with pytest.raises(QuantError, match="layers.0.mixer.in_proj.*NaN or Inf"):
            FP8Weight.from_float(w, name="layers.0.mixer.in_proj")


def test_error_wrong_shapes_and_modes():
    with pytest.raises(QuantError, match="bias: FP8 needs a matrix"):
        FP8Weight.from_float(np.ones(8, np.float32), name="bias")
    with pytest.raises(QuantError, match="w: FP8 mode 'w4a4'"):
        FP8Weight.from_float(np.ones((4, 8), np.float32), mode="w4a4", name="w")
    node = FP8Weight.from_float(np.ones((4, 8), np.float32))
    with pytest.raises(QuantError, match=r"input \[\.\.\., 7\] does not match weight \[4, 8\]"):
        node.matmul(jnp.ones((2, 7)))
    with pytest.raises(QuantError, match="w8a8 mode needs input_scale"):
        node.replace(mode="w8a8").matmul(jnp.ones((2, 8)))
    with pytest.raises(QuantError, match=r"a matrix \[N, K\] or a bank \[E, N, K\], got \[2, 2, 4, 8\]"):
        FP8Weight.from_float(np.ones((2, 2, 4, 8), np.float32)).matmul(jnp.ones((2, 8)))
    with pytest.raises(ValueError, match="fp8_mode='w4a4': expected one of"):
        node.configure(fp8_mode="w4a4")
    with pytest.raises(QuantError, match="fp8_mode='w8a8' needs input_scale"):
        node.configure(fp8_mode="w8a8")


def test_error_checkpoint_arrays_are_checked():
    codes = np.full((2, 4, 8), 0x38, np.uint8)  # 1.0
    node = FP8Weight.from_arrays(codes, np.array([0.5, 0.25], np.float32), name="experts")
    np.testing.assert_array_equal(np.asarray(node.dequantize())[:, 0, 0], [0.5, 0.25])
    assert FP8Weight.from_arrays(codes[0], np.array([0.5], np.float32)).weight_scale.shape == ()
    with pytest.raises(QuantError, match=r"experts.weight_scale: shape \[3\] does not match weight \[2, 4, 8\]"):
        FP8Weight.from_arrays(codes, np.ones(3, np.float32), name="experts")
    with pytest.raises(QuantError, match="x.input_scale: scales must be finite and positive"):
        FP8Weight.from_arrays(codes[0], np.float32(1), np.float32(0), name="x")
    nan = codes.copy()
    nan[1, 2, 3] = 0xFF
    with pytest.raises(QuantError, match="experts.weight: contains NaN codes"):
        FP8Weight.from_arrays(nan, np.ones(2, np.float32), name="experts")
    with pytest.raises(QuantError, match=r"w.weight: FP8 needs float8_e4m3fn \[\.\.\., out, in\], got float32"):
        FP8Weight.from_arrays(np.ones((4, 8), np.float32), np.float32(1), name="w")
