#!/usr/bin/env python
"""Generate the FP8 golden test data (``tests/data/fp8/``) with NVIDIA ModelOpt, on a CPU-only machine.

nemojax's FP8 code (``nemojax/formats/fp8.py``) must reproduce ModelOpt's FP8 checkpoints bit for bit. This tool
runs the real ModelOpt (tested with nvidia-modelopt 0.47.0, torch 2.13 CPU, transformers 5.23) and stores what
it produced, so the tests can compare against it without ModelOpt installed. Unlike NVFP4, ModelOpt's FP8 fake
quant has a plain torch fallback (``tensor_quant.fp8_eager``), so nothing in the quantizer is patched.

Environment::

    pip install torch --index-url https://download.pytorch.org/whl/cpu
    pip install nvidia-modelopt==0.47.0 transformers==5.23.0 safetensors ml_dtypes requests
    python tools/make_fp8_golden.py                 # writes tests/data/fp8/
    python tools/make_fp8_golden.py --out OUT_DIR    # somewhere else

Output (under ``--out``)::

    seq/model.safetensors       nn.Sequential(Linear(64,128,bias), ReLU, Linear(128,48)) in bf16, quantized with
                                mtq.FP8_DEFAULT_CFG and exported by ModelOpt's per-module export
                                ("0.weight" F8_E4M3 [128,64], "0.weight_scale" F32 [], "0.input_scale" F32 [],
                                "0.bias" BF16, "2.*"); rows 0-3 of "0.weight" and row 0 of "2.weight"
                                are crafted (seq_first_weight, seq_second_weight)
    seq/hf_quant_config.json    modelopt.torch.export.quant_utils.get_quant_config
    seq/reference.npz           x_test, calib, w_bf16.<name>, y_bf16, y_fakequant, y_fakequant_f32,
                                <i>.input, <i>.input_fq, <i>.weight_fq, <i>.input_quantizer._amax,
                                <i>.weight_quantizer._amax (all float32)
    nemotronh/export/           ModelOpt export_hf_checkpoint of the BF16 tiny Nemotron-H of the NVFP4 golden data
                                (``tests/data/nvfp4/nemotronh/source``): FP8 W8A8 everywhere ModelOpt's defaults
                                allow, FP8 KV cache, except the first attention layer and the Mamba layer before it
                                (kept BF16 as in the published Nemotron-3-Nano layout), so the export holds both an
                                FP8 and a BF16 attention / Mamba layer
    nemotronh/reference.npz     input_ids, calib_ids, logits_bf16, logits_f32, logits_fakequant (W8A8),
                                logits_fakequant_f32, logits_w8a16, logits_w8a16_f32 (input quantizers disabled),
                                amax.<quantizer buffer> (calibrated),
                                act.<module>.input / act.<module>.input_fq (one call of a few input quantizers)
    manifest.txt                name / dtype / shape of every exported tensor
    verify.txt                  the checks below, one line per quantized linear, plus the facts found

The ``*_f32`` logits are the same models run in float32 (bf16 weights and calibrated amaxes kept, float32
arithmetic). Mamba layers run with ``time_step_limit = (0, inf)`` as in the NVFP4 golden data.

ModelOpt 0.47's FP8 math, as checked here (the tool exits non-zero if a check fails):
  * export (``_export_quantized_weight`` + ``to_quantized_weight``): ``weight_scale = float32(amax) / 448`` (0-d
    float32; amax = max|W| of the matrix, per expert for routed experts; layers that share their input, q/k/v,
    keep their own amax: ModelOpt's shared-input fusion skips FP8), ``weight = (W_bf16 / weight_scale)
    .to(float8_e4m3fn)``: the bf16 tensor divided by a 0-d float32 tensor is a **bf16** tensor, so the quotient
    is rounded to bf16 first and then to e4m3 (two roundings, RNE each, no clamp). Rounding the float32
    quotient straight to e4m3 differs in ~3% of the elements; the tool counts them;
  * ``input_scale = float32(input amax) / 448`` (0-d; one value per fused expert bank), ``k_scale`` /
    ``v_scale`` = k/v_bmm amax / 448 (0-d);
  * fake quant (``tensor_quant._fp8_eager``, used for calibration and the fake-quant logits):
    ``scale = 448.0 / amax`` -- torch evaluates a Python number over a tensor as ``448 * (1 / amax)``, two
    roundings --, ``x_hat = e4m3(clamp(float32(x) * scale, +-448)) * (1 / scale)``, cast back to x's dtype. One
    rounding of the float32 product, so the weight fake quant differs from dequant(export) in the double-rounded
    elements and where the two scales differ in the last bit (counted). amax has the model's dtype (bf16), so
    ``bf16(input_scale * 448)`` recovers it exactly and with it the fake quant of the activations (counted over
    every input quantizer, compared element by element on a few captured ones).

One thing ModelOpt 0.47 gets wrong with transformers 5 + nemotron_h is patched at run time, as for NVFP4:
``patch_exclude_name_mapper`` (from ``goldenlib.py``) keeps junk out of ``exclude_modules``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from goldenlib import (  # noqa: E402
    E4M3_MAX, REPO, bf16_attention_rules, check_exclude_modules, check_exported_linears, check_kv_scales,
    check_unquantized, exact, f32, in_memory_name, load_nemotronh, load_safetensors, patch_exclude_name_mapper,
    quantize_export_seq, quantized_weights, rel, save_npz, seq_model, write_seq_and_nemotronh)

DEFAULT_OUT = REPO / "tests" / "data" / "fp8"
DEFAULT_SOURCE = REPO / "tests" / "data" / "nvfp4" / "nemotronh" / "source"

SEQ_AMAX = 77 / 256  # layer 0's pinned weight amax: bf16-exact, and amax / 448 = 11 / 16384 exactly in float32
# modules whose input quantizer calls are stored (in-memory names; the first call of each)
CAPTURE_INPUTS = ("model.layers.0.mixer.in_proj", "model.layers.0.mixer.out_proj", "model.layers.5.mixer.down_proj",
                  "model.layers.7.mixer.q_proj", "model.layers.7.mixer.o_proj",
                  "model.layers.8.mixer.shared_experts.down_proj", "model.layers.8.mixer.experts.down_proj")


# ----------------------------------------------------------------------------------------------------------------
# FP8 math: NumPy transcriptions of ModelOpt's export and fake quant (independent of nemojax)
# ----------------------------------------------------------------------------------------------------------------
def numpy_export_fp8(w, amax=None):
    """ModelOpt's FP8 export of one weight (bf16 values as float32, or bf16): (e4m3 codes, weight_scale f32).

    weight_scale = float32(amax) / 448; codes = e4m3(bf16(float32(w) / weight_scale)). ``amax`` defaults to
    max|w| (pass the group max for fused layers)."""
    import ml_dtypes
    import numpy as np

    w = np.asarray(w, np.float32)
    s = np.float32(np.abs(w).max() if amax is None else amax) / np.float32(E4M3_MAX)
    return (w / s).astype(ml_dtypes.bfloat16).astype(ml_dtypes.float8_e4m3fn), s


def modelopt_fake_quant_scale(amax):
    """The multiplier of ModelOpt's FP8 fake quant: ``448.0 / amax`` with a 0-d float32 tensor ``amax`` is
    torch's ``Tensor.__rtruediv__``, i.e. ``448 * (1 / amax)`` (two float32 roundings, not one division)."""
    import numpy as np

    amax = np.float32(amax)
    amax = amax if amax > np.float32(2.0 ** -24) else np.float32(1)  # _fp8_eager: amax <= 2^-24 -> 1
    return np.float32(E4M3_MAX) * (np.float32(1) / amax)


