#!/usr/bin/env python3
"""Quantization measurements (NVFP4, HLWQ and FP8) on the medium config, in one run, one pinned core.

Reports:
  * resident bits per parameter by component for bf16, NVFP4 (selective ``nvfp4`` recipe) and HLWQ Q5;
  * quantize time: a 4096x4096 matrix (HLWQ and NVFP4; first call incl. compile, and steady state) and the
    whole medium model;
  * decode tok/s (batch 1, greedy) of bf16, NVFP4 weight-only (W4A16; the selective ``nvfp4`` recipe and
    ``nvfp4-all``, every linear of the blocks), each on the "xla" reference and the "cpu" backend, HLWQ dequant path
    and HLWQ rotated path, FP8 weight-only (W8A16; ``fp8`` and ``fp8-all``), each on both backends too; in
    generate's jitted loop (``--new-tokens`` tokens per call, where XLA may hoist a weight's dequantization out of
    the token loop) and one token per call (a server's decode step);
  * logit error vs bf16 (mean |dlogit|, KL(bf16 || q), top-1 agreement) for NVFP4 W4A16 / W4A4 and HLWQ with the
    polarquant-compatible and the converged codebook, on random-weight models (only relative orderings mean much).

    python tools/bench_quant.py [--json] [--new-tokens 16] [--prompt 64]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

COMPONENTS = ("embeddings", "lm_head", "mamba", "attention", "routed_experts", "shared_experts", "router", "other")


def _component(path: str, pattern: str) -> str:
    if path.startswith("embeddings"):
        return "embeddings"
    if path.startswith("lm_head"):
        return "lm_head"
    if not path.startswith("layers."):
        return "other"
    i = int(path.split(".")[1])
    if ".mixer.experts." in path:
        return "routed_experts"
    if ".mixer.shared_experts." in path:
        return "shared_experts"
    if path.endswith((".mixer.gate", ".e_score_correction_bias")):
        return "router"
    if path.endswith(".norm") and ".mixer." not in path:
        return "other"
    return {"M": "mamba", "*": "attention", "E": "other", "-": "other"}[pattern[i]]


def bits_by_component(params, cfg) -> dict:
    import jax
    import numpy as np

    from nemojax.formats import is_quantized
    from nemojax.params import param_specs, tree_paths

    n_params = {p: int(np.prod(s.shape)) for p, s in tree_paths(param_specs(cfg))}
    nbytes, nparam = {c: 0 for c in COMPONENTS}, {c: 0 for c in COMPONENTS}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]:
        p = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        c = _component(p, cfg.pattern)
        nbytes[c] += leaf.nbytes if is_quantized(leaf) else int(leaf.size) * leaf.dtype.itemsize
        nparam[c] += n_params.get(p, 0)
    out = {c: round(8 * nbytes[c] / nparam[c], 3) for c in COMPONENTS if nparam[c]}
    out["total"] = round(8 * sum(nbytes.values()) / sum(nparam.values()), 3)
    out["total_bytes"] = sum(nbytes.values())
    return out


def worker_quant(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import nemojax
    from nemojax import quant
    from nemojax.generate import generate_stream
    from nemojax.model import forward_jit
    from nemojax.formats.hlwq import HLWQWeight
    from nemojax.formats.nvfp4 import NVFP4Weight

    res = {"jax": jax.__version__, **benchlib.worker_common()}
    # ---- quantize time, 4096 x 4096
    w = jnp.asarray(np.random.default_rng(0).standard_normal((4096, 4096)).astype(np.float32) * 0.02)
    for name, fn in (("hlwq_q5", lambda: HLWQWeight.from_float(w, 5)), ("nvfp4", lambda: NVFP4Weight.from_float(w))):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        first = time.perf_counter() - t0
        steady, _ = benchlib.median_time(lambda: jax.block_until_ready(fn()), 3)
        res[f"quantize_4096_{name}_s"] = {"first_call": round(first, 3), "steady": round(steady, 3)}
        benchlib.log(f"4096x4096 {name}: first {first:.2f} s, steady {steady:.2f} s")
    del w

    cfg_model = nemojax.load(spec["ckpt"], dtype="bfloat16")
    cfg, base = cfg_model.config, cfg_model.params
    rng = np.random.default_rng(1)
    calib = [rng.integers(3, cfg.vocab_size, (2, 64)) for _ in range(2)]
    models = {"bf16": base}
    t0 = time.perf_counter()
    amax = quant.calibrate_model(base, cfg, calib, "nvfp4")
    models["nvfp4_w4a16"] = jax.block_until_ready(quant.apply(base, cfg, "nvfp4", amax))
    res["quantize_medium_nvfp4_s"] = round(time.perf_counter() - t0, 2)
    models["nvfp4_w4a4"] = quant.set_mode(models["nvfp4_w4a16"], "w4a4")
    models["nvfp4_w4a16_cpu"] = quant.set_backend(models["nvfp4_w4a16"], "cpu")
    models["nvfp4_all_w4a16"] = quant.apply(base, cfg, "nvfp4-all")
    models["nvfp4_all_w4a16_cpu"] = quant.set_backend(models["nvfp4_all_w4a16"], "cpu")
    t0 = time.perf_counter()
    models["hlwq_q5_dequant"] = jax.block_until_ready(quant.apply(base, cfg, "hlwq-q5"))
    res["quantize_medium_hlwq_s"] = round(time.perf_counter() - t0, 2)
    models["hlwq_q5_rotated"] = jax.tree.map(lambda x: x.replace(path="rotated") if isinstance(x, HLWQWeight) else x,
                                             models["hlwq_q5_dequant"], is_leaf=lambda x: isinstance(x, HLWQWeight))
    models["hlwq_q5_dequant_cpu"] = quant.set_backend(models["hlwq_q5_dequant"], "cpu")
    models["hlwq_q5_rotated_cpu"] = quant.set_backend(models["hlwq_q5_rotated"], "cpu")
    models["hlwq_q5_converged"] = quant.apply(base, cfg, "hlwq-q5-converged")
    for r in ("fp8", "fp8-all"):  # weight-only (W8A16): no calibration
        k = r.replace("-", "_") + "_w8a16"
        models[k] = quant.apply(base, cfg, r)
        models[k + "_cpu"] = quant.set_backend(models[k], "cpu")
    benchlib.log(f"quantized the medium model: nvfp4 {res['quantize_medium_nvfp4_s']} s, "
                 f"hlwq {res['quantize_medium_hlwq_s']} s")
    res["bits_per_param"] = {k: bits_by_component(models[k], cfg)
                             for k in ("bf16", "nvfp4_w4a16", "hlwq_q5_dequant")}
    # ---- logit error vs bf16
    ids = rng.integers(3, cfg.vocab_size, (2, 128))
    ref = np.asarray(forward_jit(base, cfg, ids), np.float64)
    lp_ref = ref - np.log(np.exp(ref - ref.max(-1, keepdims=True)).sum(-1, keepdims=True)) - ref.max(-1, keepdims=True)
    res["logit_error"] = {}
    for k in ("nvfp4_w4a16", "nvfp4_all_w4a16", "nvfp4_w4a4", "hlwq_q5_dequant", "hlwq_q5_rotated",
              "hlwq_q5_converged", "fp8_w8a16", "fp8_all_w8a16"):
        got = np.asarray(forward_jit(models[k], cfg, ids), np.float64)
        lp = got - got.max(-1, keepdims=True)
        lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
        kl = float((np.exp(lp_ref) * (lp_ref - lp)).sum(-1).mean())
        res["logit_error"][k] = {"mean_abs": round(float(np.abs(got - ref).mean()), 4),
                                 "kl": round(kl, 5),
                                 "top1": round(float((got.argmax(-1) == ref.argmax(-1)).mean()), 4)}
        benchlib.log(f"logit error {k}: {res['logit_error'][k]}")
    # ---- decode speed
    prompt = [rng.integers(3, cfg.vocab_size, spec["prompt"]).tolist()]
    res["decode_tok_s"], res["decode_step_tok_s"] = {}, {}
    for k in DECODED:
        for key, chunk in (("decode_tok_s", spec["new_tokens"]), ("decode_step_tok_s", 1)):
            for _ in generate_stream(models[k], cfg, prompt, spec["new_tokens"], chunk=chunk):
                pass  # compile + warm up
            tps = []
            for _ in range(2):
                tm = {}
                for _ in generate_stream(models[k], cfg, prompt, spec["new_tokens"], chunk=chunk, timings=tm):
                    pass
                tps.append(spec["new_tokens"] / tm["decode_s"])
            res[key][k] = round(max(tps), 2)
        benchlib.log(f"decode {k}: {res['decode_tok_s'][k]} tok/s in the loop, {res['decode_step_tok_s'][k]} "
                     f"a token per call")
    return res


WORKERS = {"quant": worker_quant}
DECODED = ("bf16", "nvfp4_w4a16", "nvfp4_w4a16_cpu", "nvfp4_all_w4a16", "nvfp4_all_w4a16_cpu", "hlwq_q5_dequant",
           "hlwq_q5_dequant_cpu", "hlwq_q5_rotated", "hlwq_q5_rotated_cpu", "fp8_w8a16", "fp8_w8a16_cpu",
           "fp8_all_w8a16", "fp8_all_w8a16_cpu")


def markdown(r: dict) -> str:
    L = ["| weights | " + " | ".join(COMPONENTS[:-1]) + " | all weights |", "|---" * (len(COMPONENTS) + 1) + "|"]
    for k, b in r["bits_per_param"].items():
        L.append(f"| {k} | " + " | ".join(str(b.get(c, "")) for c in COMPONENTS[:-1]) + f" | {b['total']} |")
    L += ["", "| variant | decode tok/s (loop) | a token per call | mean abs dlogit vs bf16 | KL vs bf16 | "
          "top-1 agreement |", "|---|---|---|---|---|---|"]
    for k in ("bf16", "nvfp4_w4a16", "nvfp4_w4a16_cpu", "nvfp4_all_w4a16", "nvfp4_all_w4a16_cpu", "nvfp4_w4a4",
              "hlwq_q5_dequant", "hlwq_q5_dequant_cpu", "hlwq_q5_rotated", "hlwq_q5_rotated_cpu", "hlwq_q5_converged",
              "fp8_w8a16", "fp8_w8a16_cpu", "fp8_all_w8a16", "fp8_all_w8a16_cpu"):
        e = r["logit_error"].get(k, {})
        err = ("– | – | –" if k.endswith("_cpu") else  # the logits are a 128-token prefill: the reference's GEMMs
               f"{e.get('mean_abs', '0')} | {e.get('kl', '0')} | {e.get('top1', '1')}")
        L.append(f"| {k} | {r['decode_tok_s'].get(k, '')} | {r['decode_step_tok_s'].get(k, '')} | {err} |")
    L += ["", f"quantize 4096x4096: HLWQ Q5 {r['quantize_4096_hlwq_q5_s']} s, NVFP4 {r['quantize_4096_nvfp4_s']} s; "
          f"whole medium model: HLWQ {r['quantize_medium_hlwq_s']} s, NVFP4 (incl. calibration) "
          f"{r['quantize_medium_nvfp4_s']} s"]
    return "\n".join(L)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens for the decode measurement")
    ap.add_argument("--new-tokens", type=int, default=16, help="decoded tokens per measurement")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cores", default=None, help="comma-separated cores to pin to (default: the first ones)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    ap.add_argument("--_spec", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._worker:
        benchlib.worker_main(WORKERS, a._worker, a._spec)
        return 0
    cores = benchlib.pick_cores(ap, a.threads, a.cores)
    benchlib.set_driver_env(a.threads)
    with tempfile.TemporaryDirectory(prefix="nemojax_bench_quant_") as work:
        ck = os.path.join(work, "medium")
        benchlib.log("writing the random medium checkpoint")
        benchlib.build_checkpoint(benchlib.MEDIUM, ck, seed=0)
        r = benchlib.run_worker(__file__, "quant", {"ckpt": ck, "prompt": a.prompt, "new_tokens": a.new_tokens},
                                cores, a.threads, work)
    r["command"] = "python tools/bench_quant.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(json.dumps(r, indent=1) if a.json else markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
