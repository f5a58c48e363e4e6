"""Host-offloaded routed experts with a device cache of N slots per MoE layer.

Routed-expert banks (bf16 arrays, NVFP4 or HLWQ nodes) live in host memory (``pinned_host`` where the backend
has that memory kind, else NumPy); each MoE layer owns device slot arrays — the bank's leaves with a leading
axis of N — that :func:`nemojax.blocks.moe.grouped_experts` indexes by slot. :class:`OffloadedExperts` is a
host-driven experts strategy: ``nemojax.model.forward(..., experts=...)`` runs its jitted pieces layer by layer and,
per MoE block, hands the router's choice to the host (one sync per layer, as in the vLLM expert-offload PR): the
policy (``nemojax.experts.policies``; the batch's experts are pinned before any victim is chosen), one batched
``jax.device_put`` of the misses and a donated in-place install, then the experts on the slots. A batch
needing more distinct experts than slots is computed in passes of at most N experts, each pass adding the
assignments of its experts only: the result equals the resident model's (fp32 sums in another order).

On a CPU with experts left in the checkpoint files (``nemojax.load(..., mmap=True)``) the device *is* host memory:
every forward reads its experts' file pages in place (``jax.device_put`` aliases them; no slot is filled, nothing
copied), one jitted product per needed expert: on every row for up to :data:`IN_PLACE_ROWS` live tokens (a decode
step), on the rows that chose it (gathered, padded to a power of two) for more (prefill).

Prefetch: after each MoE layer the next MoE layer's router is applied to the current residual stream; its
predicted misses are put to the device right away (``device_put`` is asynchronous, so the copy overlaps the
layers in between) and used when the real routing confirms them. Predictor precision and recall are counted.

Generation: ``nemojax.generate.generate(params, cfg, ..., experts=strategy)`` runs the strategy's prefill and its
host decode loop (one forward per token) in the same streaming loop as the resident model. Serving:
``nemojax.serve.Engine`` runs :meth:`OffloadedExperts.forward` in its steps (only the real tokens of its
right-padded chunks and running rows route through the cache).
"""
from __future__ import annotations

import dataclasses
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ..config import Config
from ..generate import DecodeState, next_token
from ..blocks.moe import MOE, RoutedExperts, grouped_experts
from ..model import STEPWISE, forward
from ..ops import as_bits, from_bits, linear, relu2
from .bank import HostBank, drop_mapped_pages, will_need
from .policies import make_policy
from .policies.slots import SlotTable

__all__ = ["OffloadStats", "OffloadedExperts", "offload_experts", "IN_PLACE_ROWS"]

IN_PLACE_ROWS = 8  # up to this many live tokens an expert read in place runs on every row; above, on its own rows


