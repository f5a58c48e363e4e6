#!/usr/bin/env python
"""Generate the NVFP4 golden test data (``tests/data/nvfp4/``) with NVIDIA ModelOpt, on a CPU-only machine.

nemojax's NVFP4 code (``nemojax/quant``) must reproduce ModelOpt's checkpoints bit for bit. This tool runs the
real ModelOpt (tested with nvidia-modelopt 0.47.0, torch 2.13 CPU, transformers 5.23) and stores what it
produced, so the tests can compare against it without ModelOpt installed.

Environment::

    pip install torch --index-url https://download.pytorch.org/whl/cpu
    pip install nvidia-modelopt==0.47.0 transformers==5.23.0 safetensors requests
    python tools/make_nvfp4_golden.py                 # writes tests/data/nvfp4/
    python tools/make_nvfp4_golden.py --out OUT_DIR    # somewhere else

Output (under ``--out``)::

    seq/model.safetensors       nn.Sequential(Linear(64,128,bias), ReLU, Linear(128,48)) in bf16, quantized with
                                mtq.NVFP4_DEFAULT_CFG and exported by ModelOpt's per-module export
                                ("0.weight" u8 [128,32], "0.weight_scale" F8_E4M3 [128,4], "0.weight_scale_2" F32 [],
                                "0.input_scale" F32 [], "0.bias" BF16, "2.*")
    seq/hf_quant_config.json    modelopt.torch.export.quant_utils.get_quant_config
    seq/reference.npz           x_test, calib, w_bf16.<name>, y_bf16, y_fakequant, y_fakequant_f32,
                                <i>.input_fq, <i>.weight_fq, <i>.input_quantizer._amax,
                                <i>.weight_quantizer._amax (all float32)
    nemotronh/source/           BF16 source checkpoint written by nemojax (init_params_numpy(seed=1234),
                                save_params(naming="original")) -- a test can rebuild it exactly
    nemotronh/export/           ModelOpt export_hf_checkpoint of it (Nano-style NVFP4 W4A4 + FP8 KV cache)
    nemotronh/reference.npz     input_ids, calib_ids, logits_bf16, logits_fakequant, logits_f32,
                                logits_fakequant_f32, amax.<quantizer buffer>

The ``*_f32`` outputs are the same models run in float32 (the quantized one keeps its bf16 weights and calibrated
amaxes, only the arithmetic is float32). Use them to test a float32 implementation: with random weights the W4A4
model is chaotic -- bf16 vs float32 arithmetic flips E2M1 roundings that compound over the layers, so its bf16
and float32 fake-quant logits differ by tens of percent, while nemojax's float32 W4A4 path agrees with
logits_fakequant_f32 to ~1e-6.
    manifest.txt                name / dtype / shape of every exported tensor
    verify.txt                  the checks below, one line per quantized linear

Checks done here (results in verify.txt; the tool exits non-zero if one fails):
  * weight_scale_2 == weight amax / 2688 and input_scale == input amax / 2688 (float32, exact);
  * the export's bytes equal an independent NumPy transcription of the NVFP4 export recipe;
  * dequant(export) == ModelOpt's fake quant of the bf16 weight in every 16-block, except blocks whose scale
    underflows in the fake quant (its scale < 1e-5 becomes 1.0, i.e. the block reads as zero, while the export
    clamps the block scale to 2^-9 and keeps the values) -- these are counted separately;
  * k_scale / v_scale == k/v_bmm_quantizer amax / 448.

Two things ModelOpt 0.47 cannot do on CPU out of the box, patched here at run time (nothing on disk changes):
  1. NVFP4 fake quant (``tensor_quant.dynamic_block_quantize_op``) requires CUDA: it dispatches to a Triton
     kernel (``kernels/quantization/gemm/fp4_kernel_hopper.py``). ``fake_quant_nvfp4`` below computes the same
     float32 formula with torch ops (IEEE division, RNE float8_e4m3fn cast). Calibration (max) and the export
     itself are plain torch and run unpatched. Caveat: Triton lowers an f32 ``/`` to PTX ``div.full.f32``
     (approximate, <= 2 ulp), so on a GPU ModelOpt's fake quant can differ from this IEEE formula (and from
     its own export path) where a quotient sits exactly on an E2M1 or E4M3 rounding tie; the golden data
     follows the export path's IEEE arithmetic.
  2. With transformers 5 + nemotron_h the export's name mapper (``build_reverse_name_mapper``) rewrites
     ModelOpt's private sentinel suffix ".\\x00modelopt_name_sentinel" ("model" -> "backbone"), leaving junk in
     every exclude_modules entry. We replace the mapper by one whose sentinel contains no letters
     (``goldenlib.patch_exclude_name_mapper``, shared with the FP8 tool).
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
    E4M3_MAX, NEMOTRONH_CONFIG, REPO, bf16_attention_rules, check_exclude_modules, check_exported_linears,
    check_kv_scales, check_unquantized, exact, f32, load_nemotronh, load_safetensors, patch_exclude_name_mapper,
    quantize_export_seq, quantized_weights, rel, save_npz, seq_model, write_nemotronh_source, write_seq_and_nemotronh)

DEFAULT_OUT = REPO / "tests" / "data" / "nvfp4"
NEMOTRONH_SEED = 1234

E2M1_MAX = 6.0
NVFP4_DIV = E2M1_MAX * E4M3_MAX  # 2688: global scale = amax / 2688
BLOCK = 16


# ----------------------------------------------------------------------------------------------------------------
# NVFP4 math (torch for the fake quant that ModelOpt calls, NumPy for the independent export check)
# ----------------------------------------------------------------------------------------------------------------
# E2M1 magnitudes and the midpoints between neighbours. Round to nearest, ties to the even code: a midpoint
# above an even code (0, 1.0, 2.0, 4.0 have even codes 0, 2, 4, 6) rounds down, above an odd code rounds up.
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_MIDPOINTS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


def e2m1_magnitude_code(m):
    """Code 0..7 (uint8) of the magnitude m = |x|/scale, for a torch tensor or a NumPy array; saturates at 6."""
    steps = [(m >= edge) if tie_up else (m > edge) for edge, tie_up in _MIDPOINTS]
    if hasattr(m, "astype"):  # NumPy
        return sum(st.astype("uint8") for st in steps).astype("uint8")
    import torch

    return sum(st.to(torch.uint8) for st in steps).to(torch.uint8)


def fake_quant_nvfp4(x, global_amax):
    """ModelOpt's NVFP4 fake quant (fp4_fake_quant_kernel) in float32 torch ops, for CPU.

    Per 16-block of the last axis: s = e4m3(min(bmax / (6 g), 448)) * g with g = amax/2688 (s < 1e-5 -> 1.0),
    x_hat = sign(x) * E2M1(|x| / s) * s, cast back to x.dtype; the sign is taken from x >= 0."""
    import torch

    if x.shape[-1] % BLOCK:
        raise ValueError(f"NVFP4 fake quant needs the last dim to be a multiple of {BLOCK}, got {tuple(x.shape)}")
    g = global_amax.float().reshape(()) / NVFP4_DIV
    g = torch.where(g > 0, g, torch.full_like(g, 1e-12))
    xb = x.float().reshape(-1, x.shape[-1] // BLOCK, BLOCK)
    bmax = xb.abs().amax(-1, keepdim=True)
    s = torch.clamp(bmax / (E2M1_MAX * g), max=E4M3_MAX).to(torch.float8_e4m3fn).float() * g
    s = torch.where(s >= 1e-5, s, torch.ones_like(s))
    lut = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32)
    q = lut[e2m1_magnitude_code(xb.abs() / s).long()] * s
    q = torch.where(xb >= 0, q, -q)
    return q.reshape(x.shape).to(x.dtype)


def fake_quant_underflow_blocks(w, global_amax):
    """bool [N, K/16]: blocks whose fake-quant scale is < 1e-5 (the fake quant zeroes them; the export does not)."""
    import torch

    g = global_amax.float().reshape(()) / NVFP4_DIV
    bmax = w.float().reshape(w.shape[0], -1, BLOCK).abs().amax(-1)
    s = torch.clamp(bmax / (E2M1_MAX * g), max=E4M3_MAX).to(torch.float8_e4m3fn).float() * g
    return s < 1e-5


def numpy_export_nvfp4(w):
    """Independent transcription of ModelOpt's NVFP4 weight export (NVFP4QTensor path), float32 NumPy.

    Returns (packed uint8 [N, K/2], block scales float8_e4m3fn [N, K/16], weight_scale_2 float32)."""
    import ml_dtypes
    import numpy as np

    w = np.asarray(w, np.float32)
    F = np.float32
    s2 = F(np.abs(w).max()) / F(NVFP4_DIV)
    blocks = w.reshape(w.shape[0], -1, BLOCK)
    sb = np.abs(blocks).max(-1) / (F(E2M1_MAX) * s2)
    sb = np.where(sb == 0, F(1.0), sb)
    sb = np.clip(sb, F(2.0 ** -9), F(E4M3_MAX)).astype(ml_dtypes.float8_e4m3fn)
    y = blocks / (sb.astype(F) * s2)[..., None]
    codes = (e2m1_magnitude_code(np.abs(y)) | ((y < 0).astype(np.uint8) << 3)).reshape(w.shape).astype(np.uint8)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8), sb, s2


def dequant_export(packed, scale, scale_2):
    """float32 [N, K] from ModelOpt's (weight u8 [N, K/2], weight_scale e4m3 [N, K/16], weight_scale_2 f32 [])."""
    import torch

    lut = torch.tensor(E2M1_MAGNITUDES + tuple(-v for v in E2M1_MAGNITUDES), dtype=torch.float32)
    codes = torch.stack([packed & 0xF, packed >> 4], -1).reshape(packed.shape[0], -1).long()
    vals = lut[codes].reshape(packed.shape[0], -1, BLOCK)
    return (vals * (scale.float() * scale_2.float())[..., None]).reshape(packed.shape[0], -1)


