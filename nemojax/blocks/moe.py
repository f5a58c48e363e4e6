"""Mixture of experts (``E`` layers): sigmoid router with score-correction bias and group-limited top-k,
squared-ReLU routed experts (non-gated), plus an unweighted shared expert.

How the routed experts run is a strategy the MoE block is given (:class:`RoutedExperts`): :data:`GROUPED`
(``grouped_experts``: routed work proportional to the tokens each expert receives, not to the number of experts;
assignments sorted by expert and processed in fixed-size row blocks, one expert per block), :data:`DENSE` (every
expert on every token; differentiable, for training), :class:`ExpertParallel` (grouped under ``shard_map`` over a
``nemojax.sharding`` mesh), or host-driven strategies such as ``nemojax.experts.offload.OffloadedExperts``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from .. import kernels
from ..config import Config
from ..formats import is_quantized
from ..ops import dynamic_index, linear, relu2
from .base import BlockInput, BlockKind, Normal, Spec, register
from .mlp import mlp, mlp_params

__all__ = ["route", "grouped_experts", "dense_experts", "moe_mixer", "moe_route", "moe_output", "block_rows",
           "expert_parallel_experts", "routing_matrix", "dense_hidden", "dense_output", "RoutedExperts", "Grouped",
           "Dense", "ExpertParallel", "GROUPED", "DENSE", "resident_experts", "MOE"]


def route(gate_w, bias, cfg: Config, x: jax.Array):
    """Router, all in fp32. x [T, H] -> (weights [T, k] fp32, expert ids [T, k] int32).

    Selection uses ``sigmoid(logits) + e_score_correction_bias``; the weights come from the unbiased sigmoid,
    renormalised (``norm_topk_prob``) and scaled by ``routed_scaling_factor``.
    """
    logits = jnp.dot(x.astype(jnp.float32), gate_w.astype(jnp.float32).T, precision=jax.lax.Precision.HIGHEST)
    s = jax.nn.sigmoid(logits)
    choice = s + bias.astype(jnp.float32)
    E, G = cfg.n_routed_experts, cfg.n_group
    if G > 1:
        grouped = choice.reshape(-1, G, E // G)
        group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [T, G]
        _, keep = jax.lax.top_k(group_score, cfg.topk_group)
        gmask = jnp.zeros(group_score.shape, bool).at[jnp.arange(x.shape[0])[:, None], keep].set(True)
        choice = jnp.where(jnp.repeat(gmask, E // G, axis=1), choice, -jnp.inf)
    _, idx = jax.lax.top_k(choice, cfg.num_experts_per_tok)
    w = jnp.take_along_axis(s, idx, axis=1)
    if cfg.norm_topk_prob:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return w * cfg.routed_scaling_factor, idx.astype(jnp.int32)


def block_rows(n_assign: int, n_experts: int) -> int:
    """Rows per block: a power of two at or above 3/4 of the expected rows per *used* expert, in [1, 128].

    Each block copies its expert's weights once (a bank slice), so at decode sizes, where the copy costs far more
    than the few rows' arithmetic, one block should hold all of an expert's rows: with ``A`` assignments over
    ``E`` experts about ``E (1 - (1 - 1/E)^A)`` experts are used."""
    E = max(1, n_experts)
    used = max(1.0, E * (1.0 - (1.0 - 1.0 / E) ** n_assign)) if E > 1 else 1.0
    mean = n_assign / used
    b = 1
    while b < 0.75 * mean and b < 128:
        b *= 2
    return b


def _take_expert(w, e):
    """Expert ``e`` of a stacked weight (a plain array or a quantized node)."""
    return jax.tree.map(lambda a: dynamic_index(a, e, 0), w)


def grouped_experts(x: jax.Array, weights, idx, up, down, block: int | None = None) -> jax.Array:
    """``sum_k weights[t,k] * f_{idx[t,k]}(x[t])`` with ``f_e = down_e relu(up_e x)^2``.

    x [T, H]; weights, idx [T, k]; up [E, F, H]; down [E, H, F]. Returns [T, H] fp32.
    Assignments are sorted by expert; each expert's rows are cut into blocks of ``block`` rows and a
    ``while_loop`` visits only the non-empty blocks, so the cost is O(T*k + E*block) rows, never O(T*E).
    """
    if getattr(up, "backend", "xla") != "xla":  # quant.set_backend: the grouped kernels
        out = kernels.grouped_experts(x, weights, idx, up, down, relu2)
        if out is not None:
            return out
    T, H = x.shape
    k = idx.shape[1]
    E = jax.tree.leaves(up)[0].shape[0]
    A = T * k
    b = block or block_rows(A, E)
    flat_e = idx.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)
    se = flat_e[order]
    tok = (jnp.arange(A, dtype=jnp.int32) // k)[order]
    sw = weights.reshape(-1)[order].astype(jnp.float32)
    counts = jnp.bincount(se, length=E).astype(jnp.int32)
    starts = jnp.cumsum(counts) - counts
    nblk = (counts + b - 1) // b
    blk_end = jnp.cumsum(nblk)
    total = blk_end[-1]
    # a bank's shared input transform (HLWQ's rotated path: the per-128-block Hadamard), once for every expert
    transform = up.input_transform() if is_quantized(up) else None
    xin = transform(x) if transform else x
    # rows padded by one block so a block never reads past the end
    xs = jnp.concatenate([xin[tok], jnp.zeros((b, xin.shape[1]), x.dtype)])
    tok_p = jnp.concatenate([tok, jnp.zeros((b,), jnp.int32)])
    sw_p = jnp.concatenate([sw, jnp.zeros((b,), jnp.float32)])
    lane = jnp.arange(b)

    def body(carry):
        c, out = carry
        e = jnp.searchsorted(blk_end, c, side="right").astype(jnp.int32)
        first_blk = blk_end[e] - nblk[e]
        row0 = starts[e] + (c - first_blk) * b
        valid = lane < (starts[e] + counts[e] - row0)
        xb = jax.lax.dynamic_slice_in_dim(xs, row0, b)
        # the banks pass a barrier with the loop-variant index: XLA then slices them inside the loop instead of
        # hoisting a copy of each whole bank (the raw-bits view of ``ops.dynamic_index``) out of it
        bank_up, bank_down, e = jax.lax.optimization_barrier((up, down, e))
        w_up = _take_expert(bank_up, e)
        h = relu2(kernels.linear_transformed(xb, w_up, x.dtype) if transform else linear(xb, w_up))
        y = linear(h, _take_expert(bank_down, e)).astype(jnp.float32)
        wb = jnp.where(valid, jax.lax.dynamic_slice_in_dim(sw_p, row0, b), 0.0)
        tb = jax.lax.dynamic_slice_in_dim(tok_p, row0, b)
        return c + 1, out.at[tb].add(y * wb[:, None])

    _, out = jax.lax.while_loop(lambda cs: cs[0] < total, body, (jnp.int32(0), jnp.zeros((T, H), jnp.float32)))
    return out


def dense_experts(x: jax.Array, weights, idx, up, down) -> jax.Array:
    """Every expert on every token, combined with the routing weights (zero for unchosen experts).

    Same result as :func:`grouped_experts` at E/k times the cost; differentiable (training tiny models).
    """
    return dense_output(dense_hidden(x, up), down, routing_matrix(weights, idx, up.shape[0]))


def routing_matrix(weights, idx, n_experts: int) -> jax.Array:
    """weights, idx [T, k] -> [T, E] fp32: each token's routing weight per expert (0 where not chosen)."""
    T = idx.shape[0]
    return jnp.zeros((T, n_experts), jnp.float32).at[jnp.arange(T)[:, None], idx].add(weights)


