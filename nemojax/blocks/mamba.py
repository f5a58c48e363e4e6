"""Mamba2 mixer (``M`` layers): in_proj -> causal depthwise conv -> selective SSM (chunked SSD) -> gated
grouped RMSNorm -> out_proj. Shapes: B batch, T time, nh heads, P head dim, G groups, N state, C conv channels.

The SSM runs in fp32 and is never clamped unless config.json gives a ``time_step_limit``.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ..config import Config
from ..ops import dynamic_slice, linear
from .base import BlockInput, BlockKind, Normal, Spec, near_one, register

__all__ = ["mamba_mixer", "ssd_chunked", "ssd_step", "gated_rms_norm", "causal_conv", "MAMBA"]


def gated_rms_norm(y: jax.Array, z: jax.Array, w: jax.Array, n_groups: int, eps: float, dtype) -> jax.Array:
    """``rmsnorm_per_group(y * silu(z)) * w``. y, z: [..., d_in]; normalised in ``n_groups`` groups, fp32."""
    g = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
    shp = g.shape
    g = g.reshape(*shp[:-1], n_groups, shp[-1] // n_groups)
    g = g * jax.lax.rsqrt(jnp.mean(g * g, axis=-1, keepdims=True) + eps)
    return w.astype(dtype) * g.reshape(shp).astype(dtype)


def causal_conv(xbc: jax.Array, window: jax.Array, w: jax.Array, bias, mask=None) -> tuple[jax.Array, jax.Array]:
    """Depthwise causal conv + SiLU, in fp32.

    xbc [B, T, C] (new inputs), window [B, K-1, C] (previous inputs, zeros at the start), w [C, K], mask [B, T]
    (1 = real input) or None. Returns (u [B, T, C] fp32, new window [B, K-1, C]): the K-1 inputs up to each row's
    last real one (the last K-1 inputs for left pads; for right pads those before the pads; a row without real
    inputs keeps its window).
    """
    K = w.shape[1]
    T = xbc.shape[1]
    cat = jnp.concatenate([window.astype(xbc.dtype), xbc], axis=1)  # [B, T+K-1, C]
    xp = cat.astype(jnp.float32)
    wf = w.astype(jnp.float32)
    acc = sum(xp[:, j:j + T, :] * wf[:, j] for j in range(K))
    if bias is not None:
        acc = acc + bias.astype(jnp.float32)
    if K == 1:
        new_window = window
    elif mask is None:
        new_window = cat[:, T:, :]
    else:  # the window ends at each row's last real input: slice cat at (last real index + 1)
        end = jnp.max(jnp.arange(1, T + 1) * mask.astype(jnp.int32), axis=1)  # [B]; 0 without real inputs
        new_window = jax.vmap(lambda c, e: dynamic_slice(c, e, K - 1, axis=0))(cat, end)
    return jax.nn.silu(acc), new_window.astype(window.dtype)


def ssd_chunked(x, dt, A, B, C, chunk: int, init_state=None):
    """Chunked SSD (Mamba2) scan, fp32.

    x [b, T, nh, P], dt [b, T, nh] (already softplus'ed), A [nh] (negative), B, C [b, T, G, N],
    init_state [b, nh, P, N] or None. Returns (y [b, T, nh, P] without the D skip, final state).
    Recurrence: S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T ; y_t = S_t C_t.
    Padded positions (to a multiple of ``chunk``) have dt = 0: they neither decay nor write the state.
    """
    b, T, nh, P = x.shape
    G, N = B.shape[2], B.shape[3]
    r = nh // G
    Q = min(chunk, T)
    nc = -(-T // Q)
    pad = nc * Q - T
    f32 = jnp.float32
    x, dt, B, C = (a.astype(f32) for a in (x, dt, B, C))
    if pad:
        padw = lambda a: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))  # noqa: E731
        x, dt, B, C = padw(x), padw(dt), padw(B), padw(C)
    # chunk-major for the scan: [nc, b, Q, ...]; heads split into (G, r)
    xs = (x * dt[..., None]).reshape(b, nc, Q, G, r, P).transpose(1, 0, 2, 3, 4, 5)
    a = (dt * A.astype(f32)).reshape(b, nc, Q, G, r).transpose(1, 0, 2, 3, 4)
    Bs = B.reshape(b, nc, Q, G, N).transpose(1, 0, 2, 3, 4)
    Cs = C.reshape(b, nc, Q, G, N).transpose(1, 0, 2, 3, 4)
    S0 = (jnp.zeros((b, nh, P, N), f32) if init_state is None else init_state.astype(f32)).reshape(b, G, r, P, N)
    causal = jnp.tril(jnp.ones((Q, Q), bool))

    def step(S, inp):
        xdt, ac, Bc, Cc = inp  # [b,Q,G,r,P], [b,Q,G,r], [b,Q,G,N], [b,Q,G,N]
        cum = jnp.cumsum(ac, axis=1)  # [b,Q,G,r]
        seg = cum[:, :, None] - cum[:, None, :]  # [b,l,s,G,r]
        L = jnp.exp(jnp.where(causal[None, :, :, None, None], seg, -jnp.inf))
        CB = jnp.einsum("blgn,bsgn->blsg", Cc, Bc)
        y = jnp.einsum("blsg,blsgr,bsgrp->blgrp", CB, L, xdt)
        y = y + jnp.einsum("blgn,bgrpn->blgrp", Cc, S) * jnp.exp(cum)[..., None]
        last = cum[:, -1]  # [b,G,r]
        to_end = jnp.exp(last[:, None] - cum)  # [b,Q,G,r]
        S = S * jnp.exp(last)[..., None, None] + jnp.einsum("bsgn,bsgr,bsgrp->bgrpn", Bc, to_end, xdt)
        return S, y

    S, ys = jax.lax.scan(step, S0, (xs, a, Bs, Cs))
    y = ys.transpose(1, 0, 2, 3, 4, 5).reshape(b, nc * Q, nh, P)[:, :T]
    return y, S.reshape(b, nh, P, N)


def ssd_step(state, x, dt, A, B, C):
    """One recurrence step. state [b, nh, P, N] fp32, x [b, nh, P], dt [b, nh], B, C [b, G, N].
    Returns (y [b, nh, P] without the D skip, new state)."""
    b, nh, P = x.shape
    G = B.shape[1]
    r = nh // G
    f32 = jnp.float32
    Bh = jnp.repeat(B.astype(f32), r, axis=1)  # head h uses group h // r
    Ch = jnp.repeat(C.astype(f32), r, axis=1)
    dA = jnp.exp(dt * A)[..., None, None]
    state = state * dA + (dt[..., None] * x.astype(f32))[..., None] * Bh[:, :, None, :]
    y = jnp.einsum("bhpn,bhn->bhp", state, Ch)
    return y, state


def mamba_mixer(p: dict, cfg: Config, x: jax.Array, mask=None, state=None):
    """Mamba2 mixer over a sequence.

    p: the layer's mixer params; x [B, T, H] (already block-normed); mask [B, T] (1 = token, 0 = pad; pads on
    the left or on the right) or None; state: None or {"conv": window [B, K-1, C], "ssm": [B, nh, P, N] fp32} to
    continue from. Returns (out [B, T, H], {"conv", "ssm"} final state). Pads are zeroed and get dt = 0, so they
    do not touch the SSM state (an identity step); the conv window ends at each row's last real token.
    """
    Bsz, T, _ = x.shape
    nh, P, G, N, K = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.n_groups, cfg.ssm_state_size, cfg.conv_kernel
    d_in, Cdim = cfg.mamba_d_inner, cfg.mamba_conv_dim
    dtype = x.dtype
    if mask is not None:
        x = x * mask[..., None].astype(dtype)
    zxbcdt = linear(x, p["in_proj"])
    z, xbc, dt_raw = jnp.split(zxbcdt, [d_in, d_in + Cdim], axis=-1)
    if state is None:
        window = jnp.zeros((Bsz, K - 1, Cdim), dtype)
        ssm0 = None
    else:
        window, ssm0 = state["conv"], state["ssm"]
    u, new_window = causal_conv(xbc, window, p["conv1d"], p.get("conv1d_bias"), mask)
    dt = jax.nn.softplus(dt_raw.astype(jnp.float32) + p["dt_bias"].astype(jnp.float32))  # [B, T, nh]
    if cfg.time_step_limit is not None:
        dt = jnp.clip(dt, *cfg.time_step_limit)
    if mask is not None:
        m = mask.astype(jnp.float32)
        u = u * m[..., None]
        dt = dt * m[..., None]
    xs, Bm, Cm = jnp.split(u, [d_in, d_in + G * N], axis=-1)
    xs = xs.reshape(Bsz, T, nh, P)
    A = -jnp.exp(p["A_log"].astype(jnp.float32))
    if T == 1 and ssm0 is not None:  # decode: one recurrence step
        y, ssm = ssd_step(ssm0.astype(jnp.float32), xs[:, 0], dt[:, 0], A, Bm.reshape(Bsz, G, N),
                          Cm.reshape(Bsz, G, N))
        y = y[:, None]
    else:
        y, ssm = ssd_chunked(xs, dt, A, Bm.reshape(Bsz, T, G, N), Cm.reshape(Bsz, T, G, N), cfg.chunk_size, ssm0)
    y = y + p["D"].astype(jnp.float32)[:, None] * xs
    g = gated_rms_norm(y.reshape(Bsz, T, d_in), z, p["norm"], G, cfg.layer_norm_epsilon, dtype)
    return linear(g, p["out_proj"]), {"conv": new_window, "ssm": ssm}


# ------------------------------------------------------------------------------------------------ the block kind
def _a_log_init(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    """A = -exp(A_log) with -A uniform in [1, 16]."""
    return np.log(rng.uniform(1.0, 16.0, shape))


def _dt_bias_init(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    """softplus(dt_bias) log-uniform in [1e-3, 0.1]."""
    dt = np.exp(rng.uniform(math.log(1e-3), math.log(0.1), shape))
    return dt + np.log(-np.expm1(-dt))  # inverse softplus


def _params(cfg: Config, p: str) -> dict:
    """in_proj [2*d_in+2*G*N+nh, H], conv1d [C, K] ([C, 1, K] stored), conv1d_bias [C], dt_bias [nh], A_log [nh]
    (fp32), D [nh] (fp32), norm [d_in], out_proj [H, d_in]   (C = d_in + 2*G*N)."""
    C, K = cfg.mamba_conv_dim, cfg.conv_kernel
    nh, d_in, H = cfg.mamba_num_heads, cfg.mamba_d_inner, cfg.hidden_size
    m = {
        "in_proj": Spec((cfg.mamba_in_proj_dim, H), ("mamba", "embed"), p + "in_proj.weight"),
        "conv1d": Spec((C, K), ("mamba", None), p + "conv1d.weight", ckpt_shape=(C, 1, K), init=Normal(0.5)),
        "dt_bias": Spec((nh,), ("mamba",), p + "dt_bias", init=_dt_bias_init),
        "A_log": Spec((nh,), ("mamba",), p + "A_log", fp32=True, init=_a_log_init),
        "D": Spec((nh,), ("mamba",), p + "D", fp32=True, init=Normal(0.5, mean=1.0)),
        "norm": Spec((d_in,), ("mamba",), p + "norm.weight", init=near_one),
        "out_proj": Spec((H, d_in), ("embed", "mamba"), p + "out_proj.weight"),
    }
    if cfg.use_conv_bias:
        m["conv1d_bias"] = Spec((C,), ("mamba",), p + "conv1d.bias", init=Normal(0.1))
    return m


def _init_state(cfg: Config, batch: int, max_len: int, dtype, kv_dtype) -> dict:
    """``conv`` [B, K-1, C] (model dtype: the last K-1 conv inputs), ``ssm`` [B, nh, P, N] (always float32)."""
    return {"conv": jnp.zeros((batch, cfg.conv_kernel - 1, cfg.mamba_conv_dim), dtype),
            "ssm": jnp.zeros((batch, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size), jnp.float32)}


def _mixer(p: dict, cfg: Config, x: jax.Array, inp: BlockInput):
    return mamba_mixer(p, cfg, x, inp.mask, inp.state)


MAMBA = register(BlockKind(
    char="M", type_name="linear_attention", params=_params, mixer=_mixer, init_state=_init_state,
    state_axes={"conv": ("batch", None, "mamba"), "ssm": ("batch", "mamba", None, None)},
    linears=("in_proj", "out_proj")))
