"""The transformers side of the nemojax benchmarks: ``NemotronHForCausalLM`` (eager) as the peer that
``tools/bench_forward.py`` and ``tools/bench_generate.py`` time nemojax against (not a package module: the tools
put ``tools/`` on ``sys.path`` and ``import transformers_bench``).

* :func:`load_model`: the checkpoint folder loaded with ``dtype=``, one thread per worker (interop threads 1),
  ``time_step_limit = (0, inf)`` on every Mamba mixer (the canonical no-clamp, as nemojax and
  tests/hf_reference.py), plus the versions and the attention / experts implementations transformers chose;
* generation timing (:func:`generation`), the same work per forward as nemojax's figures:

  - prefill tok/s: ``model(prompt, use_cache=True, logits_to_keep=1)`` (fresh cache), median of the prefill
    repeats;
  - decode tok/s: a manual greedy loop from a ``copy.deepcopy`` of the post-prefill cache: token 1 is the argmax
    of the prefill logits, then ``new - 1`` timed steps ``model(tok[:, None], past_key_values=cache,
    use_cache=True, logits_to_keep=1)`` + argmax each give tokens 2..new; decode tok/s = B x (new - 1) / (time of
    those steps), median of the decode repeats;
  - a short warm-up (64-token prompt, 4 steps) first;
* per-layer decode times through forward hooks (:func:`decode_breakdown`).

Imports torch and transformers only inside the functions, so the driver processes stay light.
"""
from __future__ import annotations

import copy
import statistics
import time

from benchlib import log, worker_common

# transformers' block_type -> the hybrid_override_pattern character
HF_KIND = {"linear_attention": "M", "moe": "E", "full_attention": "*", "mlp": "-"}


def load_model(spec: dict):
    """``NemotronHForCausalLM`` from ``spec["folder"]`` in ``spec["dtype"]`` on ``spec["threads"]`` threads
    (``spec["hf_experts_impl"]``: the experts implementation to request, default transformers' own choice).

    Returns ``(model, info)``: info = the worker's affinity and pid, torch / transformers versions, thread counts,
    load seconds and the attention / experts implementations in use."""
    import torch
    import transformers
    from transformers import NemotronHForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(spec["threads"])
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    info = worker_common() | {"torch_version": torch.__version__, "transformers_version": transformers.__version__,
                              "torch_threads": torch.get_num_threads(),
                              "torch_interop_threads": torch.get_num_interop_threads()}
    t0 = time.perf_counter()
    kw = {}
    if spec.get("hf_experts_impl"):
        kw["experts_implementation"] = spec["hf_experts_impl"]
    model = NemotronHForCausalLM.from_pretrained(spec["folder"], dtype=getattr(torch, spec["dtype"]), **kw)
    model.eval()
    for layer in model.model.layers:
        if layer.block_type == "linear_attention":
            layer.mixer.time_step_limit = (0.0, float("inf"))  # the canonical no-clamp, as nemojax
    info["load_s"] = time.perf_counter() - t0
    info["attn_implementation"] = model.config._attn_implementation
    info["experts_implementation"] = getattr(model.config, "_experts_implementation", None)
    return model, info


def generation(model, ids, new: int, prefill_repeats: int, decode_repeats: int) -> tuple[dict, object, object]:
    """Prefill and greedy decode tok/s of ``new`` tokens from the prompts ``ids`` [B, T] (see the module
    docstring). Returns (results, the greedy tokens [B, new], (post-prefill cache, first token))."""
    import torch

    B, T = ids.shape
    res = {"batch": B, "prompt_len": T, "new_tokens": new, "prefill_repeats": prefill_repeats,
           "decode_repeats": decode_repeats}
    # warm-up: a short prompt and a few steps (no compilation on this side; allocator and code paths)
    o = model(ids[:, :64], use_cache=True, logits_to_keep=1)
    pkv, tok = o.past_key_values, o.logits[:, -1].argmax(-1)
    for _ in range(4):
        o = model(tok[:, None], past_key_values=pkv, use_cache=True, logits_to_keep=1)
        tok = o.logits[:, -1].argmax(-1)
    pre = []
    for r in range(prefill_repeats):
        t0 = time.perf_counter()
        o = model(ids, use_cache=True, logits_to_keep=1)
        pre.append(time.perf_counter() - t0)
        log(f"  transformers B={B} prefill {r + 1}/{prefill_repeats}: {pre[-1]:.3f} s ({B * T / pre[-1]:,.0f} tok/s)")
    pkv0, tok0 = o.past_key_values, o.logits[:, -1].argmax(-1)
    dec, toks, steps_med = [], [], []
    for r in range(decode_repeats):
        pkv, tok = copy.deepcopy(pkv0), tok0
        out = [tok0]
        st = []
        t0 = time.perf_counter()
        for _ in range(new - 1):
            s0 = time.perf_counter()
            o = model(tok[:, None], past_key_values=pkv, use_cache=True, logits_to_keep=1)
            tok = o.logits[:, -1].argmax(-1)
            st.append(time.perf_counter() - s0)
            out.append(tok)
        dec.append(time.perf_counter() - t0)
        steps_med.append(statistics.median(st))
        toks.append(torch.stack(out, 1).numpy().astype("int32"))
        log(f"  transformers B={B} decode {r + 1}/{decode_repeats}: {new - 1} steps {dec[-1]:.3f} s "
            f"({B * (new - 1) / dec[-1]:,.1f} tok/s; median step {steps_med[-1] * 1e3:.1f} ms)")
    res["prefill_all_s"], res["decode_all_s"], res["step_median_all_s"] = pre, dec, steps_med
    res["prefill_s"], res["decode_s"] = statistics.median(pre), statistics.median(dec)
    res["decode_steps"] = new - 1
    res["prompt_tokens"], res["generated_tokens"] = B * T, B * new
    res["prefill_tok_s"] = B * T / res["prefill_s"]
    res["decode_tok_s"] = B * (new - 1) / res["decode_s"]
    res["decode_ms_per_step"] = res["decode_s"] / (new - 1) * 1e3
    res["repeats_identical"] = all((t == toks[0]).all() for t in toks)
    return res, toks[0], (pkv0, tok0)