def dense_hidden(x: jax.Array, up) -> jax.Array:
    """x [T, H], up [E, F, H] -> every expert's hidden activations ``relu(up_e x)^2`` [T, E, F]."""
    return relu2(jnp.einsum("th,efh->tef", x, up.astype(x.dtype)))


def dense_output(h: jax.Array, down, comb) -> jax.Array:
    """h [T, E, F], down [E, H, F], comb [T, E] (:func:`routing_matrix`) -> ``sum_e comb[t,e] down_e h[t,e]``
    [T, H] fp32."""
    y = jnp.einsum("tef,ehf->teh", h, down.astype(h.dtype), preferred_element_type=jnp.float32)
    return jnp.einsum("teh,te->th", y, comb)


def expert_parallel_experts(x, weights, idx, up, down, mesh, batch: int) -> jax.Array:
    """:func:`grouped_experts` under ``shard_map``: each device holds ``E / expert`` experts (and a
    ``1 / tensor`` slice of their intermediate channels), computes only the assignments of its experts, and a
    ``psum`` over the split axes adds the parts. Rows are split over ``data`` when it divides the
    batch. Same shapes as :func:`grouped_experts`; the expert bank is never gathered."""
    from jax.sharding import PartitionSpec as P

    from ..sharding import bank_specs, leading_spec, mesh_axis_size

    E = jax.tree.leaves(up)[0].shape[0]
    up_s, down_s = bank_specs(up, down, mesh)
    first = leading_spec(up_s)
    ep = mesh_axis_size(mesh, "expert") if first[0] == "expert" else 1  # E not divisible: bank replicated
    split = tuple(a for a in ("expert", "tensor") if a in tuple(first[:2]))  # axes whose parts must be summed
    rows = "data" if batch % mesh_axis_size(mesh, "data") == 0 else None
    e_local = E // ep

    def local(x, weights, idx, up, down):
        off = jax.lax.axis_index("expert") * e_local if ep > 1 else 0
        li = idx - off
        mine = (li >= 0) & (li < e_local)
        # other devices' assignments get expert id e_local: sorted last and never visited. An expert expects as
        # many rows here as on one device, so the blocks are sized by the whole bank (the products then have
        # the single-device shapes and round alike)
        y = grouped_experts(x, jnp.where(mine, weights, 0.0), jnp.where(mine, li, e_local), up, down,
                            block=block_rows(x.shape[0] * idx.shape[1], E))
        return jax.lax.psum(y, split) if split else y

    return jax.shard_map(local, mesh=mesh, in_specs=(P(rows, None), P(rows, None), P(rows, None), up_s, down_s),
                         out_specs=P(rows, None), check_vma=False)(x, weights, idx, up, down)


