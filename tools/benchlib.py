"""Shared pieces of the ``tools/bench_*.py`` benchmarks (not a package module: the tools put ``tools/`` on
``sys.path`` and ``import benchlib``).

* the benchmark configs (``TINY``, ``MEDIUM``) and a random fp32 checkpoint writer;
* worker processes: every measurement runs in a fresh ``python <tool> --_worker KIND --_spec FILE`` process
  pinned to the chosen core(s) with ``os.sched_setaffinity``, every thread-pool knob (OMP / MKL / OpenBLAS /
  XLA eigen) set to the thread count; the worker writes its result as JSON;
* timing: medians of repeated calls, also rotating over distinct argument sets (weights not cache-resident);
* the analytic cost model of a full-sequence forward (FLOPs, weights read) and of generation (bytes per decode
  step, decode / prefill FLOPs, the limits they give at the measured rates) with its markdown table;
* machine-limit probes run inside a pinned worker: GEMM rates (numpy / jax / torch), memory-copy, pure-read
  and GEMV bandwidth; ``measure_limits`` runs them all and ``limits_markdown`` prints them;
* token comparisons and number formats of the reports.

The transformers side of the comparisons is ``tools/transformers_bench.py``.

Nothing here imports jax, torch or nemojax at module level, so the driver processes stay light.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# tests/conftest.py TINY (copied: tools must not import tests)
TINY = dict(
    vocab_size=512, hidden_size=64, hybrid_override_pattern="MEM*E-M*E", num_hidden_layers=9,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2, conv_kernel=4, chunk_size=16,
    n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=48,
    n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5, intermediate_size=96,
    layer_norm_epsilon=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)

# a ~180M-parameter (~100M active) Nemotron-H-shaped model: every block type except the dense MLP
MEDIUM = dict(
    vocab_size=32000, hidden_size=1024, hybrid_override_pattern="MEMEM*EM", num_hidden_layers=8,
    num_attention_heads=16, num_key_value_heads=2, head_dim=128,
    mamba_num_heads=32, mamba_head_dim=64, ssm_state_size=128, n_groups=8, conv_kernel=4, chunk_size=128,
    n_routed_experts=16, num_experts_per_tok=6, moe_intermediate_size=704, moe_shared_expert_intermediate_size=1408,
    n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5, intermediate_size=0,
    layer_norm_epsilon=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)

CONFIGS = {"tiny": TINY, "medium": MEDIUM}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median_time(fn, repeats: int) -> tuple[float, list[float]]:
    """Call ``fn`` ``repeats`` times; (median seconds, all seconds)."""
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts


def median_time_rotating(f, arg_sets, reps: int) -> float:
    """Median seconds of ``f(*args)`` over ``reps`` rounds of every argument set in turn (distinct weights)."""
    import jax

    for a in arg_sets[:2]:
        jax.block_until_ready(f(*a))
    ts = []
    for _ in range(reps):
        for a in arg_sets:
            t0 = time.perf_counter()
            jax.block_until_ready(f(*a))
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


# ====================================================================================== analytic cost model
def cost_model(cfg, batch: int, seq: int) -> dict:
    """FLOPs of one full-sequence forward and the weight bytes it must read, from the config alone.

    matmul: 2 x (weights touched per token) x tokens, routed experts counted top-k (not all E), the router
    gate and lm_head included, the embedding lookup excluded. attention: QK^T and PV over the causal
    triangle (2*2*nq*Dh per (query, key) pair). ssd: what the chunked SSD algorithm computes per token with
    chunk Q: C.B^T (2*Q*G*N), intra-chunk y (2*Q*nh*P), C.S and the state update (2*2*nh*P*N).
    """
    H, V = cfg.hidden_size, cfg.vocab_size
    tok = batch * seq
    per_tok = {"M": 0, "E": 0, "*": 0, "-": 0}
    for c in cfg.pattern:
        if c == "M":
            per_tok["M"] += cfg.mamba_in_proj_dim * H + cfg.mamba_d_inner * H
        elif c == "E":
            per_tok["E"] += (cfg.n_routed_experts * H + cfg.num_experts_per_tok * 2 * cfg.moe_intermediate_size * H
                             + (2 * cfg.moe_shared_expert_intermediate_size * H if cfg.n_shared_experts else 0))
        elif c == "*":
            q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
            per_tok["*"] += 2 * q * H + 2 * kv * H
        elif c == "-":
            per_tok["-"] += 2 * cfg.intermediate_size * H
    active = sum(per_tok.values()) + V * H
    matmul = 2 * active * tok
    n_attn = cfg.pattern.count("*")
    attn = n_attn * batch * 4 * cfg.num_attention_heads * cfg.head_dim * (seq * (seq + 1) // 2)
    n_m = cfg.pattern.count("M")
    Q = min(cfg.chunk_size, seq)
    nh, P, G, N = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.n_groups, cfg.ssm_state_size
    ssd = n_m * tok * (2 * Q * G * N + 2 * Q * nh * P + 4 * nh * P * N) if n_m else 0
    from nemojax.params import count_params

    total_params = count_params(cfg)
    return {
        "tokens": tok,
        "params_total": total_params,
        "params_active_matmul": active,
        "flops_matmul": matmul,
        "flops_attention": attn,
        "flops_ssd": ssd,
        "flops_total": matmul + attn + ssd,
        "flops_matmul_by_kind": {k: 2 * v * tok for k, v in per_tok.items() if v} | {"lm_head": 2 * V * H * tok},
        # weights a forward reads at least once (the embedding table only by row: not counted)
        "weight_elems_read": total_params - V * H,
    }


# ====================================================================================== generation cost model
def tree_nbytes(tree) -> int:
    """Bytes of every array leaf of a pytree (abstract shapes too)."""
    import jax

    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def expected_experts(cfg, batch: int) -> float:
    """Distinct routed experts a decode step of ``batch`` tokens reads, per MoE layer: k at batch 1, else the
    expectation under uniform independent routing."""
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    return float(k) if batch == 1 else E * (1.0 - (1.0 - k / E) ** batch)


def decode_bytes(cfg, dtype: str, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """Bytes one decode step (``batch`` tokens) must move, from the config alone: every Mamba, attention,
    shared-expert, router, norm and lm_head weight once, the routed experts of each MoE layer (top-k at batch 1,
    at batch B the expected number of distinct experts for uniform routing, E (1 - (1 - k/E)^B)), one embedding
    row per sequence, in ``dtype`` (A_log, D, e_score_correction_bias fp32); the SSM states (fp32) and conv
    windows read + written; the KV cache read up to the current length (the mean over the ``new_tokens``
    steps: lengths prompt+1 .. prompt+new) plus the new K/V written."""
    import jax.numpy as jnp

    from nemojax.params import abstract_params

    ap = abstract_params(cfg, dtype)
    sz = jnp.dtype(dtype).itemsize
    H = cfg.hidden_size
    parts = {"mamba weights": 0, "attention weights": 0, "MoE router": 0, "MoE shared expert": 0,
             "MoE routed experts": 0, "mlp weights": 0, "norms": tree_nbytes(ap["norm_f"]), "lm_head": 0,
             "embedding rows": batch * H * sz, "SSM states (r+w)": 0, "conv windows (r+w)": 0,
             "KV cache (read + write)": 0}
    parts["lm_head"] = tree_nbytes(ap["embeddings"] if cfg.tie_word_embeddings else ap["lm_head"])
    n_exp = expected_experts(cfg, batch)
    mean_len = prompt_len + (new_tokens + 1) / 2
    for i, kind in enumerate(cfg.pattern):
        lp = ap["layers"][i]
        parts["norms"] += tree_nbytes(lp["norm"])
        m = lp["mixer"]
        if kind == "M":
            parts["mamba weights"] += tree_nbytes(m)
            parts["SSM states (r+w)"] += 2 * batch * cfg.mamba_num_heads * cfg.mamba_head_dim * cfg.ssm_state_size * 4
            parts["conv windows (r+w)"] += 2 * batch * (cfg.conv_kernel - 1) * cfg.mamba_conv_dim * sz
        elif kind == "*":
            parts["attention weights"] += tree_nbytes(m)
            per_pos = 2 * batch * cfg.num_key_value_heads * cfg.head_dim * sz  # K and V of one position
            parts["KV cache (read + write)"] += per_pos * (mean_len + 1)
        elif kind == "E":
            parts["MoE router"] += tree_nbytes(m["gate"]) + tree_nbytes(m["e_score_correction_bias"])
            if "shared_experts" in m:
                parts["MoE shared expert"] += tree_nbytes(m["shared_experts"])
            parts["MoE routed experts"] += n_exp * tree_nbytes(m["experts"]) / cfg.n_routed_experts
        elif kind == "-":
            parts["mlp weights"] += tree_nbytes(m)
    parts = {k: v for k, v in parts.items() if v}
    total = sum(parts.values())
    return {"parts": parts, "total": total, "per_token": total / batch, "experts_per_moe_layer": n_exp,
            "mean_context": mean_len}


def decode_flops(cfg, batch: int, prompt_len: int, new_tokens: int) -> float:
    """FLOPs of one decode step (for the batch-8 compute floor): matmuls with top-k experts and lm_head, the
    attention over the mean context, the SSM recurrence."""
    c = cost_model(cfg, 1, 1)
    mean_len = prompt_len + (new_tokens + 1) / 2
    attn = cfg.pattern.count("*") * 4 * cfg.num_attention_heads * cfg.head_dim * mean_len
    ssm = cfg.pattern.count("M") * 6 * cfg.mamba_num_heads * cfg.mamba_head_dim * cfg.ssm_state_size
    return batch * (2 * c["params_active_matmul"] + attn + ssm)


def prefill_flops(cfg, batch: int, seq: int) -> dict:
    """FLOPs of a prefill of ``batch`` x ``seq`` tokens: :func:`cost_model` (2 x active matmul params x tokens,
    top-k experts, + causal attention + chunked SSD) with lm_head for the last position only (generation
    computes last-position logits only)."""
    c = cost_model(cfg, batch, seq)
    lm_skip = 2 * cfg.vocab_size * cfg.hidden_size * batch * (seq - 1)  # logits of the last position only
    return {"matmul": c["flops_matmul"] - lm_skip, "attention": c["flops_attention"], "ssd": c["flops_ssd"],
            "total": c["flops_total"] - lm_skip, "params_active_matmul": c["params_active_matmul"],
            "params_total": c["params_total"]}


def generation_limits(cfg, dtype: str, B: int, T: int, new: int, limits: dict) -> dict:
    """Generation limits of a batch of ``B`` prompts of ``T`` tokens and ``new`` new tokens in ``dtype``, from the
    config and :func:`measure_limits`' results: decode tok/s at the copy and at the read bandwidth
    (:func:`decode_bytes`), the decode roofline (bytes at copy bandwidth, FLOPs at the GEMM rate) and prefill
    tok/s at the GEMM rate (:func:`prefill_flops`)."""
    db = decode_bytes(cfg, dtype, B, T, new)
    pf = prefill_flops(cfg, B, T)
    gemm, gemm_src = gemm_limit(limits, dtype)
    copy_bw, read_bw = limits["copy_bytes_per_s"], limits["read_bytes_per_s"]
    dec_lim_copy = B * copy_bw / db["total"]
    dec_lim_read = B * read_bw / db["total"]
    pre_lim = B * T * gemm * 1e9 / pf["total"]
    dflops = decode_flops(cfg, B, T, new)
    return {
        "decode_bytes": db, "prefill_flops": pf, "gemm_limit_gflops": gemm, "gemm_limit_source": gemm_src,
        "decode_limit_tok_s": dec_lim_copy, "decode_limit_read_tok_s": dec_lim_read,
        "decode_flops_per_step": dflops,
        # roofline with both floors (bytes at copy bandwidth, FLOPs at the GEMM rate): matters at batch 8
        "decode_roofline_tok_s": B / max(db["total"] / copy_bw, dflops / (gemm * 1e9)),
        "prefill_limit_tok_s": pre_lim,
    }


def generation_cost_markdown(results: list[dict]) -> list[str]:
    """The bytes-per-decode-step table and the prefill FLOPs line of results carrying
    ``{"dtype", "batch", "derived": generation_limits(...)}``."""
    L = []
    L.append("Bytes per decode step (config-derived, MB = 1e6 bytes):\n")
    cols = [(r["dtype"], r["batch"], r["derived"]["decode_bytes"]) for r in results]
    keys = list(dict.fromkeys(k for _, _, db in cols for k in db["parts"]))
    L.append("| part | " + " | ".join(f"{dt} B={b}" for dt, b, _ in cols) + " |")
    L.append("|---|" + "---|" * len(cols))
    for k in keys:
        L.append(f"| {k} | " + " | ".join(f"{db['parts'].get(k, 0) / 1e6:.2f}" for _, _, db in cols) + " |")
    L.append("| **total per step** | " + " | ".join(f"**{db['total'] / 1e6:.1f}**" for _, _, db in cols) + " |")
    L.append("| routed experts read per MoE layer | " + " | ".join(
        f"{db['experts_per_moe_layer']:.2f}" for _, _, db in cols) + " |")
    L.append("")
    r0 = results[0]["derived"]["prefill_flops"]
    pfs = [r["derived"]["prefill_flops"] | {"batch": r["batch"]} for r in results
           if r["dtype"] == results[0]["dtype"]]
    L.append("Prefill FLOPs: " + "; ".join(
        f"B={p['batch']}: {p['total'] / 1e9:.1f} GFLOP (matmul {p['matmul'] / 1e9:.1f} + attention "
        f"{p['attention'] / 1e9:.2f} + SSD {p['ssd'] / 1e9:.2f})" for p in pfs)
        + f"; {r0['params_active_matmul'] / 1e6:.1f}M active matmul params (lm_head included, used for the last "
        f"position only) of {r0['params_total'] / 1e6:.1f}M.")
    return L


def pct(x) -> str:
    return f"{100 * x:.0f}%"


def rate(x) -> str:
    """A tokens/s figure: no decimals from 100 on, one below."""
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}"


# ====================================================================================== workers
def worker_env(threads: int) -> dict:
    """The environment of a pinned worker: every thread-pool knob set to ``threads``, jax on the CPU."""
    env = dict(os.environ)
    n = str(threads)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
              "VECLIB_MAXIMUM_THREADS", "BLIS_NUM_THREADS"):
        env[k] = n
    if threads == 1:
        flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    else:
        flags = "--xla_cpu_multi_thread_eigen=true"
    env["XLA_FLAGS"] = (flags + " " + env.get("XLA_FLAGS", "")).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["TF_CPP_MIN_LOG_LEVEL"] = env.get("TF_CPP_MIN_LOG_LEVEL", "2")
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["TRANSFORMERS_VERBOSITY"] = "error"
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def set_driver_env(threads: int) -> None:
    """Keep the driver process itself (checkpoint writing, comparisons) on the same thread budget."""
    for k, v in worker_env(threads).items():
        if k.endswith("_THREADS") or k in ("XLA_FLAGS", "JAX_PLATFORMS"):
            os.environ.setdefault(k, v)
    if REPO not in sys.path:
        sys.path.insert(0, REPO)


def run_worker(script: str, kind: str, spec: dict, cores: list[int], threads: int, workdir: str) -> dict:
    """Run ``script --_worker kind --_spec FILE`` pinned to ``cores``; returns the JSON result it wrote."""
    spec_path = os.path.join(workdir, f"spec_{kind}.json")
    out_path = os.path.join(workdir, f"result_{kind}.json")
    with open(spec_path, "w") as f:
        json.dump(spec | {"result": out_path, "threads": threads}, f)
    if os.path.exists(out_path):
        os.remove(out_path)
    cmd = [sys.executable, os.path.abspath(script), "--_worker", kind, "--_spec", spec_path]
    proc = subprocess.run(cmd, env=worker_env(threads), preexec_fn=lambda: os.sched_setaffinity(0, cores),
                          stdout=sys.stderr, stderr=sys.stderr)
    if proc.returncode != 0 or not os.path.exists(out_path):
        raise RuntimeError(f"{kind} worker failed with exit status {proc.returncode}")
    with open(out_path) as f:
        return json.load(f)


def worker_main(workers: dict, kind: str, spec_path: str) -> None:
    """Entry point of a worker process: run ``workers[kind](spec)`` and write its JSON result."""
    with open(spec_path) as f:
        spec = json.load(f)
    result = workers[kind](spec)
    with open(spec["result"], "w") as f:
        json.dump(result, f)


def worker_common() -> dict:
    return {"affinity": sorted(os.sched_getaffinity(0)), "pid": os.getpid()}


def pick_cores(ap, threads: int, cores_arg: str | None) -> list[int]:
    """The cores to pin to: ``--cores`` (checked against the allowed set) or the first ``threads`` allowed."""
    allowed = sorted(os.sched_getaffinity(0))
    if cores_arg:
        cores = [int(c) for c in cores_arg.split(",")]
        bad = [c for c in cores if c not in allowed]
        if bad:
            ap.error(f"--cores {bad} not in the allowed CPU set {allowed}")
    else:
        if threads > len(allowed):
            ap.error(f"--threads {threads} exceeds the {len(allowed)} allowed cores {allowed}")
        cores = allowed[:threads]
    if threads < 1:
        ap.error("--threads must be >= 1")
    return cores


# ====================================================================================== checkpoint, machine
def build_checkpoint(cfg_dict: dict, folder: str, seed: int) -> None:
    """Random weights (``init_params_numpy``) written as an fp32 checkpoint folder, original naming."""
    from nemojax import Config
    from nemojax.params import init_params_numpy
    from nemojax.checkpoint import save_params

    cfg = Config.from_dict(cfg_dict)
    params = init_params_numpy(cfg, seed=seed, dtype="float32")
    save_params(params, cfg, folder, naming="original")


def cpu_info() -> dict:
    info = {"machine": platform.machine(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            txt = f.read()
        for line in txt.splitlines():
            if line.startswith("model name") and "model" not in info:
                info["model"] = line.split(":", 1)[1].strip()
            if line.startswith("flags") and "flags" not in info:
                flags = set(line.split(":", 1)[1].split())
                info["flags"] = sorted(f for f in flags if f.startswith(("avx512", "amx", "avx_vnni", "fma", "avx2")))
                info["native_bf16"] = bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return info


def l3_cache_bytes(default: int = 32 * 2 ** 20) -> int:
    """Largest last-level cache size the kernel reports (sysfs), or ``default``."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for d in os.listdir(base):
            try:
                with open(os.path.join(base, d, "size")) as f:
                    s = f.read().strip()
            except OSError:
                continue
            mult = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}.get(s[-1:], 1)
            best = max(best, int(s.rstrip("KMG")) * mult)
    except (OSError, ValueError):
        pass
    return best or default


