"""Sharded-vs-single-device checks on 8 CPU devices, run by tests/test_sharding.py in a subprocess (the device
count must be set before JAX starts; the rest of the suite runs on one device). Prints one JSON object.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_worker.py OUT_DIR
"""
from __future__ import annotations

import json
import os
import re
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from nemojax import quant  # noqa: E402
from nemojax import sharding as S  # noqa: E402
from nemojax.config import Config  # noqa: E402
from nemojax.generate import generate, prefill  # noqa: E402
from nemojax.cache import init_cache  # noqa: E402
from nemojax.model import forward_jit  # noqa: E402
from nemojax.params import init_params  # noqa: E402
from nemojax.checkpoint import load_params, load_sharded, save_params  # noqa: E402

# all block types; dims divisible by 2 and (mostly) 8 so every mesh axis really splits something
CFG = dict(
    vocab_size=512, hidden_size=64, hybrid_override_pattern="MEM*E-M*E", num_hidden_layers=9,
    num_attention_heads=8, num_key_value_heads=2, head_dim=16,
    mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2, conv_kernel=4, chunk_size=16,
    n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, moe_shared_expert_intermediate_size=64,
    n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5, intermediate_size=128,
    layer_norm_epsilon=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
MESHES = {"float32": [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2)],
          "bfloat16": [(2, 2, 2)],
          "nvfp4": [(2, 2, 2), (1, 2, 4)],
          "hlwq": [(1, 8, 1), (2, 2, 2)],
          "trained-bf16": [(2, 2, 2)]}
# generate (prefill + decode loop with a sharded cache) is compared on the mesh that splits every axis, for the
# plain and the NVFP4 weights (HLWQ's nodes shard as NVFP4's do: its forward is compared on every mesh); the
# forward on every mesh (bit-identical with an expert split only)
GENERATE_ON = {(2, 2, 2)}
GENERATE_FORMATS = ("float32", "nvfp4")
QUESTIONS = ["What is 248 + 377?", "What is 51 - 19?", "What is 7 * 8?", "Which is larger, 45 or 54?",
             "What is 903 + 88?", "What is 66 - 9?", "What is 12 * 3?", "What is 300 + 411?"]
NEW = 8


def bank_gathers(params, cfg, ids, mesh) -> int:
    """Number of all-gathers in the compiled forward that produce a whole routed-expert bank."""
    E = cfg.n_routed_experts
    txt = forward_jit.lower(params, cfg, ids, mesh=mesh).compile().as_text()
    return len(re.findall(rf"= \w+\[{E},\d+,\d+\][^ ]* all-gather\(", txt))