class RoutedExperts:
    """How an MoE block runs its routed experts: ``experts(x, weights, idx, bank, layer)`` with x [B, T, H] (the
    block-normed input), weights / idx [B*T, k] (the router's choice), bank the layer's ``{"up_proj",
    "down_proj"}`` (None where the strategy holds the banks itself) and layer the block's index; returns the
    weighted sum of the chosen experts [B*T, H] float32.

    ``host_driven = True`` marks a strategy that decides on the host between layers (it reads the routing):
    ``nemojax.model.forward`` then runs layer by layer, each piece jitted, and calls
    ``after_moe(params, cfg, layer, h)`` after each MoE block; ``nemojax.generate`` runs it with the strategy's own
    ``prefill`` / ``decode`` (same signatures and results as ``nemojax.generate.prefill`` / ``decode``).
    Resident strategies are hashable values, static arguments of the jitted forward."""

    host_driven = False

    def __call__(self, x, weights, idx, bank, layer: int) -> jax.Array:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Grouped(RoutedExperts):
    """:func:`grouped_experts` on the resident bank: work proportional to top-k (inference)."""

    def __call__(self, x, weights, idx, bank, layer):
        return grouped_experts(x.reshape(-1, x.shape[-1]), weights, idx, bank["up_proj"], bank["down_proj"])


