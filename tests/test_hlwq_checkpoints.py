"""polarengine (HLWQ) checkpoints against the real polarquant 0.6.0 package (golden data made by
tools/make_hlwq_golden.py): every layout loads, dequantizes to its BF16 bit for bit, runs both inference paths,
and nemojax's own quantization reproduces the package's codes."""
from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import nemojax
from nemojax import quant
from nemojax.checkpoint import dequantize_checkpoint
from nemojax.formats.hlwq import HLWQWeight
from nemojax.model import forward_jit
from nemojax.checkpoint import Checkpoint, CheckpointError, save_params

DATA = os.path.join(os.path.dirname(__file__), "data", "hlwq", "nemotronh")
SRC = os.path.join(DATA, "source")
pytestmark = pytest.mark.skipif(not os.path.isdir(DATA), reason="golden data missing (tools/make_hlwq_golden.py)")
LAYOUTS = ("layout_a", "layout_b", "layout_c")
is_hlwq = lambda x: isinstance(x, HLWQWeight)  # noqa: E731


def _quantized_leaves(params):
    return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_hlwq)[0]
            if is_hlwq(x)]


@pytest.fixture(scope="module")
def reference():
    return np.load(os.path.join(DATA, "reference.npz"))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_dequantizes_bit_exact_to_polarquant_bf16(layout, tmp_path):
    out = tmp_path / "bf16"
    dequantize_checkpoint(os.path.join(DATA, layout), out, base=SRC)
    mine, ref = Checkpoint(out), Checkpoint(os.path.join(DATA, "dequant_bf16"))
    assert set(mine.names) == set(ref.names)
    passthrough_lossy = layout == "layout_b"  # that writer stores unquantized tensors as fp16
    n_matrices = 0
    for n in ref.names:
        a, b = np.asarray(mine.get(n)), np.asarray(ref.get(n))
        if n.endswith((".A_log", ".D")):  # nemojax keeps these fp32 (dtype policy)
            if not passthrough_lossy:
                np.testing.assert_array_equal(a.astype(ml_dtypes.bfloat16), b)
            continue
        if passthrough_lossy and "polar" not in n and not _is_quantized(n):
            continue
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8), err_msg=n)
        n_matrices += _is_quantized(n)
    assert n_matrices == 72  # every quantized matrix of the tiny model


def _is_quantized(name: str) -> bool:
    return name.endswith(".weight") and not any(k in name for k in ("norm", "conv1d", "gate.weight"))


@pytest.mark.parametrize("layout", ["layout_a", "layout_c"])
def test_logits_match_transformers_on_polarquant_bf16(layout, reference):
    m = nemojax.load(os.path.join(DATA, layout), dtype="bfloat16", base=SRC, dequantize=True)
    p32 = jax.tree.map(lambda a: a.astype(jnp.float32), m.params)
    got = np.asarray(forward_jit(p32, m.config, reference["input_ids"]))
    np.testing.assert_allclose(got, reference["logits_dequant"], atol=1e-4, rtol=0)


def test_both_inference_paths_agree_and_generate(reference):
    ids = reference["input_ids"]
    a = nemojax.load(os.path.join(DATA, "layout_b"), dtype="float32", base=SRC, hlwq_path="dequant")
    b = nemojax.load(os.path.join(DATA, "layout_b"), dtype="float32", base=SRC, hlwq_path="rotated")
    assert isinstance(a.params["layers"][1]["mixer"]["experts"]["up_proj"], HLWQWeight)
    assert isinstance(a.params["embeddings"], HLWQWeight) and isinstance(a.params["lm_head"], HLWQWeight)
    la, lb = np.asarray(a.logits(ids)), np.asarray(b.logits(ids))
    np.testing.assert_allclose(la, lb, atol=2e-3, rtol=0)  # same weights, different fp32 association
    np.testing.assert_array_equal(a.generate([ids[0, :9].tolist()], 8), b.generate([ids[0, :9].tolist()], 8))


def test_nemojax_quantization_reproduces_polarquant_codes_and_round_trips(tmp_path):
    src = nemojax.load(SRC, dtype="bfloat16")
    q = quant.apply(src.params, src.config, "hlwq-q5")
    ref = nemojax.load(os.path.join(DATA, "layout_a"), dtype="bfloat16", base=SRC)
    mine, theirs = _quantized_leaves(q), _quantized_leaves(ref.params)
    assert [p for p, _ in mine] == [p for p, _ in theirs] and len(mine) == 30  # 72 matrices (experts stacked)
    for (p, x), (_, y) in zip(mine, theirs):
        np.testing.assert_array_equal(np.asarray(x.codes()), np.asarray(y.codes()), err_msg=p)
        np.testing.assert_array_equal(np.asarray(x.norms), np.asarray(y.norms), err_msg=p)
    save_params(q, src.config, tmp_path)
    pc = json.loads((tmp_path / "polar_config.json").read_text())
    assert pc["layers"]["backbone.layers.1.mixer.experts.3.up_proj"]["packed_q5"] is True
    back = nemojax.load(tmp_path, dtype="bfloat16")
    same = jax.tree.map(lambda u, v: bool(jnp.all(u == v)), back.params, q)
    assert all(jax.tree.leaves(same))


