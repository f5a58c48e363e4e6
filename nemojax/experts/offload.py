"""Host-offloaded routed experts with a device cache of N slots per MoE layer.

Routed-expert banks (bf16 arrays, NVFP4 or HLWQ nodes) live in host memory (``pinned_host`` where the backend
has that memory kind, else NumPy); each MoE layer owns device slot arrays — the bank's leaves with a leading
axis of N — that :func:`nemojax.layers.moe.grouped_experts` indexes by slot. The forward becomes host-driven
per MoE layer: a jitted segment up to the router, the expert ids to the host (one sync per layer, as in the
vLLM PR), the policy (``nemojax.experts.policies``; the batch's experts are pinned before any victim is chosen),
one batched ``jax.device_put`` of the misses and a donated in-place install, then the experts on the slots. A batch
needing more distinct experts than slots is computed in passes of at most N experts, each pass adding the
assignments of its experts only: the result equals the resident model's (fp32 sums in another order).

Prefetch: after each MoE layer the next MoE layer's router is applied to the current residual stream; its
predicted misses are put to the device right away (``device_put`` is asynchronous, so the copy overlaps the
layers in between) and used when the real routing confirms them. Predictor precision and recall are counted.
"""
from __future__ import annotations

import dataclasses
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ..cache import init_cache
from ..config import Config
from ..layers.mlp import mlp
from ..layers.moe import grouped_experts, route
from ..model import block, compute_dtype, embed, lm_head
from ..ops import rms_norm
from ..sampling import SamplingParams, sample
from .policies import make_policy
from .policies.slots import SlotTable

__all__ = ["OffloadStats", "ExpertOffload", "offload_experts", "forward_offloaded", "generate_offloaded"]


@dataclasses.dataclass
class OffloadStats:
    """Per-run counters: ``hit_rate``, ``bytes_per_token``, ``wait_s`` (blocked on transfers), predictor
    ``precision`` / ``recall`` (prefetched experts that were needed / needed experts that were prefetched)."""

    hits: int = 0
    misses: int = 0
    prefetched_used: int = 0
    prefetched_wasted: int = 0
    bytes_moved: int = 0
    wait_s: float = 0.0
    tokens: int = 0
    passes: int = 0
    pred_correct: int = 0
    pred_total: int = 0
    needed_total: int = 0

    def summary(self) -> dict:
        acc = self.hits + self.misses
        return {"hit_rate": self.hits / acc if acc else 0.0, "misses": self.misses, "hits": self.hits,
                "bytes_moved": self.bytes_moved, "bytes_per_token": self.bytes_moved / max(1, self.tokens),
                "wait_s": self.wait_s, "tokens": self.tokens, "extra_passes": self.passes,
                "prefetched_used": self.prefetched_used, "prefetched_wasted": self.prefetched_wasted,
                "predictor_precision": self.pred_correct / self.pred_total if self.pred_total else None,
                "predictor_recall": self.pred_correct / self.needed_total if self.needed_total else None}


def _host_kind(device) -> str | None:
    try:
        kinds = {m.kind for m in device.addressable_memories()}
    except Exception:  # noqa: BLE001  (older runtimes)
        return None
    return "pinned_host" if "pinned_host" in kinds and device.platform != "cpu" else None


@partial(jax.jit, donate_argnums=(0,))
def _install(slots, at, new):
    """slots leaves [N, ...]; at [m] int32; new leaves [m, ...] -> slots with rows ``at`` replaced (in place)."""
    return jax.tree.map(lambda s, n: s.at[at].set(n.astype(s.dtype)), slots, new)