@dataclasses.dataclass(frozen=True)
class Dense(RoutedExperts):
    """:func:`dense_experts`: every expert on every token (differentiable, for training)."""

    def __call__(self, x, weights, idx, bank, layer):
        return dense_experts(x.reshape(-1, x.shape[-1]), weights, idx, bank["up_proj"], bank["down_proj"])


@dataclasses.dataclass(frozen=True)
class ExpertParallel(RoutedExperts):
    """:func:`expert_parallel_experts` over ``mesh`` (a ``nemojax.sharding`` mesh the bank is sharded on)."""

    mesh: Any

    def __call__(self, x, weights, idx, bank, layer):
        return expert_parallel_experts(x.reshape(-1, x.shape[-1]), weights, idx, bank["up_proj"], bank["down_proj"],
                                       self.mesh, x.shape[0])


GROUPED, DENSE = Grouped(), Dense()


def resident_experts(cfg: Config, mesh=None) -> RoutedExperts:
    """The default strategy: expert-parallel where ``mesh`` has an expert or tensor axis > 1, else grouped."""
    from ..sharding import expert_parallel

    return ExpertParallel(mesh) if expert_parallel(mesh, cfg.n_routed_experts) else GROUPED


def moe_route(p: dict, cfg: Config, x: jax.Array):
    """x [B, T, H] (block-normed) -> the router's (weights [B*T, k] fp32, expert ids [B*T, k] int32)."""
    return route(p["gate"], p["e_score_correction_bias"], cfg, x.reshape(-1, x.shape[-1]))


def moe_output(p: dict, x: jax.Array, routed: jax.Array) -> jax.Array:
    """The routed experts' sum [B*T, H] fp32 -> the block's mixer output [B, T, H]: plus the shared expert."""
    out = routed.astype(x.dtype).reshape(x.shape)
    if "shared_experts" in p:
        out = out + mlp(p["shared_experts"], x)
    return out


def moe_mixer(p: dict, cfg: Config, x: jax.Array, experts: RoutedExperts | None = None, layer: int = 0
              ) -> jax.Array:
    """x [B, T, H] (block-normed) -> [B, T, H]: routed experts (weighted, fp32 sum) + shared expert.

    experts: how the routed experts run (:class:`RoutedExperts`; default :data:`GROUPED`); layer: the block's index.
    """
    weights, idx = moe_route(p, cfg, x)
    return moe_output(p, x, (experts or GROUPED)(x, weights, idx, p.get("experts"), layer))


# ------------------------------------------------------------------------------------------------ the block kind
def _params(cfg: Config, p: str) -> dict:
    """gate [E, H], e_score_correction_bias [E] (fp32), experts {up_proj [E, F, H], down_proj [E, H, F]} (one
    checkpoint tensor per expert), shared_experts {up_proj [Fs, H], down_proj [H, Fs]}."""
    E, F, H = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    m = {
        "gate": Spec((E, H), (None, "embed"), p + "gate.weight"),
        "e_score_correction_bias": Spec((E,), (None,), p + "gate.e_score_correction_bias", fp32=True,
                                        init=Normal(0.1)),
        "experts": {
            "up_proj": Spec((E, F, H), ("expert", "mlp", "embed"), p + "experts.{e}.up_proj.weight", stacked=True),
            "down_proj": Spec((E, H, F), ("expert", "embed", "mlp"), p + "experts.{e}.down_proj.weight",
                              stacked=True),
        },
    }
    if cfg.n_shared_experts:
        m["shared_experts"] = mlp_params(p + "shared_experts.", H, cfg.moe_shared_expert_intermediate_size)
    return m


def _mixer(p: dict, cfg: Config, x: jax.Array, inp: BlockInput):
    return moe_mixer(p, cfg, x, inp.experts, inp.layer), {}


MOE = register(BlockKind(
    char="E", type_name="moe", params=_params, mixer=_mixer,
    linears=("experts.up_proj", "experts.down_proj", "shared_experts.up_proj", "shared_experts.down_proj")))