# ----------------------------------------------------------------------------------------------------------------
# ModelOpt run-time patch (the other one, patch_exclude_name_mapper, is in goldenlib)
# ----------------------------------------------------------------------------------------------------------------
def patch_modelopt_for_cpu():
    """Route ModelOpt's dynamic-block (NVFP4) fake-quant op to fake_quant_nvfp4; other formats are untouched."""
    import modelopt.torch.quantization.tensor_quant as tq

    cuda_only = tq.dynamic_block_quantize_op

    def dynamic_block_quantize_cpu(inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits,
                                   scale_exponent_bits):
        # NVFP4: E2M1 elements (4 bits, 2 exponent bits) with E4M3 block scales (8 bits, 4 exponent bits)
        if (num_bits, exponent_bits, scale_num_bits, scale_exponent_bits) == (4, 2, 8, 4) and amax is not None:
            if block_size != BLOCK:
                raise NotImplementedError(f"NVFP4 block size {block_size}")
            return fake_quant_nvfp4(inputs, amax.amax())  # the CUDA op also reduces a non-scalar amax
        return cuda_only(inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits, scale_exponent_bits)

    tq.dynamic_block_quantize_op = dynamic_block_quantize_cpu  # looked up as a module global at call time


# ----------------------------------------------------------------------------------------------------------------
# NVFP4 checks of one exported linear
# ----------------------------------------------------------------------------------------------------------------
def check_linear(rep, name, exp, w_bf16, w_amax, in_amax, weight_fq):
    """All per-linear checks of one exported NVFP4 linear ``name`` (export key prefix). Returns block counts."""
    import numpy as np
    import torch

    s2, sc, packed = exp[name + ".weight_scale_2"], exp[name + ".weight_scale"], exp[name + ".weight"]
    ok_s2 = exact(s2, w_amax.float() / NVFP4_DIV)
    ok_in = in_amax is not None and name + ".input_scale" in exp and exact(exp[name + ".input_scale"],
                                                                            in_amax.float() / NVFP4_DIV)
    rp, rs, rs2 = numpy_export_nvfp4(f32(w_bf16))
    ok_bytes = (np.array_equal(packed.numpy(), rp) and np.array_equal(sc.view(torch.uint8).numpy(), rs.view(np.uint8))
                and np.float32(s2.item()) == rs2)
    deq = dequant_export(packed, sc, s2).to(w_bf16.dtype)
    bad = (deq != weight_fq).reshape(w_bf16.shape[0], -1, BLOCK).any(-1)
    under = fake_quant_underflow_blocks(w_bf16, w_amax)
    n_bad, n_under, n_blk = int(bad.sum()), int((bad & under).sum()), bad.numel()
    ok_fq = n_bad == n_under
    rep.add(f"{name}: weight_scale_2==w_amax/2688 {ok_s2}; input_scale==in_amax/2688 {ok_in}; "
            f"bytes==numpy recipe {ok_bytes}; dequant!=fakequant blocks {n_bad}/{n_blk} "
            f"(scale-underflow {n_under})", ok_s2 and ok_in and ok_bytes and ok_fq)
    return n_bad, n_under, n_blk


