"""NVFP4 against NVIDIA ModelOpt 0.47's own exports (golden bytes made by tools/make_nvfp4_golden.py)."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import nemojax
from nemojax import quant
from nemojax.formats.nvfp4 import NVFP4Weight, dequantize, fake_quant, quantize
from nemojax.checkpoint import SafeFile, save_params

DATA = os.path.join(os.path.dirname(__file__), "data", "nvfp4")
pytestmark = pytest.mark.skipif(not os.path.isdir(DATA), reason="golden data missing (tools/make_nvfp4_golden.py)")


def _bf16(a):
    return jnp.asarray(np.asarray(a, np.float32).astype(ml_dtypes.bfloat16))


def test_seq_export_bytes_and_fake_quant_bit_exact():
    ref = np.load(os.path.join(DATA, "seq", "reference.npz"))
    f = SafeFile(os.path.join(DATA, "seq", "model.safetensors"))
    for i in ("0", "2"):
        w = _bf16(ref[f"w_bf16.{i}.weight"])
        packed, scale, s2 = jax.jit(quantize)(w)
        np.testing.assert_array_equal(np.asarray(packed), f.get(f"{i}.weight"))
        np.testing.assert_array_equal(np.asarray(scale).view(np.uint8), f.get(f"{i}.weight_scale").view(np.uint8))
        assert np.float32(s2) == np.float32(f.get(f"{i}.weight_scale_2"))
        amax_in = np.float32(ref[f"{i}.input_quantizer._amax"]).reshape(())
        g = jnp.float32(amax_in) / jnp.float32(2688.0)
        assert np.float32(g) == np.float32(f.get(f"{i}.input_scale"))
        # activation fake quant (dynamic per-16 scales, static global scale) is ModelOpt's, bit for bit
        xin = _bf16(ref[f"{i}.input_fq"]) if i == "2" else _bf16(ref["x_test"])
        if i == "0":
            np.testing.assert_array_equal(np.asarray(jax.jit(fake_quant)(xin, g), np.float32), ref["0.input_fq"])
        # dequantized export == ModelOpt's fake-quantized weight (except the crafted underflowing 1e-6 block)
        deq = np.asarray(dequantize(packed, scale, s2, jnp.bfloat16), np.float32)
        wfq = ref[f"{i}.weight_fq"]
        bad = (deq != wfq).reshape(deq.shape[0], -1, 16).any(-1)
        assert bad.sum() <= (1 if i == "0" else 0), np.argwhere(bad)
    # the W4A4 linear reproduces ModelOpt's fake-quant layer output
    node = NVFP4Weight(*[jnp.asarray(f.get(f"2.{s}")) for s in ("weight", "weight_scale", "weight_scale_2")],
                       input_scale=jnp.asarray(f.get("2.input_scale")), mode="w4a4")
    y = np.asarray(node.matmul(_bf16(ref["2.input_fq"])), np.float32)
    np.testing.assert_allclose(y, ref["2.output"] if "2.output" in ref else ref["y_fakequant"], atol=2e-2, rtol=2e-2)


def _amaxes(ref, cfg):
    """ModelOpt's calibrated amaxes in nemojax's calibration naming."""
    out = {}
    for k in ref.files:
        if not k.startswith("amax.") or "weight_quantizer" in k:
            continue
        name = k[len("amax.model."):].removesuffix("._amax")
        name = name.replace(".input_quantizer", "").replace("_input_quantizer", "")
        name = name.replace(".k_bmm_quantizer", ".k_proj.k").replace(".v_bmm_quantizer", ".v_proj.v")
        out[name] = float(np.asarray(ref[k]).reshape(()))
    return out


@pytest.fixture(scope="module")
def golden():
    src = os.path.join(DATA, "nemotronh", "source")
    exp = os.path.join(DATA, "nemotronh", "export")
    return src, exp, np.load(os.path.join(DATA, "nemotronh", "reference.npz"))


def test_nemojax_quantization_reproduces_the_modelopt_export(golden, tmp_path):
    src, exp, ref = golden
    model = nemojax.load(src, dtype="bfloat16")
    cfg = model.config
    q = quant.apply(model.params, cfg, "nvfp4", calibration=_amaxes(ref, cfg))
    save_params(q, cfg, tmp_path)
    ours, theirs = SafeFile(tmp_path / "model.safetensors"), SafeFile(os.path.join(exp, "model.safetensors"))
    assert set(ours.keys()) == set(theirs.keys())
    n_q = 0
    for k in theirs.keys():
        a, b = ours.get(k), theirs.get(k)
        if k.endswith((".A_log", ".D")):  # ModelOpt exports these two in bf16; nemojax keeps fp32
            np.testing.assert_array_equal(a.astype(ml_dtypes.bfloat16), b)
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, k
        np.testing.assert_array_equal(np.atleast_1d(a).view(np.uint8), np.atleast_1d(b).view(np.uint8), err_msg=k)
        n_q += k.endswith(".weight_scale_2")
    assert n_q == 58  # every quantized linear, byte for byte


def test_our_calibration_matches_modelopt_amaxes(golden):
    src, exp, ref = golden
    model = nemojax.load(src, dtype="bfloat16")
    ours = quant.calibrate_model(model.params, model.config, [c for c in ref["calib_ids"]])
    theirs = _amaxes(ref, model.config)
    assert set(theirs) <= set(ours)
    # bf16 forwards in JAX and torch differ slightly (transformers computes dt's softplus in bf16, nemojax in
    # fp32), and the difference grows with depth: median relative difference < 1%, every amax within 5%
    rel = {k: abs(ours[k] - v) / v for k, v in theirs.items()}
    assert np.median(list(rel.values())) < 0.01, rel
    assert max(rel.values()) < 0.05, rel
    assert rel["layers.0.mixer.in_proj"] < 1e-6  # the first linear sees identical inputs


def test_loaded_modelopt_checkpoint_reproduces_fake_quant_logits(golden):
    src, exp, ref = golden
    ids = ref["input_ids"]
    m = nemojax.load(exp, dtype="float32", nvfp4_mode="w4a4")
    assert m.params["layers"][3]["mixer"]["k_scale"].shape == ()
    got = np.asarray(m.logits(ids))
    # ModelOpt's fake quant (W4A4 + FP8 K/V) run in float32: stated tolerance 1e-4
    np.testing.assert_allclose(got, ref["logits_fakequant_f32"], atol=1e-4, rtol=0)
    plain = np.asarray(nemojax.load(src, dtype="float32").logits(ids))
    np.testing.assert_allclose(plain, ref["logits_f32"], atol=1e-4, rtol=0)
    # weight-only mode on the same checkpoint is a different (less quantized) model
    w16 = np.asarray(nemojax.load(exp, dtype="float32", nvfp4_mode="w4a16").logits(ids))
    assert np.abs(w16 - got).max() > 1e-3
    toks = m.generate([ids[0, :8].tolist()], 5)
    assert toks.shape == (1, 5)
