"""The OpenAI-compatible HTTP server (FastAPI): ``build_app(engine, tokenizer, ...)`` and ``serve(...)`` (uvicorn).

Endpoints: ``GET /health``, ``GET /version``, ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (both
streamed as server-sent events when ``stream`` is true), ``GET /metrics`` (Prometheus). Requests run on a
``nemojax.serve.engine.Engine``; chat output is split into reasoning, content and tool calls by
``nemojax.chat.OutputParser``. Every failure answers an OpenAI error object (``{"object": "error", "error":
{"message", "type", "param", "code"}}``): 400 for invalid requests, 401 without the ``--api-key``, 404 for an
unknown model, 503 when the engine's queue is full.

``tool_choice``: ``"none"`` renders no tools and parses none; ``"auto"`` renders the tools and parses the calls the
model makes. ``"required"`` and a named function are accepted but not enforced (vLLM forces them with guided
decoding, which this server does not have): the tools are rendered and parsed as with ``"auto"``, and if the model
answers without a call the request finishes normally with ``finish_reason`` ``"stop"``.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import AsyncIterator

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chat import OutputParser
from ..version import __version__
from .engine import QueueFull, Request
from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import (
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
    CompletionChoice, CompletionRequest, CompletionResponse, DeltaMessage, DeltaToolCall, ErrorBody, ErrorResponse,
    MessageToolCall, ModelCard, ModelList, PromptTokensDetails, ResponseMessage, ToolCallFunction, Usage, new_id,
)
from .textstream import Detokenizer, StopMatcher

__all__ = ["build_app", "serve", "APIError"]

_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                405: "MethodNotAllowedError", 500: "InternalServerError", 503: "ServiceUnavailableError"}


DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks that its client is still there


class APIError(Exception):
    """An error answered as an OpenAI error object with HTTP status ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(message=message, type=_ERROR_TYPES.get(status, "Error"), param=param,
                                         code=status))
    return JSONResponse(body.model_dump(), status_code=status)


def _sse(obj) -> str:
    return f"data: {obj.model_dump_json(exclude_none=True)}\n\n"


class Generation:
    """One engine request seen from the event loop: :meth:`pieces` yields its output text as it becomes final
    (detokenized incrementally, stop strings cut), then ``finish_reason`` and the token counts are set."""

    def __init__(self, server: "_Server", request_id: str, prompt_ids: list[int], max_tokens: int,
                 sampling: dict, stops: list[str], stop_token_ids: list[int], skip_special_tokens: bool):
        self.server, self.request_id, self.prompt_ids = server, request_id, prompt_ids
        self.req = Request(request_id=request_id, prompt_ids=prompt_ids, max_tokens=max_tokens,
                           stop_token_ids=tuple(stop_token_ids), **sampling)
        tok = server.tokenizer
        self.detok = Detokenizer(lambda ids: tok.decode(ids, skip_special_tokens=skip_special_tokens))
        self.stop = StopMatcher(stops)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.arrived = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at = 0.0
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.prompt_tokens = len(prompt_ids)
        self.cached_tokens = 0
        self.done = False
        self.polled = self.arrived  # when the client's connection was last checked

    def submit(self) -> None:
        """Hand the request to the engine (APIError 503 when its queue is full, 400 for a request it refuses)."""
        loop = asyncio.get_running_loop()

        def on_output(out):  # engine thread
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, out)
            except RuntimeError:  # the event loop is closed: the server is shutting down
                pass

        try:
            self.server.engine.submit(self.req, on_output)
        except QueueFull as e:
            raise APIError(503, f"the server is busy: {e or 'the request queue is full'}; retry later") from None
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def abort(self) -> None:
        """Cancel the engine request unless it finished (frees its slot)."""
        if not self.done:
            self.done = True
            self.server.engine.cancel(self.request_id)

    async def _next(self, http: HTTPRequest | None):
        """The next engine Output; with ``http`` (non-streamed answers), aborts when the client went away (checked
        at least every ``DISCONNECT_POLL_S``, also while outputs keep coming)."""
        if http is not None and time.perf_counter() - self.polled > DISCONNECT_POLL_S:
            self.polled = time.perf_counter()
            if await http.is_disconnected():
                raise APIError(499, "the client disconnected")
        if http is None or not self.queue.empty():
            return await self.queue.get()
        getter = asyncio.ensure_future(self.queue.get())
        try:
            while True:
                done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
                if done:
                    return getter.result()
                self.polled = time.perf_counter()
                if await http.is_disconnected():
                    raise APIError(499, "the client disconnected")
        finally:
            getter.cancel()

    async def pieces(self, http: HTTPRequest | None = None) -> AsyncIterator[str]:
        try:
            while not self.done:
                out = await self._next(http)
                now = time.perf_counter()
                if out.token_ids:
                    if self.first_token_at is None:
                        self.first_token_at = now
                    self.last_token_at = now
                    self.completion_tokens += len(out.token_ids)
                self.prompt_tokens = out.prompt_tokens or self.prompt_tokens
                self.cached_tokens = max(self.cached_tokens, out.cached_tokens)
                text = self.detok.push(out.token_ids)
                if out.finish_reason is not None:
                    text += self.detok.flush()
                emit, matched = self.stop.push(text)
                if emit:
                    yield emit
                if matched:
                    self.finish_reason = "stop"
                    self.abort()
                elif out.finish_reason is not None:
                    rest = self.stop.flush()
                    if rest:
                        yield rest
                    self.finish_reason, self.done = out.finish_reason, True
            self._observe()
        finally:
            self.abort()

    def _observe(self) -> None:
        m = self.server.metrics
        if self.first_token_at is not None:
            m.ttft.observe(self.first_token_at - self.arrived)
            if self.completion_tokens > 1:
                m.tpot.observe((self.last_token_at - self.first_token_at) / (self.completion_tokens - 1))

    def usage(self) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                     total_tokens=self.prompt_tokens + self.completion_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=self.cached_tokens))