@dataclasses.dataclass
class OffloadStats:
    """Counters: ``hit_rate``, ``bytes_per_token``, ``wait_s`` (blocked on transfers), predictor
    ``precision`` / ``recall`` (prefetched experts that were needed / needed experts that were prefetched),
    ``in_place`` (expert products that read the mapped files directly, bypassing the slots)."""

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
    in_place: int = 0

    def summary(self) -> dict:
        acc = self.hits + self.misses
        return {"hit_rate": self.hits / acc if acc else 0.0, "misses": self.misses, "hits": self.hits,
                "in_place": self.in_place,
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
    return jax.tree.map(lambda s, n: from_bits(as_bits(s).at[at].set(as_bits(n.astype(s.dtype))), s.dtype), slots, new)


class _Layer:
    """One MoE layer: host store (per leaf of the bank: a stacked [E, ...] array, or, from a
    :class:`nemojax.experts.bank.HostBank`, a list of E per-expert arrays, e.g. read-only views of the checkpoint
    files, of which each fetch stacks only the experts it moves), device slots, slot table."""

    def __init__(self, up, down, n_slots: int, policy: str, device, shared: dict | None = None):
        self.views = None
        if isinstance(up, HostBank):  # per-expert views (mmap loads): host[j] is a list of E arrays, never stacked
            self.E = len(up)
            if device.platform == "cpu":  # the device reads host memory: a few rows' experts are used in place
                self.views = [{"up": u, "down": d} for u, d in zip(up.experts, down.experts)]
            per = [jax.tree_util.tree_flatten({"up": u, "down": d}) for u, d in zip(up.experts, down.experts)]
            self.treedef = per[0][1]
            self.host = [[leaves[j] for leaves, _ in per] for j in range(len(per[0][0]))]
        else:
            self.E = jax.tree.leaves(up)[0].shape[0]
            leaves, self.treedef = jax.tree_util.tree_flatten({"up": up, "down": down})
            self.host = [np.asarray(a) for a in leaves]  # [E, ...] each
            kind = _host_kind(device)
            if kind is not None:  # page-locked host memory: DMA-able without a staging copy
                from jax.sharding import SingleDeviceSharding

                self.host = [jax.device_put(a, SingleDeviceSharding(device, memory_kind=kind)) for a in self.host]
        self.table = SlotTable(self.E, n_slots, policy, shared)
        self.N = self.table.n_slots
        one = [(tuple(a[0].shape), a[0].dtype) if isinstance(a, list) else (a.shape[1:], a.dtype) for a in self.host]
        self.expert_bytes = sum(int(np.prod(shp)) * np.dtype(dt).itemsize for shp, dt in one)
        self.leaf_shapes = one  # per leaf of one expert: (shape, dtype)
        self.device = device
        self.slots_ = None  # made now, except where experts are read in place (then on first use, if ever)
        if self.views is None:
            self.slots_ = self._make_slots()
        self.pending: dict[int, list] = {}  # expert -> device leaves put ahead of use

    @property
    def slots(self):
        """The device slots, per leaf ``[N, ...]`` (allocated when first used)."""
        if self.slots_ is None:
            self.slots_ = self._make_slots()
        return self.slots_

    def _make_slots(self):
        return jax.device_put(jax.tree_util.tree_unflatten(
            self.treedef, [np.zeros((self.N, *shp), dt) for shp, dt in self.leaf_shapes]), self.device)

    @slots.setter
    def slots(self, value):
        self.slots_ = value

    @property
    def slot_bytes(self) -> int:
        """Bytes of device slots allocated so far."""
        return 0 if self.slots_ is None else self.N * self.expert_bytes

    def fetch(self, experts: list[int]) -> list[list]:
        """One batched device_put of the given experts' leaves -> per leaf [m, ...] device arrays."""
        idx = np.asarray(experts, np.int64)
        host = [np.stack([a[e] for e in idx]) if isinstance(a, list) else a[idx] if isinstance(a, np.ndarray)
                else jnp.take(a, jnp.asarray(idx), axis=0) for a in self.host]
        for a in self.host:  # experts read from the files: their pages stay in the page cache, not in our RSS
            if isinstance(a, list):
                for e in idx:
                    drop_mapped_pages(a[e])
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

    def in_place(self) -> bool:
        """Whether this layer's experts are read straight from the mapped files (a CPU, a mapped load)."""
        return self.views is not None

    def routed_in_place(self, x, weights, idx, ids: np.ndarray, live, needed: list[int], stats: OffloadStats):
        """The routed sum from the experts' file pages, aliased by ``jax.device_put`` on a CPU (no copy into the
        slots, which on a CPU would copy them from one part of host memory to another): one jitted product per
        expert weighted by its routing weight; up to ``IN_PLACE_ROWS`` live rows on every row (0 weight where a row
        did not choose it), above on the rows that chose it. ids [T, k] (host); live [T] bool or None."""
        x2 = x.reshape(-1, x.shape[-1])
        for e in needed:  # pages not in the page cache yet are read ahead together
            for a in jax.tree.leaves(self.views[e]):
                will_need(a)
        n_live = ids.shape[0] if live is None else int(live.sum())
        if n_live <= IN_PLACE_ROWS:
            w = weights if live is None else jnp.where(jnp.asarray(live)[:, None], weights, 0.0)
            routed = None
            for e in needed:
                ex = jax.device_put(self.views[e], self.device)
                y = _expert_on_rows(x2, w, idx, jnp.int32(e), ex["up"], ex["down"])
                routed = y if routed is None else routed + y
        else:
            chose = ids if live is None else np.where(live[:, None], ids, -1)
            flat = chose.reshape(-1)
            order = np.argsort(flat, kind="stable")
            bounds = np.searchsorted(flat[order], [needed, np.asarray(needed) + 1])
            T = x2.shape[0]
            routed = jnp.zeros((T, x2.shape[1]), jnp.float32)
            for e, lo, hi in zip(needed, *bounds):
                rows = order[lo:hi] // ids.shape[1]  # the rows that chose e (once each: top-k ids are distinct)
                b = max(IN_PLACE_ROWS, 1 << (len(rows) - 1).bit_length())  # bucketed: few compiled shapes
                r = np.full(b, T, np.int32)  # row T: out of range, gathers zeros and scatters nowhere
                r[:len(rows)] = rows
                ex = jax.device_put(self.views[e], self.device)
                routed = _expert_on_own_rows(routed, x2, weights, idx, jnp.asarray(r), jnp.int32(e), ex["up"],
                                             ex["down"])
        jax.block_until_ready(routed)
        for e in needed:  # their pages stay in the page cache, not in this process's resident set
            for a in jax.tree.leaves(self.views[e]):
                drop_mapped_pages(a)
        stats.in_place += len(needed)
        return routed

    def drop_stale_prefetch(self, stats: OffloadStats) -> None:
        stats.prefetched_wasted += len(self.pending)
        self.pending.clear()


class OffloadedExperts(RoutedExperts):
    """The host-offloaded routed-expert strategy (``nemojax.blocks.moe.RoutedExperts``, host-driven): one
    :class:`_Layer` (host store, device slots, slot table) per MoE layer, whose banks are not in the params.

    ``stats`` (:class:`OffloadStats`) accumulates over every forward (``reset_stats`` starts anew); ``trace``: None
    or a list that receives ``(layer, expert ids [B*T][k])`` per MoE block of each forward (routing traces; under
    :meth:`forward` with a mask, the rows of the real tokens only)."""

    host_driven = True

    def __init__(self, layers: dict, n_slots: int, policy: str, prefetch: bool = True, device=None):
        self.layers = layers
        self.device = device or jax.devices()[0]  # where the slots live
        self.n_slots = n_slots
        self.policy = policy
        self.prefetch = prefetch
        self.stats = OffloadStats()
        self.trace: list | None = None
        self._live: np.ndarray | None = None  # [B*T] bool during :meth:`forward`: the tokens that need experts

    @property
    def slot_bytes(self) -> int:
        """Bytes of device slots allocated so far, over every layer (none on a CPU that reads mapped experts in
        place: a layer's slots are made when a forward first needs them)."""
        return sum(lay.slot_bytes for lay in self.layers.values())

    def reset_stats(self) -> OffloadStats:
        """Start new counters; returns the previous ones."""
        old, self.stats = self.stats, OffloadStats()
        return old

    def __call__(self, x, weights, idx, bank, layer: int):
        """The routed sum of MoE layer ``layer`` from its device slots, in passes of at most N experts."""
        try:
            ids = np.asarray(idx)  # one device -> host sync per MoE layer
        except jax.errors.TracerArrayConversionError:
            raise TypeError("offloaded experts decide on the host: run model.forward eagerly, not under jit") from None
        lay, stats = self.layers[layer], self.stats
        live = self._live if self._live is not None and self._live.shape[0] == ids.shape[0] else None
        used = ids if live is None else ids[live]
        needed = list(dict.fromkeys(int(e) for e in used.reshape(-1)))
        if self.trace is not None:
            self.trace.append((layer, used.tolist()))
        if not needed:  # every token masked
            lay.drop_stale_prefetch(stats)
            return jnp.zeros((ids.shape[0], x.shape[-1]), jnp.float32)
        if lay.in_place():
            lay.drop_stale_prefetch(stats)
            return lay.routed_in_place(x, weights, idx, ids, live, needed, stats)
        if lay.pending or self.prefetch:
            stats.pred_correct += sum(1 for e in needed if e in lay.pending)
            stats.needed_total += len(needed)
        routed = None
        parts = lay.table.passes(needed)
        stats.passes += len(parts) - 1
        for part in parts:
            lay.load(part, stats)
            in_part = np.zeros(lay.E, bool)
            in_part[part] = True
            take = in_part[ids] if live is None else in_part[ids] & live[:, None]
            slot_idx = np.where(take, lay.table.slot_of[ids], lay.N).astype(np.int32)
            y = _experts_pass(x, weights, jnp.asarray(slot_idx), lay.slots)
            routed = y if routed is None else routed + y
        lay.drop_stale_prefetch(stats)
        return routed

    def after_moe(self, params: dict, cfg: Config, layer: int, h) -> None:
        """After MoE block ``layer`` was dispatched (its policy's bookkeeping overlaps the device's work): the policy
        settles the forward; with ``prefetch`` the next MoE layer's router is applied to the residual stream ``h``
        and its predicted misses are put to the device."""
        self.layers[layer].table.policy.step()
        nxt = [j for j in self.layers if j > layer]
        if not self.prefetch or not nxt or self.layers[nxt[0]].in_place():
            return
        _, _, idx = STEPWISE.moe_input(params["layers"][nxt[0]], cfg, h)
        idx = np.asarray(idx)
        if self._live is not None and self._live.shape[0] == idx.shape[0]:
            idx = idx[self._live]
        pred = list(dict.fromkeys(int(e) for e in idx.reshape(-1)))
        self.stats.pred_total += len(pred)
        self.layers[nxt[0]].prefetch(pred, self.stats)

    def forward(self, params, cfg: Config, tokens, attention_mask=None, cache=None, **kw):
        """``nemojax.model.forward(..., experts=self)`` where the tokens with ``attention_mask`` [B, T] 0 (pads,
        idle rows) load no expert and get a zero routed sum (their outputs are never used)."""
        self._live = None if attention_mask is None else np.asarray(attention_mask).reshape(-1) > 0
        try:
            return forward(params, cfg, tokens, attention_mask, cache, experts=self, **kw)
        finally:
            self._live = None

    # the generation steps (``nemojax.generate.generate_stream`` runs them in its loop)
    def prefill(self, params, cfg: Config, tokens, mask, cache):
        """``nemojax.generate.prefill`` with these experts."""
        logits, cache = forward(params, cfg, tokens, mask, cache, last_only=True, experts=self)
        return logits[:, -1], cache

    def decode(self, params, cfg: Config, n_steps: int, cache, state: DecodeState, sp, limit, stop_ids, pad_id):
        """``nemojax.generate.decode`` as a host loop, one forward per token (the cache decisions happen between
        layers); no forward once every sequence is done."""
        B = state.done.shape[0]
        out = np.full((B, n_steps), int(pad_id), np.int32)
        for i in range(n_steps):
            if int(state.step) >= int(limit) or bool(np.all(np.asarray(state.done))):
                break
            tok, done = _next_token(state, sp, stop_ids, pad_id)
            out[:, i] = np.asarray(tok)
            state = state.replace(done=done, step=state.step + 1)
            if not np.all(np.asarray(done)):
                logits, cache = forward(params, cfg, tok[:, None], None, cache, last_only=True, experts=self)
                state = state.replace(logits=logits[:, -1])
                self.stats.tokens += B
        return out, cache, state


def offload_experts(params: dict, cfg: Config, n_slots: int, policy: str = "adaptive", prefetch: bool = True,
                    device=None) -> tuple[dict, OffloadedExperts]:
    """Move every MoE layer's routed experts to host memory with a device cache of ``n_slots`` per layer.

    Returns (the params without routed-expert banks (``layers[i]["mixer"]["experts"]`` removed), the strategy):
    ``forward(params, cfg, ..., experts=strategy)``, ``generate(params, cfg, ..., experts=strategy)``."""
    make_policy(policy, cfg.n_routed_experts)  # validates the name
    if isinstance(n_slots, bool) or not isinstance(n_slots, (int, np.integer)) or n_slots < 1:
        raise ValueError(f"expert_cache={n_slots!r}: the number of device slots per MoE layer must be >= 1")
    device = device or jax.devices()[0]
    layers, new_layers, shared = {}, [], {}  # shared: the layers' policies pool their evidence
    for i, (lp, kind) in enumerate(zip(params["layers"], cfg.pattern)):
        if kind == MOE.char:
            ex = lp["mixer"]["experts"]
            layers[i] = _Layer(ex["up_proj"], ex["down_proj"], int(n_slots), policy, device, shared)
            lp = {**lp, "mixer": {k: v for k, v in lp["mixer"].items() if k != "experts"}}
        new_layers.append(lp)
    return {**params, "layers": new_layers}, OffloadedExperts(layers, int(n_slots), policy, prefetch, device)


@jax.jit
def _expert_on_rows(x, w, idx, e, up, down):
    """One routed expert on every row: x [T, H]; w, idx [T, k]; e [] -> ``coef_t * down(relu2(up x_t))`` [T, H]
    fp32 with ``coef_t`` the routing weight of ``e`` in row t (0 if t did not choose it)."""
    coef = jnp.sum(jnp.where(idx == e, w, 0.0), axis=-1)
    y = linear(relu2(linear(x, up)), down).astype(jnp.float32)
    return y * coef[:, None]


@partial(jax.jit, donate_argnums=0)
def _expert_on_own_rows(acc, x, w, idx, rows, e, up, down):
    """``acc [T, H] fp32 + coef_t * down(relu2(up x_t))`` for the rows [b] that chose expert e (entries T: padding,
    gathering zeros and scattering nowhere), with ``coef_t`` the routing weight of ``e`` in row t."""
    xr = jnp.take(x, rows, axis=0, mode="fill", fill_value=0)
    coef = jnp.sum(jnp.where(jnp.take(idx, rows, axis=0, mode="fill", fill_value=-1) == e,
                             jnp.take(w, rows, axis=0, mode="fill", fill_value=0), 0.0), axis=-1)
    y = linear(relu2(linear(xr, up)), down).astype(jnp.float32)
    return acc.at[rows].add(y * coef[:, None], mode="drop")


@jax.jit
def _experts_pass(x, w, slot_idx, slots):
    """Routed experts of one pass: slot_idx [T, k] (N = not in this pass) -> fp32 [T, H]."""
    keep = slot_idx < jax.tree.leaves(slots["up"])[0].shape[0]
    return grouped_experts(x.reshape(-1, x.shape[-1]), jnp.where(keep, w, 0.0), slot_idx, slots["up"], slots["down"])


_next_token = jax.jit(next_token)  # eagerly, ``sample``'s ``lax.cond`` over fresh closures compiles every token
