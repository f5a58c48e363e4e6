"""FP8 weights (nemojax.formats.fp8) against NVIDIA ModelOpt 0.47's own exports (golden data made by
tools/make_fp8_golden.py, read with the official ``safetensors`` package) and against float64 NumPy."""
from __future__ import annotations

import fnmatch
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from nemojax.formats.fp8 import FP8Weight, QuantError, activation_multiplier, dequantize, fake_quant, quantize

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
    return np.asarray(a).view(np.uint8)


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
    with pytest.raises(QuantError, match="stacked weight"):
        FP8Weight.from_float(np.ones((2, 4, 8), np.float32)).matmul(jnp.ones((2, 8)))


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
