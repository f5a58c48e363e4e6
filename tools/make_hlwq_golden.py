#!/usr/bin/env python
"""Generate the HLWQ ("PolarQuant") golden test data (``tests/data/hlwq/``) with the real ``polarquant`` package.

HLWQ (Hadamard-Lloyd Weight Quantization, formerly "PolarQuant", PyPI ``polarquant``, import name
``polarengine_vllm``) stores each weight matrix as one 5-bit Lloyd-Max code per weight plus one fp16 L2 norm per
128-block of a row, the block rotated by a normalized Walsh-Hadamard matrix before quantization. nemojax's HLWQ
code must read those checkpoints and reproduce the package's arithmetic; this tool runs the package (CPU only) and
stores what it produced, so the tests need neither the package nor torch.

Environment (tested with polarquant 0.6.0, torch 2.13 CPU, transformers 5.23, JAX 0.10.2)::

    pip install polarquant==0.6.0                    # needs torch, safetensors, scipy, transformers
    python tools/make_hlwq_golden.py                 # writes tests/data/hlwq/
    python tools/make_hlwq_golden.py --out OUT_DIR    # somewhere else

Output (under ``--out``; all float arrays in .npz are float32 unless stated)::

    matrices.npz      fresh seeded bf16 matrices, each quantized by PolarQuantizer.quantize_tensor:
                        <m>.w        source weight (float32 copy of the bf16 values) [out, in]
                        <m>.codes    uint8 [out, in_pad], one code per weight (the package's int8 codes, bytes as is)
                        <m>.norms    float16 [out, n_blocks]
                        <m>.ct       the Lloyd-Max table the package used (get_centroids(bits)) [2^bits]
                        <m>.deq      the package's BF16 dequant (polarquant-convert ``dequant_codes``), trimmed to
                                     ``in``, as float32 [out, in]
                        <m>.meta     int64 [out, in, in_pad, n_blocks, bits, block_size]
                        <m>.packed_b bits == 5: layout B bytes, packing.pack_codes_q5 (LSB-first) [out, in_pad*5/8]
                        <m>.packed_c bits == 5: layout C bytes, hf_integration._bitpack_5 (MSB-first) of the
                                     flattened row-major codes, zero codes padded to a multiple of 8 [ceil(N/8)*5]
                        <m>.packed_nibble  bits <= 4: utils.pack_codes_half_block (what quantize_model writes for
                                     Q3/Q4 in mixed-bit mode: byte i of a block = code[i] | code[64+i] << 4)
                      matrices: gauss_q5 48x256 N(0, 0.02^2); student_t_q5 32x384 (t, nu=3, scale 0.01);
                      pad232_q5 24x232 (in not a multiple of 128 -> zero padded to 256, like 1856 -> 1920);
                      bits2 .. bits8 16x256 N(0, 0.02^2) quantized at 2..8 bits.
                      lloyd_max.b2 .. lloyd_max.b8: utils.get_centroids(b) (float32, the 100-iteration tables)
                      trap.hf_integration_ct5: hf_integration._get_centroids(5), a *different* table (outer
                      boundaries left at +-4); never use it, it is here so a test can show it differs.
    nemotronh/source/       BF16 tiny Nemotron-H written by nemojax (init_params_numpy(cfg, seed=4321), every leaf
                            bf16 except A_log, D, e_score_correction_bias; save_params(naming="original")).
    nemotronh/layout_a/     "codes/ct/norms", one byte per code, written the way the eoq notebook
                            (polarquant_q5_torchao.ipynb, the "polar_engine_v5" PQ5 exports) writes it: model loaded
                            in bf16, named_parameters() in sorted key order, <p>.codes int8 [out, in_pad], <p>.ct f32
                            [32], <p>.norms f16 [out, n_blocks], passthrough tensors bf16, 0-based shard name
                            model-00000-of-00001.safetensors + index, notebook-flavour polar_config.json
                            (format "polar_engine_v5", key "in_f_padded", base_model "../source").
    nemotronh/layout_b/     PolarQuantizer.quantize_model(pack_q5=True) run for real on the source: <p>.codes uint8
                            [out, in_pad*5/8] (pack_codes_q5, LSB-first), <p>.norms f16, <p>.ct_scaled f32 [32],
                            passthrough tensors fp16 (the model is loaded in fp16), polar_config.json
                            (format "polar_engine_v5", layers[p].packed_q5 = true).
    nemotronh/layout_c/     "hlwq-q5" bit-packed (the git-HEAD loader's format): <p>.weight__packed uint8 flat,
                            MSB-first (hf_integration._bitpack_5), <p>.weight__norms f16, <p>.weight__meta int64
                            [out, n_blocks, 128, N, in]; no table; passthrough bf16; polar_config.json format "hlwq-q5".
    nemotronh/dequant_bf16/ polarquant-convert (cli.convert, loaded by file path) of layout_a: every quantized matrix
                            dequantized to BF16 and trimmed; passthrough copied (bf16); the dropped
                            e_score_correction_bias buffers recovered from base_model into
                            model-extra-buffers.safetensors, as convert does.
    nemotronh/reference.npz input_ids int32 [2, 20]; logits_dequant / logits_source float32 [2, 20, 512]:
                            transformers NemotronHForCausalLM in fp32 (bf16 weights upcast exactly) with
                            ``time_step_limit = (0, inf)`` on the Mamba layers, on dequant_bf16/ and on source/.
    manifest.txt            name / dtype / shape of every tensor of every nemotronh/ checkpoint.
    verify.txt              the checks below, one line each (the tool exits non-zero if one fails).

Checks (verify.txt): Lloyd-Max tables b2..b8 == our NumPy transcription of hlwq.md section 2 (bit for bit) and the
Q5 sha256 quoted there; per matrix: codes in [0, 2^b), norms f16 [out, n_blocks], pack/unpack round trips (package
and our own LSB/MSB decoders), convert's dequant == weight_converter's; codes / norms / dequant of our independent
float32 NumPy transcription of hlwq.md section 1 vs the package (counts, informational); rel. error of the 5-bit
Gaussian matrix ~0.054; the histogram bit-order test (KL to the Lloyd-Max bin masses, right order << wrong order) on
the gauss_q5 bytes and on all of nemotronh layout_b / layout_c; nemotronh: same quantized set (72) and passthrough
set in every layout, dropped = the 3 buffers, B/C decode to A's codes, PolarWeightLoader(B) + _dequant_weight ==
convert(A) bit for bit, dequant_bf16 holds every source name (buffers recovered), transformers loads it with no
missing keys, logits finite.

Faithful to the writers, every layout DROPS the registered buffers (mixer.gate.e_score_correction_bias): both
writers iterate named_parameters(). A reader must take them from the base checkpoint (source/).
All layouts quantize the same matrices (the uniform-Q5 "Mamba-aware" rule set, utils.get_bits_for_layer with every
pattern at 5 bits): embeddings, lm_head, Mamba in/out_proj, attention q/k/v/o, MLP and (shared) expert up/down
projections; kept: norms, A_log, D, dt_bias, conv1d.*, mixer.gate.weight (router).
Layouts A and C quantize the bf16 weights (notebook path), layout B the fp16 copy quantize_model makes, so B may
differ from A/C in a few codes/norms (verify.txt counts them).

Things the 0.6.0 wheel cannot do as shipped, handled at run time (nothing on disk is patched; helpers: goldenlib):
  * ``polarengine_vllm/cli.py`` (polarquant-convert) is shadowed by the sibling package ``cli/``: loaded by path.
  * quantize_model() loads the model with AutoModelForCausalLM; transformers 5 would hand it *fused* 3-D expert
    tensors (which it skips as non-2-D) under "model.*" names, not the per-expert "backbone.*" hub names of the
    published checkpoints. We give it a stand-in module tree built from the source safetensors (hub names,
    parameters + the e_score_correction_bias buffers, cast to the requested dtype; ``standin_auto_classes``), so
    the package's own loop, rules, packing, sharding and polar_config writing run unchanged. There is no tokenizer
    (its save is skipped with a warning, as the package does) and config.json is copied from source/.
  * convert() recovers missing buffers with huggingface_hub.snapshot_download(base_model); we point it at a temp
    copy of source/ with an index file (the hub layout it expects; ``offline_hub``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from goldenlib import (  # noqa: E402
    BUFFERS, NEMOTRONH_CONFIG, REPO, Report, checkpoint_manifest, f32, load_safetensors, module_from_path,
    nemotronh_logits_f32, offline_hub, quiet, rel_err, save_npz, sort_weight_map, standin_auto_classes, standin_model,
    u8, write_nemotronh_source, write_outputs)

DEFAULT_OUT = REPO / "tests" / "data" / "hlwq"
NEMOTRONH_SEED = 4321
LOGGER = "polarengine_vllm"  # the package's logger: quiet(LOGGER) swallows it and its prints (convert's report)
BS = 128
Q5_SHA256 = "f303a6b12f99e9c2fdf8a7a7a73e8e12a5881bb023ceccbe20c0ac0cfeb5d859"  # hlwq.md section 2

# (name, out, in, bits, distribution)
MATRICES = [
    ("gauss_q5", 48, 256, 5, "normal"),
    ("student_t_q5", 32, 384, 5, "student_t"),
    ("pad232_q5", 24, 232, 5, "normal"),
] + [(f"bits{b}", 16, 256, b, "normal") for b in range(2, 9)]


# ----------------------------------------------------------------------------------------------------------------
# the package
# ----------------------------------------------------------------------------------------------------------------
class PQ:
    """The polarquant modules we use, imported once (importing utils pre-computes the 2..6 bit tables)."""

    def __init__(self):
        from importlib.metadata import version

        import polarengine_vllm
        from polarengine_vllm import hf_integration, loader, packing, quantizer, utils, weight_converter

        self.utils, self.packing, self.quantizer = utils, packing, quantizer
        self.hf, self.loader, self.wc = hf_integration, loader, weight_converter
        # polarquant-convert lives in polarengine_vllm/cli.py, which the sibling package cli/ shadows
        path = os.path.join(os.path.dirname(polarengine_vllm.__file__), "cli.py")
        self.cli = module_from_path("polarquant_convert_cli", path)
        self.q5_assignment = {k: 5 for k in utils.DEFAULT_BIT_ASSIGNMENT}  # uniform Q5, same patterns
        self.version = version("polarquant")


# ----------------------------------------------------------------------------------------------------------------
# our own NumPy reading of hlwq.md (independent of the package) -- used only to cross-check it
# ----------------------------------------------------------------------------------------------------------------
def hadamard(n):
    """Normalized Sylvester-Walsh-Hadamard matrix, H[i, k] = (-1)^popcount(i & k) / sqrt(n)."""
    i = np.arange(n)
    bits = np.bitwise_and.outer(i, i)
    parity = np.zeros_like(bits)
    while bits.any():
        parity ^= bits & 1
        bits >>= 1
    return ((1 - 2 * parity) / math.sqrt(n)).astype(np.float32)


def lloyd_max_table(bits, iters=100):
    """hlwq.md section 2: float64, uniform boundaries on [-4, 4] with +-inf ends, 100 iterations, float32."""
    from scipy.stats import norm

    n = 1 << bits
    t = np.linspace(-4.0, 4.0, n + 1)
    t[0], t[-1] = -np.inf, np.inf
    for _ in range(iters):
        lo, hi = t[:-1], t[1:]
        mass = norm.cdf(hi) - norm.cdf(lo)
        safe = np.where(mass > 1e-10, mass, 1.0)
        c = np.where(mass > 1e-10, (norm.pdf(lo) - norm.pdf(hi)) / safe, (lo + hi) / 2)
        t = np.concatenate([[-np.inf], (c[:-1] + c[1:]) / 2, [np.inf]])
    return c.astype(np.float32)


def np_quantize(w, ct):
    """hlwq.md section 1 in float32 NumPy: codes via searchsorted + nearer-of-two (ties -> lower), fp16 norms."""
    out, n_in = w.shape
    in_pad = -(-n_in // BS) * BS
    wp = np.zeros((out, in_pad), np.float32)
    wp[:, :n_in] = w
    blocks = wp.reshape(out, -1, BS)
    r = np.maximum(np.sqrt((blocks.astype(np.float32) ** 2).sum(-1, dtype=np.float32)), np.float32(1e-10))
    z = ((blocks / r[..., None]) @ hadamard(BS)) * np.float32(math.sqrt(BS))
    k = np.clip(np.searchsorted(ct, z), 1, len(ct) - 1)
    lower_nearer = np.abs(z - ct[k - 1]) <= np.abs(ct[k] - z)
    codes = np.where(lower_nearer, k - 1, k).astype(np.uint8)
    return codes.reshape(out, in_pad), r.astype(np.float16)


def np_dequant_bf16(codes, norms, ct, n_in):
    import ml_dtypes

    out = codes.shape[0]
    v = (ct[codes.astype(np.int64)] / np.float32(math.sqrt(BS))).reshape(out, -1, BS) @ hadamard(BS)
    v = v * norms.astype(np.float32)[..., None]
    return v.reshape(out, -1)[:, :n_in].astype(ml_dtypes.bfloat16).astype(np.float32)


def decode5(packed, total, order):
    """5-bit codes from groups of 5 bytes: 'lsb' = 40-bit little-endian sum c_i 2^(5i) (layout B),
    'msb' = 40-bit big-endian sum c_i 2^(5(7-i)) (layout C). Flat output, first ``total`` codes."""
    p = np.asarray(packed, np.uint8).reshape(-1, 5).astype(np.uint64)
    if order == "lsb":
        v = sum(p[:, j] << np.uint64(8 * j) for j in range(5))
        sh = [5 * i for i in range(8)]
    else:
        v = sum(p[:, j] << np.uint64(8 * (4 - j)) for j in range(5))
        sh = [5 * (7 - i) for i in range(8)]
    c = np.stack([(v >> np.uint64(s)) & np.uint64(31) for s in sh], axis=1)
    return c.reshape(-1)[:total].astype(np.uint8)


def kl_to_lloyd_max(codes, ct):
    """KL(code histogram || Lloyd-Max bin masses of N(0,1)) -- the bit-order test of hlwq.md section 3."""
    from scipy.stats import norm

    t = np.concatenate([[-np.inf], (ct[:-1].astype(np.float64) + ct[1:]) / 2, [np.inf]])
    p = np.diff(norm.cdf(t))
    h = np.bincount(codes.reshape(-1), minlength=len(ct))[: len(ct)] / codes.size
    m = h > 0
    return float((h[m] * np.log(h[m] / p[m])).sum())


# ----------------------------------------------------------------------------------------------------------------
# part 1: matrices.npz
# ----------------------------------------------------------------------------------------------------------------
def make_matrix(rng, out, n_in, dist):
    import ml_dtypes

    if dist == "student_t":
        w = 0.01 * rng.standard_t(3.0, size=(out, n_in))
    else:
        w = rng.normal(0.0, 0.02, size=(out, n_in))
    return w.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def make_matrices(pq, out, rep):
    import torch

    rep.add("# matrices.npz (PolarQuantizer.quantize_tensor on bf16 input)")
    arrays = {}
    # --- Lloyd-Max tables
    for b in range(2, 9):
        ct = pq.utils.get_centroids(b).numpy().astype(np.float32)
        arrays[f"lloyd_max.b{b}"] = ct
        mine = lloyd_max_table(b)
        sym = bool(np.array_equal(ct, -ct[::-1]))
        rep.add(f"lloyd_max b{b}: {len(ct)} levels, ends +-{ct[-1]:.6f}, symmetric {sym}, "
                f"our NumPy recipe (hlwq.md 2) bit-equal {np.array_equal(mine, ct)} "
                f"(max|diff| {np.abs(mine - ct).max():.3g})", sym and np.array_equal(mine, ct))
    sha = hashlib.sha256(arrays["lloyd_max.b5"].astype("<f4").tobytes()).hexdigest()
    rep.add(f"lloyd_max b5 sha256 {sha[:16]}.. == hlwq.md: {sha == Q5_SHA256}", sha == Q5_SHA256)
    trap = pq.hf._get_centroids(5).numpy().astype(np.float32)
    arrays["trap.hf_integration_ct5"] = trap
    rep.add(f"note: hf_integration._get_centroids(5) ends +-{trap[-1]:.4f}, max|diff| vs get_centroids(5) "
            f"{np.abs(trap - arrays['lloyd_max.b5']).max():.4f} (do not use)")

    # --- matrices
    qz = pq.quantizer.PolarQuantizer(block_size=BS)
    for idx, (name, n_out, n_in, bits, dist) in enumerate(MATRICES):
        w = make_matrix(np.random.Generator(np.random.PCG64([2026, idx])), n_out, n_in, dist)
        wt = torch.from_numpy(w).to(torch.bfloat16)
        r = qz.quantize_tensor(wt, bits)
        codes_t, norms_t, ct_t = r["codes"], r["norms"], pq.utils.get_centroids(bits)
        in_pad = -(-n_in // BS) * BS
        nb = in_pad // BS
        codes = u8(codes_t)
        norms = norms_t.numpy()
        ct = ct_t.numpy().astype(np.float32)
        deq_t = pq.cli.dequant_codes(codes_t, norms_t, ct_t, BS)[:, :n_in]
        deq = f32(deq_t)
        a = {"w": w, "codes": codes, "norms": norms, "ct": ct, "deq": deq,
             "meta": np.array([n_out, n_in, in_pad, nb, bits, BS], np.int64)}
        ok = (codes.shape == (n_out, in_pad) and int(codes.max()) < (1 << bits) and norms.shape == (n_out, nb)
              and norms.dtype == np.float16 and torch.allclose(r["ct_scaled"], ct_t / math.sqrt(BS)))
        err = rel_err(deq, w)
        line = (f"{name}: [{n_out},{n_in}] b{bits} codes {codes.dtype}{list(codes.shape)} in [{codes.min()},"
                f"{codes.max()}] norms {norms.dtype}{list(norms.shape)} rel.err {err:.4f}")
        # the same dequant through weight_converter._dequant_weight (vLLM load hook) must agree bit for bit
        deq2 = f32(pq.wc._dequant_weight(codes_t, norms_t, ct_t, BS)[:, :n_in])
        ok = ok and np.array_equal(deq, deq2)
        if bits == 5:
            pb = pq.packing.pack_codes_q5(codes_t, BS)
            pc, total = pq.hf._bitpack_5(codes_t.view(torch.uint8).reshape(-1))
            a["packed_b"], a["packed_c"] = pb.numpy(), pc.numpy()
            rt_b = np.array_equal(u8(pq.packing.unpack_codes_q5(pb, BS)), codes)
            rt_c = np.array_equal(pq.hf._unpack_5bit(pc, total).numpy(), codes.reshape(-1))
            own_b = np.array_equal(decode5(a["packed_b"], codes.size, "lsb"), codes.reshape(-1))
            own_c = np.array_equal(decode5(a["packed_c"], codes.size, "msb"), codes.reshape(-1))
            ok = ok and rt_b and rt_c and own_b and own_c and pb.shape == (n_out, in_pad * 5 // 8)
            line += (f" | B {list(pb.shape)} roundtrip {rt_b} our-lsb {own_b} | C {list(pc.shape)} roundtrip {rt_c}"
                     f" our-msb {own_c}")
        elif bits <= 4:
            pn = pq.utils.pack_codes_half_block(codes_t, BS)
            a["packed_nibble"] = pn.numpy()
            mine = (codes.reshape(n_out, nb, 2, BS // 2)[:, :, 0] | (codes.reshape(n_out, nb, 2, BS // 2)[:, :, 1]
                                                                    << 4)).reshape(n_out, -1)
            ok = ok and np.array_equal(mine, a["packed_nibble"])
            line += f" | nibble {list(pn.shape)} == code[i]|code[64+i]<<4: {np.array_equal(mine, a['packed_nibble'])}"
        rep.add(line, ok)
        # independent NumPy transcription of hlwq.md (float32): how often does it differ from the package?
        c2, n2 = np_quantize(w, ct)
        d2 = np_dequant_bf16(codes, norms, ct, n_in)
        rep.add(f"  {name} vs our NumPy hlwq.md: codes differ {int((c2 != codes).sum())}/{codes.size} "
                f"(max |dc| {int(np.abs(c2.astype(int) - codes).max())}), fp16 norms differ "
                f"{int((n2 != norms).sum())}/{norms.size}, bf16 dequant (package codes) differs "
                f"{int((d2 != deq).sum())}/{deq.size}")
        for k, v in a.items():
            arrays[f"{name}.{k}"] = v
        if name == "gauss_q5":
            rep.add(f"gauss_q5 rel.err {err:.4f} in [0.045, 0.065] (hlwq.md: 0.0539 on 1024x4096)",
                    0.045 <= err <= 0.065)
            kb = kl_to_lloyd_max(decode5(a["packed_b"], codes.size, "lsb"), ct)
            kbw = kl_to_lloyd_max(decode5(a["packed_b"], codes.size, "msb"), ct)
            kc = kl_to_lloyd_max(decode5(a["packed_c"], codes.size, "msb"), ct)
            kcw = kl_to_lloyd_max(decode5(a["packed_c"], codes.size, "lsb"), ct)
            rep.add(f"gauss_q5 bit-order KL: B lsb {kb:.2e} vs msb {kbw:.3f}; C msb {kc:.2e} vs lsb {kcw:.3f}",
                    kb * 20 < kbw and kc * 20 < kcw)
        if name == "pad232_q5":
            rep.add(f"pad232_q5: in_pad {in_pad}, last block has {in_pad - n_in} zero-padded inputs, "
                    f"deq trimmed to {deq.shape[1]}", deq.shape[1] == n_in)
    save_npz(out / "matrices.npz", arrays)
    return arrays


# ----------------------------------------------------------------------------------------------------------------
# part 2: tiny Nemotron-H
# ----------------------------------------------------------------------------------------------------------------
def write_layout_b(pq, src_dir, src, folder):
    """Run PolarQuantizer.quantize_model(pack_q5=True) with the stand-in model (loaded "in fp16")."""
    import torch

    q = pq.quantizer.PolarQuantizer(block_size=BS, bit_assignment=dict(pq.q5_assignment))
    with standin_auto_classes(src_dir, src, torch.float16), quiet(LOGGER):
        q.quantize_model(str(src_dir), str(folder), pack_int4=True, pack_q5=True)
    shutil.copy(src_dir / "config.json", folder / "config.json")


def quantize_notebook_style(pq, src):
    """The eoq notebook's save loop (load bf16, named_parameters, get_bits_q5, quantize): per quantized prefix the
    package's quantize_tensor result, plus the bf16 passthrough tensors. Names in named_parameters() order."""
    import torch

    model = standin_model(src, torch.bfloat16)
    qz = pq.quantizer.PolarQuantizer(block_size=BS)
    quant, passthrough, meta = {}, {}, {}
    for name, p in model.named_parameters():
        bits = pq.utils.get_bits_for_layer(name, p.data, pq.q5_assignment)
        if bits >= 16 or p.ndim != 2:
            passthrough[name] = p.data.clone().contiguous()
            continue
        assert bits == 5, name
        prefix = name[:-7] if name.endswith(".weight") else name
        out_f, in_f = p.shape
        in_pad = -(-in_f // BS) * BS
        quant[prefix] = qz.quantize_tensor(p.data, bits)
        meta[prefix] = {"in_features": in_f, "out_features": out_f, "in_f_padded": in_pad,
                        "n_blocks": in_pad // BS, "bits": bits, "block_size": BS}
    return quant, passthrough, meta


def write_layout_a(pq, src_dir, quant, passthrough, meta, folder):
    """Layout A as the notebook writes it: sorted keys, 0-based shard names, .codes int8 / .norms f16 / .ct f32."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = dict(passthrough)
    for prefix, r in quant.items():
        state[f"{prefix}.codes"] = r["codes"].contiguous()
        state[f"{prefix}.norms"] = r["norms"].contiguous()
        state[f"{prefix}.ct"] = pq.utils.get_centroids(meta[prefix]["bits"]).clone().contiguous()
    state = {k: state[k] for k in sorted(state)}
    shard = "model-00000-of-00001.safetensors"
    save_file(state, str(folder / shard))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": {k: shard for k in state}}, indent=2))
    (folder / "polar_config.json").write_text(json.dumps({
        "format": "polar_engine_v5", "base_model": "../source", "block_size": BS,
        "quantization": "PolarQuant Q5 (Lloyd-Max + Hadamard)", "bits": 5, "layers": meta,
        "usage": "Dequant codes to BF16 (polarquant-convert)"}, indent=2))
    shutil.copy(src_dir / "config.json", folder / "config.json")


def write_layout_c(pq, src_dir, quant, passthrough, meta, folder):
    """Layout C ("hlwq-q5"): <name>.weight__packed (MSB-first _bitpack_5), __norms f16, __meta int64 [5]."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    state = dict(passthrough)
    layers = {}
    for prefix, r in quant.items():
        m = meta[prefix]
        codes = r["codes"].view(torch.uint8)
        packed, total = pq.hf._bitpack_5(codes.reshape(-1))
        state[f"{prefix}.weight__packed"] = packed.contiguous()
        state[f"{prefix}.weight__norms"] = r["norms"].contiguous()
        state[f"{prefix}.weight__meta"] = torch.tensor(
            [m["out_features"], m["n_blocks"], BS, total, m["in_features"]], dtype=torch.int64)
        layers[prefix] = {"in_features": m["in_features"], "out_features": m["out_features"],
                          "in_features_padded": m["in_f_padded"], "n_blocks": m["n_blocks"], "bits": 5,
                          "block_size": BS}
    with quiet(LOGGER):
        pq.quantizer._save_sharded_safetensors(state, str(folder))
    (folder / "polar_config.json").write_text(json.dumps({
        "format": "hlwq-q5", "quantization": "polarengine", "block_size": BS, "bits": 5, "layers": layers},
        indent=2))
    shutil.copy(src_dir / "config.json", folder / "config.json")


def write_dequant(pq, src_dir, layout_a, folder):
    """polarquant-convert on layout A; base_model ("../source") resolved to a hub-style copy of source/."""
    if folder.exists():
        shutil.rmtree(folder)
    with offline_hub("../source", src_dir), quiet(LOGGER):
        pq.cli.convert(str(layout_a), str(folder))
    # convert() lists the recovered buffers in set order (varies with the string hash seed)
    sort_weight_map(folder)


def make_nemotronh(pq, out, rep):
    import torch

    nh = out / "nemotronh"
    if nh.exists():
        shutil.rmtree(nh)
    src_dir, la, lb, lc, dq = (nh / d for d in ("source", "layout_a", "layout_b", "layout_c", "dequant_bf16"))
    cfg = write_nemotronh_source(src_dir, NEMOTRONH_SEED)
    src = load_safetensors(src_dir)

    write_layout_b(pq, src_dir, src, lb)
    quant, passthrough, meta = quantize_notebook_style(pq, src)
    write_layout_a(pq, src_dir, quant, passthrough, meta, la)
    write_layout_c(pq, src_dir, quant, passthrough, meta, lc)
    write_dequant(pq, src_dir, la, dq)

    rep.add("# nemotronh")
    A, B, C, D = load_safetensors(la), load_safetensors(lb), load_safetensors(lc), load_safetensors(dq)
    pcb = json.loads((lb / "polar_config.json").read_text())
    qa = sorted(k[:-6] for k in A if k.endswith(".codes"))
    qb = sorted(k[:-6] for k in B if k.endswith(".codes"))
    qc = sorted(k[: -len(".weight__packed")] for k in C if k.endswith(".weight__packed"))
    n_expect = (2 + 2 * cfg.pattern.count("M") + 4 * cfg.pattern.count("*") + 2 * cfg.pattern.count("-")
                + cfg.pattern.count("E") * (2 * NEMOTRONH_CONFIG["n_routed_experts"] + 2))
    rep.add(f"quantized matrices: A {len(qa)}, B {len(qb)}, C {len(qc)} (expected {n_expect}); same set "
            f"{qa == qb == qc}; B polar_config layers {len(pcb['layers'])}, all packed_q5 "
            f"{all(v.get('packed_q5') for v in pcb['layers'].values())}",
            qa == qb == qc and len(qa) == n_expect and sorted(pcb["layers"]) == qb)
    kept = sorted(k for k in A if not k.endswith((".codes", ".norms", ".ct")))
    kept_b = sorted(k for k in B if not k.endswith((".codes", ".norms", ".ct_scaled")))
    kept_c = sorted(k for k in C if ".weight__" not in k)
    dropped = sorted(set(src) - set(kept) - {p + ".weight" for p in qa})
    kinds = sorted({re.sub(r"layers\.\d+\.", "layers.N.", k) for k in kept})
    rep.add(f"passthrough: {len(kept)} tensors, same in A/B/C {kept == kept_b == kept_c}; kinds {kinds}",
            kept == kept_b == kept_c)
    rep.add(f"dropped (buffers, not written by either writer): {dropped}",
            bool(dropped) and all(any(b in k for b in BUFFERS) for k in dropped))
    pdt = {lay: sorted({str(d[k].dtype)[6:] for k in kept}) for lay, d in (("A", A), ("B", B), ("C", C))}
    rep.add(f"passthrough dtypes: {pdt}; A/C == source cast to bf16: "
            f"{all(torch.equal(A[k], src[k].to(torch.bfloat16)) and torch.equal(C[k], A[k]) for k in kept)}; "
            f"B == source cast to fp16: {all(torch.equal(B[k], src[k].to(torch.float16)) for k in kept)}")

    n_diff_codes = n_diff_norms = n_codes = n_norms = 0
    ok_all = True
    b_loader_exact = 0
    errs = []
    hist = {"B": [], "C": []}
    with pq.loader.PolarWeightLoader(str(lb), pq.loader.load_polar_config(str(lb))) as L:
        for p in qa:
            m = meta[p]
            out_f, in_f, in_pad, nb = m["out_features"], m["in_features"], m["in_f_padded"], m["n_blocks"]
            ca = u8(A[p + ".codes"])
            ok = (A[p + ".codes"].dtype == torch.int8 and ca.shape == (out_f, in_pad) and int(ca.max()) < 32
                  and A[p + ".norms"].shape == (out_f, nb) and A[p + ".norms"].dtype == torch.float16
                  and torch.equal(A[p + ".ct"], pq.utils.get_centroids(5)))
            # B: packed LSB-first, decoded by the package (unpack_codes_q5, PolarWeightLoader) and by us
            pb = B[p + ".codes"].numpy()
            cb = u8(pq.packing.unpack_codes_q5(B[p + ".codes"], BS))
            lw = L.load_layer_weights(p)
            ok = ok and (pb.shape == (out_f, in_pad * 5 // 8) and B[p + ".codes"].dtype == torch.uint8
                         and np.array_equal(u8(lw["codes"]), cb)
                         and np.array_equal(decode5(pb, cb.size, "lsb").reshape(cb.shape), cb)
                         and B[p + ".norms"].shape == (out_f, nb)
                         and torch.equal(B[p + ".ct_scaled"], pq.utils.get_centroids(5) / math.sqrt(BS)))
            # C: MSB-first over the flattened codes, meta [out, nb, 128, N, in]
            mc = C[p + ".weight__meta"].tolist()
            cc = pq.hf._unpack_5bit(C[p + ".weight__packed"], out_f * in_pad).numpy().reshape(out_f, in_pad)
            ok = ok and (mc == [out_f, nb, BS, out_f * in_pad, in_f] and np.array_equal(cc, ca)
                         and np.array_equal(decode5(C[p + ".weight__packed"].numpy(), ca.size, "msb"),
                                            ca.reshape(-1))
                         and torch.equal(C[p + ".weight__norms"], A[p + ".norms"]))
            n_diff_codes += int((cb != ca).sum())
            n_diff_norms += int((B[p + ".norms"] != A[p + ".norms"]).sum())
            n_codes, n_norms = n_codes + ca.size, n_norms + A[p + ".norms"].numel()
            # dequant: convert(A) == package formula on A; PolarWeightLoader(B) + _dequant_weight vs convert(A)
            wd = D[p + ".weight"]
            ok = ok and wd.dtype == torch.bfloat16 and wd.shape == (out_f, in_f) and torch.equal(
                wd, pq.cli.dequant_codes(A[p + ".codes"], A[p + ".norms"], A[p + ".ct"], BS)[:, :in_f])
            wb = pq.wc._dequant_weight(lw["codes"], lw["norms"], lw["ct_scaled"] * math.sqrt(BS), BS)[:, :in_f]
            b_loader_exact += int(torch.equal(wb, wd))
            errs.append(rel_err(f32(wd), f32(src[p + ".weight"])))
            hist["B"].append(pb.reshape(-1))
            hist["C"].append(C[p + ".weight__packed"].numpy())
            if not ok:
                rep.add(f"{p}: layout check failed", False)
            ok_all = ok_all and ok
    rep.add(f"per-matrix checks (codes < 32, shapes, norms [out,n_blocks] f16, tables, B/C decode == A codes "
            f"where same source, C meta, convert(A) == dequant_codes): {ok_all}", ok_all)
    rep.add(f"B (fp16 source) vs A/C (bf16 source): codes differ {n_diff_codes}/{n_codes}, "
            f"fp16 norms differ {n_diff_norms}/{n_norms}; PolarWeightLoader(B)+_dequant_weight == convert(A) "
            f"bit-exact for {b_loader_exact}/{len(qa)} matrices")
    rep.add(f"dequant rel.err vs bf16 source over {len(errs)} matrices: mean {np.mean(errs):.4f} "
            f"max {np.max(errs):.4f}", float(np.max(errs)) < 0.07)
    ct5 = pq.utils.get_centroids(5).numpy()
    for lay, right, wrong in (("B", "lsb", "msb"), ("C", "msb", "lsb")):
        by = [decode5(b, b.size // 5 * 8, right) for b in hist[lay]]
        bw = [decode5(b, b.size // 5 * 8, wrong) for b in hist[lay]]
        k_r, k_w = kl_to_lloyd_max(np.concatenate(by), ct5), kl_to_lloyd_max(np.concatenate(bw), ct5)
        rep.add(f"layout {lay} bit-order KL(hist||Lloyd-Max masses): {right} (right) {k_r:.2e} vs {wrong} "
                f"(wrong) {k_w:.3f}", k_r * 20 < k_w)
    # the dequant checkpoint: passthrough copied, buffers recovered
    dkeys = set(D)
    rep.add(f"dequant_bf16: {len(dkeys)} tensors == source names {dkeys == set(src)}; recovered buffers "
            f"{sorted(k for k in dkeys if any(b in k for b in BUFFERS)) == dropped} "
            f"({str(D[dropped[0]].dtype)[6:]}, == source {all(torch.equal(D[k], src[k]) for k in dropped)})",
            dkeys == set(src) and all(torch.equal(D[k], src[k]) for k in dropped))

    # reference logits
    gen = torch.Generator().manual_seed(NEMOTRONH_SEED)
    input_ids = torch.randint(3, NEMOTRONH_CONFIG["vocab_size"], (2, 20), generator=gen)
    ld, info_d, n_m = nemotronh_logits_f32(dq, input_ids)
    ls, info_s, _ = nemotronh_logits_f32(src_dir, input_ids)
    miss = {k: v for k, v in info_d.items() if v} | {f"source.{k}": v for k, v in info_s.items() if v}
    rep.add(f"transformers loading info (missing/unexpected/mismatched keys): {miss or 'none'}; "
            f"mamba layers with time_step_limit=(0,inf): {n_m}", not miss)
    fin = bool(np.isfinite(ld).all() and np.isfinite(ls).all())
    agree = float((ld.argmax(-1) == ls.argmax(-1)).mean())
    rep.add(f"logits finite {fin}; dequant vs source: max|diff| {np.abs(ld - ls).max():.4g}, rel "
            f"{rel_err(ld, ls):.4f}, top-1 agreement {agree:.3f}", fin)
    save_npz(nh / "reference.npz", {"input_ids": input_ids.numpy().astype(np.int32),
                                     "logits_dequant": ld, "logits_source": ls})
    return nh


# ----------------------------------------------------------------------------------------------------------------
README = """# HLWQ ("PolarQuant") golden data (generated -- do not edit)

Made by `tools/make_hlwq_golden.py` with polarquant {version} (import name `polarengine_vllm`; torch 2.13 CPU,
transformers 5.23); see that file's docstring for what each file holds and how it was made, `verify.txt` for the
checks it ran and `manifest.txt` for every tensor of every checkpoint. Regenerate with
`python tools/make_hlwq_golden.py`.

- `matrices.npz`: seeded bf16 matrices and the package's codes / norms / table / BF16 dequant / packed bytes
  (layout B LSB-first `pack_codes_q5`, layout C MSB-first `_bitpack_5`, Q2-Q4 nibbles), Lloyd-Max tables b2..b8.
- `nemotronh/source/`: BF16 tiny Nemotron-H written by nemojax (`init_params_numpy(cfg, seed=4321)`, all leaves
  bf16 except A_log, D, e_score_correction_bias; `save_params(naming="original")`).
- `nemotronh/layout_a/` (codes int8 + ct + norms, bf16 passthrough), `layout_b/` (quantize_model, packed LSB-first
  + ct_scaled + norms, fp16 passthrough), `layout_c/` (hlwq-q5 `.weight__packed/__norms/__meta`, MSB-first, bf16
  passthrough). All drop `mixer.gate.e_score_correction_bias` (a buffer): take it from `source/`.
- `nemotronh/dequant_bf16/`: polarquant-convert of layout_a (buffers recovered into model-extra-buffers).
- `nemotronh/reference.npz`: input_ids [2,20]; logits_dequant / logits_source (transformers, fp32 compute, mamba
  `time_step_limit = (0, inf)`; compare with a tolerance).
"""


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="Generate HLWQ/PolarQuant golden test data with the polarquant package on CPU "
                    "(see the module docstring).")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help=f"output folder (default: {DEFAULT_OUT.relative_to(REPO)} in the repository)")
    ap.add_argument("--skip-matrices", action="store_true", help="do not build matrices.npz")
    ap.add_argument("--skip-nemotronh", action="store_true", help="do not build nemotronh/")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import torch

    torch.manual_seed(0)
    with quiet(LOGGER):
        pq = PQ()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    rep = Report()
    rep.add(f"# polarquant {pq.version}, torch {torch.__version__}")
    if not args.skip_matrices:
        make_matrices(pq, out, rep)
    manifest, summary = None, []
    if not args.skip_nemotronh:
        nh = make_nemotronh(pq, out, rep)
        manifest, summary = checkpoint_manifest(nh, ("source", "layout_a", "layout_b", "layout_c", "dequant_bf16"))
    return write_outputs(out, manifest, README.format(version=pq.version), rep, summary, list_files=True)


if __name__ == "__main__":
    sys.exit(main())
