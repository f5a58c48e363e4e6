"""GQA self-attention (``*`` layers) with no positional encoding (NoPE), causal, fp32 softmax."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ..config import Config
from ..ops import linear
from ..formats.kv import FP8, fp8_fake_quant, fp8_load, fp8_store
from .base import BlockInput, BlockKind, Spec, register, write_at

__all__ = ["attention_mixer", "attend", "ATTENTION"]

_NEG = -1e30  # finite: a fully masked row (a left pad) gives a uniform softmax, never NaN


def attend(q, k, v, allowed) -> jax.Array:
    """q [B, Tq, nq, Dh], k, v [B, Tk, nkv, Dh], allowed [B, Tq, Tk] bool -> [B, Tq, nq, Dh].

    Query head i uses KV head i // (nq / nkv). The r = nq / nkv query heads of a KV head are laid out as one
    [r*Tq, Dh] matrix, so each KV head is one plain matmul (no transposes of the score matrix).
    """
    Bsz, Tq, nq, Dh = q.shape
    Tk, nkv = k.shape[1], k.shape[2]
    r = nq // nkv
    qg = q.reshape(Bsz, Tq, nkv, r, Dh).transpose(0, 2, 3, 1, 4).reshape(Bsz, nkv, r * Tq, Dh)
    kt = k.astype(q.dtype).transpose(0, 2, 1, 3)  # [B, nkv, Tk, Dh]
    vt = v.astype(q.dtype).transpose(0, 2, 1, 3)
    s = jnp.einsum("bkqd,bksd->bkqs", qg, kt, preferred_element_type=jnp.float32) * (1.0 / math.sqrt(Dh))
    mask = jnp.broadcast_to(allowed[:, None, None], (Bsz, 1, r, Tq, Tk)).reshape(Bsz, 1, r * Tq, Tk)
    s = jnp.where(mask, s, _NEG)
    pr = jax.nn.softmax(s, axis=-1).astype(q.dtype)
    o = jnp.einsum("bkqs,bksd->bkqd", pr, vt, preferred_element_type=jnp.float32).astype(q.dtype)
    return o.reshape(Bsz, nkv, r, Tq, Dh).transpose(0, 3, 1, 2, 4).reshape(Bsz, Tq, nq, Dh)


def attention_mixer(p: dict, cfg: Config, x: jax.Array, mask=None, kv=None, pos=None, kv_mask=None):
    """Self-attention over x [B, T, H] (block-normed).

    Without a cache: mask [B, T] (1 = token) or None; returns (out [B, T, H], {"k", "v"} [B, T, nkv, Dh]).
    With a cache: kv = {"k", "v"} [B, S, nkv, Dh], the new keys/values are written at ``pos`` ([]: the batch's
    position, or [B]: each row's); query t of row b sees slot s iff s <= pos(b) + t and kv_mask[b, s]; kv_mask
    [B, S] marks real tokens (already including the new ones). Returns (out, updated kv).
    """
    Bsz, T, _ = x.shape
    nq, nkv, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = linear(x, p["q_proj"]).reshape(Bsz, T, nq, Dh)
    k = linear(x, p["k_proj"]).reshape(Bsz, T, nkv, Dh)
    v = linear(x, p["v_proj"]).reshape(Bsz, T, nkv, Dh)
    fp8 = "k_scale" in p  # FP8 KV cache: K and V pass through e4m3 with per-tensor scales
    if kv is None:
        if fp8:
            k, v = fp8_fake_quant(k, p["k_scale"]), fp8_fake_quant(v, p["v_scale"])
        allowed = jnp.tril(jnp.ones((T, T), bool))[None]
        if mask is not None:
            allowed = allowed & mask.astype(bool)[:, None, :]
        o = attend(q, k, v, jnp.broadcast_to(allowed, (Bsz, T, T)))
        return linear(o.reshape(Bsz, T, nq * Dh), p["o_proj"]), {"k": k, "v": v}
    if kv["k"].dtype == FP8:
        if not fp8:
            raise ValueError("an FP8 KV cache needs k_scale / v_scale in the attention parameters (calibrate)")
        k, v = fp8_store(k, p["k_scale"]), fp8_store(v, p["v_scale"])
    elif fp8:
        k, v = fp8_fake_quant(k, p["k_scale"]), fp8_fake_quant(v, p["v_scale"])
    kc = write_at(kv["k"], k.astype(kv["k"].dtype), pos)
    vc = write_at(kv["v"], v.astype(kv["v"].dtype), pos)
    S = kc.shape[1]
    qpos = jnp.broadcast_to(jnp.reshape(pos, (-1, 1)) + jnp.arange(T), (Bsz, T))  # [B, T]
    allowed = (jnp.arange(S)[None, None, :] <= qpos[:, :, None]) & kv_mask.astype(bool)[:, None, :]
    kr, vr = kc, vc
    if kc.dtype == FP8:
        kr, vr = fp8_load(kc, p["k_scale"], q.dtype), fp8_load(vc, p["v_scale"], q.dtype)
    o = attend(q, kr, vr, allowed)
    return linear(o.reshape(Bsz, T, nq * Dh), p["o_proj"]), {"k": kc, "v": vc}


# ------------------------------------------------------------------------------------------------ the block kind
def _params(cfg: Config, p: str) -> dict:
    """q_proj [nq*Dh, H], k_proj [nkv*Dh, H], v_proj [nkv*Dh, H], o_proj [H, nq*Dh]."""
    H, Dh = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * Dh, cfg.num_key_value_heads * Dh
    return {"q_proj": Spec((q, H), ("heads", "embed"), p + "q_proj.weight"),
            "k_proj": Spec((kv, H), ("heads", "embed"), p + "k_proj.weight"),
            "v_proj": Spec((kv, H), ("heads", "embed"), p + "v_proj.weight"),
            "o_proj": Spec((H, q), ("embed", "heads"), p + "o_proj.weight")}


def _optional(cfg: Config, p: str) -> dict:
    """The FP8 KV cache's per-tensor scales (``nemojax.quant.apply`` with calibration, or FP8 checkpoints)."""
    return {"k_scale": Spec((), (), p + "k_proj.k_scale", fp32=True),
            "v_scale": Spec((), (), p + "v_proj.v_scale", fp32=True)}


def _init_state(cfg: Config, batch: int, max_len: int, dtype, kv_dtype) -> dict:
    """``k``, ``v`` [B, S, nkv, Dh] in ``kv_dtype``."""
    shp = (batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    return {"k": jnp.zeros(shp, kv_dtype), "v": jnp.zeros(shp, kv_dtype)}


def _mixer(p: dict, cfg: Config, x: jax.Array, inp: BlockInput):
    return attention_mixer(p, cfg, x, inp.mask, inp.state, inp.pos, inp.kv_mask)


ATTENTION = register(BlockKind(
    char="*", type_name="full_attention", params=_params, mixer=_mixer, init_state=_init_state,
    state_axes={"k": ("batch", None, "heads", None), "v": ("batch", None, "heads", None)},
    linears=("q_proj", "k_proj", "v_proj", "o_proj"), optional=_optional, positional=("k", "v")))
