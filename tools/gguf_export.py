#!/usr/bin/env python
"""Write a float Nemotron-H MoE checkpoint folder (original ``backbone.*`` naming, one tensor per expert) as a
GGUF file that llama.cpp runs (architecture ``nemotron_h_moe``), with the ``gguf`` package; ``--outtype q8_0 /
q4_0`` then runs llama.cpp's own quantizer (``llama_model_quantize`` of llama-cpp-python, as ``llama-quantize``).

It exists so that ``tools/bench_generate.py --llamacpp`` can run llama.cpp on the benchmark's random weights:
the vocabulary written is a placeholder of the config's size (the benchmark feeds token ids), not a tokenizer.
The tensor transforms are the ones llama.cpp's loader expects of this architecture: ``A = -exp(A_log)`` and
``D`` as [heads, 1], the conv weight squeezed to [channels, kernel], the gated norm's weight as [groups,
d_inner / groups], each layer's experts stacked into one [E, out, in] bank; per-layer ``head_count_kv`` and
``feed_forward_length`` arrays tell the Mamba, attention and MoE layers apart (0 where a layer has none).

    python tools/gguf_export.py CKPT_DIR OUT.gguf [--outtype f32|bf16|q8_0|q4_0]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

ARCH = "nemotron_h_moe"
OUTTYPES = ("f32", "bf16", "q8_0", "q4_0")


def _stay_f32(gguf_name: str, ndim: int) -> bool:
    """Tensors llama.cpp keeps in fp32 whatever the file type: vectors, the conv, A / D, the router."""
    return ndim < 2 or any(s in gguf_name for s in ("ssm_conv1d", "ssm_a", "ssm_d", "ssm_norm", "ffn_gate_inp"))


def write_float_gguf(folder: str, out: str, outtype: str = "f32") -> None:
    """Checkpoint folder -> ``out`` (F32 or BF16 weights)."""
    import gguf

    from nemojax.checkpoint.source import Checkpoint

    with open(os.path.join(folder, "config.json")) as f:
        hp = json.load(f)
    pattern = hp["hybrid_override_pattern"]
    if "-" in pattern:
        raise ValueError(f"{folder}: pattern {pattern!r} has dense MLP layers ('-'), which llama.cpp's "
                         f"{ARCH} architecture does not run")
    ck = Checkpoint(folder)
    if ck.naming != "original":
        raise ValueError(f"{folder}: expected original backbone.* naming, found {ck.naming}")
    L, E = len(pattern), hp["n_routed_experts"]
    nmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.NEMOTRON_H_MOE, L)
    w = gguf.GGUFWriter(out, ARCH)
    w.add_name("nemojax-benchmark-random")
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if outtype == "f32" else gguf.LlamaFileType.MOSTLY_BF16)
    w.add_context_length(hp.get("max_position_embeddings", 4096))
    w.add_embedding_length(hp["hidden_size"])
    w.add_block_count(L)
    w.add_feed_forward_length([hp["moe_intermediate_size"] if c == "E" else 0 for c in pattern])
    w.add_head_count(hp["num_attention_heads"])
    w.add_head_count_kv([hp["num_key_value_heads"] if c == "*" else 0 for c in pattern])
    w.add_key_length(hp["head_dim"])
    w.add_value_length(hp["head_dim"])
    w.add_layer_norm_eps(hp["layer_norm_epsilon"])
    w.add_layer_norm_rms_eps(hp["layer_norm_epsilon"])
    w.add_expert_count(E)
    w.add_expert_used_count(hp["num_experts_per_tok"])
    w.add_expert_feed_forward_length(hp["moe_intermediate_size"])
    w.add_expert_shared_feed_forward_length(hp["moe_shared_expert_intermediate_size"])
    w.add_expert_shared_count(hp.get("n_shared_experts", 1))
    w.add_expert_weights_norm(bool(hp["norm_topk_prob"]))
    w.add_expert_weights_scale(float(hp["routed_scaling_factor"]))
    w.add_expert_group_count(hp.get("n_group", 1))
    d_inner = hp["mamba_num_heads"] * hp["mamba_head_dim"]
    w.add_ssm_conv_kernel(hp["conv_kernel"])
    w.add_ssm_state_size(hp["ssm_state_size"])
    w.add_ssm_group_count(hp["n_groups"])
    w.add_ssm_inner_size(d_inner)
    w.add_ssm_time_step_rank(hp["mamba_num_heads"])
    # a placeholder vocabulary (SentencePiece-type, so no merges are needed): ids in, ids out
    V = hp["vocab_size"]
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>" for i in range(V)])
    w.add_token_scores([0.0] * V)
    w.add_token_types([gguf.TokenType.CONTROL if i < 3 else gguf.TokenType.NORMAL for i in range(V)])
    w.add_bos_token_id(hp.get("bos_token_id", 1))
    w.add_eos_token_id(hp.get("eos_token_id", 2))
    w.add_unk_token_id(0)

    def add(hf_name: str, a: np.ndarray) -> None:
        name = nmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"{folder}: no GGUF name for tensor {hf_name}")
        a = np.ascontiguousarray(a.astype(np.float32))
        if outtype == "bf16" and not _stay_f32(name, a.ndim):
            # bytes in, so the writer derives the element shape from the byte shape
            w.add_tensor(name, gguf.quants.quantize(a, gguf.GGMLQuantizationType.BF16),
                         raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            w.add_tensor(name, a)

    for n in ck.names:
        parts = n.split(".")
        if ".mixer.experts." in n:
            if parts[5] != "0":  # every expert is written with expert 0, as one bank
                continue
            banks = [ck.get(n.replace(".experts.0.", f".experts.{e}.")) for e in range(E)]
            add(f"model.layers.{parts[2]}.mlp.experts.{parts[6]}.weight", np.stack(banks))
            continue
        a = ck.get(n)
        if n.endswith("mixer.A_log"):
            a = -np.exp(a.astype(np.float32)).reshape(-1, 1)
        elif n.endswith("mixer.D"):
            a = a.reshape(-1, 1)
        elif n.endswith("mixer.conv1d.weight"):
            a = a.reshape(a.shape[0], -1)
        elif n.endswith("mixer.norm.weight"):
            a = a.reshape(hp["n_groups"], -1)
        elif n.endswith("mixer.dt_bias"):
            n = n.replace("dt_bias", "dt.bias")
        elif n.endswith("gate.e_score_correction_bias"):
            n = n.replace("e_score_correction_bias", "e_score_correction.bias")
        add(n, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize(src: str, out: str, outtype: str, threads: int = 1) -> None:
    """An F32 GGUF ``src`` -> ``out`` in ``outtype`` (q8_0 / q4_0) by llama.cpp's quantizer, with its default
    tensor choices (as ``llama-quantize``)."""
    import llama_cpp

    qp = llama_cpp.llama_model_quantize_default_params()
    qp.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[outtype]
    qp.nthread = threads
    rc = llama_cpp.llama_model_quantize(src.encode(), out.encode(), qp)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {out}, {outtype}) returned {rc}")


def export(folder: str, out: str, outtype: str = "f32", threads: int = 1) -> str:
    """``folder`` -> ``out`` in ``outtype``; the quantized types through a temporary F32 file and
    :func:`quantize`. Returns ``out``."""
    if outtype not in OUTTYPES:
        raise ValueError(f"--outtype: {outtype!r} is not one of {', '.join(OUTTYPES)}")
    if outtype in ("f32", "bf16"):
        write_float_gguf(folder, out, outtype)
        return out
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(out))) as tmp:
        src = os.path.join(tmp, "f32.gguf")
        write_float_gguf(folder, src, "f32")
        quantize(src, out, outtype, threads)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", help="checkpoint folder (float weights, original naming)")
    ap.add_argument("out", help="GGUF file to write")
    ap.add_argument("--outtype", choices=OUTTYPES, default="f32")
    ap.add_argument("--threads", type=int, default=1, help="quantizer threads")
    args = ap.parse_args(argv)
    try:
        export(args.folder, args.out, args.outtype, args.threads)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
