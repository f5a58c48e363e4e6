"""A test double for the server tests: :class:`ScriptedEngine`, the ``nemojax.serve.engine.Engine`` interface
over scripted output text (a tiny random model writes no tool calls or reasoning by itself), one request at a
time, recording what it was asked (prompts, requests, cancels) and able to hold its queue (``gate``)."""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable

from nemojax.serve.engine import Output, QueueFull


class SequentialEngine:
    """The Engine interface over one worker thread that runs the requests one after another; ``tokens(req)``
    (subclasses) yields lists of new token ids. Records ``cancelled`` request ids."""

    def __init__(self, max_waiting: int = 256):
        self.max_waiting = max_waiting
        self.jobs: queue.Queue = queue.Queue()
        self.cancelled: list[str] = []
        self.prompts: dict[str, list[int]] = {}
        self.requests: dict = {}
        self.lock = threading.Lock()
        self.n_waiting = self.n_running = 0
        self.totals = dict(prompt_tokens_total=0, generation_tokens_total=0, prefix_cache_queries_total=0,
                           prefix_cache_hits_total=0)
        self.thread: threading.Thread | None = None
        self.gate = threading.Event()
        self.gate.set()

    def start(self):
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def stop(self):
        self.jobs.put(None)
        if self.thread:
            self.thread.join(10)

    def submit(self, req, on_output: Callable) -> None:
        if req.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {req.max_tokens}")
        with self.lock:
            if self.n_waiting >= self.max_waiting:
                raise QueueFull(f"{self.n_waiting} requests are waiting")
            self.n_waiting += 1
            self.prompts[req.request_id] = list(req.prompt_ids)
            self.requests[req.request_id] = req
        self.jobs.put((req, on_output))

    def cancel(self, request_id: str) -> None:
        with self.lock:
            self.cancelled.append(request_id)

    def stats(self) -> dict:
        with self.lock:
            return dict(running=self.n_running, waiting=self.n_waiting, **self.totals)

    def _loop(self):
        while (job := self.jobs.get()) is not None:
            req, emit = job
            with self.lock:
                self.n_waiting -= 1
                self.n_running += 1
                self.totals["prompt_tokens_total"] += len(req.prompt_ids)
                self.totals["prefix_cache_queries_total"] += len(req.prompt_ids)
            self.gate.wait()
            n, reason = 0, "length"
            try:
                for ids in self.tokens(req):
                    with self.lock:
                        if req.request_id in self.cancelled:
                            reason = "abort"
                            break
                    stop = next((i for i, t in enumerate(ids) if t in req.stop_token_ids), None)
                    ids = ids[:stop] if stop is not None else ids
                    ids = ids[:req.max_tokens - n]
                    n += len(ids)
                    with self.lock:
                        self.totals["generation_tokens_total"] += len(ids)
                    if stop is not None and n < req.max_tokens:
                        reason = "stop"
                    done = reason == "stop" or n >= req.max_tokens
                    emit(Output(req.request_id, list(ids), reason if done else None, len(req.prompt_ids)))
                    if done:
                        break
                else:
                    emit(Output(req.request_id, [], "stop", len(req.prompt_ids)))
                if reason == "abort":
                    emit(Output(req.request_id, [], "abort", len(req.prompt_ids)))
            finally:
                with self.lock:
                    self.n_running -= 1


class ScriptedEngine(SequentialEngine):
    """Answers with scripted text: the request whose decoded prompt contains a key of ``scripts`` gets the token
    ids of its text (plus the first stop token), ``per_step`` tokens per Output, ``delays.get(key, 0)`` seconds
    apart."""

    def __init__(self, tokenizer, scripts: dict[str, str], per_step: int = 2, delays: dict | None = None, **kw):
        super().__init__(**kw)
        self.tok, self.scripts, self.per_step, self.delays = tokenizer, scripts, per_step, delays or {}

    def tokens(self, req):
        prompt = self.tok.decode(req.prompt_ids)
        key = max((k for k in self.scripts if k in prompt), key=prompt.rfind)
        ids = self.tok.encode(self.scripts[key]) + list(req.stop_token_ids[:1])
        for i in range(0, len(ids), self.per_step):
            time.sleep(self.delays.get(key, 0.0))
            yield ids[i:i + self.per_step]