def _template_message(i: int, m) -> dict:
    """A request message as the chat template reads it (tool-call arguments as objects, like vLLM)."""
    d = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
    for key in ("reasoning_content", "tool_call_id", "name"):
        if getattr(m, key) is not None:
            d[key] = getattr(m, key)
    if m.tool_calls:
        calls = []
        for j, c in enumerate(m.tool_calls):
            args = c.function.arguments
            if isinstance(args, str):
                try:
                    args = json.loads(args) if args.strip() else {}
                except ValueError as e:
                    raise APIError(400, f"messages[{i}].tool_calls[{j}].function.arguments is not valid JSON ({e})",
                                   f"messages[{i}].tool_calls[{j}].function.arguments") from None
            if not isinstance(args, dict):
                raise APIError(400, f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON object",
                               f"messages[{i}].tool_calls[{j}].function.arguments")
            calls.append({"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": args}})
        d["tool_calls"] = calls
    return d


class _Server:
    """What the endpoints share: the engine, tokenizer, limits and metrics."""

    def __init__(self, engine, tokenizer, served_model_name: str, max_model_len: int):
        self.engine, self.tokenizer = engine, tokenizer
        self.model_name, self.max_model_len = served_model_name, max_model_len
        self.metrics = ServerMetrics(engine)
        self.stop_token_ids = list(tokenizer.stop_token_ids)
        gen_cfg = getattr(tokenizer, "generation_config", None) or {}
        self.sampling_defaults = {k: gen_cfg[k] for k in ("temperature", "top_p", "top_k") if k in gen_cfg}

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist.", "model")

    def generation(self, body, request_id: str, prompt_ids: list[int], skip_special_tokens: bool) -> Generation:
        """Check the lengths and submit; the running Generation."""
        n, L = len(prompt_ids), self.max_model_len
        limit = body.output_limit()
        if n >= L or (limit is not None and n + limit > L):
            want = n + (limit or 0)
            raise APIError(400, f"This model's maximum context length is {L} tokens. However, you requested {want} "
                                f"tokens ({n} in the prompt, {limit or 0} in the completion). Please reduce the "
                                f"length of the prompt or of max_tokens.", "max_tokens")
        stops = [] if body.ignore_eos else self.stop_token_ids
        gen = Generation(self, request_id, prompt_ids, limit or L - n, body.sampling(self.sampling_defaults),
                         body.stop_list(),
                         list(dict.fromkeys(stops + list(body.stop_token_ids or []))), skip_special_tokens)
        gen.submit()
        return gen

    # ------------------------------------------------------------------ chat
    def chat_prompt(self, body: ChatCompletionRequest) -> tuple[list[int], list[dict] | None, bool]:
        """(prompt ids, the tools rendered and parsed or None, thinking: the prompt ends inside <think>)."""
        tools = None
        if body.tools and body.tool_choice != "none":
            tools = [t.model_dump(exclude_none=True) for t in body.tools]
        msgs = [_template_message(i, m) for i, m in enumerate(body.messages)]
        kwargs = dict(body.chat_template_kwargs or {})
        kwargs.pop("enable_thinking", None)
        try:
            text = self.tokenizer.apply_chat_template(msgs, tools=tools, add_generation_prompt=body.add_generation_prompt,
                                                      enable_thinking=body.enable_thinking(), **kwargs)
        except (ValueError, TypeError) as e:  # TokenizerError is a ValueError
            raise APIError(400, f"the chat template cannot render these messages: {e}", "messages") from None
        except Exception as e:  # jinja2 errors (raise_exception in the template)
            raise APIError(400, f"the chat template cannot render these messages: {e}", "messages") from None
        thinking = text.rfind("<think>") > text.rfind("</think>")
        ids = self.tokenizer.encode(text)
        if not ids:
            raise APIError(400, "the rendered prompt encodes to no tokens", "messages")
        return ids, tools, thinking

    async def chat(self, body: ChatCompletionRequest, http: HTTPRequest):
        self.check_model(body.model)
        ids, tools, thinking = self.chat_prompt(body)
        rid = new_id("chatcmpl-")
        try:
            # without tools (none given, or tool_choice "none") call blocks stay text, as in vLLM
            parser = OutputParser(tools=tools, thinking=thinking, tool_calls=bool(tools))
        except ValueError as e:
            raise APIError(400, f"tools: {e}", "tools") from None
        gen = self.generation(body, rid, ids, False)  # the parser reads <think> / <tool_call> tags
        if body.stream:
            return StreamingResponse(self.chat_stream(body, gen, parser), media_type="text/event-stream")
        reasoning, content, calls = [], [], []
        try:
            async for piece in gen.pieces(http):
                _collect(parser.feed(piece), reasoning, content, calls)
            _collect(parser.finish(), reasoning, content, calls)
        finally:
            gen.abort()
        msg = ResponseMessage(content="".join(content) or None, reasoning_content="".join(reasoning) or None,
                              tool_calls=[MessageToolCall(id=new_id("call_"), function=ToolCallFunction(
                                  name=c.name, arguments=c.arguments)) for c in calls])
        return JSONResponse(ChatCompletionResponse(
            id=rid, model=self.model_name, usage=gen.usage(),
            choices=[ChatChoice(message=msg, finish_reason=_finish(gen.finish_reason, calls))]).model_dump())

    async def chat_stream(self, body: ChatCompletionRequest, gen: Generation, parser) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(delta: DeltaMessage, finish: str | None = None) -> str:
            return _sse(ChatCompletionChunk(id=gen.request_id, created=created, model=self.model_name,
                                            choices=[ChatChunkChoice(delta=delta, finish_reason=finish)]))

        n_calls = 0

        def deltas(d) -> list[str]:
            nonlocal n_calls
            out = []
            if d.reasoning:
                out.append(chunk(DeltaMessage(reasoning_content=d.reasoning)))
            if d.content:
                out.append(chunk(DeltaMessage(content=d.content)))
            if d.tool_calls:
                calls = [DeltaToolCall(index=n_calls + k, id=new_id("call_"),
                                       function=ToolCallFunction(name=c.name, arguments=c.arguments))
                         for k, c in enumerate(d.tool_calls)]
                n_calls += len(calls)
                out.append(chunk(DeltaMessage(tool_calls=calls)))
            return out

        try:
            yield chunk(DeltaMessage(role="assistant", content=""))
            async for piece in gen.pieces():
                for s in deltas(parser.feed(piece)):
                    yield s
            for s in deltas(parser.finish()):
                yield s
            yield chunk(DeltaMessage(), _finish(gen.finish_reason, range(n_calls)))
            if body.include_usage():
                yield _sse(ChatCompletionChunk(id=gen.request_id, created=created, model=self.model_name,
                                               choices=[], usage=gen.usage()))
        except Exception as e:  # the status line went out already: report in the stream
            yield _stream_error(e)
        finally:
            gen.abort()
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------------ completions
    def completion_prompt(self, body: CompletionRequest) -> list[int]:
        p = body.prompt
        if isinstance(p, str):
            ids = self.tokenizer.encode(p, add_special_tokens=True)
            if not ids:
                raise APIError(400, "prompt encodes to no tokens", "prompt")
            return ids
        V = self.tokenizer.vocab_size
        bad = [t for t in p if not 0 <= t < V]
        if bad:
            raise APIError(400, f"prompt token ids must lie in [0, {V}), got {bad[:5]}", "prompt")
        return list(p)

    async def completion(self, body: CompletionRequest, http: HTTPRequest):
        self.check_model(body.model)
        rid = new_id("cmpl-")
        gen = self.generation(body, rid, self.completion_prompt(body), body.skip_special_tokens)
        if body.stream:
            return StreamingResponse(self.completion_stream(body, gen), media_type="text/event-stream")
        try:
            text = "".join([piece async for piece in gen.pieces(http)])
        finally:
            gen.abort()
        return JSONResponse(CompletionResponse(
            id=rid, model=self.model_name, usage=gen.usage(),
            choices=[CompletionChoice(text=text, finish_reason=gen.finish_reason)]).model_dump())

    async def completion_stream(self, body: CompletionRequest, gen: Generation) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(text: str, finish: str | None = None, usage=None, choices=True) -> str:
            return _sse(CompletionResponse(id=gen.request_id, created=created, model=self.model_name, usage=usage,
                                           choices=[CompletionChoice(text=text, finish_reason=finish)] if choices
                                           else []))

        try:
            async for piece in gen.pieces():
                yield chunk(piece)
            yield chunk("", gen.finish_reason)
            if body.include_usage():
                yield chunk("", usage=gen.usage(), choices=False)
        except Exception as e:
            yield _stream_error(e)
        finally:
            gen.abort()
        yield "data: [DONE]\n\n"