class _Layer:
    """One MoE layer: host store, device slots, slot table."""

    def __init__(self, up, down, n_slots: int, policy: str, device, shared: dict | None = None):
        self.E = jax.tree.leaves(up)[0].shape[0]
        self.table = SlotTable(self.E, n_slots, policy, shared)
        self.N = self.table.n_slots
        bank = {"up": up, "down": down}
        leaves, self.treedef = jax.tree_util.tree_flatten(bank)
        self.host = [np.asarray(a) for a in leaves]  # [E, ...] each
        kind = _host_kind(device)
        if kind is not None:  # page-locked host memory: DMA-able without a staging copy
            from jax.sharding import SingleDeviceSharding

            self.host = [jax.device_put(a, SingleDeviceSharding(device, memory_kind=kind)) for a in self.host]
        self.expert_bytes = sum(int(np.prod(a.shape[1:])) * a.dtype.itemsize for a in self.host)
        self.slots = jax.device_put(
            jax.tree_util.tree_unflatten(self.treedef, [np.zeros((self.N, *a.shape[1:]), a.dtype)
                                                        for a in self.host]), device)
        self.device = device
        self.pending: dict[int, list] = {}  # expert -> device leaves put ahead of use
        self.trace_sink: list | None = None

    def fetch(self, experts: list[int]) -> list[list]:
        """One batched device_put of the given experts' leaves -> per leaf [m, ...] device arrays."""
        idx = np.asarray(experts, np.int64)
        host = [a[idx] if isinstance(a, np.ndarray) else jnp.take(a, jnp.asarray(idx), axis=0) for a in self.host]
        return jax.device_put(host, self.device)

    def prefetch(self, experts: list[int], stats: OffloadStats) -> None:
        want = [e for e in experts if self.table.slot_of[e] < 0 and e not in self.pending]
        if not want:
            return
        got = self.fetch(want)
        for i, e in enumerate(want):
            self.pending[e] = [g[i] for g in got]
        stats.bytes_moved += len(want) * self.expert_bytes

    def load(self, part: list[int], stats: OffloadStats) -> None:
        """Make every expert of ``part`` (<= N distinct) resident."""
        hits, loads = self.table.plan(part)
        stats.hits += len(hits)
        stats.misses += len(loads)
        if not loads:
            return
        demand = [e for e, _ in loads if e not in self.pending]
        rows: dict[int, list] = {}
        if demand:
            got = self.fetch(demand)
            stats.bytes_moved += len(demand) * self.expert_bytes
            for i, e in enumerate(demand):
                rows[e] = [g[i] for g in got]
        for e, _ in loads:
            if e in self.pending:
                rows[e] = self.pending.pop(e)
                stats.prefetched_used += 1
        m = len(loads)
        b = 1 << (m - 1).bit_length()  # bucketed install size bounds the recompiles
        order = [e for e, _ in loads] + [loads[-1][0]] * (b - m)
        at = jnp.asarray([s for _, s in loads] + [loads[-1][1]] * (b - m), jnp.int32)
        new = [jnp.stack([rows[e][j] for e in order]) for j in range(len(self.host))]
        t0 = time.perf_counter()
        jax.block_until_ready(new)  # waiting for transfers not finished yet
        stats.wait_s += time.perf_counter() - t0
        self.slots = _install(self.slots, at, jax.tree_util.tree_unflatten(self.treedef, new))

    def drop_stale_prefetch(self, stats: OffloadStats) -> None:
        stats.prefetched_wasted += len(self.pending)
        self.pending.clear()


@dataclasses.dataclass
class ExpertOffload:
    """The offloaded model: params without routed-expert banks (``layers[i]["mixer"]["experts"]`` removed) and
    one :class:`_Layer` per MoE layer."""

    params: dict
    layers: dict
    n_slots: int
    policy: str
    prefetch: bool = True


def offload_experts(params: dict, cfg: Config, n_slots: int, policy: str = "adaptive", prefetch: bool = True,
                    device=None) -> ExpertOffload:
    """Move every MoE layer's routed experts to host memory with a device cache of ``n_slots`` per layer."""
    make_policy(policy, cfg.n_routed_experts)  # validates the name
    if isinstance(n_slots, bool) or not isinstance(n_slots, (int, np.integer)) or n_slots < 1:
        raise ValueError(f"expert_cache={n_slots!r}: the number of device slots per MoE layer must be >= 1")
    device = device or jax.devices()[0]
    layers, new_layers, shared = {}, [], {}  # shared: the layers' policies pool their evidence
    for i, (lp, kind) in enumerate(zip(params["layers"], cfg.pattern)):
        if kind == "E":
            ex = lp["mixer"]["experts"]
            layers[i] = _Layer(ex["up_proj"], ex["down_proj"], int(n_slots), policy, device, shared)
            lp = {**lp, "mixer": {k: v for k, v in lp["mixer"].items() if k != "experts"}}
        new_layers.append(lp)
    return ExpertOffload({**params, "layers": new_layers}, layers, int(n_slots), policy, prefetch)