def numpy_fake_quant_fp8(x, amax, out_dtype):
    """ModelOpt's ``_fp8_eager`` (per-tensor amax): e4m3(clamp(x * scale, +-448)) * (1 / scale), in out_dtype."""
    return numpy_fake_quant_scaled(x, modelopt_fake_quant_scale(amax), out_dtype)


def numpy_fake_quant_from_scale(x, input_scale, out_dtype):
    """The same fake quant when only the checkpoint's input_scale is known: scale = 1 / input_scale."""
    import numpy as np

    return numpy_fake_quant_scaled(x, np.float32(1) / np.float32(input_scale), out_dtype)


def numpy_fake_quant_scaled(x, scale, out_dtype):
    """e4m3(clamp(float32(x) * scale, +-448)) * (1 / scale) in float32, cast to out_dtype."""
    import ml_dtypes
    import numpy as np

    scale = np.float32(scale)
    q = np.clip(np.asarray(x, np.float32) * scale, -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)
    return (q.astype(np.float32) * (np.float32(1) / scale)).astype(out_dtype)


def e4m3_tables():
    """(sorted non-negative finite e4m3 values, the midpoints between neighbours), float32."""
    import ml_dtypes
    import numpy as np

    vals = np.arange(0x7F, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)  # 0x00..0x7E
    return vals, (vals[:-1] + vals[1:]) / np.float32(2)