# ====================================================================================== limit probes
def gemm_rates(n: int, reps: int, threads: int, bf16: bool) -> dict:
    """GFLOP/s (median and best of ``reps``) of an n^3 matmul: numpy fp32, jax fp32, torch fp32, and with
    ``bf16`` jax / torch bf16. The jax one is ``x @ w^T`` accumulated in fp32, like ``nemojax.ops.linear``."""
    import numpy as np

    flop = 2.0 * n ** 3
    out = {}
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)

    def rate(fn):
        fn()
        fn()
        med, ts = median_time(fn, reps)
        return {"gflops_median": flop / med / 1e9, "gflops_best": flop / min(ts) / 1e9}

    out["numpy_fp32"] = rate(lambda: a @ b)
    log(f"  GEMM {n}^3 numpy fp32: {out['numpy_fp32']['gflops_median']:.1f} GFLOP/s")

    import jax
    import jax.numpy as jnp

    # like nemojax.ops.linear: x @ w^T accumulated in fp32 (for bf16 the fast path; a bf16-output dot is ~3x slower)
    dot = jax.jit(lambda x, w: jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())),
                                                   preferred_element_type=jnp.float32))
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    out["jax_fp32"] = rate(lambda: dot(ja, jb).block_until_ready())
    log(f"  GEMM {n}^3 jax fp32:   {out['jax_fp32']['gflops_median']:.1f} GFLOP/s")

    import torch

    torch.set_num_threads(threads)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    out["torch_fp32"] = rate(lambda: torch.mm(ta, tb))
    log(f"  GEMM {n}^3 torch fp32: {out['torch_fp32']['gflops_median']:.1f} GFLOP/s")
    if bf16:
        jab, jbb = ja.astype(jnp.bfloat16), jb.astype(jnp.bfloat16)
        out["jax_bf16"] = rate(lambda: dot(jab, jbb).block_until_ready())
        tab, tbb = ta.bfloat16(), tb.bfloat16()
        out["torch_bf16"] = rate(lambda: torch.mm(tab, tbb))
        log(f"  GEMM {n}^3 bf16: jax {out['jax_bf16']['gflops_median']:.1f}, "
            f"torch {out['torch_bf16']['gflops_median']:.1f} GFLOP/s")
    return out