# ------------------------------------------------------------------------------------------------ jitted pieces
@partial(jax.jit, static_argnums=(1, 2))
def _block(lp, cfg, kind, h, mask, state, pos, kv_mask):
    return block(lp, cfg, kind, h, mask, state, pos, kv_mask)


@partial(jax.jit, static_argnums=(1,))
def _router(lp, cfg, h):
    """h [B, T, H] -> (normed x [B, T, H], weights [B*T, k], ids [B*T, k])."""
    x = rms_norm(h.astype(lp["norm"].dtype), lp["norm"], cfg.layer_norm_epsilon)
    w, idx = route(lp["mixer"]["gate"], lp["mixer"]["e_score_correction_bias"], cfg, x.reshape(-1, x.shape[-1]))
    return x, w, idx


@jax.jit
def _experts_pass(x, w, slot_idx, slots):
    """Routed experts of one pass: slot_idx [T, k] (N = not in this pass) -> fp32 [T, H]."""
    keep = slot_idx < jax.tree.leaves(slots["up"])[0].shape[0]
    return grouped_experts(x.reshape(-1, x.shape[-1]), jnp.where(keep, w, 0.0), slot_idx, slots["up"], slots["down"])


@jax.jit
def _moe_finish(lp, x, h, routed):
    """The rest of moe_mixer + the residual, exactly as the resident block computes it."""
    out = routed.astype(x.dtype).reshape(x.shape)
    if "shared_experts" in lp["mixer"]:
        out = out + mlp(lp["mixer"]["shared_experts"], x)
    return h + out.astype(h.dtype)


@partial(jax.jit, static_argnums=(1,))
def _embed(params, cfg, tokens):
    h = embed(params, tokens)
    return h.astype(jnp.float32) if cfg.residual_in_fp32 else h


@jax.jit
def _sample(logits, key, sp):
    """``sample`` compiled once (called eagerly, its ``lax.cond`` over fresh closures compiled on every token)."""
    return sample(logits, key, sp)


@partial(jax.jit, static_argnums=(1,))
def _head(params, cfg, h):
    return lm_head(params, cfg, h[:, -1:])[:, -1]


def _moe_layer(off: ExpertOffload, i: int, cfg: Config, h, stats: OffloadStats):
    lp = off.params["layers"][i]
    layer = off.layers[i]
    x, w, idx = _router(lp, cfg, h)
    ids = np.asarray(idx)  # one device -> host sync per MoE layer
    needed = list(dict.fromkeys(int(e) for e in ids.reshape(-1)))
    if layer.trace_sink is not None:
        layer.trace_sink.append((i, ids.tolist()))
    if layer.pending or off.prefetch:
        hit = sum(1 for e in needed if e in layer.pending)
        stats.pred_correct += hit
        stats.needed_total += len(needed)
    routed = None
    parts = layer.table.passes(needed)
    stats.passes += len(parts) - 1
    for part in parts:
        layer.load(part, stats)
        slot = layer.table.slot_of
        in_part = np.zeros(layer.E, bool)
        in_part[part] = True
        slot_idx = np.where(in_part[ids], slot[ids], layer.N).astype(np.int32)
        y = _experts_pass(x, w, jnp.asarray(slot_idx), layer.slots)
        routed = y if routed is None else routed + y
    layer.drop_stale_prefetch(stats)
    out = _moe_finish(lp, x, h, routed)  # dispatched: the policy's bookkeeping below overlaps the device's work
    layer.table.policy.step()
    return out