# ----------------------------------------------------------------------------------------------------------------
# part 1: nn.Sequential
# ----------------------------------------------------------------------------------------------------------------
def seq_first_weight(gen):
    """Linear(64 -> 128) weight: Gaussian rows plus crafted blocks. Global amax is pinned to 2688 * 2^-10, so
    weight_scale_2 = 2^-10 exactly and a block with amax 6u (u = 16 * 2^-10) gets block scale 16 exactly: its
    values / u are the E2M1 rounding ties themselves."""
    import torch

    w = torch.randn(128, 64, generator=gen) * 0.05
    s2 = 2.0 ** -10
    u = 16 * s2
    w[0, 5] = NVFP4_DIV * s2  # 2.625: the tensor amax (row 0 block 0 -> block scale 448)
    w[1, :16] = torch.tensor([6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0,
                              -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, -0.125]) * u
    w[1, 16:32] = 0.0  # all-zero block: export block scale 1.0 (stored as e4m3 1.0), codes 0
    w[1, 32:48] = torch.tensor([-6, -0.0, 0.0, -0.0625, 0.0625, 0.5, -0.5, 1.0,
                                -1.0, 1.5, -1.5, 2.0, -2.0, 3.0, -3.0, 4.0]) * u  # -0.0 -> 0x0, small neg -> 0x8
    w[2, :16] = 1e-6  # tiny block: scale underflows (fake quant -> 0; export clamps the scale to 2^-9)
    w[2, 16:32] = torch.linspace(-1, 1, 16) * 1e-4  # small block, block scale in the e4m3 subnormal range
    w[3, :16] = -7 * u  # every value == -block amax; scale 18.67 -> e4m3 18 -> |x|/s = 6.22 saturates to 6
    # block scales that are exact E4M3 ties (RNE): 17 -> 16 (even mantissa), 19 -> 20
    w[4, :16] = torch.linspace(-1, 1, 16) * 17 * E2M1_MAX * s2 * 0.9
    w[4, 0] = 17 * E2M1_MAX * s2  # block amax 102 * 2^-10: block scale 17 -> 16
    w[4, 16:32] = torch.linspace(1, -1, 16) * 19 * E2M1_MAX * s2 * 0.9
    w[4, 16] = 19 * E2M1_MAX * s2  # block scale 19 -> 20
    w[5, :16] = torch.tensor([3, 0.75, 1.75, 3.5, 0.25, 1.25, 2.5, 5, 2.99, 3.01, 0.2, 0.3, 1.0, 2.0, 4.0, 6.0]) * u
    return w.to(torch.bfloat16)