def test_converged_codebook_is_stored_and_read_back(tmp_path):
    src = nemojax.load(SRC, dtype="bfloat16")
    q = quant.apply(src.params, src.config, "hlwq-q5-converged")
    save_params(q, src.config, tmp_path)
    back = nemojax.load(tmp_path, dtype="bfloat16")
    t = np.asarray(back.params["layers"][0]["mixer"]["in_proj"].table)
    assert abs(float(t.max()) - 3.2607) < 1e-3  # the converged 5-bit table ends near 3.26, not 3.55
    w = np.asarray(src.params["layers"][1]["mixer"]["experts"]["up_proj"], np.float32)
    err = {}
    for name in ("hlwq-q5", "hlwq-q5-converged"):
        node = quant.apply(src.params, src.config, name)["layers"][1]["mixer"]["experts"]["up_proj"]
        err[name] = np.linalg.norm(np.asarray(node.dequantize(jnp.float32)) - w) / np.linalg.norm(w)
    assert err["hlwq-q5-converged"] < err["hlwq-q5"]


def test_missing_base_and_bad_tensors(tmp_path):
    with pytest.raises(CheckpointError, match="e_score_correction_bias.*base="):
        nemojax.load(os.path.join(DATA, "layout_a"))
    empty = tmp_path / "empty_base"
    shutil.copytree(os.path.join(DATA, "layout_c"), empty)  # a "base" that lacks the buffers too
    with pytest.raises(CheckpointError, match="base checkpoint has no"):
        nemojax.load(os.path.join(DATA, "layout_a"), base=empty)
    from nemojax.checkpoint import save_file

    lay = os.path.join(DATA, "layout_a")
    ck = Checkpoint(lay)
    tensors = {n: np.array(ck.get(n)) for n in ck.names}

    def write(t):
        d = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        for f in ("config.json", "polar_config.json"):
            shutil.copy(os.path.join(lay, f), d / f)
        save_file(t, d / "model.safetensors")
        return d

    bad = dict(tensors)
    codes = bad["backbone.layers.0.mixer.in_proj.codes"].copy()
    codes[0, 0] = 40  # out of range for 5 bits
    bad["backbone.layers.0.mixer.in_proj.codes"] = codes
    with pytest.raises(CheckpointError, match="in_proj.*out of range"):
        nemojax.load(write(bad), base=SRC)
    bad = dict(tensors)
    bad["backbone.layers.0.mixer.in_proj.norms"] = bad["backbone.layers.0.mixer.in_proj.norms"][:, :0]
    with pytest.raises(CheckpointError, match="in_proj.*norms shape"):
        nemojax.load(write(bad), base=SRC)
    bad = dict(tensors)
    bad["backbone.layers.0.mixer.in_proj.codes"] = bad["backbone.layers.0.mixer.in_proj.codes"][:, :100]
    with pytest.raises(CheckpointError, match="in_proj.*neither in_pad"):
        nemojax.load(write(bad), base=SRC)
    bad = dict(tensors)
    del bad["backbone.layers.0.mixer.in_proj.norms"]
    with pytest.raises(CheckpointError, match="in_proj.*no norms"):
        nemojax.load(write(bad), base=SRC)


@pytest.mark.parametrize("layout,suffix", [("layout_a", ".ct"), ("layout_b", ".ct_scaled")])
def test_bad_codebooks_and_layer_fields_are_named_errors(layout, suffix, tmp_path):
    from nemojax.checkpoint import save_file

    lay = os.path.join(DATA, layout)
    ck = Checkpoint(lay)
    tensors = {n: np.array(ck.get(n)) for n in ck.names}
    name = "backbone.layers.0.mixer.in_proj" + suffix
    table = tensors[name]
    rng = np.random.default_rng()

    def load_with(t=None, polar=None):
        d = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        shutil.copy(os.path.join(lay, "config.json"), d / "config.json")
        with open(os.path.join(lay, "polar_config.json")) as f:
            pc = json.load(f)
        if polar:
            polar(pc)
        (d / "polar_config.json").write_text(json.dumps(pc))
        save_file({**tensors, **(t or {})}, d / "model.safetensors")
        return nemojax.load(d, base=SRC)

    cases = [(table[: rng.choice([3, 5, 6, 7, 9, 12, 17, 31])], r"in_proj\.ct.*shape \[2\*\*bits\]"),
             (table[:8], r"in_proj: HLWQ table shape \[8\], expected \[32\] for 5 bits"),
             (table.reshape(-1)[:1].reshape(()), r"in_proj\.ct.*shape \[2\*\*bits\]"),
             (np.concatenate([table, table, table]), r"in_proj\.ct.*shape \[2\*\*bits\]"),
             (table.astype(np.int32), r"in_proj\.ct.*floating point, got int32"),
             (np.where(rng.random(table.shape) < 0.5, np.nan, table).astype(table.dtype), "NaN or Inf")]
    for bad, match in cases:
        with pytest.raises(CheckpointError, match=match):
            load_with({name: bad})
    with pytest.raises(CheckpointError, match=r"polar_config.json: backbone.layers.0.mixer.in_proj.bits"):
        load_with(polar=lambda pc: pc["layers"]["backbone.layers.0.mixer.in_proj"].update(bits="five"))
    with pytest.raises(CheckpointError, match=r"in_proj.in_features must be an integer"):
        load_with(polar=lambda pc: pc["layers"]["backbone.layers.0.mixer.in_proj"].update(in_features=128.5))