def _predict_next(off: ExpertOffload, cfg: Config, i: int, h, stats: OffloadStats) -> None:
    """Apply the next MoE layer's router to the current residual stream; put its predicted misses."""
    nxt = [j for j in off.layers if j > i]
    if not nxt:
        return
    j = nxt[0]
    _, _, idx = _router(off.params["layers"][j], cfg, h)
    pred = list(dict.fromkeys(int(e) for e in np.asarray(idx).reshape(-1)))
    stats.pred_total += len(pred)
    off.layers[j].prefetch(pred, stats)


def forward_offloaded(off: ExpertOffload, cfg: Config, tokens, mask=None, cache=None,
                      stats: OffloadStats | None = None):
    """Like ``model.forward(..., last_only=True)`` with offloaded experts: tokens [B, T] -> (last logits [B, V]
    float32, new cache)."""
    stats = stats if stats is not None else OffloadStats()
    p = off.params
    tokens = jnp.asarray(tokens, jnp.int32)
    h = _embed(p, cfg, tokens)
    pos = kv_mask = None
    if cache is not None:
        pos = cache.pos
        new = jnp.ones(tokens.shape, jnp.int32) if mask is None else jnp.asarray(mask, jnp.int32)
        kv_mask = jax.lax.dynamic_update_slice_in_dim(cache.mask, new, pos, axis=1)
    states = []
    for i, kind in enumerate(cfg.pattern):
        st = cache.layers[i] if cache is not None else None
        if kind == "E":
            h = _moe_layer(off, i, cfg, h, stats)
            if off.prefetch:
                _predict_next(off, cfg, i, h, stats)
            states.append({})
        else:
            h, st = _block(p["layers"][i], cfg, kind, h, None if mask is None else jnp.asarray(mask), st, pos,
                           kv_mask)
            states.append(st)
    logits = _head(p, cfg, h)
    if cache is None:
        return logits, None
    return logits, cache.replace(layers=tuple(states), mask=kv_mask, pos=pos + tokens.shape[1])


def generate_offloaded(off: ExpertOffload, cfg: Config, input_ids, max_new_tokens: int, *, temperature=0.0,
                       top_k=0, top_p=1.0, seed=0, attention_mask=None, stop_token_ids=None, pad_id=None,
                       stats: OffloadStats | None = None, trace: list | None = None) -> np.ndarray:
    """Greedy / sampled generation with offloaded experts (a host loop per token: the cache decisions happen
    between layers). Same validation and outputs as :func:`nemojax.generate.generate`.

    ``trace`` (optional list) receives, per forward, ``{layer: [expert ids]}`` (routing traces for benchmarks).
    """
    from ..generate import _validate, bucket, pad_prompts, pad_to_bucket

    sp = SamplingParams.make(temperature, top_k, top_p)
    pad_id = cfg.pad_token_id if pad_id is None else pad_id
    pad_id = 0 if pad_id is None else pad_id
    ids, mask = pad_prompts(input_ids, attention_mask, pad_id)
    stops = _validate(cfg, ids, mask, max_new_tokens, seed, stop_token_ids)
    stops = set(int(s) for s in stops if s >= 0)
    ids, mask = pad_to_bucket(ids, mask, pad_id)  # as in ``generate``: a bounded number of compilations
    B, Tb = ids.shape
    stats = stats if stats is not None else OffloadStats()
    cache = init_cache(cfg, B, Tb + bucket(max_new_tokens), compute_dtype(off.params))
    if trace is not None:
        _trace_hook(off, trace)
    logits, cache = forward_offloaded(off, cfg, ids, mask, cache, stats)
    key = jax.random.PRNGKey(seed)
    out = np.full((B, max_new_tokens), pad_id, np.int32)
    done = np.zeros(B, bool)
    for step in range(max_new_tokens):
        tok = np.asarray(_sample(logits, jax.random.fold_in(key, step), sp))
        tok = np.where(done, pad_id, tok)
        out[:, step] = tok
        done |= np.isin(tok, list(stops)) if stops else False
        if done.all():
            break
        logits, cache = forward_offloaded(off, cfg, tok[:, None], None, cache, stats)
        stats.tokens += B
    if trace is not None:
        _trace_hook(off, None)
    return out


def _trace_hook(off: ExpertOffload, sink):
    for layer in off.layers.values():
        layer.trace_sink = sink