def make_seq(out, rep):
    import modelopt.torch.quantization as mtq
    import torch

    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(20240617)
    w0 = seq_first_weight(gen)
    b0 = torch.randn(128, generator=gen) * 0.1
    w2 = torch.randn(48, 128, generator=gen) * 0.08
    w2[0, 32:48] = 0.0
    w2[1, :16] = -w2[1, :16].abs()
    model = seq_model(w0, b0, w2)
    calib = torch.randn(4, 8, 64, generator=gen).mul(2.0).to(torch.bfloat16)
    x_test = torch.randn(6, 64, generator=gen).mul(2.0)
    x_test[0, :16] = 0.0  # zero activation block
    x_test[1, 16:32] *= 4.0  # beyond the calibrated range: block scale saturates at 448, values at 6
    x_test[2, 32:48] = 1e-4  # small activation block: block scale in the e4m3 subnormal range
    x_test[3, 48:64] = 1e-6  # tiny activation block: scale < 1e-5 -> 1.0 in the fake quant (reads as zero)
    x_test = x_test.to(torch.bfloat16)
    linears = ("0", "2")
    w_bf16, captured, amax, y_bf16, y_fq = quantize_export_seq(model, mtq.NVFP4_DEFAULT_CFG, calib, x_test, linears,
                                                               out)

    rep.add("# seq (NVFP4_DEFAULT_CFG, per-module export)")
    exp = load_safetensors(out)
    for i in linears:
        check_linear(rep, i, exp, w_bf16[f"{i}.weight"], amax[f"{i}.weight_quantizer._amax"],
                     amax[f"{i}.input_quantizer._amax"], captured[f"{i}.weight_fq"])
        # the export must not have touched the bf16 bias
        if f"{i}.bias" in w_bf16:
            rep.add(f"{i}.bias: exported == source {torch.equal(exp[f'{i}.bias'], w_bf16[f'{i}.bias'])}",
                    torch.equal(exp[f"{i}.bias"], w_bf16[f"{i}.bias"]))
    # ModelOpt's fake-quant forward is the plain bf16 layer applied to the fake-quantized input and weight
    with torch.no_grad():
        y_re = torch.nn.functional.linear(captured["2.input_fq"], captured["2.weight_fq"])
    rep.add(f"y_fakequant == linear(2.input_fq, 2.weight_fq): {torch.equal(y_re, y_fq)}", torch.equal(y_re, y_fq))
    rep.add(f"y_fakequant vs y_bf16: max|diff| {float((y_fq.float() - y_bf16.float()).abs().max()):.4g}, "
            f"rel {float((y_fq.float() - y_bf16.float()).norm() / y_bf16.float().norm()):.4g}")
    return sorted(exp)


