"""llama.cpp as a peer in tools/bench_generate.py (``--llamacpp f32,bf16,q8_0,q4_0``): the benchmark's random
checkpoint written as GGUF (tools/gguf_export.py), then timed in a pinned worker through llama-cpp-python's
C API (no Python sampling loop beyond an argmax over the logits).

What is timed, per GGUF type, batch 1 only: prefill = one ``llama_decode`` of the whole prompt (``n_batch`` =
``n_ubatch`` = prompt length, as ``llama-bench -p``), decode = ``new_tokens - 1`` single-token ``llama_decode``
calls of a greedy loop (token 1 is the argmax of the prefill's logits), medians of ``repeats``, the memory
(KV cache + recurrent states) cleared between runs; KV cache in f16 (llama.cpp's default). The greedy tokens
of the first run are saved for the comparison with nemojax's fp32 tokens, and the prefill's last logits for
an accuracy check of the export.

llama-cpp-python is not a dependency of nemojax: ``pip install llama-cpp-python`` builds llama.cpp from source
(CPU; ``CMAKE_ARGS="-DGGML_NATIVE=ON"`` for this machine's instruction set).
"""
from __future__ import annotations

import os
import time

import numpy as np

GGUF_TYPES = ("f32", "bf16", "q8_0", "q4_0")
_QUIET = None  # the log callback that silences llama.cpp in a worker


def available() -> str | None:
    """llama-cpp-python's version, or None where it is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp.__version__


def write_ggufs(folder: str, types: list[str], workdir: str, threads: int) -> dict:
    """The checkpoint folder as one GGUF per type, the quantized ones from the one F32 file; returns
    {type: {"path", "bytes", "write_s"}}."""
    import gguf_export

    out = {}
    f32 = os.path.join(workdir, "bench-f32.gguf")
    for t in sorted(types, key=lambda t: t != "f32"):  # F32 first: the quantizer's source
        path = os.path.join(workdir, f"bench-{t}.gguf")
        t0 = time.perf_counter()
        if t in ("f32", "bf16"):
            gguf_export.write_float_gguf(folder, path, t)
        else:
            if not os.path.exists(f32):
                gguf_export.write_float_gguf(folder, f32, "f32")
            gguf_export.quantize(f32, path, t, threads)
        out[t] = {"path": path, "bytes": os.path.getsize(path), "write_s": time.perf_counter() - t0}
    if "f32" not in types and os.path.exists(f32):
        os.remove(f32)
    return out


def generation_worker(spec: dict) -> dict:
    """Pinned worker: spec has "gguf", "prompts" (npy, row 0 used), "new_tokens", "repeats", "threads",
    "tokens" / "logits" (npy paths to write). Returns prefill / decode tok/s and the runs' times."""
    import ctypes

    import llama_cpp

    global _QUIET  # llama.cpp keeps the pointer: the callback must outlive the call
    _QUIET = llama_cpp.llama_log_callback(lambda level, text, data: None)
    llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    prompt = np.load(spec["prompts"])[0].astype(np.int32)
    T, N, threads = len(prompt), spec["new_tokens"], spec["threads"]
    mp = llama_cpp.llama_model_default_params()
    t0 = time.perf_counter()
    model = llama_cpp.llama_model_load_from_file(spec["gguf"].encode(), mp)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {spec['gguf']}")
    load_s = time.perf_counter() - t0
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx = T + N + 8
    cp.n_batch = cp.n_ubatch = T
    cp.n_threads = cp.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(model, cp)
    if not ctx:
        raise RuntimeError("llama.cpp could not create a context")
    V = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    mem = llama_cpp.llama_get_memory(ctx)

    def decode(ids) -> np.ndarray:
        arr = (llama_cpp.llama_token * len(ids))(*[int(i) for i in ids])
        rc = llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(arr, len(ids)))
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(V,))

    prefill_s, decode_s, tokens, logits = [], [], None, None
    for r in range(spec["repeats"] + 1):  # run 0 warms up (first-touch of the weights, graph allocation)
        llama_cpp.llama_memory_clear(mem, True)
        t0 = time.perf_counter()
        lg = decode(prompt)
        t1 = time.perf_counter()
        toks = [int(lg.argmax())]
        if r == 0:
            logits = lg.copy()
        t2 = time.perf_counter()
        for _ in range(N - 1):
            toks.append(int(decode([toks[-1]]).argmax()))
        t3 = time.perf_counter()
        if r == 0:
            tokens = np.asarray(toks, np.int32)[None]
        else:
            prefill_s.append(t1 - t0)
            decode_s.append(t3 - t2)
    np.save(spec["tokens"], tokens)
    np.save(spec["logits"], logits)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    return {"prefill_tok_s": T / float(np.median(prefill_s)), "decode_tok_s": (N - 1) / float(np.median(decode_s)),
            "prefill_s": prefill_s, "decode_s": decode_s, "load_s": load_s, "version": llama_cpp.__version__,
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()}


