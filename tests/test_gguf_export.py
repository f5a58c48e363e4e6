"""tools/gguf_export.py: a float checkpoint as the GGUF file llama.cpp's nemotron_h_moe loader expects, read
back with the official ``gguf`` reader and checked tensor by tensor against the safetensors source."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from .conftest import TINY

gguf = pytest.importorskip("gguf")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import gguf_export  # noqa: E402

MOE_ONLY = dict(TINY, hybrid_override_pattern="MEM*EMM*E")  # llama.cpp's MoE architecture has no dense MLP


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from nemojax import Config
    from nemojax.checkpoint import save_params
    from nemojax.params import init_params_numpy

    folder = str(tmp_path_factory.mktemp("gguf_src"))
    cfg = Config.from_dict(MOE_ONLY)
    save_params(init_params_numpy(cfg, seed=3, dtype="float32"), cfg, folder, naming="original")
    return folder


def _read(path):
    r = gguf.GGUFReader(path)
    tensors = {t.name: t for t in r.tensors}
    fields = {k: f for k, f in r.fields.items()}
    return tensors, fields


def _array(t) -> np.ndarray:
    """A reader tensor as float32 in numpy order (the reverse of ggml's dims)."""
    a = gguf.quants.dequantize(t.data, t.tensor_type)
    return np.asarray(a, np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))


def _field(fields, key):
    f = fields[key]
    vals = [f.parts[i].tolist() for i in f.data]
    return [v[0] if isinstance(v, list) and len(v) == 1 else v for v in vals]


@pytest.mark.parametrize("outtype", ["f32", "bf16"])
def test_tensors_and_metadata(ckpt, tmp_path, outtype):
    from safetensors.numpy import load_file

    out = str(tmp_path / f"m-{outtype}.gguf")
    gguf_export.export(ckpt, out, outtype)
    src = load_file(os.path.join(ckpt, "model.safetensors"))
    tensors, fields = _read(out)
    cfg = MOE_ONLY
    pattern, E = cfg["hybrid_override_pattern"], cfg["n_routed_experts"]
    tol = 0.0 if outtype == "f32" else 2.0 ** -8  # bf16: 8 bits of mantissa

    def close(got, want, exact=False):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0 if exact else tol, atol=0 if exact else tol * 1e-2)

    close(_array(tensors["token_embd.weight"]), src["backbone.embeddings.weight"])
    close(_array(tensors["output.weight"]), src["lm_head.weight"])
    close(_array(tensors["output_norm.weight"]), src["backbone.norm_f.weight"], exact=True)
    for i, kind in enumerate(pattern):
        p = f"backbone.layers.{i}."
        close(_array(tensors[f"blk.{i}.attn_norm.weight"]), src[p + "norm.weight"], exact=True)
        if kind == "M":
            a_log = src[p + "mixer.A_log"]
            close(_array(tensors[f"blk.{i}.ssm_a"]), (-np.exp(a_log)).reshape(-1, 1), exact=True)
            close(_array(tensors[f"blk.{i}.ssm_d"]), src[p + "mixer.D"].reshape(-1, 1), exact=True)
            conv = src[p + "mixer.conv1d.weight"]
            close(_array(tensors[f"blk.{i}.ssm_conv1d.weight"]), conv.reshape(conv.shape[0], -1), exact=True)
            close(_array(tensors[f"blk.{i}.ssm_dt.bias"]), src[p + "mixer.dt_bias"], exact=True)
            close(_array(tensors[f"blk.{i}.ssm_norm.weight"]),
                  src[p + "mixer.norm.weight"].reshape(cfg["n_groups"], -1), exact=True)
            close(_array(tensors[f"blk.{i}.ssm_in.weight"]), src[p + "mixer.in_proj.weight"])
            close(_array(tensors[f"blk.{i}.ssm_out.weight"]), src[p + "mixer.out_proj.weight"])
        elif kind == "*":
            for a, b in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj"), ("attn_output", "o_proj")):
                close(_array(tensors[f"blk.{i}.{a}.weight"]), src[p + f"mixer.{b}.weight"])
        else:
            close(_array(tensors[f"blk.{i}.ffn_gate_inp.weight"]), src[p + "mixer.gate.weight"], exact=True)
            close(_array(tensors[f"blk.{i}.exp_probs_b.bias"]), src[p + "mixer.gate.e_score_correction_bias"],
                  exact=True)
            for proj in ("up_proj", "down_proj"):
                bank = np.stack([src[p + f"mixer.experts.{e}.{proj}.weight"] for e in range(E)])
                close(_array(tensors[f"blk.{i}.ffn_{proj.split('_')[0]}_exps.weight"]), bank)
                close(_array(tensors[f"blk.{i}.ffn_{proj.split('_')[0]}_shexp.weight"]),
                      src[p + f"mixer.shared_experts.{proj}.weight"])
    n_src = len([k for k in src if ".experts." not in k]) + 2 * pattern.count("E")
    assert len(tensors) == n_src  # every tensor written once, the experts as one bank per projection
    arch = "nemotron_h_moe"
    assert bytes(fields["general.architecture"].parts[-1]).decode() == arch
    assert _field(fields, f"{arch}.attention.head_count_kv") == [cfg["num_key_value_heads"] if c == "*" else 0 for c in pattern]
    assert _field(fields, f"{arch}.feed_forward_length") == [cfg["moe_intermediate_size"] if c == "E" else 0
                                                               for c in pattern]
    assert _field(fields, f"{arch}.ssm.inner_size") == [cfg["mamba_num_heads"] * cfg["mamba_head_dim"]]
    assert _field(fields, f"{arch}.expert_used_count") == [cfg["num_experts_per_tok"]]
    assert len(_field(fields, "tokenizer.ggml.tokens")) == cfg["vocab_size"]


def test_refuses_what_llama_cpp_cannot_run(tmp_path):
    from nemojax import Config
    from nemojax.checkpoint import save_params
    from nemojax.params import init_params_numpy

    folder = str(tmp_path / "dense")
    cfg = Config.from_dict(TINY)  # has '-' (dense MLP) layers
    save_params(init_params_numpy(cfg, seed=1, dtype="float32"), cfg, folder, naming="original")
    with pytest.raises(ValueError, match="dense MLP"):
        gguf_export.export(folder, str(tmp_path / "x.gguf"))
    with pytest.raises(ValueError, match="outtype"):
        gguf_export.export(folder, str(tmp_path / "x.gguf"), "q2_k")
    assert not (tmp_path / "x.gguf").exists()  # refused before anything is written
