"""The continuous-batching engine: ``max_num_seqs`` cache slots of ``max_model_len`` positions, one background
thread that admits waiting requests into free slots between decode steps, prefills prompts one chunk of
``chunk`` tokens per loop iteration (so the running rows keep decoding; a prompt's last, shorter piece runs in
the smallest of ``chunk``, ``chunk / 2`` and ``chunk / 4`` (those >= 2) that holds it) and decodes every
running row in one compiled step over the first ``n`` rows, ``n`` the smallest of 1, 2, 4, .., ``max_num_seqs``
that holds them (the occupied rows are kept at the front: the last one moves into a free row when that shrinks
``n``; every size is compiled at ``start``), ``decode_steps`` of them in one call while no request waits or
prefills.
A model whose routed experts are offloaded (``Model.offload``: a host-driven strategy) runs the same loop with
the same steps called eagerly (``steps.host_pieces``), one decode step per call; ``stats`` then reports its expert
cache.
Each row samples with its own setting and key (``fold_in(PRNGKey(seed),
n_generated)``), so a request's tokens do not depend on its neighbours.

Prefix caching (hybrid): at each chunk boundary of a prompt and at its end the row is checkpointed to host memory
(the KV of the segment since the previous checkpoint, the Mamba conv window and SSM state) in a
:class:`~nemojax.serve.prefix_cache.PrefixCache`; a new request restores the deepest checkpoint inside its prompt
and prefills only the rest (``Output.cached_tokens``).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import secrets
import threading
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ..blocks.base import BLOCKS
from ..cache import init_cache
from ..formats.kv import FP8
from ..model import compute_dtype
from ..sampling import SamplingParams, check_sampling
from . import steps
from .prefix_cache import PrefixCache

__all__ = ["Request", "Output", "QueueFull", "Engine"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Request:
    """One generation request. temperature 0 is greedy; top_k 0 and top_p 1 are off; seed None draws one.
    ``return_logits``: each Output carries the float32 logits each of its tokens was sampled from."""

    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    return_logits: bool = False


@dataclasses.dataclass
class Output:
    """What one engine step produced for a request: the new tokens since the last Output (a stop token is not
    included), the finish reason once finished ("stop" | "length" | "abort"), the prompt's length and how many of
    its tokens came from the prefix cache; ``logits`` [len(token_ids) (+1 at a stop), V] with ``return_logits``."""

    request_id: str
    token_ids: list[int]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    logits: np.ndarray | None = None


class QueueFull(Exception):
    """``max_waiting`` requests wait already."""


@dataclasses.dataclass
class _Seq:
    req: Request
    on_output: Callable[[Output], None]
    prompt: np.ndarray  # [L] int32
    key: np.ndarray  # [2] uint32
    done: int = 0  # prompt tokens in the cache
    cached: int = 0  # of which restored from the prefix cache
    n_gen: int = 0


class Engine:
    """See the module docstring. ``submit`` / ``cancel`` / ``stats`` are thread-safe; outputs are delivered by
    calling ``on_output`` from the engine thread."""

    def __init__(self, model, *, max_num_seqs: int = 8, max_model_len: int | None = None, chunk: int = 64,
                 prefix_cache_bytes: int = 1 << 30, kv_dtype=None, max_waiting: int = 256, decode_steps: int = 4):
        cfg = model.config
        experts = model.experts
        self._run = None  # the pieces of the eager steps with a host-driven experts strategy
        if experts is not None and experts.host_driven:
            if not callable(getattr(experts, "forward", None)):
                raise ValueError(f"model.experts ({type(experts).__name__}) is host-driven without a forward(): "
                                 f"the engine runs nemojax.experts.offload.OffloadedExperts")
            self._run = steps.host_pieces(experts)
        if max_model_len is None:
            max_model_len = min(cfg.max_position_embeddings, 8192)
        for name, v, lo in (("max_num_seqs", max_num_seqs, 1), ("max_model_len", max_model_len, 2),
                            ("chunk", chunk, 1), ("max_waiting", max_waiting, 0),
                            ("prefix_cache_bytes", prefix_cache_bytes, 0), ("decode_steps", decode_steps, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if max_model_len > cfg.max_position_embeddings:
            raise ValueError(f"max_model_len={max_model_len} exceeds the model's context length of "
                             f"{cfg.max_position_embeddings} tokens (max_position_embeddings)")
        self.model, self.cfg = model, cfg
        self.max_num_seqs, self.max_model_len, self.chunk, self.max_waiting = (max_num_seqs, max_model_len, chunk,
                                                                                max_waiting)
        if self._run is not None and decode_steps > 1:  # the compiled multi-step loop needs resident experts
            log.info("offloaded experts: one decode step per call (decode_steps=%d ignored)", decode_steps)
            decode_steps = 1
        self.decode_steps = decode_steps
        params = model.params
        if kv_dtype is None and any("k_scale" in params["layers"][i]["mixer"] for i in cfg.layer_indices("*")):
            kv_dtype = FP8  # calibrated FP8 KV scales: cache K/V in float8_e4m3fn
        self.kv_dtype = kv_dtype
        self._fresh_state()
        self.positional = tuple(tuple(BLOCKS[c].positional) for c in cfg.pattern)
        self.prefix = PrefixCache(prefix_cache_bytes, chunk) if prefix_cache_bytes else None
        self._slots: list[_Seq | None] = [None] * max_num_seqs
        self._prefilling: collections.deque[int] = collections.deque()  # slots in admission order
        self._waiting: collections.deque[_Seq] = collections.deque()
        self._cancels: list[str] = []
        self._live: set[str] = set()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._counts = collections.Counter()
        # the decode steps' row counts: the running rows are kept at the front and decoded in the smallest bucket
        # holding them (one compiled program per bucket)
        self.buckets = sorted({min(1 << i, max_num_seqs) for i in range(max_num_seqs.bit_length() + 1)})
        # the prefill programs' token counts: a whole chunk, and smaller sizes for a prompt's last piece
        self.prefill_sizes = sorted({chunk} | {chunk >> i for i in (1, 2) if chunk >> i >= 2})

    def _fresh_state(self) -> None:
        """An empty batched cache (a chunk written at any prompt position < max_model_len stays inside a row) and
        next-token logits [max_num_seqs, V]; with host-driven experts both committed to the experts' device (as
        every step's results are, so that the warm-up compiles what later steps run)."""
        self.cache = init_cache(self.cfg, self.max_num_seqs, self.max_model_len + self.chunk,
                                compute_dtype(self.model.params), self.kv_dtype, per_row=True)
        self.logits = jnp.zeros((self.max_num_seqs, self.cfg.vocab_size), jnp.float32)
        if self._run is not None:
            self.cache, self.logits = jax.device_put((self.cache, self.logits), self.model.experts.device)

    # ------------------------------------------------------------------------------------------ the public side
    def start(self) -> None:
        """Compile and warm up every step, then run the loop in a background thread."""
        if self._thread is not None:
            return
        self._warm_up()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="nemojax-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop (running and waiting requests are aborted) and wait for the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def submit(self, req: Request, on_output: Callable[[Output], None]) -> None:
        """Queue a request (ValueError naming the field for a bad one; QueueFull when ``max_waiting`` wait)."""
        seq = self._check(req, on_output)
        with self._cv:
            if req.request_id in self._live:
                raise ValueError(f"request_id {req.request_id!r} is already running or waiting")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (max_waiting={self.max_waiting})")
            self._live.add(req.request_id)
            self._waiting.append(seq)
            self._cv.notify_all()

    def cancel(self, request_id: str) -> None:
        """Abort a waiting or running request: its slot is freed and it gets a final Output("abort")."""
        with self._cv:
            if request_id in self._live:
                self._cancels.append(request_id)
                self._cv.notify_all()

    def stats(self) -> dict:
        """Counters: running, waiting, prompt_tokens_total, generation_tokens_total, prefix_cache_queries_total,
        prefix_cache_hits_total (tokens), prefix_cache_entries, prefix_cache_bytes; with offloaded experts also
        (counted since ``start``) expert_cache_hit_rate, expert_cache_hits_total, expert_cache_misses_total,
        expert_cache_bytes_moved_total, expert_cache_bytes_per_token (per generated token) and
        expert_cache_wait_seconds_total (blocked on transfers)."""
        with self._cv:
            pc = self.prefix.stats() if self.prefix is not None else {}
            out = {"running": sum(s is not None for s in self._slots), "waiting": len(self._waiting),
                   "prompt_tokens_total": self._counts["prompt"], "generation_tokens_total": self._counts["gen"],
                   "prefix_cache_queries_total": pc.get("queries", 0), "prefix_cache_hits_total": pc.get("hits", 0),
                   "prefix_cache_entries": pc.get("entries", 0), "prefix_cache_bytes": pc.get("bytes", 0)}
        if self._run is not None:
            ex = self.model.experts.stats.summary()
            out.update(expert_cache_hit_rate=ex["hit_rate"], expert_cache_hits_total=ex["hits"],
                       expert_cache_misses_total=ex["misses"], expert_cache_bytes_moved_total=ex["bytes_moved"],
                       expert_cache_bytes_per_token=ex["bytes_per_token"], expert_cache_wait_seconds_total=ex["wait_s"])
        return out

    def _check(self, req: Request, on_output) -> _Seq:
        V = self.cfg.vocab_size
        if not isinstance(req, Request):
            raise ValueError(f"expected a Request, got {type(req).__name__}")
        if not isinstance(req.request_id, str) or not req.request_id:
            raise ValueError(f"request_id must be a non-empty string, got {req.request_id!r}")
        if not callable(on_output):
            raise ValueError("on_output must be callable")
        ids = list(req.prompt_ids) if isinstance(req.prompt_ids, (list, tuple, np.ndarray)) else None
        if not ids or any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < V
                          for t in ids):
            raise ValueError(f"prompt_ids must be a non-empty list of token ids in [0, {V})")
        if isinstance(req.max_tokens, bool) or not isinstance(req.max_tokens, int) or req.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {req.max_tokens!r}")
        if len(ids) + req.max_tokens > self.max_model_len:
            raise ValueError(f"prompt of {len(ids)} tokens + max_tokens={req.max_tokens} exceeds "
                             f"max_model_len={self.max_model_len}")
        check_sampling(req.temperature, req.top_k, req.top_p)
        seed = req.seed
        if seed is None:
            seed = secrets.randbits(32)
        elif isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 1 << 64:
            raise ValueError(f"seed must be an integer in [0, 2**64) or None, got {seed!r}")
        stops = req.stop_token_ids
        if not isinstance(stops, (list, tuple)) or any(
                isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s < V for s in stops):
            raise ValueError(f"stop_token_ids must be a list of token ids in [0, {V}), got {stops!r}")
        key = jax.random.PRNGKey(int(seed) & 0xFFFFFFFF)
        if seed >> 32:
            key = jax.random.fold_in(key, int(seed) >> 32)
        return _Seq(req, on_output, np.asarray(ids, np.int32), np.asarray(key, np.uint32))

    # ------------------------------------------------------------------------------------------ the loop
    def _warm_up(self) -> None:
        """Run every step once with the shapes of real use (slot 0, then emptied): all compilations happen here."""
        s0 = np.int32(0)
        for size in self.prefill_sizes:
            self._prefill_call(s0, np.zeros(size, np.int32), np.int32(1))
        active = np.zeros(self.max_num_seqs, bool)
        active[0] = self._run is not None  # host-driven experts: a real token, so that its expert pass compiles too
        for n in (self.buckets if self._run is None else (self.max_num_seqs,)):
            for k in sorted({1, self.decode_steps}):
                self._decode_call(active, [None] * self.max_num_seqs, k, n=n)
        if self._run is None and self.max_num_seqs > 1:
            self.cache, self.logits = steps.move_row(self.cache, self.logits, np.int32(1), s0)
        if self.prefix is not None:
            self._checkpoint_row(0, 0)
            self.cache = steps.restore_row(self.cache, s0, self._row_state([]), np.int32(0))
        self.cache = steps.reset_row(self.cache, s0)
        jax.block_until_ready(self.cache)
        if self._run is not None:
            self.model.experts.reset_stats()  # count served requests only

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._stopping or self._cancels or self._prefilling or self._waiting and
                           None in self._slots or any(s is not None for s in self._slots)):
                    self._cv.wait()
                if self._stopping:
                    break
                cancels, self._cancels = self._cancels, []
                dropped = cancels_from(self._waiting, cancels)
                admit = []
                while self._waiting and len(admit) < self._slots.count(None):
                    admit.append(self._waiting.popleft())
            for seq in dropped:
                self._emit(seq, [], "abort")
            try:
                for rid in cancels:
                    for b, s in enumerate(self._slots):
                        if s is not None and s.req.request_id == rid:
                            self._finish(b, [], "abort")
                while admit:
                    self._admit(admit[0])
                    admit.pop(0)
                if self._prefilling:
                    self._prefill_one()
                if any(s is not None and s.done == len(s.prompt) for s in self._slots):
                    self._decode()
            except Exception:  # a failed step (its donated cache may be gone): abort the running requests, restart
                log.exception("engine step failed")
                for b, s in enumerate(self._slots):
                    if s is not None:
                        self._finish(b, [], "abort")
                for seq in admit:  # not admitted yet
                    self._emit(seq, [], "abort")
                self._fresh_state()
        for b, s in enumerate(self._slots):
            if s is not None:
                self._finish(b, [], "abort")
        with self._cv:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for seq in waiting:
            self._emit(seq, [], "abort")

    def _emit(self, seq: _Seq, tokens: list[int], reason: str | None, logits=None) -> None:
        if reason is not None:
            with self._cv:
                self._live.discard(seq.req.request_id)
        try:
            seq.on_output(Output(seq.req.request_id, tokens, reason, len(seq.prompt), seq.cached, logits))
        except Exception:
            log.exception("on_output of request %s failed", seq.req.request_id)

    def _finish(self, b: int, tokens: list[int], reason: str, logits=None) -> None:
        seq = self._slots[b]
        self._slots[b] = None
        if b in self._prefilling:
            self._prefilling.remove(b)
        self._emit(seq, tokens, reason, logits)

    def _admit(self, seq: _Seq) -> None:
        b = self._slots.index(None)
        slot = np.int32(b)
        n, entries = self.prefix.lookup(seq.prompt.tolist()) if self.prefix is not None else (0, [])
        if n:
            self.cache = steps.restore_row(self.cache, slot, self._row_state(entries), np.int32(n))
        else:
            self.cache = steps.reset_row(self.cache, slot)
        seq.done = seq.cached = n
        self._slots[b] = seq
        self._prefilling.append(b)
        with self._cv:
            self._counts["prompt"] += len(seq.prompt)

    def _prefill_one(self) -> None:
        """One chunk of the oldest prefilling slot, up to the next multiple of ``chunk`` (or the prompt's end), in
        the smallest of ``prefill_sizes`` that holds it."""
        b = self._prefilling[0]
        seq = self._slots[b]
        start = seq.done
        end = min(len(seq.prompt), (start // self.chunk + 1) * self.chunk)
        tokens = np.zeros(next(n for n in self.prefill_sizes if n >= end - start), np.int32)
        tokens[:end - start] = seq.prompt[start:end]
        self._prefill_call(np.int32(b), tokens, np.int32(end - start))
        seq.done = end
        if self.prefix is not None and (end % self.chunk == 0 or end == len(seq.prompt)):
            self._checkpoint_row(b, end, seq)
        if end == len(seq.prompt):
            self._prefilling.popleft()

    def _prefill_call(self, slot, tokens: np.ndarray, n) -> None:
        """Prefill ``n`` tokens of ``tokens`` [size] (one of ``prefill_sizes``) into row ``slot`` (compiled, or
        eagerly with host-driven experts)."""
        args = (self.model.params, self.cfg, self.cache, self.logits, slot, tokens, n)
        if self._run is None:
            self.cache, self.logits = steps.prefill_chunk(*args)
        else:
            self.cache, self.logits = steps.prefill_chunk_with(self._run, *args)

    def _decode(self) -> None:
        """Decode every running row: one step, or ``decode_steps`` in one call when no request waits or prefills
        and none wants logits (a finished row's extra tokens are dropped)."""
        self._compact()
        active = np.array([s is not None and s.done == len(s.prompt) for s in self._slots])
        want = any(s is not None and active[b] and s.req.return_logits for b, s in enumerate(self._slots))
        k = 1 if want or self._waiting or self._prefilling else self.decode_steps
        top = int(np.flatnonzero(active)[-1]) + 1
        n = self.max_num_seqs if self._run is not None else next(n for n in self.buckets if n >= top)
        tok, logits = self._decode_call(active, self._slots, k, want, n)
        for b in np.flatnonzero(active):
            seq = self._slots[b]
            for t in tok[b]:
                if t < 0:
                    break
                t = int(t)
                seq.n_gen += 1
                with self._cv:
                    self._counts["gen"] += 1
                lg = logits[b:b + 1] if want and seq.req.return_logits else None
                if t in seq.req.stop_token_ids:
                    self._finish(b, [], "stop", lg)
                elif seq.n_gen >= seq.req.max_tokens:
                    self._finish(b, [t], "length", lg)
                else:
                    self._emit(seq, [t], None, lg)
                    continue
                break

    def _compact(self) -> None:
        """Move the last occupied row into the first free one while that shrinks the decode bucket (an exact
        copy of its cache row and logits; the row numbers of a prefilling request follow)."""
        if self._run is not None:
            return
        while True:
            used = [b for b, s in enumerate(self._slots) if s is not None]
            if not used or None not in self._slots[:used[-1]]:
                return
            need = next(n for n in self.buckets if n >= len(used))
            if next(n for n in self.buckets if n > used[-1]) == need:
                return
            src, dst = used[-1], self._slots.index(None)
            self.cache, self.logits = steps.move_row(self.cache, self.logits, np.int32(src), np.int32(dst))
            self._slots[dst], self._slots[src] = self._slots[src], None
            self._prefilling = collections.deque(dst if b == src else b for b in self._prefilling)

    def _decode_call(self, active: np.ndarray, slots: list, k: int = 1, want: bool = False,
                     n: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Run ``k`` decode steps over the rows ``active`` [B] (all inside the first ``n``, default all rows;
        with host-driven experts always all) -> (tokens [n, k] (-1: none), the logits [B, V] the first step
        sampled from when ``want``)."""
        B = self.max_num_seqs if n is None else n
        temp, top_k, top_p = np.zeros(B, np.float32), np.zeros(B, np.int32), np.ones(B, np.float32)
        keys, n_gen, left = np.zeros((B, 2), np.uint32), np.zeros(B, np.int32), np.zeros(B, np.int32)
        for b, s in enumerate(slots[:B]):
            if s is not None and active[b]:
                temp[b], top_k[b], top_p[b], keys[b], n_gen[b] = (s.req.temperature, s.req.top_k, s.req.top_p,
                                                                  s.key, s.n_gen)
                left[b] = s.req.max_tokens - s.n_gen
        logits = np.asarray(self.logits) if want else None
        sp = SamplingParams(jnp.asarray(temp), jnp.asarray(top_k), jnp.asarray(top_p))
        args = (self.cache, self.logits, jnp.asarray(active[:B]), jnp.asarray(keys), jnp.asarray(n_gen), sp)
        if self._run is not None:  # eagerly: one step
            tok, self.cache, self.logits = steps.decode_once(self.model.params, self.cfg, *args, run=self._run)
            self.model.experts.stats.tokens += int(active.sum())
            return np.asarray(tok)[:, None], logits
        if k == 1:
            tok, self.cache, self.logits = steps.decode_step(self.model.params, self.cfg, B, *args)
            return np.asarray(tok)[:, None], logits
        tok, self.cache, self.logits = steps.decode_steps(self.model.params, self.cfg, k, B, *args, jnp.asarray(left))
        return np.asarray(tok), logits

    # ------------------------------------------------------------------------------------------ prefix checkpoints
    def _checkpoint_row(self, b: int, end: int, seq: _Seq | None = None) -> None:
        """Copy row b's state at prompt position ``end`` to the prefix cache: the KV of [prev, end) (prev the
        previous checkpoint) and the Mamba state. Skipped when the checkpoint came from the cache itself."""
        if seq is not None and end <= seq.cached:
            return
        prev = (end - 1) // self.chunk * self.chunk if end else 0
        layers = jax.device_get(steps.extract_row(self.cache, self.positional, self.chunk, np.int32(b),
                                                  np.int32(prev)))
        if seq is None:  # warm-up
            return
        entry = tuple({k: a[0, :end - prev] if k in names else a[0] for k, a in st.items()}
                      for st, names in zip(layers, self.positional))
        nbytes = sum(a.nbytes for st in entry for a in st.values())
        self.prefix.insert(seq.prompt.tolist(), end, entry, nbytes)

    def _row_state(self, entries: list) -> tuple:
        """A row's layer states (batch 1, positional arrays over all S positions, zero-padded) from the chain of
        checkpoint entries (root first): positional segments concatenated, the rest from the last entry."""
        S = self.cache.mask.shape[1]
        out = []
        for i, (st, names) in enumerate(zip(self.cache.layers, self.positional)):
            row = {}
            for k, a in st.items():
                shape, dt = a.shape[1:], a.dtype
                if k in names:
                    full = np.zeros(shape, dt)
                    segs = [e[i][k] for e in entries]
                    if segs:
                        cat = np.concatenate(segs, axis=0)
                        full[:len(cat)] = cat
                    row[k] = full[None]
                else:
                    row[k] = (np.asarray(entries[-1][i][k], dt) if entries else np.zeros(shape, dt))[None]
            out.append(row)
        return tuple(out)


def cancels_from(waiting: collections.deque, ids: list[str]) -> list[_Seq]:
    """Remove the waiting requests named in ``ids`` from ``waiting``; returns them."""
    gone = [s for s in waiting if s.req.request_id in ids]
    for s in gone:
        waiting.remove(s)
    return gone
