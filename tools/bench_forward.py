#!/usr/bin/env python
"""Full-sequence forward benchmark: nemojax vs transformers' NemotronHForCausalLM, same random weights, one run.

For every (config, dtype) it

1. builds random weights with ``nemojax.params.init_params_numpy`` and writes one checkpoint folder
   (``nemojax.checkpoint.save_params``, original naming, fp32); both sides load that folder (cast to the dtype);
2. runs nemojax and transformers in separate worker processes pinned to the same ``--threads`` CPU core(s)
   (``os.sched_setaffinity``), with every thread-pool knob set to ``--threads``;
3. nemojax: lower + compile time (``jax.jit(forward).lower(...).compile()``), first call, then the median of
   ``--repeats`` steady-state calls (``block_until_ready``); transformers: one warm-up call, then the median;
4. compares the logits of all positions (max |difference|) and reports tokens/s, ms per forward and the
   speedup (transformers time / nemojax time);
5. measures the machine's limits in the same run under the same pinning: the fp32 (and bf16) GEMM rate of
   numpy / jax / torch on a 1024^3 matmul and a 512 MB memory copy, and sets the forward's analytic FLOPs
   (matmuls with top-k active experts, causal attention, chunked SSD) against them.

``--breakdown`` also times every layer type (and the parts of the Mamba and MoE mixers) separately on both
sides. Progress goes to stderr; stdout gets a markdown table, or with ``--json`` one JSON object.

Examples::

    python tools/bench_forward.py --config tiny
    python tools/bench_forward.py --config both --dtype float32
    python tools/bench_forward.py --config medium --dtype both --repeats 3 --breakdown --json > bench.json
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
import transformers_bench  # noqa: E402
from benchlib import CONFIGS, MEDIUM, REPO, TINY, cost_model, cpu_info, log  # noqa: E402,F401

DEFAULT_SEQ = {"tiny": 64, "medium": 512}
DEFAULT_REPEATS = {"tiny": 10, "medium": 5}
_median_time = benchlib.median_time


# ====================================================================================== workers
def run_worker(kind: str, spec: dict, cores: list[int], threads: int, workdir: str) -> dict:
    """Run this file as ``--_worker kind`` pinned to ``cores``; returns the JSON it prints last."""
    return benchlib.run_worker(__file__, kind, spec, cores, threads, workdir)


_worker_common = benchlib.worker_common


def worker_limits(spec: dict) -> dict:
    """GEMM rates (numpy / jax / torch, fp32 and bf16) and memory-copy bandwidth on the pinned core(s)."""
    out = _worker_common() | {"gemm_n": spec["gemm_n"]}
    out |= benchlib.gemm_rates(spec["gemm_n"], spec["gemm_repeats"], spec["threads"], bool(spec.get("bf16")))
    cp = benchlib.copy_bandwidth(spec["copy_mb"], spec["copy_repeats"])
    # bytes moved = read + write (the STREAM "copy" convention)
    out["copy_mb"] = spec["copy_mb"]
    out["copy_gbs_median"] = 2 * cp["nbytes"] / cp["s_median"] / 1e9
    out["copy_gbs_best"] = 2 * cp["nbytes"] / cp["s_best"] / 1e9
    log(f"  memory copy {spec['copy_mb']} MB: {out['copy_gbs_median']:.1f} GB/s (read+write)")
    import torch

    out["torch_threads"] = torch.get_num_threads()
    return out


def worker_nemojax(spec: dict) -> dict:
    import numpy as np
    import jax
    import jax.numpy as jnp

    import nemojax
    from nemojax.model import forward

    out = _worker_common() | {"jax_version": jax.__version__, "backend": jax.default_backend(),
                              "xla_flags": os.environ.get("XLA_FLAGS", "")}
    t0 = time.perf_counter()
    model = nemojax.load(spec["folder"], dtype=spec["dtype"], progress=False)
    jax.block_until_ready(model.params)
    out["load_s"] = time.perf_counter() - t0
    cfg, params = model.config, model.params
    ids = jnp.asarray(np.load(spec["tokens"]), jnp.int32)

    fn = jax.jit(forward, static_argnums=(1,))
    t0 = time.perf_counter()
    lowered = fn.lower(params, cfg, ids)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    out["lower_s"], out["compile_s"] = t1 - t0, t2 - t1
    log(f"  nemojax: trace+lower {out['lower_s']:.2f} s, XLA compile {out['compile_s']:.2f} s")
    t0 = time.perf_counter()
    logits = compiled(params, ids)
    logits.block_until_ready()
    out["first_call_s"] = time.perf_counter() - t0
    med, ts = _median_time(lambda: compiled(params, ids).block_until_ready(), spec["repeats"])
    out["forward_s"], out["forward_all_s"] = med, ts
    log(f"  nemojax: {med * 1e3:.1f} ms / forward (median of {len(ts)}; min {min(ts) * 1e3:.1f})")
    np.save(spec["logits"], np.asarray(logits, np.float32))
    if spec.get("breakdown"):
        out["breakdown"] = nemojax_breakdown(params, cfg, ids, spec["breakdown_repeats"])
    return out


def nemojax_breakdown(params, cfg, ids, repeats: int) -> dict:
    """Per-layer-type (and per-part) steady-state times of the jitted pieces, on realistic inputs."""
    import jax
    import jax.numpy as jnp

    from nemojax.blocks import mamba as mam
    from nemojax.blocks import moe as moe_mod
    from nemojax.blocks.attention import attention_mixer
    from nemojax.blocks.mlp import mlp
    from nemojax.model import block, lm_head
    from nemojax.ops import linear, rms_norm

    res = {}

    def timed(name, f, *args):
        jf = jax.jit(f)
        r = jf(*args)
        jax.block_until_ready(r)
        med, _ = _median_time(lambda: jax.block_until_ready(jf(*args)), repeats)
        res[name] = med
        log(f"  nemojax breakdown {name:<28} {med * 1e3:9.2f} ms")
        return r

    emb = params["embeddings"]
    h = timed("embedding", lambda e, t: jnp.take(e, t, axis=0), emb, ids)
    dtype = h.dtype
    Bsz, T, _ = h.shape
    for kind in dict.fromkeys(cfg.pattern):
        i = cfg.pattern.index(kind)
        lp = params["layers"][i]
        timed(f"block {kind}", lambda lp, h, kind=kind: block(lp, cfg, kind, h), lp, h)
        x = jax.jit(lambda w, h: rms_norm(h, w, cfg.layer_norm_epsilon))(lp["norm"], h)
        p = lp["mixer"]
        if kind == "M":
            d_in, Cdim, G, N, nh, P = (cfg.mamba_d_inner, cfg.mamba_conv_dim, cfg.n_groups, cfg.ssm_state_size,
                                       cfg.mamba_num_heads, cfg.mamba_head_dim)
            zxbcdt = timed("M: in_proj matmul", linear, x, p["in_proj"])
            z, xbc, dt_raw = jnp.split(zxbcdt, [d_in, d_in + Cdim], axis=-1)
            window = jnp.zeros((Bsz, cfg.conv_kernel - 1, Cdim), dtype)
            u, _ = timed("M: causal conv + silu", mam.causal_conv, xbc, window, p["conv1d"], p.get("conv1d_bias"))
            dt = jax.nn.softplus(dt_raw.astype(jnp.float32) + p["dt_bias"].astype(jnp.float32))
            xs, Bm, Cm = jnp.split(u, [d_in, d_in + G * N], axis=-1)
            xs = xs.reshape(Bsz, T, nh, P)
            A = -jnp.exp(p["A_log"].astype(jnp.float32))
            y, _ = timed("M: ssd_chunked scan", lambda xs, dt, A, Bm, Cm: mam.ssd_chunked(
                xs, dt, A, Bm, Cm, cfg.chunk_size), xs, dt, A, Bm.reshape(Bsz, T, G, N), Cm.reshape(Bsz, T, G, N))
            g = timed("M: gated rms norm", lambda y, z, w: mam.gated_rms_norm(
                y, z, w, G, cfg.layer_norm_epsilon, dtype), y.reshape(Bsz, T, d_in), z, p["norm"])
            timed("M: out_proj matmul", linear, g, p["out_proj"])
        elif kind == "E":
            xf = x.reshape(-1, x.shape[-1])
            w, idx = timed("E: router (fp32 gate + top-k)", lambda gw, b, xf: moe_mod.route(gw, b, cfg, xf),
                           p["gate"], p["e_score_correction_bias"], xf)
            timed("E: routed experts", lambda xf, w, idx, up, down: moe_mod.grouped_experts(xf, w, idx, up, down),
                  xf, w, idx, p["experts"]["up_proj"], p["experts"]["down_proj"])
            if "shared_experts" in p:
                timed("E: shared expert", mlp, p["shared_experts"], x)
            # the same routed work as 6 dense [T, F] matmul pairs: what a perfect grouping would cost
            up, down = p["experts"]["up_proj"], p["experts"]["down_proj"]
            k = cfg.num_experts_per_tok
            timed("E: ideal dense k-expert matmuls",
                  lambda xf, up, down: sum(linear(moe_mod.relu2(linear(xf, up[j])), down[j]) for j in range(k)),
                  xf, up, down)
        elif kind == "*":
            timed("*: attention mixer", lambda p, x: attention_mixer(p, cfg, x)[0], p, x)
        elif kind == "-":
            timed("-: mlp", mlp, p, x)
    timed("lm_head (norm_f + matmul)", lambda prm, h: lm_head(prm, cfg, h), params, h)
    return res


def worker_torch(spec: dict) -> dict:
    import numpy as np
    import torch

    model, out = transformers_bench.load_model(spec)
    ids = torch.from_numpy(np.load(spec["tokens"]).astype(np.int64))

    def fwd():
        return model(ids, use_cache=False, logits_to_keep=0).logits

    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = fwd()
        out["first_call_s"] = time.perf_counter() - t0
        med, ts = _median_time(fwd, spec["repeats"])
        out["forward_s"], out["forward_all_s"] = med, ts
        log(f"  transformers: {med * 1e3:.1f} ms / forward (median of {len(ts)}; min {min(ts) * 1e3:.1f}); "
            f"attn={out['attn_implementation']} experts={out['experts_implementation']}")
        np.save(spec["logits"], logits.float().numpy())
        if spec.get("breakdown"):
            out["breakdown"] = torch_breakdown(model, ids, spec["breakdown_repeats"])
    return out


def torch_breakdown(model, ids, repeats: int) -> dict:
    res = {}

    def timed(name, f):
        r = f()
        med, _ = _median_time(f, repeats)
        res[name] = med
        log(f"  transformers breakdown {name:<23} {med * 1e3:9.2f} ms")
        return r

    m = model.model
    h = timed("embedding", lambda: m.embeddings(ids))
    pattern = "".join(transformers_bench.HF_KIND[ly.block_type] for ly in m.layers)
    for kind in dict.fromkeys(pattern):
        layer = m.layers[pattern.index(kind)]
        timed(f"block {kind}", lambda layer=layer: layer(h))
        x = layer.norm(h)
        mx = layer.mixer
        if kind == "E":
            _, w, idx = mx.gate(x)
            xf = x.view(-1, x.shape[-1])
            timed("E: router (fp32 gate + top-k)", lambda: mx.gate(x))
            timed("E: routed experts", lambda: mx.experts(xf, idx, w))
            timed("E: shared expert", lambda: mx.shared_experts(x))
        elif kind == "M":
            timed("M: in_proj matmul", lambda: mx.in_proj(x))
    timed("lm_head (norm_f + matmul)", lambda: model.lm_head(m.norm_f(h)))
    return res


WORKERS = {"limits": worker_limits, "nemojax": worker_nemojax, "torch": worker_torch}


def worker_main(kind: str, spec_path: str) -> None:
    benchlib.worker_main(WORKERS, kind, spec_path)


# ====================================================================================== driver
def build_checkpoint(name: str, folder: str, seed: int) -> None:
    benchlib.build_checkpoint(CONFIGS[name], folder, seed)


def bench_one(name: str, dtype: str, args, cores: list[int], workdir: str, folder: str, limits: dict) -> dict:
    import numpy as np

    from nemojax import Config

    cfg = Config.from_dict(CONFIGS[name])
    seq = args.seq or DEFAULT_SEQ[name]
    repeats = args.repeats or DEFAULT_REPEATS[name]
    tag = f"{name}/{dtype}"
    rng = np.random.default_rng(args.seed + 1)
    tokens = rng.integers(3, cfg.vocab_size, size=(args.batch, seq)).astype(np.int32)
    tok_path = os.path.join(workdir, f"tokens_{name}_{seq}.npy")
    np.save(tok_path, tokens)
    common = {"folder": folder, "tokens": tok_path, "dtype": dtype, "repeats": repeats,
              "breakdown": args.breakdown, "breakdown_repeats": max(3, min(repeats, 5)),
              "hf_experts_impl": args.hf_experts_impl}
    lj = os.path.join(workdir, "logits_nemojax.npy")
    lt = os.path.join(workdir, "logits_torch.npy")
    log(f"[{tag}] nemojax forward, batch {args.batch} x seq {seq}, {repeats} repeats")
    rj = run_worker("nemojax", common | {"logits": lj}, cores, args.threads, workdir)
    log(f"[{tag}] transformers forward")
    rt = run_worker("torch", common | {"logits": lt}, cores, args.threads, workdir)
    a, b = np.load(lj), np.load(lt)
    d = np.abs(a - b)
    diff, mean_diff = float(d.max()), float(d.mean())
    scale = float(np.abs(b).max())
    top1 = float((a.argmax(-1) == b.argmax(-1)).mean())
    del d
    os.remove(lj)
    os.remove(lt)
    cost = cost_model(cfg, args.batch, seq)
    ntok = args.batch * seq
    tj, tt = rj["forward_s"], rt["forward_s"]
    gemm_key = "fp32" if dtype == "float32" else "bf16"
    gemm = max(v["gflops_median"] for k, v in limits.items() if isinstance(v, dict) and k.endswith(gemm_key))
    bytes_w = cost["weight_elems_read"] * (4 if dtype == "float32" else 2)
    floor_compute = cost["flops_total"] / (gemm * 1e9)
    floor_mem = bytes_w / (limits["copy_gbs_median"] * 1e9)
    res = {
        "config": name, "dtype": dtype, "batch": args.batch, "seq": seq, "tokens": ntok, "repeats": repeats,
        "nemojax": rj, "transformers": rt,
        "nemojax_ms": tj * 1e3, "transformers_ms": tt * 1e3,
        "nemojax_tok_s": ntok / tj, "transformers_tok_s": ntok / tt,
        "speedup": tt / tj,
        "max_abs_logit_diff": diff, "mean_abs_logit_diff": mean_diff, "max_abs_logit": scale,
        "rel_logit_diff": diff / max(scale, 1e-30), "top1_agreement": top1,
        "cost": cost,
        "gemm_limit_gflops": gemm,
        "nemojax_gflops": cost["flops_total"] / tj / 1e9,
        "transformers_gflops": cost["flops_total"] / tt / 1e9,
        "nemojax_frac_of_gemm_limit": cost["flops_total"] / tj / 1e9 / gemm,
        "transformers_frac_of_gemm_limit": cost["flops_total"] / tt / 1e9 / gemm,
        "floor_compute_ms": floor_compute * 1e3,
        "floor_weight_read_ms": floor_mem * 1e3,
    }
    log(f"[{tag}] nemojax {tj * 1e3:.1f} ms, transformers {tt * 1e3:.1f} ms, speedup {tt / tj:.2f}x, "
        f"max|dlogits| {diff:.2e} (mean {mean_diff:.1e}, max|logits| {scale:.2f}), top-1 agreement {100 * top1:.1f}%")
    return res


def _fmt_ms(x):
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def markdown(report: dict) -> str:
    L = []
    env = report["env"]
    L.append("## nemojax vs transformers: full-sequence forward (logits for all positions)\n")
    L.append(f"CPU: {env['cpu'].get('model', '?')} ({env['cpu']['cpus']} cores visible), pinned to core(s) "
             f"{report['cores']}, {report['threads']} thread(s) per library; native bf16 instructions "
             f"(avx512_bf16/amx_bf16): {'yes' if env['cpu'].get('native_bf16') else 'no'}. "
             f"jax {env.get('jax', '?')}, torch {env.get('torch', '?')}, "
             f"transformers {env.get('transformers', '?')}.\n")
    L.append("| config | dtype | B x T | nemojax compile s | nemojax ms | nemojax tok/s | transformers ms "
             "| transformers tok/s | speedup | max (mean) abs dlogits | top-1 agree | GFLOP/fwd | nemojax GFLOP/s "
             "| % of GEMM limit (nemojax / hf) |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in report["results"]:
        j = r["nemojax"]
        L.append(f"| {r['config']} | {r['dtype']} | {r['batch']} x {r['seq']} "
                 f"| {j['lower_s'] + j['compile_s']:.2f} | {_fmt_ms(r['nemojax_ms'])} | {r['nemojax_tok_s']:,.0f} "
                 f"| {_fmt_ms(r['transformers_ms'])} | {r['transformers_tok_s']:,.0f} | {r['speedup']:.2f}x "
                 f"| {r['max_abs_logit_diff']:.1e} ({r['mean_abs_logit_diff']:.1e}) | {100 * r['top1_agreement']:.1f}% "
                 f"| {r['cost']['flops_total'] / 1e9:.3g} "
                 f"| {r['nemojax_gflops']:.1f} | {100 * r['nemojax_frac_of_gemm_limit']:.0f}% / "
                 f"{100 * r['transformers_frac_of_gemm_limit']:.0f}% |")
    L.append("")
    L.append("speedup = transformers ms / nemojax ms (median of the repeats; nemojax compile excluded, transformers "
             "after one warm-up call). dlogits over all B x T x V logits; max |logits|: "
             + ", ".join(f"{r['config']}/{r['dtype']} {r['max_abs_logit']:.2f}" for r in report["results"])
             + ". % of GEMM limit = (analytic FLOPs / time) / the best GEMM median of the dtype below.")
    lim = report["limits"]
    L.append("")
    L.append(f"Machine limits, same run, same pinning ({report['threads']} thread(s)):\n")
    L.append("| measurement | median | best |")
    L.append("|---|---|---|")
    for k in ("numpy_fp32", "jax_fp32", "torch_fp32", "jax_bf16", "torch_bf16"):
        if k in lim:
            lib, dt = k.split("_")
            how = " (x @ w^T, fp32 accumulate)" if lib == "jax" else ""
            L.append(f"| GEMM {lim['gemm_n']}^3 {lib} {dt}{how} | {lim[k]['gflops_median']:.1f} GFLOP/s "
                     f"| {lim[k]['gflops_best']:.1f} GFLOP/s |")
    L.append(f"| memory copy {lim['copy_mb']} MB (read+write bytes) | {lim['copy_gbs_median']:.1f} GB/s "
             f"| {lim['copy_gbs_best']:.1f} GB/s |")
    L.append("")
    L.append("| config | dtype | params (active matmul / total) | GFLOP: matmul + attention + SSD | GEMM limit GFLOP/s "
             "| floor: FLOPs at GEMM rate ms | floor: read weights once ms | nemojax compile: trace+lower / XLA / "
             "first call s | transformers first call s |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for r in report["results"]:
        c, j, t = r["cost"], r["nemojax"], r["transformers"]
        L.append(f"| {r['config']} | {r['dtype']} "
                 f"| {c['params_active_matmul'] / 1e6:.2f}M / {c['params_total'] / 1e6:.2f}M "
                 f"| {c['flops_matmul'] / 1e9:.3g} + {c['flops_attention'] / 1e9:.3g} + {c['flops_ssd'] / 1e9:.3g} "
                 f"| {r['gemm_limit_gflops']:.1f} | {_fmt_ms(r['floor_compute_ms'])} "
                 f"| {_fmt_ms(r['floor_weight_read_ms'])} | {j['lower_s']:.2f} / {j['compile_s']:.2f} / "
                 f"{j['first_call_s']:.2f} | {t['first_call_s']:.2f} |")
    if any("breakdown" in r["nemojax"] for r in report["results"]):
        for r in report["results"]:
            bj, bt = r["nemojax"].get("breakdown", {}), r["transformers"].get("breakdown", {})
            L.append("")
            L.append(f"Breakdown, {r['config']}/{r['dtype']} (one layer of each kind, ms; 'block' = norm + mixer + "
                     f"residual; pattern {CONFIGS[r['config']]['hybrid_override_pattern']}):\n")
            L.append("| piece | nemojax ms | transformers ms | hf / nemojax |")
            L.append("|---|---|---|---|")
            for k in list(dict.fromkeys(list(bj) + list(bt))):
                a, b = bj.get(k), bt.get(k)
                ratio = f"{b / a:.2f}" if a and b else ""
                L.append(f"| {k} | {_fmt_ms(a * 1e3) if a else ''} | {_fmt_ms(b * 1e3) if b else ''} | {ratio} |")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="Benchmark the full-sequence forward (all-position logits) of nemojax against transformers' "
                    "NemotronHForCausalLM on the same random weights, pinned to the same CPU core(s); also measures "
                    "the machine's GEMM rate and memory bandwidth and the forward's fraction of the GEMM limit.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--config", choices=["tiny", "medium", "both"], default="both",
                    help="tiny = tests' TINY config; medium = hidden 1024, 'MEMEM*EM', 16 experts top-6, vocab 32000")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "both"], default="float32",
                    help="weight dtype on both sides (the checkpoint is written in fp32 and cast at load)")
    ap.add_argument("--batch", type=int, default=1, help="sequences per forward")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: 512 medium, 64 tiny)")
    ap.add_argument("--repeats", type=int, default=None, help="timed forwards per side (default: 5 medium, 10 tiny)")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads per library; the workers are pinned to this many cores of the allowed set")
    ap.add_argument("--cores", type=str, default=None,
                    help="comma-separated CPU ids to pin to (default: the first --threads allowed cores)")
    ap.add_argument("--seed", type=int, default=0, help="weights and tokens seed")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time each layer type (and Mamba / MoE parts) separately on both sides")
    ap.add_argument("--hf-experts-impl", default=None,
                    help="transformers experts_implementation to request (default: transformers' own choice)")
    ap.add_argument("--gemm-n", type=int, default=1024, help="GEMM size for the matmul-rate limit")
    ap.add_argument("--copy-mb", type=int, default=512, help="buffer size for the memory-copy bandwidth")
    ap.add_argument("--json", action="store_true", help="print one JSON object with all results instead of tables")
    ap.add_argument("--_worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--_spec", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._worker:
        worker_main(args._worker, args._spec)
        return 0
    if args.batch < 1 or (args.seq is not None and args.seq < 1) or (args.repeats is not None and args.repeats < 1):
        ap.error("--batch, --seq and --repeats must be positive")
    cores = benchlib.pick_cores(ap, args.threads, args.cores)

    # the driver only builds checkpoints (NumPy) and compares logits: keep it single-threaded too
    benchlib.set_driver_env(args.threads)

    names = ["tiny", "medium"] if args.config == "both" else [args.config]
    dtypes = ["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]
    t_start = time.perf_counter()
    report = {"cores": cores, "threads": args.threads, "argv": sys.argv[1:], "results": []}
    with tempfile.TemporaryDirectory(prefix="nemojax_bench_") as work:
        log(f"machine limits on core(s) {cores}")
        limits = run_worker("limits", {"gemm_n": args.gemm_n, "gemm_repeats": 10, "copy_mb": args.copy_mb,
                                       "copy_repeats": 5, "bf16": "bfloat16" in dtypes},
                            cores, args.threads, work)
        report["limits"] = limits
        for name in names:
            folder = os.path.join(work, f"ckpt_{name}")
            log(f"[{name}] writing random fp32 checkpoint (seed {args.seed})")
            t0 = time.perf_counter()
            build_checkpoint(name, folder, args.seed)
            log(f"[{name}] checkpoint written in {time.perf_counter() - t0:.1f} s")
            for dtype in dtypes:
                report["results"].append(bench_one(name, dtype, args, cores, work, folder, limits))
    r0 = report["results"][0]
    report["env"] = {"cpu": cpu_info(), "jax": r0["nemojax"]["jax_version"],
                     "torch": r0["transformers"]["torch_version"],
                     "transformers": r0["transformers"]["transformers_version"]}
    report["wall_s"] = time.perf_counter() - t_start
    log(f"done in {report['wall_s']:.0f} s")
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
