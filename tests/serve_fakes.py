"""Test doubles for the server tests: engines with the ``nemojax.serve.engine.Engine`` interface that run one
request at a time, and (until ``nemojax.chat.OutputParser`` / ``nemojax.serve.engine`` exist on this branch)
minimal stand-ins of their interfaces, installed only when the real ones are missing.

MERGE NOTE: once the real Engine and OutputParser are merged, ``install_stand_ins`` installs nothing;
``ModelEngine`` below should then be replaced by the real ``nemojax.serve.engine.Engine`` in tests/test_server.py
(``ScriptedEngine`` stays: it scripts the model's output text to test the tool-call / reasoning plumbing).
"""
from __future__ import annotations

import dataclasses
import json
import queue
import sys
import threading
import time
import types
from typing import Callable

import numpy as np


# ---------------------------------------------------------------------------------------------- stand-ins
@dataclasses.dataclass
class StandInRequest:
    request_id: str
    prompt_ids: list
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple = ()


@dataclasses.dataclass
class StandInOutput:
    request_id: str
    token_ids: list
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0


class StandInQueueFull(Exception):
    pass


@dataclasses.dataclass
class StandInToolCall:
    name: str
    arguments: str


@dataclasses.dataclass
class StandInDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list = dataclasses.field(default_factory=list)


def _partial_tail(s: str, tag: str) -> int:
    """Length of the longest tail of ``s`` that is a proper prefix of ``tag``."""
    for k in range(min(len(tag) - 1, len(s)), 0, -1):
        if s.endswith(tag[:k]):
            return k
    return 0


class StandInParser:
    """Incremental reasoning / content / tool-call split with the OutputParser interface (tool calls through
    today's ``nemojax.chat.parse_tool_calls``, emitted whole when ``</tool_call>`` closes; calls to names the
    tools do not define stay text)."""

    def __init__(self, tools=None, thinking=True):
        self.tools, self.mode, self.buf = tools, ("reasoning" if thinking else "content"), ""

    def feed(self, text: str):
        self.buf += text
        return self._drain(False)

    def finish(self):
        return self._drain(True)

    def _drain(self, final: bool):
        from nemojax.chat import parse_tool_calls

        d = StandInDelta()
        while True:
            if self.mode == "call":
                i = self.buf.find("</tool_call>")
                if i < 0 and not final:
                    return d
                block = self.buf if i < 0 else self.buf[:i + len("</tool_call>")]
                self.buf = "" if i < 0 else self.buf[i + len("</tool_call>"):]
                calls = parse_tool_calls(block, self.tools)[1]
                names = {t["function"]["name"] for t in self.tools}
                if all(c["name"] in names for c in calls):
                    d.tool_calls += [StandInToolCall(c["name"], json.dumps(c["arguments"])) for c in calls]
                else:  # calls to names the tools do not define stay text
                    d.content += block
                self.mode = "content"
                continue
            tag = "</think>" if self.mode == "reasoning" else ("<tool_call>" if self.tools else None)
            i = self.buf.find(tag) if tag else -1
            if i >= 0:
                text, self.buf = self.buf[:i], self.buf[i + (len(tag) if self.mode == "reasoning" else 0):]
            else:
                k = 0 if final or not tag else _partial_tail(self.buf, tag)
                text, self.buf = self.buf[:len(self.buf) - k], self.buf[len(self.buf) - k:]
            if self.mode == "reasoning":
                d.reasoning += text
            else:
                d.content += text
            if i < 0:
                return d
            self.mode = "content" if self.mode == "reasoning" else "call"


def stand_in_parse(text, tools=None, thinking=True):
    p = StandInParser(tools, thinking)
    a, b = p.feed(text), p.finish()
    return types.SimpleNamespace(reasoning=(a.reasoning + b.reasoning) or None,
                                 content=(a.content + b.content) or None, tool_calls=a.tool_calls + b.tool_calls)


def install_stand_ins() -> list[str]:
    """Install the stand-ins whose real modules are missing; the names installed."""
    import nemojax.chat

    done = []
    if not hasattr(nemojax.chat, "OutputParser"):
        nemojax.chat.OutputParser, nemojax.chat.parse = StandInParser, stand_in_parse
        done.append("nemojax.chat.OutputParser")
    try:
        import nemojax.serve.engine  # noqa: F401
    except ImportError:
        mod = types.ModuleType("nemojax.serve.engine")
        mod.Request, mod.Output, mod.QueueFull = StandInRequest, StandInOutput, StandInQueueFull
        sys.modules["nemojax.serve.engine"] = mod
        done.append("nemojax.serve.engine")
    return done


install_stand_ins()
from nemojax.serve.engine import Output, QueueFull  # noqa: E402


# ---------------------------------------------------------------------------------------------- engines
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


class ModelEngine(SequentialEngine):
    """Runs ``model.generate_stream`` per request (chunks of ``chunk`` tokens)."""

    def __init__(self, model, chunk: int = 4, **kw):
        super().__init__(**kw)
        self.model, self.chunk = model, chunk

    def tokens(self, req):
        seed = req.seed if req.seed is not None else int(np.random.default_rng().integers(1 << 30))
        for part in self.model.generate_stream([req.prompt_ids], req.max_tokens, temperature=req.temperature,
                                               top_k=req.top_k, top_p=req.top_p, seed=seed,
                                               stop_token_ids=list(req.stop_token_ids), chunk=self.chunk):
            yield part[0].tolist()


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