def _collect(d, reasoning: list, content: list, calls: list) -> None:
    reasoning.append(d.reasoning)
    content.append(d.content)
    calls.extend(d.tool_calls)


def _finish(reason: str | None, calls) -> str | None:
    return "tool_calls" if reason == "stop" and len(calls) else reason


def _stream_error(e: Exception) -> str:
    status, msg = (e.status, e.message) if isinstance(e, APIError) else (500, f"{type(e).__name__}: {e}")
    body = ErrorResponse(error=ErrorBody(message=msg, type=_ERROR_TYPES.get(status, "Error"), code=status))
    return f"data: {body.model_dump_json()}\n\n"


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            parts.append(f"the request body is not valid JSON ({err.get('ctx', {}).get('error', err['msg'])})")
            continue
        where = ".".join(loc)
        param = param or (where or None)
        parts.append(f"{where}: {err['msg']}" if where else err["msg"])
    return "; ".join(parts) or "invalid request", param


def build_app(engine, tokenizer, *, served_model_name: str, max_model_len: int, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` (a started ``nemojax.serve.engine.Engine``) with ``tokenizer``
    (``nemojax.tokenizer.Tokenizer``) under the model name ``served_model_name``. ``max_model_len``: prompt +
    max_tokens limit (400 above it). ``api_key``: required as ``Authorization: Bearer KEY`` on /v1/*."""
    srv = _Server(engine, tokenizer, served_model_name, max_model_len)
    app = FastAPI(title="nemojax serve", docs_url=None, redoc_url=None)
    app.state.server = srv

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        return error_response(400, *_validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    if api_key is not None:
        @app.middleware("http")
        async def _auth(request: HTTPRequest, call_next):
            if request.url.path.startswith("/v1"):
                given = request.headers.get("authorization", "")
                if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                    return error_response(401, "invalid or missing API key (send Authorization: Bearer KEY)")
            return await call_next(request)

    @app.get("/health")
    async def health():
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/v1/models")
    async def models():
        return ModelList(data=[ModelCard(id=served_model_name, root=served_model_name,
                                         max_model_len=max_model_len)]).model_dump()

    @app.get("/metrics")
    async def metrics():
        return Response(srv.metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: HTTPRequest):
        return await srv.chat(body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: HTTPRequest):
        return await srv.completion(body, request)

    return app


def serve(engine, tokenizer, *, served_model_name: str, max_model_len: int, api_key: str | None = None,
          host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Start ``engine``, serve the app with uvicorn on ``host:port`` until interrupted, then stop the engine."""
    import uvicorn

    app = build_app(engine, tokenizer, served_model_name=served_model_name, max_model_len=max_model_len,
                    api_key=api_key)
    engine.start()
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        engine.stop()