def reference_logits(folder: str, prompts: str) -> np.ndarray:
    """nemojax fp32's last-position prefill logits of prompt row 0 (the export's accuracy check)."""
    import jax.numpy as jnp

    from nemojax import load
    from nemojax.model import forward_jit

    m = load(folder, dtype="float32", progress=False)
    ids = jnp.asarray(np.load(prompts)[:1].astype(np.int32))
    return np.asarray(forward_jit(m.params, m.config, ids), np.float32)[0, -1]


def parse_types(ap, arg: str, config: dict) -> list[str]:
    """``--llamacpp`` -> the GGUF types to run (an argparse error for unknown ones, a config llama.cpp cannot run
    or a missing llama-cpp-python)."""
    types = [t for t in arg.split(",") if t]
    if set(types) - set(GGUF_TYPES):
        ap.error(f"--llamacpp: types are {', '.join(GGUF_TYPES)}")
    if types and "-" in config["hybrid_override_pattern"]:
        ap.error("--llamacpp: llama.cpp's MoE architecture has no dense MLP layers ('-' in the pattern)")
    if types and not available():
        ap.error("--llamacpp needs llama-cpp-python (pip install llama-cpp-python; it builds llama.cpp)")
    return types


def run(run_worker, types: list[str], folder: str, prompts: str, rep: dict, work: str) -> list[dict]:
    """Export, time every GGUF type in a pinned worker (``run_worker(kind, spec, cores, threads, work)`` of
    tools/bench_generate.py, whose workers include "llamacpp": :func:`generation_worker`) with its report's
    settings (``rep``: new tokens, batch-1 repeats, cores, threads; its results so far), compare with nemojax:
    greedy tokens with its fp32 run's, the prefill logits with an fp32 forward, the decode rate with bf16's."""
    from benchlib import compare_tokens, log

    new_tokens, repeats, cores, threads = rep["new_tokens"], rep["repeats"]["1"], rep["cores"], rep["threads"]
    tok_path = os.path.join(work, "tokens_nemojax_float32_1.npy")
    ref_tokens = np.load(tok_path)[:1] if os.path.exists(tok_path) else None
    bf16 = [r["nemojax"]["decode_tok_s"] for r in rep["results"] if r["dtype"] == "bfloat16" and r["batch"] == 1]
    nemojax_bf16_decode = bf16[0] if bf16 else None
    log(f"llama.cpp: writing GGUF {', '.join(types)}")
    files = write_ggufs(folder, types, work, threads)
    rows = []
    for t in types:
        spec = {"gguf": files[t]["path"], "prompts": prompts, "new_tokens": new_tokens, "repeats": repeats,
                "tokens": os.path.join(work, f"tokens_llamacpp_{t}.npy"),
                "logits": os.path.join(work, f"logits_llamacpp_{t}.npy")}
        rows.append((run_worker("llamacpp", spec, cores, threads, work) | {"type": t} | files[t], spec))
    for f in files.values():
        os.remove(f["path"])
    ref = reference_logits(folder, prompts)  # jax in this process only now: no fork after it
    for r, spec in rows:
        toks, lg = np.load(spec["tokens"]), np.load(spec["logits"])
        r["tokens"] = compare_tokens(toks, ref_tokens) if ref_tokens is not None else {"match": 0, "total": 0}
        r["logits_max_abs"], r["logits_scale"] = float(np.abs(lg - ref).max()), float(np.abs(ref).max())
        if nemojax_bf16_decode:
            r["decode_vs_nemojax_bf16"] = r["decode_tok_s"] / nemojax_bf16_decode
        log(f"llama.cpp {r['type']}: prefill {r['prefill_tok_s']:,.0f} tok/s, decode {r['decode_tok_s']:,.1f} "
            f"tok/s, logits max abs diff {r['logits_max_abs']:.3g}, greedy tokens equal to nemojax fp32 "
            f"{r['tokens']['match']}/{r['tokens']['total']}")
    return [r for r, _ in rows]


def markdown(rows: list[dict], threads: int) -> list[str]:
    """Table lines for bench_generate's report: one row per GGUF type."""
    if not rows:
        return []
    L = ["", f"### llama.cpp (llama-cpp-python {rows[0]['version']}, {threads} thread(s), batch 1, f16 KV cache)", "",
         "| GGUF | file MB | prefill tok/s | decode tok/s | decode vs nemojax bf16 | greedy tokens = nemojax fp32 "
         "| prefill logits max abs diff vs nemojax fp32 (scale) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        vs = f"{r['decode_vs_nemojax_bf16']:.2f}x" if r.get("decode_vs_nemojax_bf16") else ""
        L.append(f"| {r['type'].upper()} | {r['bytes'] / 1e6:,.0f} | {r['prefill_tok_s']:,.0f} | "
                 f"{r['decode_tok_s']:,.1f} | {vs} | {r['tokens']['match']}/{r['tokens']['total']} | "
                 f"{r['logits_max_abs']:.3g} ({r['logits_scale']:.3g}) |")
    L.append(f"\nllama.cpp system info: `{rows[0]['system_info']}`")
    return L