def copy_bandwidth(mb: int, reps: int) -> dict:
    """``np.copyto`` of an ``mb`` MiB fp32 buffer: seconds (median, best) and the buffer size in bytes.

    Bytes copied per second = nbytes / s; the read + write traffic (STREAM "copy" convention) is twice that
    (a write-allocating cache adds a third read of the destination, not counted)."""
    import numpy as np

    nbytes = mb * 2 ** 20
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # first touch
    med, ts = median_time(lambda: np.copyto(dst, src), reps)
    return {"nbytes": nbytes, "s_median": med, "s_best": min(ts)}


def read_bandwidth(mb: int, reps: int, threads: int = 1) -> dict:
    """Pure reads of an ``mb`` MiB fp32 array (each call reads nbytes once): numpy ``a.dot(a)`` (BLAS sdot),
    jax ``jnp.sum`` (jitted) and torch ``sum``; seconds (median, best) per probe. Single probes are noisy on
    a shared machine and no single library's loop is guaranteed to saturate the core, hence several."""
    import numpy as np
    import jax
    import jax.numpy as jnp
    import torch

    torch.set_num_threads(threads)
    nbytes = mb * 2 ** 20
    a = np.random.default_rng(0).standard_normal(nbytes // 4, dtype=np.float32) * 1e-3
    ja = jnp.asarray(a)
    ta = torch.from_numpy(a)
    jsum = jax.jit(jnp.sum)
    probes = {"numpy a.dot(a)": lambda: a.dot(a), "jax jnp.sum": lambda: jsum(ja).block_until_ready(),
              "torch sum": lambda: ta.sum()}
    out = {"nbytes": nbytes, "probes": {}}
    for name, fn in probes.items():
        fn()
        med, ts = median_time(fn, reps)
        out["probes"][name] = {"s_median": med, "s_best": min(ts)}
    return out


def gemv_bandwidth(mb: int, reps: int, threads: int, cols: int = 1024, mat_mb: int = 16) -> dict:
    """What decode-style matrix-vector products reach: ``x [1, cols] @ W_i^T`` over distinct ``mat_mb`` MiB
    matrices W_i totalling ``mb`` MiB (layer-sized, so neither cache-resident nor one huge temporary), per
    library and dtype; GB/s of weight bytes read (median of ``reps``). jax as ``nemojax.ops.linear``
    (dot_general, fp32 accumulation, output cast back) with all products in one jitted call; torch
    ``F.linear`` one call per matrix."""
    import numpy as np
    import jax
    import jax.numpy as jnp
    import torch

    torch.set_num_threads(threads)
    out = {}

    def lin(x, w):
        return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32).astype(x.dtype)

    many = jax.jit(lambda x, ws: [lin(x, w) for w in ws])
    rng = np.random.default_rng(0)
    n_mats = max(1, mb // mat_mb)
    for name, jdt, tdt, size in (("fp32", jnp.float32, torch.float32, 4), ("bf16", jnp.bfloat16, torch.bfloat16, 2)):
        rows = mat_mb * 2 ** 20 // (size * cols)
        w32 = rng.standard_normal((rows, cols), dtype=np.float32)
        x32 = rng.standard_normal((1, cols), dtype=np.float32)
        jws = [jnp.asarray(w32, jdt) + i for i in range(n_mats)]
        tws = [torch.from_numpy(w32).to(tdt) + i for i in range(n_mats)]
        jx, tx = jnp.asarray(x32, jdt), torch.from_numpy(x32).to(tdt)
        nbytes = n_mats * rows * cols * size
        jax.block_until_ready(many(jx, jws))
        med, _ = median_time(lambda: jax.block_until_ready(many(jx, jws)), reps)
        out[f"jax_{name}_gbs"] = nbytes / med / 1e9

        def tcall():
            return [torch.nn.functional.linear(tx, w) for w in tws]

        tcall()
        med, _ = median_time(tcall, reps)
        out[f"torch_{name}_gbs"] = nbytes / med / 1e9
        del jws, tws
        log(f"  GEMV over {n_mats} x {mat_mb} MiB {name} matrices: jax {out[f'jax_{name}_gbs']:.1f} GB/s, "
            f"torch {out[f'torch_{name}_gbs']:.1f} GB/s")
    return out


def measure_limits(spec: dict) -> dict:
    """The machine's limits on the pinned core(s), for a worker: the GEMM rates (``spec["gemm_n"]``^3, numpy / jax /
    torch, fp32 and bf16), the memory-copy bandwidth of ``spec["copy_mb"]`` MiB (bytes copied per second, the
    decode limit; the read + write traffic is twice that), the pure-read probes of the same size (the fastest
    median is the read bandwidth, the stricter decode limit), decode-style GEMVs over that many MiB of distinct
    16 MiB matrices (informational) and the last-level cache size."""
    out = worker_common() | {"gemm_n": spec["gemm_n"], "copy_mb": spec["copy_mb"]}
    out["gemm"] = gemm_rates(spec["gemm_n"], spec["gemm_repeats"], spec["threads"], bf16=True)
    cp = copy_bandwidth(spec["copy_mb"], spec["copy_repeats"])
    out["copy_bytes_per_s"] = cp["nbytes"] / cp["s_median"]
    out["copy_bytes_per_s_best"] = cp["nbytes"] / cp["s_best"]
    out["copy_traffic_per_s"] = 2 * cp["nbytes"] / cp["s_median"]
    log(f"  memory copy {spec['copy_mb']} MB: {out['copy_bytes_per_s'] / 1e9:.1f} GB/s copied "
        f"({out['copy_traffic_per_s'] / 1e9:.1f} GB/s read+write traffic)")
    rd = read_bandwidth(spec["copy_mb"], spec["copy_repeats"], spec["threads"])
    out["read_probes"] = {k: {"bytes_per_s": rd["nbytes"] / v["s_median"],
                              "bytes_per_s_best": rd["nbytes"] / v["s_best"]} for k, v in rd["probes"].items()}
    best = max(out["read_probes"], key=lambda k: out["read_probes"][k]["bytes_per_s"])
    out["read_probe"] = best
    out["read_bytes_per_s"] = out["read_probes"][best]["bytes_per_s"]
    out["read_bytes_per_s_best"] = out["read_probes"][best]["bytes_per_s_best"]
    log(f"  memory read {spec['copy_mb']} MB: " + ", ".join(
        f"{k} {v['bytes_per_s'] / 1e9:.1f}" for k, v in out["read_probes"].items()) + " GB/s")
    out["gemv"] = gemv_bandwidth(spec["copy_mb"], spec["copy_repeats"], spec["threads"])
    out["l3_bytes"] = l3_cache_bytes()
    return out


def gemm_limit(limits: dict, dtype: str) -> tuple[float, str]:
    """(GFLOP/s, probe) of the fastest GEMM median of ``measure_limits`` in ``dtype``'s precision."""
    key = "fp32" if dtype == "float32" else "bf16"
    cands = {k: v["gflops_median"] for k, v in limits["gemm"].items() if k.endswith(key)}
    best = max(cands, key=cands.get)
    return cands[best], best


def limits_markdown(lim: dict, threads: int) -> list[str]:
    """The markdown table of :func:`measure_limits`' results (one line per list item)."""
    L = [f"Machine limits, same run, same pinning ({threads} thread(s)):\n", "| measurement | value |", "|---|---|"]
    for k, v in lim["gemm"].items():
        lib, dt = k.split("_")
        L.append(f"| GEMM {lim['gemm_n']}^3 {lib} {dt} | {v['gflops_median']:.1f} GFLOP/s "
                 f"(best {v['gflops_best']:.1f}) |")
    L.append(f"| memory copy {lim['copy_mb']} MiB (np.copyto): bytes copied per s **(decode limit)** "
             f"| {lim['copy_bytes_per_s'] / 1e9:.1f} GB/s (best {lim['copy_bytes_per_s_best'] / 1e9:.1f}) |")
    L.append(f"| memory copy: read + write traffic | {lim['copy_traffic_per_s'] / 1e9:.1f} GB/s |")
    for k, v in lim["read_probes"].items():
        mark = " **(stricter decode limit: the fastest read probe)**" if k == lim["read_probe"] else ""
        L.append(f"| memory read {lim['copy_mb']} MiB, {k}{mark} | {v['bytes_per_s'] / 1e9:.1f} GB/s "
                 f"(best {v['bytes_per_s_best'] / 1e9:.1f}) |")
    for k, v in lim["gemv"].items():
        lib, dt, _ = k.split("_")
        L.append(f"| GEMV x[1,1024] @ W^T over {lim['copy_mb']} MiB of distinct 16 MiB {dt} matrices, {lib} "
                 f"(informational) | {v:.1f} GB/s |")
    return L


# ====================================================================================== comparisons
def compare_tokens(a, b) -> dict:
    """Position-by-position agreement of two token arrays [B, N]."""
    import numpy as np

    eq = a == b
    prefix = [int(np.argmin(r)) if not r.all() else len(r) for r in eq]
    return {"match": int(eq.sum()), "total": int(eq.size), "identical_prefix_min": min(prefix),
            "identical_prefix_mean": float(np.mean(prefix)), "rows_identical": int(sum(r.all() for r in eq))}