def decode_breakdown(model, pkv0, tok0, steps: int) -> dict:
    """Per-layer decode times from forward hooks over ``steps`` single-token steps (distinct layers' weights)."""
    layers = list(model.model.layers)
    kinds = [HF_KIND.get(ly.block_type, "?") for ly in layers]
    acc = {i: 0.0 for i in range(len(layers))} | {"lm_head": 0.0}
    t_start = {}

    def pre_hook(key):
        def f(mod, args):
            t_start[key] = time.perf_counter()
        return f

    def post_hook(key):
        def f(mod, args, out):
            acc[key] += time.perf_counter() - t_start[key]
        return f

    handles = []
    for i, ly in enumerate(layers):
        handles += [ly.register_forward_pre_hook(pre_hook(i)), ly.register_forward_hook(post_hook(i))]
    handles += [model.lm_head.register_forward_pre_hook(pre_hook("lm_head")),
                model.lm_head.register_forward_hook(post_hook("lm_head"))]
    pkv, tok = copy.deepcopy(pkv0), tok0
    t0 = time.perf_counter()
    try:
        for _ in range(steps):
            o = model(tok[:, None], past_key_values=pkv, use_cache=True, logits_to_keep=1)
            tok = o.logits[:, -1].argmax(-1)
    finally:
        for hd in handles:
            hd.remove()
    total = (time.perf_counter() - t0) / steps
    res = {"step_ms": total * 1e3, "block_ms": {}, "steps": steps}
    for k in dict.fromkeys(kinds):
        idx = [i for i, c in enumerate(kinds) if c == k]
        res["block_ms"][k] = sum(acc[i] for i in idx) / len(idx) / steps * 1e3
    res["lm_head_ms"] = acc["lm_head"] / steps * 1e3
    res["other_ms"] = res["step_ms"] - sum(acc[i] for i in range(len(layers))) / steps * 1e3 - res["lm_head_ms"]
    log("  transformers decode breakdown (ms per call): " + ", ".join(
        f"{k} {v:.2f}" for k, v in res["block_ms"].items()) + f", lm_head {res['lm_head_ms']:.2f}, "
        f"other {res['other_ms']:.2f}; step {res['step_ms']:.2f}")
    return res


def generation_worker(spec: dict) -> dict:
    """A generation worker: for every batch size of ``spec["batches"]`` the first B prompts of ``spec["prompts"]``,
    ``spec["new_tokens"]`` greedy tokens (saved to ``spec["tokens"][B]``), batch 1 with ``spec["repeats"]["1"]``
    prefill forwards, larger batches with one (it takes longest); ``spec["breakdown"]`` adds per-layer times."""
    import numpy as np
    import torch

    model, out = load_model(spec)
    prompts = np.load(spec["prompts"])
    out["runs"] = {}
    with torch.inference_mode():
        for B in spec["batches"]:
            ids = torch.from_numpy(prompts[:B].astype(np.int64))
            log(f"[{spec['dtype']}] transformers batch {B}: prompt {ids.shape[1]}, {spec['new_tokens']} new tokens "
                f"(attn={out['attn_implementation']}, experts={out['experts_implementation']})")
            rep = spec["repeats"][str(B)]
            r, toks, (pkv0, tok0) = generation(model, ids, spec["new_tokens"], rep if B == 1 else 1, rep)
            np.save(spec["tokens"][str(B)], toks)
            if spec["breakdown"]:
                r["breakdown"] = decode_breakdown(model, pkv0, tok0, 16)
            del pkv0
            out["runs"][str(B)] = r
    return out