# ----------------------------------------------------------------------------------------------------------------
# part 2: tiny Nemotron-H
# ----------------------------------------------------------------------------------------------------------------
def nano_style_recipe(pattern):
    """NVFP4 W4A4 (dynamic 16-blocks, max calibration) on routed experts, shared experts, dense MLPs and Mamba
    in/out projections; BF16 for every attention projection and for the Mamba layer right before each attention
    layer (the published Nemotron-3-Nano NVFP4 layout); FP8 KV cache. ModelOpt's defaults already leave
    conv1d, lm_head and embeddings alone; the router is listed explicitly for clarity."""
    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
    rules = list(cfg["quant_cfg"])
    rules.append({"quantizer_name": "*mixer.gate.*", "enable": False})
    rules += bf16_attention_rules(pattern, [i for i, kind in enumerate(pattern) if kind == "*"])
    rules.extend(copy.deepcopy(mtq.FP8_KV_CFG)["quant_cfg"])
    cfg["quant_cfg"] = rules
    return cfg


def make_nemotronh(out, rep):
    import modelopt.torch.quantization as mtq
    import numpy as np
    import torch
    from modelopt.torch.export import export_hf_checkpoint

    src, exp_dir = out / "source", out / "export"
    cfg = write_nemotronh_source(src, NEMOTRONH_SEED)

    def load_hf(dtype):
        m, _, n_mamba = load_nemotronh(src, dtype)
        assert n_mamba == cfg.pattern.count("M")
        return m

    model = load_hf(torch.bfloat16)
    dtypes = {n: str(p.dtype).removeprefix("torch.") for n, p in model.named_parameters()}
    dtypes.update({n: str(b.dtype).removeprefix("torch.") for n, b in model.named_buffers()})

    gen = torch.Generator().manual_seed(4321)
    vocab = NEMOTRONH_CONFIG["vocab_size"]
    calib_ids = torch.randint(3, vocab, (4, 2, 32), generator=gen)
    input_ids = torch.randint(3, vocab, (2, 20), generator=gen)
    with torch.no_grad():
        logits_bf16 = model(input_ids, use_cache=False).logits
        logits_f32 = load_hf(torch.float32)(input_ids, use_cache=False).logits  # fp32 A_log/D from the source

    def forward_loop(m):
        with torch.no_grad():
            for batch in calib_ids:
                m(batch, use_cache=False)

    model = mtq.quantize(model, nano_style_recipe(cfg.pattern), forward_loop)
    with torch.no_grad():
        logits_fq = model(input_ids, use_cache=False).logits
        logits_fq32 = copy.deepcopy(model).float()(input_ids, use_cache=False).logits
    amax = {n: b.detach().clone() for n, b in model.named_buffers() if n.endswith("._amax")}
    qw = quantized_weights(model)
    with torch.no_grad():
        fq = {n: (w.detach().clone(), wq.amax.detach().clone(), iq.amax.detach().clone(), wq(w).detach().clone())
              for n, (w, wq, iq) in qw.items()}
    kv = {n: b for n, b in amax.items() if "_bmm_quantizer" in n}
    router_quantizers = [n for n, _ in model.named_modules() if ".mixer.gate." in n and "quantizer" in n]

    export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=str(exp_dir))

    arrays = dict(input_ids=input_ids.numpy().astype(np.int32), calib_ids=calib_ids.numpy().astype(np.int32),
                  logits_bf16=f32(logits_bf16), logits_fakequant=f32(logits_fq),
                  logits_f32=f32(logits_f32), logits_fakequant_f32=f32(logits_fq32))
    arrays.update({f"amax.{k}": f32(v) for k, v in amax.items()})
    save_npz(out / "reference.npz", arrays)

    # ---- verification
    rep.add("# nemotronh (Nano-style recipe, export_hf_checkpoint)")
    exp = load_safetensors(exp_dir)
    source = load_safetensors(src)
    exported_q = sorted(k.removesuffix(".weight_scale_2") for k in exp if k.endswith(".weight_scale_2"))

    tot_bad, tot_under, tot_blk = check_exported_linears(rep, exp, source, exported_q, fq, check_linear, "NVFP4")
    # routed experts: one input quantizer per fused bank in transformers 5 -> equal input_scale for all experts
    banks = {}
    for n in exported_q:
        if ".experts." in n and ".shared_experts." not in n:
            bank, _, proj = n.rsplit(".", 2)  # backbone.layers.L.mixer.experts, E, up_proj
            banks.setdefault(f"{bank}.E.{proj}", set()).add(exp[n + ".input_scale"].item())
    for bank, vals in sorted(banks.items()):
        rep.add(f"note: {bank}.input_scale: {len(vals)} distinct value(s) over the experts {sorted(vals)}")
    check_unquantized(rep, exp, source, exported_q, fq)
    rep.add(f"TOTAL nemotronh blocks dequant(export)!=fakequant: {tot_bad}/{tot_blk} (scale-underflow {tot_under})",
            tot_bad == tot_under)
    check_kv_scales(rep, exp, kv)

    # facts for the report
    hfq = json.loads((exp_dir / "hf_quant_config.json").read_text())
    conf = json.loads((exp_dir / "config.json").read_text())
    check_exclude_modules(rep, hfq)
    notes = [
        f"hf_quant_config.quantization: {json.dumps(hfq['quantization'])}",
        f"config.json has quantization_config: {'quantization_config' in conf}",
        f"router quantizer modules (mixer.gate): {router_quantizers or 'none'}",
        "HF in-memory dtypes after from_pretrained(bf16): "
        + ", ".join(f"{k}={v}" for k, v in sorted(dtypes.items())
                    if k.startswith("model.layers.0.mixer.") and k.split(".")[-1] in ("A_log", "D", "dt_bias")
                    or k.endswith("layers.1.mixer.gate.e_score_correction_bias")),
        f"logits rel. differences: fakequant vs bf16 {rel(logits_fq, logits_bf16):.3g}, "
        f"fakequant_f32 vs f32 {rel(logits_fq32, logits_f32):.3g}, f32 vs bf16 {rel(logits_f32, logits_bf16):.3g}, "
        f"fakequant_f32 vs fakequant {rel(logits_fq32, logits_fq):.3g}",
    ]
    ins = sorted(k for k in amax if "experts." in k and "input_quantizer" in k and "shared" not in k)
    notes.append(f"routed-expert input quantizers ({len(ins)}): {ins}")
    for n in notes:
        rep.add("note: " + n)
    return sorted(exp)


