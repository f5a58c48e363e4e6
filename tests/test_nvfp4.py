"""NVFP4: format, rounding, node behaviour, model transform, checkpoints, FP8 KV cache (no ModelOpt needed;
the ModelOpt golden-byte tests live in test_nvfp4_modelopt.py)."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import nemojax
from nemojax import quant
from nemojax.cache import init_cache
from nemojax.model import forward_jit
from nemojax.params import init_params
from nemojax.formats import QuantError
from nemojax.formats.nvfp4 import (E2M1_VALUES, NVFP4Weight, dequantize, e2m1_code, fake_quant, pack_codes, quantize,
                                   unpack_codes)
from nemojax.checkpoint import CheckpointError, save_params

from .conftest import tiny_config


def test_e2m1_rounding_table_ties_to_even():
    m = np.array([0, 0.25, 0.2501, 0.5, 0.75, 1.0, 1.25, 1.2501, 1.5, 1.75, 2.5, 2.5001, 3.0, 3.5, 5.0, 5.0001, 6, 7,
                  100], np.float32)
    want = [0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 7, 7]
    np.testing.assert_array_equal(np.asarray(e2m1_code(jnp.asarray(m))), want)
    # away from ties, the code's value is ml_dtypes' (RNE, saturating) float4_e2m1fn cast
    x = np.random.default_rng(0).uniform(0, 7, 4000).astype(np.float32)
    ref = x.astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
    np.testing.assert_array_equal(E2M1_VALUES[np.asarray(e2m1_code(jnp.asarray(x)))], ref)


def test_pack_low_nibble_first_and_bitcast_order():
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 16, (5, 32)).astype(np.uint8)
    packed = np.asarray(pack_codes(jnp.asarray(codes)))
    assert packed[0, 0] == codes[0, 0] | (codes[0, 1] << 4)
    np.testing.assert_array_equal(np.asarray(unpack_codes(jnp.asarray(packed))), codes)
    # ml_dtypes' view of the packed bytes as fp4 pairs gives the same element order
    as_f4 = packed.view(np.uint8)
    lo, hi = as_f4 & 0xF, as_f4 >> 4
    np.testing.assert_array_equal(np.stack([lo, hi], -1).reshape(5, 32), codes)


def _numpy_nvfp4(w):
    """float64-free NumPy transcription of the ModelOpt export math (independent of the jnp code path)."""
    w = w.astype(np.float32)
    amax = np.abs(w).max()
    s2 = np.float32(amax / np.float32(2688.0))
    blocks = w.reshape(w.shape[0], -1, 16)
    sb = np.abs(blocks).max(-1) / np.float32(np.float32(6.0) * s2)
    sb = np.where(sb == 0, np.float32(1), sb)
    sb = np.clip(sb, np.float32(2 ** -9), np.float32(448)).astype(ml_dtypes.float8_e4m3fn)
    y = blocks / (sb.astype(np.float32) * s2)[..., None]
    m = np.abs(y)
    mag = ((m > 0.25).astype(np.uint8) + (m >= 0.75) + (m > 1.25) + (m >= 1.75) + (m > 2.5) + (m >= 3.5) + (m > 5))
    codes = (mag | ((y < 0).astype(np.uint8) << 3)).reshape(w.shape)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8), sb, s2


def test_quantize_matches_numpy_transcription_and_error():
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((96, 256)) * 0.02).astype(ml_dtypes.bfloat16)
    w[0, :16] = 0  # all-zero block -> scale 1.0
    w[1, :16] = 1e-7  # tiny block -> scale clamped to 2^-9
    w[2, :16] = -w[2, :16].astype(np.float32).__abs__().max()  # a block of -amax
    packed, scale, s2 = jax.jit(quantize)(jnp.asarray(w))
    rp, rs, rs2 = _numpy_nvfp4(np.asarray(w, np.float32))
    np.testing.assert_array_equal(np.asarray(packed), rp)
    np.testing.assert_array_equal(np.asarray(scale).view(np.uint8), rs.view(np.uint8))
    assert np.float32(s2) == rs2
    assert float(np.asarray(scale)[0, 0].astype(np.float32)) == 1.0
    assert float(np.asarray(scale)[1, 0].astype(np.float32)) == 2.0 ** -9
    deq = np.asarray(dequantize(packed, scale, s2))
    wf = np.asarray(w, np.float32)
    rel = np.linalg.norm(deq - wf) / np.linalg.norm(wf)
    assert 0.05 < rel < 0.13, rel  # NVFP4 on Gaussian weights
    # a small negative value that rounds to zero is stored as -0 (code 8)
    v = np.zeros((1, 16), np.float32)
    v[0, 0], v[0, 1] = 6.0, -0.01
    codes = np.asarray(unpack_codes(quantize(jnp.asarray(v))[0]))
    assert codes[0, 1] == 8 and codes[0, 2] == 0


def test_node_under_jit_vmap_and_tree_ops():
    rng = np.random.default_rng(3)
    bank = jnp.asarray(rng.standard_normal((4, 32, 64)), jnp.float32)
    node = NVFP4Weight.from_float(bank, input_scale=jnp.full((4,), 0.01, jnp.float32))
    assert node.shape == (4, 32, 64) and node.packed.shape == (4, 32, 32) and node.scale.shape == (4, 32, 4)
    # one global scale per expert
    np.testing.assert_allclose(np.asarray(node.scale_2), np.abs(np.asarray(bank)).max((1, 2)) / 2688, rtol=1e-6)
    full = jax.jit(lambda n: n.dequantize())(node)
    per = jax.vmap(lambda p, s, s2: dequantize(p, s, s2))(node.packed, node.scale, node.scale_2)
    np.testing.assert_array_equal(np.asarray(full), np.asarray(per))
    x = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)
    e2 = jax.tree.map(lambda a: a[2], node)
    np.testing.assert_allclose(np.asarray(jax.jit(lambda n, x: n.matmul(x))(e2, x)),
                               np.asarray(x) @ np.asarray(full[2]).T, atol=1e-4)
    assert len(jax.tree.leaves(node)) == 4


def test_fake_quant_activations():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((4, 64)) * 3, jnp.float32)
    g = float(jnp.abs(x).max()) / 2688
    y = np.asarray(fake_quant(x, g))
    xb = np.asarray(x).reshape(4, 4, 16)
    for r in range(4):
        for b in range(4):
            vals = np.unique(np.abs(y.reshape(4, 4, 16)[r, b]))
            s = float(np.abs(xb[r, b]).max() / (6 * g))
            s = float(np.float32(s).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)) * g
            assert set(np.round(vals / s, 5)) <= {0, 0.5, 1, 1.5, 2, 3, 4, 6}
    assert np.linalg.norm(y - np.asarray(x)) / np.linalg.norm(np.asarray(x)) < 0.15


def test_bad_inputs_name_the_tensor():
    with pytest.raises(QuantError, match="w_odd.*divisible by the NVFP4 block size"):
        NVFP4Weight.from_float(jnp.ones((8, 40)), name="w_odd")
    bad = np.ones((8, 32), np.float32)
    bad[3, 5] = np.nan
    with pytest.raises(QuantError, match="w_nan.*NaN or Inf"):
        NVFP4Weight.from_float(bad, name="w_nan")
    bad[3, 5] = np.inf
    with pytest.raises(QuantError, match="NaN or Inf"):
        NVFP4Weight.from_float(bad)
    cfg = tiny_config(hidden_size=72)  # 72 is not a multiple of 16
    with pytest.raises(QuantError, match="backbone.layers.0.mixer.in_proj.*divisible"):
        quant.apply(init_params(cfg), cfg, "nvfp4")
    with pytest.raises(ValueError, match="recipe='nope'"):
        quant.apply(init_params(tiny_config()), tiny_config(), "nope")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    cfg = tiny_config()
    src = tmp_path_factory.mktemp("bf16")
    save_params(init_params(cfg, seed=5), cfg, src)
    params = nemojax.load(src, dtype="bfloat16").params
    rng = np.random.default_rng(6)
    calib = [rng.integers(3, cfg.vocab_size, (2, 24)) for _ in range(2)]
    amax = quant.calibrate_model(params, cfg, calib)
    q = quant.apply(params, cfg, "nvfp4", amax)
    out = tmp_path_factory.mktemp("nvfp4")
    save_params(q, cfg, out)
    return cfg, params, q, amax, out


def test_recipe_selects_the_nano_layout(quantized):
    cfg, params, q, amax, out = quantized
    lay = q["layers"]
    assert isinstance(lay[0]["mixer"]["in_proj"], NVFP4Weight)  # Mamba, not before attention
    assert not isinstance(lay[2]["mixer"]["in_proj"], NVFP4Weight)  # Mamba right before attention 3
    assert not isinstance(lay[3]["mixer"]["q_proj"], NVFP4Weight)
    assert isinstance(lay[1]["mixer"]["experts"]["up_proj"], NVFP4Weight)
    assert isinstance(lay[1]["mixer"]["shared_experts"]["down_proj"], NVFP4Weight)
    assert isinstance(lay[5]["mixer"]["up_proj"], NVFP4Weight)  # dense MLP
    assert lay[1]["mixer"]["gate"].dtype == jnp.bfloat16 and q["lm_head"].dtype == jnp.bfloat16
    assert "k_scale" in lay[3]["mixer"] and float(lay[3]["mixer"]["k_scale"]) > 0
    # every expert of a bank shares the calibrated input scale, = amax / 2688
    ins = np.asarray(lay[1]["mixer"]["experts"]["up_proj"].input_scale)
    np.testing.assert_allclose(ins, amax["layers.1.mixer.experts.up_proj"] / 2688, rtol=1e-6)
    hq = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert hq["quant_algo"] == "NVFP4" and hq["kv_cache_quant_algo"] == "FP8" and hq["group_size"] == 16
    assert "backbone.layers.2.mixer.in_proj" in hq["exclude_modules"] and "lm_head" in hq["exclude_modules"]
    assert "backbone.layers.0.mixer.in_proj" not in hq["exclude_modules"]


def test_export_load_round_trip_identical_bytes(quantized, tmp_path):
    cfg, params, q, amax, out = quantized
    m = nemojax.load(out, dtype="bfloat16")
    save_params(m.params, cfg, tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert (tmp_path / "hf_quant_config.json").read_text() == (out / "hf_quant_config.json").read_text()
    node = m.params["layers"][1]["mixer"]["experts"]["up_proj"]
    np.testing.assert_array_equal(np.asarray(node.packed), np.asarray(q["layers"][1]["mixer"]["experts"]["up_proj"]
                                                                      .packed))


def test_modes_generate_and_bits_per_parameter(quantized):
    cfg, params, q, amax, out = quantized
    ids = np.random.default_rng(7).integers(3, cfg.vocab_size, (2, 20))
    ref = np.asarray(forward_jit(params, cfg, ids))
    for mode in ("w4a16", "w4a4"):
        m = nemojax.load(out, nvfp4_mode=mode)
        got = np.asarray(m.logits(ids))
        assert np.isfinite(got).all()
        assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.5  # 4-bit on a chaotic random model
        toks = m.generate([[5, 6, 7], [9, 10]], 6)
        assert toks.shape == (2, 6)
    w16 = np.asarray(nemojax.load(out, nvfp4_mode="w4a16").logits(ids))
    # weight-only = the float model whose weights are the dequantized NVFP4 values, exactly
    deq = jax.tree.map(lambda n: n.dequantize(jnp.bfloat16) if isinstance(n, NVFP4Weight) else n, q,
                       is_leaf=lambda n: isinstance(n, NVFP4Weight))
    np.testing.assert_allclose(w16, np.asarray(forward_jit(deq, cfg, ids)), atol=1e-5)
    w4 = np.asarray(nemojax.load(out, nvfp4_mode="w4a4").logits(ids))
    assert np.abs(w16 - w4).max() > 0  # activation quantization really ran
    node = q["layers"][1]["mixer"]["experts"]["up_proj"]
    bits = 8 * (node.packed.size + node.scale.size + node.scale_2.size * 4) / np.prod(node.shape)
    assert bits <= 4.52, bits  # tiny bank: the per-expert fp32 scale still shows
    real = jax.eval_shape(quantize, jax.ShapeDtypeStruct((128, 1856, 2688), jnp.bfloat16))  # the 30B's experts
    bits = 8 * sum(np.prod(a.shape) * a.dtype.itemsize for a in real) / (128 * 1856 * 2688)
    assert 4.5 <= bits <= 4.5001, bits


def test_fp8_kv_cache_decode_matches_full_forward(quantized):
    cfg, params, q, amax, out = quantized
    ids = np.random.default_rng(8).integers(3, cfg.vocab_size, (1, 30))
    full = np.asarray(forward_jit(q, cfg, ids))  # full forward with FP8 fake-quantized K/V
    cache = init_cache(cfg, 1, 32, jnp.bfloat16, jnp.float8_e4m3fn)
    logits, cache = forward_jit(q, cfg, jnp.asarray(ids[:, :17]), None, cache)
    steps = [np.asarray(logits)]
    for t in range(17, 30):
        logits, cache = forward_jit(q, cfg, jnp.asarray(ids[:, t:t + 1]), None, cache)
        steps.append(np.asarray(logits))
    assert cache.layers[3]["k"].dtype == jnp.float8_e4m3fn
    np.testing.assert_allclose(np.concatenate(steps, 1), full, atol=0.08)  # bf16 model: rounding only


def test_checkpoint_errors(quantized, tmp_path):
    cfg, params, q, amax, out = quantized
    from nemojax.checkpoint import SafeFile, save_file

    f = SafeFile(out / "model.safetensors")
    tensors = {k: np.array(f.get(k)) for k in f.keys()}
    name = "backbone.layers.0.mixer.in_proj.weight_scale"

    def write(t):
        d = tmp_path / f"ck{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        (d / "config.json").write_text((out / "config.json").read_text())
        save_file(t, d / "model.safetensors")
        return d

    missing = dict(tensors)
    del missing[name]
    with pytest.raises(CheckpointError, match="in_proj.*has weight_scale_2 but no .*weight_scale'"):
        nemojax.load(write(missing))
    wrong = dict(tensors)
    wrong[name] = tensors[name][:, :-1]
    with pytest.raises(CheckpointError, match="weight_scale.*has shape"):
        nemojax.load(write(wrong))
    kv = dict(tensors)
    del kv["backbone.layers.3.mixer.v_proj.v_scale"]
    with pytest.raises(CheckpointError, match="v_scale.*missing"):
        nemojax.load(write(kv))
    d = write(tensors)
    (d / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "W8A8_SQ", "group_size": 16}}))
    with pytest.raises(ValueError, match="hf_quant_config.json.*W8A8_SQ"):
        nemojax.load(d)