def bf16_candidates(lo, hi):
    """Every positive bf16 value in [lo, hi] as float32."""
    import ml_dtypes
    import numpy as np

    a = np.array([lo, hi], np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
    return np.arange(a[0], a[1] + 1, dtype=np.uint16).view(ml_dtypes.bfloat16).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# part 1: nn.Sequential
# ----------------------------------------------------------------------------------------------------------------
def pick(a, n):
    """n elements spread evenly over a (sorted) array."""
    import numpy as np

    if len(a) < n:
        raise RuntimeError(f"only {len(a)} candidates, need {n}")
    return a[np.linspace(0, len(a) - 1, n).round().astype(int)]


def seq_first_weight(gen):
    """Linear(64 -> 128) weight: Gaussian rows (|w| < amax) plus crafted rows. The amax is pinned to 77/256, so
    weight_scale = 11/16384 exactly and w / weight_scale is exact for the bf16 multiples of 11 * 2^-k:

      row 0: +amax, -amax (codes 0x7E / 0xFE);
      row 1: quotients that are exact e4m3 rounding ties (16 of them, both signs);
      row 2: quotients in the e4m3 subnormal range (2^-9 steps below 2^-6), 6 ties there included;
      row 3: underflow: quotient exactly 2^-10 (tie -> +0), just above (-> 2^-9), tiny negatives (-> -0, 0x80),
             an exact -0.0 (-> 0x80) and +0.0.
    """
    import numpy as np
    import torch

    F = np.float32
    s = F(SEQ_AMAX) / F(E4M3_MAX)
    assert s == F(11 / 16384)
    vals, mids = e4m3_tables()
    w = (torch.randn(128, 64, generator=gen) * 0.05).clamp(-0.25, 0.25)
    w[0, 0], w[0, 1] = SEQ_AMAX, -SEQ_AMAX
    cand = bf16_candidates(1e-7, SEQ_AMAX)
    q = cand / s
    ties = cand[np.isin(q, mids) & (q > vals[8])]  # normal-range ties
    sub = cand[(q < vals[8]) & (q >= vals[1])]  # e4m3 subnormal range [2^-9, 2^-6)
    sub_ties = sub[np.isin(sub / s, mids)]
    sign = np.where(np.arange(16) % 2, F(-1), F(1))
    w[1, :16] = torch.from_numpy(pick(ties, 16) * sign)
    w[2, :16] = torch.from_numpy(np.concatenate([pick(sub_ties, 6), pick(sub, 10)]) * sign)
    u = F(2.0 ** -10) * s  # quotient exactly 2^-10, the tie between 0 and the smallest subnormal
    above = cand[(cand / s > F(2.0 ** -10))][0]
    w[3, :8] = torch.tensor([u, -u, above, -above, -u / 4, -u / 2, -0.0, 0.0])
    return w.to(torch.bfloat16)


def seq_second_weight(gen):
    """Linear(128 -> 48) weight: Gaussian, amax pinned to 153/512 (a weight_scale with no short binary form),
    row 0: quotients whose bf16 rounding lands on an e4m3 tie that then rounds the other way than the float32
    quotient would (8 rounding down instead of up, 8 up instead of down)."""
    import ml_dtypes
    import numpy as np
    import torch

    F = np.float32
    amax = 153 / 512
    s = F(amax) / F(E4M3_MAX)
    vals, _ = e4m3_tables()
    w = (torch.randn(48, 128, generator=gen) * 0.08).clamp(-0.28, 0.28)
    w[1, 7] = amax
    cand = bf16_candidates(1e-4, amax)
    q = cand / s
    direct = q.astype(ml_dtypes.float8_e4m3fn).astype(F)
    twice = q.astype(ml_dtypes.bfloat16).astype(ml_dtypes.float8_e4m3fn).astype(F)
    normal = q > vals[8]
    row = np.concatenate([pick(cand[normal & (twice < direct)], 8), pick(cand[normal & (twice > direct)], 8)])
    w[0, :16] = torch.from_numpy(row * np.where(np.arange(16) % 2, F(-1), F(1)))
    return w.to(torch.bfloat16)


def seq_inputs(gen, calib_amax):
    """Test activations for Linear 0: Gaussian rows plus a zero row, a row beyond the calibrated range
    (saturates at +-448 in the fake quant) and a row of tiny values (e4m3 subnormals / underflow)."""
    import torch

    x = torch.randn(6, 64, generator=gen) * 2.0
    x[0] = 0.0
    x[1, :16] *= 4.0
    x[1, 16] = 3.0 * calib_amax
    x[2, :32] = torch.linspace(-1, 1, 32) * calib_amax * 2.0 ** -14
    return x.to(torch.bfloat16)


def check_fp8_linear(rep, name, exp, w_bf16, w_amax, in_amax, weight_fq):
    """All per-linear checks of one exported FP8 linear ``name``. Returns (elements, double-rounded elements,
    elements where dequant(export) != ModelOpt's weight fake quant)."""
    import ml_dtypes
    import numpy as np
    import torch

    w = f32(w_bf16)
    ws, codes = exp[name + ".weight_scale"], exp[name + ".weight"]
    shapes_ok = ws.dtype == torch.float32 and ws.dim() == 0 and codes.dtype == torch.float8_e4m3fn
    ok_ws = exact(ws, w_amax.float() / E4M3_MAX)
    has_in = name + ".input_scale" in exp
    ok_in = has_in and exact(exp[name + ".input_scale"], in_amax.float() / E4M3_MAX)
    ref, s = numpy_export_fp8(w, f32(w_amax))
    got = codes.view(torch.uint8).numpy()
    ok_bytes = np.array_equal(got, ref.view(np.uint8)) and np.float32(ws.item()) == s
    direct = (w / s).astype(ml_dtypes.float8_e4m3fn)
    n_double = int((direct.view(np.uint8) != ref.view(np.uint8)).sum())
    deq = (codes.float() * ws).to(w_bf16.dtype)
    n_fq = int((deq != weight_fq).sum())
    rep.add(f"{name}: weight_scale==amax/448 {ok_ws}; input_scale==in_amax/448 {ok_in}; 0-d f32 / e4m3 {shapes_ok}; "
            f"bytes==numpy recipe {ok_bytes}; double-rounded {n_double}/{w.size}; "
            f"dequant!=weight fakequant {n_fq}", ok_ws and ok_in and ok_bytes and shapes_ok)
    return w.size, n_double, n_fq


def make_seq(out, rep):
    import ml_dtypes
    import modelopt.torch.quantization as mtq
    import numpy as np
    import torch

    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(20250101)
    w0 = seq_first_weight(gen)
    b0 = torch.randn(128, generator=gen) * 0.1
    model = seq_model(w0, b0, seq_second_weight(gen))
    calib = torch.randn(4, 8, 64, generator=gen).mul(2.0).to(torch.bfloat16)
    x_test = seq_inputs(gen, float(calib.float().abs().max()))
    linears = ("0", "2")
    w_bf16, captured, amax, y_bf16, y_fq = quantize_export_seq(model, mtq.FP8_DEFAULT_CFG, calib, x_test, linears,
                                                               out, keep_inputs=True)
    hf_quant_config = json.loads((out / "hf_quant_config.json").read_text())

    rep.add("# seq (FP8_DEFAULT_CFG, per-module export)")
    rep.add(f"note: seq hf_quant_config: {json.dumps(hf_quant_config)}")
    exp = load_safetensors(out)
    for i in linears:
        check_fp8_linear(rep, i, exp, w_bf16[f"{i}.weight"], amax[f"{i}.weight_quantizer._amax"],
                         amax[f"{i}.input_quantizer._amax"], captured[f"{i}.weight_fq"])
        if f"{i}.bias" in w_bf16:
            ok = torch.equal(exp[f"{i}.bias"], w_bf16[f"{i}.bias"])
            rep.add(f"{i}.bias: exported == source {ok}", ok)
    # the crafted rows decode as documented
    def row(name, r):
        return " ".join(f"{v:02x}" for v in exp[name].view(torch.uint8)[r, :16].tolist())

    rep.add(f"0.weight row 0 starts 7e fe: {row('0.weight', 0)[:5] == '7e fe'}", row("0.weight", 0)[:5] == "7e fe")
    r3 = row("0.weight", 3)[:23]
    rep.add(f"0.weight row 3 (2^-10 tie, above, tiny negatives, -0.0, +0.0) = {r3}", r3 == "00 80 01 81 80 80 80 00")
    for name, r in (("0.weight", 1), ("0.weight", 2), ("2.weight", 0)):
        rep.add(f"note: {name} row {r} codes: {row(name, r)}")
    w2 = f32(w_bf16["2.weight"])[0, :16]
    direct = (w2 / np.float32(exp["2.weight_scale"].item())).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    rep.add(f"note: 2.weight row 0 if rounded once from float32: {' '.join(f'{v:02x}' for v in direct)}")
    # ModelOpt's activation fake quant == the NumPy transcription (from amax, and from input_scale alone)
    for i in linears:
        xin, xfq = captured[f"{i}.input"], captured[f"{i}.input_fq"]
        a = f32(amax[f"{i}.input_quantizer._amax"])
        by_amax = numpy_fake_quant_fp8(f32(xin), a, ml_dtypes.bfloat16).astype(np.float32)
        by_scale = numpy_fake_quant_from_scale(f32(xin), exp[f"{i}.input_scale"].item(), ml_dtypes.bfloat16)
        ok = np.array_equal(by_amax, f32(xfq))
        rep.add(f"{i}.input fakequant == numpy(amax) {ok}; == numpy(input_scale) "
                f"{np.array_equal(by_scale.astype(np.float32), f32(xfq))}", ok)
        wfq = numpy_fake_quant_fp8(f32(w_bf16[f"{i}.weight"]), f32(amax[f"{i}.weight_quantizer._amax"]),
                                   ml_dtypes.bfloat16).astype(np.float32)
        ok = np.array_equal(wfq, f32(captured[f"{i}.weight_fq"]))
        rep.add(f"{i}.weight fakequant == numpy(amax) {ok}", ok)
    with torch.no_grad():
        y_re = torch.nn.functional.linear(captured["2.input_fq"], captured["2.weight_fq"])
    rep.add(f"y_fakequant == linear(2.input_fq, 2.weight_fq): {torch.equal(y_re, y_fq)}", torch.equal(y_re, y_fq))
    rep.add(f"note: y_fakequant vs y_bf16 rel {rel(y_fq, y_bf16):.4g}")
    return sorted(exp)


# ----------------------------------------------------------------------------------------------------------------
# part 2: tiny Nemotron-H
# ----------------------------------------------------------------------------------------------------------------
def fp8_recipe(pattern):
    """FP8 W8A8 (per-tensor, max calibration) on every linear ModelOpt's defaults quantize, FP8 KV cache; the
    first attention layer's projections and the Mamba layer right before it stay BF16 (Nano-style), later
    attention / Mamba layers are FP8. ModelOpt's defaults already leave conv1d, lm_head, embeddings and the
    router (not an nn.Linear in transformers 5) alone."""
    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    rules = list(cfg["quant_cfg"])
    rules += bf16_attention_rules(pattern, [pattern.index("*")])
    rules.extend(copy.deepcopy(mtq.FP8_KV_CFG)["quant_cfg"])
    cfg["quant_cfg"] = rules
    return cfg


def input_quantizer_path(model, name):
    """Module path of the input quantizer of linear ``name``; a fused transformers-5 expert bank keeps one per
    projection on the bank (``<bank>.<proj>_input_quantizer``), since ``<bank>.<proj>`` is a parameter."""
    import torch

    parent, proj = name.rsplit(".", 1)
    if isinstance(getattr(model.get_submodule(parent), proj), torch.nn.Module):
        return f"{name}.input_quantizer"
    return f"{parent}.{proj}_input_quantizer"


def capture_inputs(model, names):
    """Forward hooks on the input quantizers of ``names``: {name: (quantizer path, input, fake-quantized input)}
    (first call)."""
    store, handles = {}, []
    for name in names:
        path = input_quantizer_path(model, name)

        def hook(mod, args, output, name=name, path=path):
            if name not in store:
                store[name] = (path, args[0].detach().clone(), output.detach().clone())

        handles.append(model.get_submodule(path).register_forward_hook(hook))
    return store, handles


def make_nemotronh(out, src, rep):
    import ml_dtypes
    import modelopt.torch.quantization as mtq
    import numpy as np
    import torch
    from modelopt.torch.export import export_hf_checkpoint

    exp_dir = out / "export"
    conf_src = json.loads((src / "config.json").read_text())
    pattern = conf_src["hybrid_override_pattern"]
    model = load_nemotronh(src, torch.bfloat16)[0]
    gen = torch.Generator().manual_seed(4321)  # the NVFP4 golden data's draws: same calibration batches
    vocab = conf_src["vocab_size"]
    calib_ids = torch.randint(3, vocab, (4, 2, 32), generator=gen)
    input_ids = torch.randint(3, vocab, (2, 20), generator=gen)[:, :8]
    with torch.no_grad():
        logits_bf16 = model(input_ids, use_cache=False).logits
        logits_f32 = load_nemotronh(src, torch.float32)[0](input_ids, use_cache=False).logits

    def forward_loop(m):
        with torch.no_grad():
            for batch in calib_ids:
                m(batch, use_cache=False)

    model = mtq.quantize(model, fp8_recipe(pattern), forward_loop)
    acts, handles = capture_inputs(model, CAPTURE_INPUTS)
    with torch.no_grad():
        logits_fq = model(input_ids, use_cache=False).logits
    for h in handles:
        h.remove()
    with torch.no_grad():
        logits_fq32 = copy.deepcopy(model).float()(input_ids, use_cache=False).logits
        w8a16 = copy.deepcopy(model)
        mtq.disable_quantizer(w8a16, "*input_quantizer")
        logits_w8a16 = w8a16(input_ids, use_cache=False).logits
        logits_w8a16_32 = w8a16.float()(input_ids, use_cache=False).logits
    del w8a16
    amax = {n: b.detach().clone() for n, b in model.named_buffers() if n.endswith("._amax")}
    qw = quantized_weights(model)
    with torch.no_grad():
        fq = {n: (w.detach().clone(), wq.amax.detach().clone().float(), iq.amax.detach().clone().float(),
                  wq(w).detach().clone()) for n, (w, wq, iq) in qw.items()}

    export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=str(exp_dir))

    arrays = dict(input_ids=input_ids.numpy().astype(np.int32), calib_ids=calib_ids.numpy().astype(np.int32),
                  logits_bf16=f32(logits_bf16), logits_f32=f32(logits_f32), logits_fakequant=f32(logits_fq),
                  logits_fakequant_f32=f32(logits_fq32), logits_w8a16=f32(logits_w8a16),
                  logits_w8a16_f32=f32(logits_w8a16_32))
    arrays.update({f"amax.{k}": f32(v) for k, v in amax.items()})
    for n, (_, x, xfq) in sorted(acts.items()):
        arrays[f"act.{n}.input"], arrays[f"act.{n}.input_fq"] = f32(x), f32(xfq)
    save_npz(out / "reference.npz", arrays)

    # ---- verification
    rep.add(f"# nemotronh (FP8_DEFAULT_CFG + FP8_KV_CFG, layer {pattern.index('*')} attention and the Mamba layer "
            f"before it BF16; export_hf_checkpoint)")
    exp = load_safetensors(exp_dir)
    source = load_safetensors(src)
    exported_q = sorted(k.removesuffix(".weight_scale") for k in exp if k.endswith(".weight_scale"))

    # ModelOpt does not merge the scales of FP8 layers that share their input (q/k/v): each keeps its own amax
    groups = {}
    for name in exported_q:
        head, proj = name.rsplit(".", 1)
        if proj in ("q_proj", "k_proj", "v_proj"):
            groups.setdefault(head, []).append(name)
    tot, tot_double, tot_fq = check_exported_linears(rep, exp, source, exported_q, fq, check_fp8_linear, "FP8")
    rep.add(f"TOTAL nemotronh: {len(exported_q)} FP8 linears, {tot} weights; double-rounded (bf16 quotient) "
            f"{tot_double}; dequant(export) != ModelOpt weight fake quant {tot_fq}")
    for head, names in sorted(groups.items()):
        ws = {exp[n + ".weight_scale"].item() for n in names}
        ins = {exp[n + ".input_scale"].item() for n in names}
        own = sorted(float(fq[in_memory_name(n)][1].reshape(()) / E4M3_MAX) for n in names)
        ok = sorted(ws) == own and len(ins) == 1
        rep.add(f"{head}.{{q,k,v}}_proj: weight_scale each its own amax/448 (not merged) {sorted(ws) == own}; "
                f"one input_scale value (same input) {len(ins) == 1}", ok)
    banks = {}
    for n in exported_q:
        if ".experts." in n and ".shared_experts." not in n:
            bank, _, proj = n.rsplit(".", 2)
            banks.setdefault(f"{bank}.E.{proj}", []).append((exp[n + ".weight_scale"].item(),
                                                              exp[n + ".input_scale"].item()))
    for bank, vals in sorted(banks.items()):
        rep.add(f"note: {bank}: {len(vals)} experts, {len({v[0] for v in vals})} distinct weight_scale, "
                f"{len({v[1] for v in vals})} distinct input_scale")
    check_unquantized(rep, exp, source, exported_q, fq)
    kv = {n: b for n, b in amax.items() if "_bmm_quantizer" in n}
    check_kv_scales(rep, exp, kv)

    # activation fake quant: ModelOpt == NumPy(amax)
    for n, (path, x, xfq) in sorted(acts.items()):
        a = f32(amax[path + "._amax"])
        ok = np.array_equal(numpy_fake_quant_fp8(f32(x), a, ml_dtypes.bfloat16).astype(np.float32), f32(xfq))
        rep.add(f"act {n}: {tuple(x.shape)} fakequant == numpy(amax) {ok}", ok)
    # what of ModelOpt's fake-quant multiplier 448 * (1/amax) can be recovered from input_scale = amax / 448
    stats = dict(total=0, recip=0, amax_f32=0, amax_bf16=0)
    for n, b in amax.items():
        if "input_quantizer" not in n:
            continue
        a = np.float32(f32(b).reshape(()))
        s = a / np.float32(E4M3_MAX)
        stats["total"] += 1
        stats["recip"] += bool(np.float32(1) / s == modelopt_fake_quant_scale(a))
        stats["amax_f32"] += bool(s * np.float32(E4M3_MAX) == a)
        stats["amax_bf16"] += bool(np.float32((s * np.float32(E4M3_MAX)).astype(ml_dtypes.bfloat16)) == a)
    rep.add(f"note: input quantizers ({stats['total']}, amax dtype {next(iter(amax.values())).dtype}): "
            f"1/input_scale == 448*(1/amax) for {stats['recip']}; input_scale*448 == amax for {stats['amax_f32']}, "
            f"after rounding to bf16 for {stats['amax_bf16']}")
    for n, (path, x, xfq) in sorted(acts.items()):
        s = exp["backbone." + n.removeprefix("model.") + ".input_scale"] if ".experts.down_proj" not in n else \
            exp["backbone." + n.removeprefix("model.").replace("experts.", "experts.0.") + ".input_scale"]
        by_scale = numpy_fake_quant_from_scale(f32(x), s.item(), ml_dtypes.bfloat16).astype(np.float32)
        rep.add(f"note: act {n}: fake quant from 1/input_scale differs from ModelOpt's in "
                f"{int((by_scale != f32(xfq)).sum())}/{x.numel()} elements")
    hfq = json.loads((exp_dir / "hf_quant_config.json").read_text())
    conf = json.loads((exp_dir / "config.json").read_text())
    check_exclude_modules(rep, hfq)
    rep.add(f"note: hf_quant_config.quantization: {json.dumps(hfq['quantization'])}")
    rep.add(f"note: config.json quantization_config: {json.dumps(conf.get('quantization_config'))}")
    rep.add(f"note: logits rel. differences: W8A8 fakequant vs bf16 {rel(logits_fq, logits_bf16):.3g}, "
            f"fakequant_f32 vs f32 {rel(logits_fq32, logits_f32):.3g}, w8a16 vs bf16 "
            f"{rel(logits_w8a16, logits_bf16):.3g}, w8a16_f32 vs f32 {rel(logits_w8a16_32, logits_f32):.3g}, "
            f"f32 vs bf16 {rel(logits_f32, logits_bf16):.3g}")
    ins = sorted(k for k in amax if "experts." in k and "input_quantizer" in k and "shared" not in k)
    rep.add(f"note: routed-expert input quantizers ({len(ins)}): {ins}")
    return sorted(exp)