def main(out_dir: str) -> dict:
    cfg = Config.from_dict(CFG)
    base = init_params(cfg, 5, dtype="float32")
    variants = {"float32": base, "bfloat16": init_params(cfg, 5, dtype="bfloat16"),
                "nvfp4": quant.apply(base, cfg, "nvfp4-all"), "hlwq": quant.apply(base, cfg, "hlwq-q5")}
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, cfg.vocab_size, (8, 13)))
    prompts = [list(rng.integers(3, cfg.vocab_size, n)) for n in (5, 9, 7, 11, 6, 8, 10, 4)]
    res: dict = {"devices": len(jax.devices()), "cases": {}}
    f32 = np.asarray(forward_jit(base, cfg, ids), np.float32)
    for name, params in variants.items():
        ref = np.asarray(forward_jit(params, cfg, ids), np.float32)
        gen = name in GENERATE_FORMATS and GENERATE_ON & set(MESHES[name])
        gref = generate(params, cfg, prompts, NEW) if gen else None
        for shape in MESHES[name]:
            mesh = S.make_mesh(*shape)
            sp = S.shard_params(params, cfg, mesh)
            out = np.asarray(forward_jit(sp, cfg, ids, mesh=mesh), np.float32)
            case = {"max_abs": float(np.abs(out - ref).max()), "ref_scale": float(np.abs(ref).max()),
                    "top1": float((out.argmax(-1) == ref.argmax(-1)).mean()),
                    "bank_gathers": bank_gathers(sp, cfg, ids, mesh) if name in ("float32", "nvfp4") else None}
            if gref is not None and shape in GENERATE_ON:
                case["tokens_equal"] = bool((generate(sp, cfg, prompts, NEW, mesh=mesh) == gref).all())
            else:  # bf16 on random weights: rounding + near-tie routing; compare both runs with the fp32 model
                case.update(err_single=float(np.abs(ref - f32).mean()), err_sharded=float(np.abs(out - f32).mean()),
                            top1_single=float((ref.argmax(-1) == f32.argmax(-1)).mean()),
                            top1_sharded=float((out.argmax(-1) == f32.argmax(-1)).mean()))
            res["cases"][f"{name}-{'x'.join(map(str, shape))}"] = case
    # bf16 end to end on the bundled trained model: greedy answers to chat prompts
    from nemojax import api
    from nemojax.tokenizer import Tokenizer

    folder = os.path.join(os.path.dirname(api.__file__), "default_model")
    model, tok = api.load(folder, progress=False), Tokenizer(folder)
    chats = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True))
             for q in QUESTIONS]
    gref = generate(model.params, model.config, chats, 24)
    for shape in MESHES["trained-bf16"]:
        mesh = S.make_mesh(*shape)
        g = generate(S.shard_params(model.params, model.config, mesh), model.config, chats, 24, mesh=mesh)
        res["cases"][f"trained-bf16-{'x'.join(map(str, shape))}"] = {"tokens_equal": bool((g == gref).all())}
    # the cache keeps its shardings through prefill
    mesh = S.make_mesh(2, 2, 2)
    sp = S.shard_params(base, cfg, mesh)
    cache = S.shard_cache(init_cache(cfg, 8, 32, jnp.float32), cfg, mesh)
    _, cache = prefill(sp, cfg, ids[:, :8], jnp.ones((8, 8), jnp.int32), cache, mesh=mesh)
    want = S.cache_shardings(cache, cfg, mesh)
    res["cache_specs_kept"] = all(a.sharding.is_equivalent_to(w, a.ndim) for a, w in
                                  zip(jax.tree.leaves(cache), jax.tree.leaves(want)))
    res["cache_ssm_spec"] = str(cache.layers[0]["ssm"].sharding.spec)
    res["cache_k_spec"] = str(cache.layers[3]["k"].sharding.spec)
    # loading straight into shards (bf16 and NVFP4 checkpoints)
    res["load"] = {}
    for name, params in (("bfloat16", variants["bfloat16"]), ("nvfp4", variants["nvfp4"])):
        folder = os.path.join(out_dir, name)
        save_params(params, cfg, folder)
        single = load_params(folder, cfg, "bfloat16" if name == "bfloat16" else "float32")
        for shape in ((1, 8, 1), (2, 2, 2)):
            mesh = S.make_mesh(*shape)
            log: list = []
            sp = load_sharded(folder, cfg, mesh, "bfloat16" if name == "bfloat16" else "float32", read_log=log)
            same = all(np.asarray(a).tobytes() == np.asarray(b).tobytes()
                       for a, b in zip(jax.tree.leaves(sp), jax.tree.leaves(single)))
            placed = all(a.sharding == b for a, b in zip(jax.tree.leaves(sp),
                                                         jax.tree.leaves(S.param_shardings(sp, cfg, mesh))))
            bank = "layers.1.mixer.experts.up_proj" + (".weight" if name == "nvfp4" else "")
            reads = [idx for p, idx in log if p == bank]
            experts_per_read = sorted({len(range(*idx[0].indices(cfg.n_routed_experts))) for idx in reads})
            out = np.asarray(forward_jit(sp, cfg, ids, mesh=mesh), np.float32)
            ref = np.asarray(forward_jit(single, cfg, ids), np.float32)
            res["load"][f"{name}-{'x'.join(map(str, shape))}"] = {
                "equal_to_single_device": same, "placed_as_rules": placed, "bank_reads": len(reads),
                "experts_per_read": experts_per_read, "forward_max_abs": float(np.abs(out - ref).max())}
    return res


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