README = """# NVFP4 golden data (generated -- do not edit)

Made by `tools/make_nvfp4_golden.py` with NVIDIA ModelOpt 0.47.0 (torch 2.13 CPU, transformers 5.23); see that
file's docstring for what each file holds and how it was made, `verify.txt` for the checks it ran and
`manifest.txt` for every exported tensor. Regenerate with `python tools/make_nvfp4_golden.py`.

- `seq/`: Linear(64,128,bias)+ReLU+Linear(128,48) in bf16, `NVFP4_DEFAULT_CFG`, ModelOpt per-module export;
  `reference.npz` holds inputs, bf16 weights, amaxes and ModelOpt's fake-quantized inputs/weights/outputs.
- `nemotronh/source/`: BF16 tiny Nemotron-H written by nemojax (`init_params_numpy(cfg, seed=1234)`, all
  leaves bf16 except A_log, D, e_score_correction_bias; `save_params(naming="original")`).
- `nemotronh/export/`: ModelOpt `export_hf_checkpoint` of it (NVFP4 W4A4 Nano-style selective + FP8 KV).
- `nemotronh/reference.npz`: input_ids, calib_ids, logits_bf16 / logits_fakequant and their float32-arithmetic
  twins logits_f32 / logits_fakequant_f32 (transformers on CPU, mamba `time_step_limit = (0, inf)`; compare with
  a tolerance, and test float32 code against the `_f32` ones: the random-weight W4A4 model is chaotic across
  bf16/f32 arithmetic), `amax.<quantizer buffer>`.
"""


# ----------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="Generate NVFP4 golden test data with NVIDIA ModelOpt on CPU (see the module docstring).")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help=f"output folder (default: {DEFAULT_OUT.relative_to(REPO)} in the repository)")
    ap.add_argument("--skip-seq", action="store_true",
                    help="do not build seq/ (manifest.txt and verify.txt then cover nemotronh/ only)")
    ap.add_argument("--skip-nemotronh", action="store_true",
                    help="do not build nemotronh/ (manifest.txt and verify.txt then cover seq/ only)")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import torch

    torch.manual_seed(0)
    patch_modelopt_for_cpu()
    patch_exclude_name_mapper()
    return write_seq_and_nemotronh(args.out, README, None if args.skip_seq else make_seq,
                                   None if args.skip_nemotronh else make_nemotronh)


if __name__ == "__main__":
    sys.exit(main())