README = """# FP8 golden data (generated -- do not edit)

Made by `tools/make_fp8_golden.py` with NVIDIA ModelOpt 0.47.0 (torch 2.13 CPU, transformers 5.23); see that
file's docstring for what each file holds and how it was made, `verify.txt` for the checks it ran and the facts it
recorded, and `manifest.txt` for every exported tensor. Regenerate with `python tools/make_fp8_golden.py`.

- `seq/`: Linear(64,128,bias)+ReLU+Linear(128,48) in bf16, `FP8_DEFAULT_CFG`, ModelOpt per-module export;
  `reference.npz` holds inputs, bf16 weights, amaxes and ModelOpt's fake-quantized inputs/weights/outputs.
  Rows 0-3 of layer 0's weight are crafted (amax, e4m3 ties, subnormals, underflow), row 0 of layer 2's too
  (quotients that round differently through bf16 than straight from float32).
- `nemotronh/export/`: ModelOpt `export_hf_checkpoint` (FP8 W8A8 per tensor + FP8 KV cache; layers 2 and 3
  BF16) of the BF16 tiny Nemotron-H in `../nvfp4/nemotronh/source/`.
- `nemotronh/reference.npz`: input_ids, calib_ids, logits (bf16 / f32 model, W8A8 fake quant, W8A16 fake
  quant, each also in float32 arithmetic: `_f32`), calibrated `amax.<quantizer buffer>`, and
  `act.<module>.input` / `.input_fq`: ModelOpt's activation fake quant on one call of a few linears.
"""


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="Generate FP8 golden test data with NVIDIA ModelOpt on CPU (see the module docstring).")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help=f"output folder (default: {DEFAULT_OUT.relative_to(REPO)} in the repository)")
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE,
                    help=f"BF16 tiny Nemotron-H checkpoint (default: {DEFAULT_SOURCE.relative_to(REPO)})")
    ap.add_argument("--skip-seq", action="store_true", help="do not build seq/")
    ap.add_argument("--skip-nemotronh", action="store_true", help="do not build nemotronh/")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch

    torch.manual_seed(0)
    patch_exclude_name_mapper()
    src = args.source.resolve()
    return write_seq_and_nemotronh(args.out, README, None if args.skip_seq else make_seq,
                                   None if args.skip_nemotronh else lambda out, rep: make_nemotronh(out, src, rep))


if __name__ == "__main__":
    sys.exit(main())
