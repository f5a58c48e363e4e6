"""``nemojax serve`` over HTTP with the official ``openai`` client: chat and completions (streamed and not, against
direct generation), tool calls and reasoning through scripted output, stop strings, concurrency, client
disconnects, every error status, /metrics and /v1/models. Servers run in-process (uvicorn in a thread)."""
from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

import nemojax
from nemojax.cli import default_model_path
from nemojax.params import init_params_numpy
from nemojax.tokenizer import Tokenizer

from nemojax import chat
from nemojax.serve.engine import Engine
from nemojax.serve.server import build_app

from .conftest import tiny_config
from .serve_fakes import ScriptedEngine
from .tiny_tokenizer import make_tokenizer

NAME = "tiny-nemotron"
CTX = 256       # the tiny model's context
SCTX = 2048     # the scripted servers' max_model_len (the bundled template's tool prompt is long)
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather forecast",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]
TOOL_OUT = ("I need the weather for Paris.\n</think>\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
            "</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")
SCRIPTS = {
    "WEATHER": TOOL_OUT,
    "THINK": "Two plus three is five.\n</think>\nThe answer is 5.",
    "PLAIN": "héllo wörld 🙂 done",
    "STOPME": "héllo wörld 🙂 STOP after the stop",
    "SLOW": "tick " * 60,
}


class LiveServer:
    """uvicorn serving ``app`` on 127.0.0.1 and a free port in a background thread."""

    def __init__(self, app, engine):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.engine = engine
        engine.start()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.port}"
        for _ in range(200):
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        else:
            raise RuntimeError("the test server did not come up")

    def client(self, api_key="none", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, **kw)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.engine.stop()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_model")
    make_tokenizer(d, vocab_size=512)
    cfg = tiny_config(max_position_embeddings=CTX)
    nemojax.checkpoint.save_params(init_params_numpy(cfg, seed=47), cfg, d)
    return d


@pytest.fixture(scope="module")
def tok(model_dir):
    return Tokenizer(model_dir)


@pytest.fixture(scope="module")
def model(model_dir):
    return nemojax.load(model_dir, dtype="float32")


def _serve(engine, tok, ctx=CTX, **kw):
    return LiveServer(build_app(engine, tok, served_model_name=NAME, max_model_len=ctx, **kw), engine)


@pytest.fixture(scope="module")
def live(model, tok):
    s = _serve(Engine(model, max_num_seqs=4, max_model_len=CTX, chunk=16, prefix_cache_bytes=1 << 24), tok)
    yield s
    s.close()


@pytest.fixture(scope="module")
def btok():
    """The bundled model's tokenizer: its chat template renders tools, tool calls and tool answers."""
    return Tokenizer(default_model_path())


@pytest.fixture(scope="module")
def scripted(btok):
    s = _serve(ScriptedEngine(btok, SCRIPTS, per_step=1, delays={"SLOW": 0.05}), btok, SCTX)
    yield s
    s.close()


def _reference(model, tok, ids, n):
    """Greedy tokens straight from the model, cut before the first stop token."""
    out = model.generate([ids], n, stop_token_ids=tok.stop_token_ids, chunk=4)[0].tolist()
    stop = next((i for i, t in enumerate(out) if t in tok.stop_token_ids), len(out))
    return out[:stop], stop < len(out)


# ---------------------------------------------------------------------------------------------- model engine
def test_chat_against_direct_generation_streamed_and_not(live, model, tok):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 2 plus 3"}]
    c = live.client()
    res = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=8, temperature=0, seed=5)
    prompt = tok.apply_chat_template(msgs)
    ids = tok.encode(prompt)
    want_ids, stopped = _reference(model, tok, ids, 8)
    want = chat.parse(tok.decode(want_ids), thinking=True, tool_calls=False)  # no tools: no call parsing
    msg = res.choices[0].message
    assert (msg.content, msg.reasoning_content) == (want.content, want.reasoning)
    assert res.choices[0].finish_reason == ("stop" if stopped else "length")
    assert res.id.startswith("chatcmpl-") and res.object == "chat.completion" and res.model == NAME
    assert (res.usage.prompt_tokens, res.usage.completion_tokens) == (len(ids), len(want_ids))
    assert res.usage.total_tokens == len(ids) + len(want_ids)
    assert res.usage.prompt_tokens_details.cached_tokens == 0

    chunks = list(c.chat.completions.create(model=NAME, messages=msgs, max_tokens=8, temperature=0, seed=5,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    content = "".join(d.content or "" for d in deltas)
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert (content or None, reasoning or None) == (msg.content, msg.reasoning_content)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == res.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want_ids)


def test_completions_text_and_token_ids(live, model, tok):
    c = live.client()
    text = "hello world the answer is"
    ids = tok.encode(text, add_special_tokens=True)
    want_ids, stopped = _reference(model, tok, ids, 8)
    a = c.completions.create(model=NAME, prompt=text, max_tokens=8, temperature=0)
    b = c.completions.create(model=NAME, prompt=ids, max_tokens=8, temperature=0)
    d = c.completions.create(model=NAME, prompt=[ids], max_tokens=8, temperature=0)
    want = tok.decode(want_ids, skip_special_tokens=True)
    assert a.choices[0].text == b.choices[0].text == d.choices[0].text == want
    assert a.object == "text_completion" and a.id.startswith("cmpl-")
    assert a.choices[0].finish_reason == ("stop" if stopped else "length")
    assert (a.usage.prompt_tokens, a.usage.completion_tokens) == (len(ids), len(want_ids))
    parts = list(c.completions.create(model=NAME, prompt=ids, max_tokens=8, temperature=0, stream=True,
                                      stream_options={"include_usage": True}))
    assert "".join(p.choices[0].text for p in parts if p.choices) == want
    assert parts[-1].choices == [] and parts[-1].usage.prompt_tokens == len(ids)


def test_sixteen_concurrent_clients_get_what_they_get_alone(live, model, tok):
    prompts = [f"the answer is {i} plus {i * 3}" for i in range(16)]
    ids = [tok.encode(p, add_special_tokens=True) for p in prompts]
    want = [tok.decode(_reference(model, tok, x, 8)[0], skip_special_tokens=True) for x in ids]
    c = live.client()
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda p: c.completions.create(model=NAME, prompt=p, max_tokens=8, temperature=0)
                            .choices[0].text, prompts))
    assert got == want and len(set(want)) > 1


# ---------------------------------------------------------------------------------------------- scripted output
def _stream_chat(c, **kw):
    chunks = list(c.chat.completions.create(model=NAME, stream=True, **kw))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    return (chunks, "".join(d.content or "" for d in deltas),
            "".join(getattr(d, "reasoning_content", None) or "" for d in deltas), calls)


def test_tool_calls_and_reasoning_end_to_end(scripted):
    c = scripted.client()
    msgs = [{"role": "user", "content": "WEATHER in Paris?"}]
    res = c.chat.completions.create(model=NAME, messages=msgs, tools=WEATHER, max_tokens=200)
    ch = res.choices[0]
    assert ch.finish_reason == "tool_calls"
    assert ch.message.reasoning_content.strip() == "I need the weather for Paris."
    assert (ch.message.content or "").strip() == ""
    (call,) = ch.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}
    want = chat.parse(TOOL_OUT, tools=WEATHER, thinking=True)
    assert [(t.name, json.loads(t.arguments)) for t in want.tool_calls] == [("get_weather", {"city": "Paris",
                                                                                             "days": 3})]
    chunks, content, reasoning, calls = _stream_chat(c, messages=msgs, tools=WEATHER, max_tokens=200)
    assert reasoning == ch.message.reasoning_content and (content or None) == ch.message.content
    assert [(t.index, t.function.name, json.loads(t.function.arguments)) for t in calls] == \
        [(0, "get_weather", {"city": "Paris", "days": 3})]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the conversation goes on: the assistant's call (arguments a JSON string) and the tool's answer render
    follow = msgs + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, THINK"}]
    res2 = c.chat.completions.create(model=NAME, messages=follow, tools=WEATHER, max_tokens=200)
    assert res2.choices[0].message.content.strip() == "The answer is 5."
    prompt = scripted.engine.tok.decode(scripted.engine.prompts[res2.id])
    assert "<function=get_weather>\n<parameter=city>\nParis\n</parameter>" in prompt


def test_tool_choice_none_and_thinking_off(scripted):
    c = scripted.client()
    msgs = [{"role": "user", "content": "WEATHER in Paris?"}]
    res = c.chat.completions.create(model=NAME, messages=msgs, tools=WEATHER, tool_choice="none", max_tokens=200)
    assert res.choices[0].finish_reason == "stop" and not res.choices[0].message.tool_calls
    assert "<function=get_weather>" in res.choices[0].message.content
    assert "get_weather" not in scripted.engine.tok.decode(scripted.engine.prompts[res.id])
    # enable_thinking off: the prompt closes <think>, the whole output is content
    res = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": [
        {"type": "text", "text": "PLAIN"}, {"type": "text", "text": " please"}]}], max_tokens=200,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert res.choices[0].message.content == SCRIPTS["PLAIN"] and res.choices[0].message.reasoning_content is None
    assert scripted.engine.tok.decode(scripted.engine.prompts[res.id]).endswith("PLAIN please<|im_end|>\n"
                                                                                "<|im_start|>assistant\n<think></think>")


def test_stop_strings_across_deltas_and_multibyte_text(scripted):
    c = scripted.client()
    parts = list(c.completions.create(model=NAME, prompt="PLAIN", max_tokens=80, stream=True))
    texts = [p.choices[0].text for p in parts]
    assert "".join(texts) == SCRIPTS["PLAIN"] and not any("\ufffd" in t for t in texts)
    for stream in (False, True):
        r = c.completions.create(model=NAME, prompt="STOPME", max_tokens=80, stop=["zzz", "STOP"], stream=stream)
        rs = list(r) if stream else [r]
        assert "".join(p.choices[0].text for p in rs) == "héllo wörld 🙂 "
        assert rs[-1].choices[0].finish_reason == "stop"
        assert rs[0].id in scripted.engine.cancelled  # the engine stops generating at the match
    r = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "THINK"}], stop="is 5",
                                  max_tokens=80)
    assert r.choices[0].message.content.strip() == "The answer" and r.choices[0].finish_reason == "stop"


def test_client_disconnect_cancels_the_engine_request(scripted):
    with httpx.stream("POST", scripted.url + "/v1/chat/completions", timeout=10,
                      json={"model": NAME, "messages": [{"role": "user", "content": "SLOW"}], "stream": True,
                            "max_tokens": 200}) as r:
        data = (json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:"))
        first = next(data)
        assert next(data)["choices"][0]["delta"] and next(data)["choices"][0]["delta"]  # streaming has begun
    eng = scripted.engine
    for _ in range(100):
        if first["id"] in eng.cancelled and eng.stats()["running"] == 0:
            break
        time.sleep(0.05)
    assert first["id"] in eng.cancelled and eng.stats()["running"] == 0
    # the slot is free: the next request runs
    assert scripted.client().completions.create(model=NAME, prompt="PLAIN", max_tokens=50).choices[0].text == \
        SCRIPTS["PLAIN"]


def test_a_client_gone_before_a_non_streamed_answer_cancels_too(scripted):
    eng = scripted.engine
    before = len(eng.cancelled)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(scripted.url + "/v1/completions", timeout=0.7,
                   json={"model": NAME, "prompt": "SLOW", "max_tokens": 200})
    for _ in range(100):
        if len(eng.cancelled) > before and eng.stats()["running"] == 0:
            break
        time.sleep(0.05)
    (rid,) = eng.cancelled[before:]
    assert rid.startswith("cmpl-") and eng.stats()["running"] == 0


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["object"] == "error" and body["error"]["code"] == status
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
    return body["error"]


def test_error_statuses(scripted, btok):
    u = scripted.url + "/v1"
    chat_body = {"model": NAME, "messages": [{"role": "user", "content": "PLAIN"}]}
    e = _error(httpx.post(u + "/chat/completions", content=b'{"model": "x", "messages": [',
                          headers={"content-type": "application/json"}), 400)
    assert "JSON" in e["message"]
    e = _error(httpx.post(u + "/chat/completions", json={**chat_body, "n": 2}), 400)
    assert "n must be 1" in e["message"]
    e = _error(httpx.post(u + "/chat/completions", json={**chat_body, "temperature": -1}), 400)
    assert "temperature" in e["message"]
    _error(httpx.post(u + "/chat/completions", json={"model": NAME, "messages": []}), 400)
    e = _error(httpx.post(u + "/completions", json={"model": NAME, "prompt": [5, 99999]}), 400)
    assert f"[0, {btok.vocab_size})" in e["message"]
    e = _error(httpx.post(u + "/completions", json={"model": NAME, "prompt": "PLAIN", "max_tokens": SCTX}), 400)
    assert f"maximum context length is {SCTX}" in e["message"] and e["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        scripted.client().completions.create(model=NAME, prompt=[5] * SCTX, max_tokens=1)
    e = _error(httpx.post(u + "/chat/completions", json={**chat_body, "model": "gpt-4"}), 404)
    assert "gpt-4" in e["message"]
    with pytest.raises(openai.NotFoundError):
        scripted.client().chat.completions.create(model="gpt-4", messages=chat_body["messages"])
    _error(httpx.post(u + "/embeddings", json={"input": "x"}), 404)  # an unknown path: an error object too
    # unknown fields are ignored, as vLLM does
    r = httpx.post(u + "/chat/completions", json={**chat_body, "frobnicate": 3, "max_tokens": 100})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["reasoning_content"] == SCRIPTS["PLAIN"]


def test_an_internal_failure_answers_500_and_the_server_keeps_serving(scripted, monkeypatch):
    srv = scripted.server.config.app.state.server

    def broken(*a, **kw):
        raise RuntimeError("tokenizer exploded")

    monkeypatch.setattr(srv.tokenizer, "encode", broken)
    e = _error(httpx.post(scripted.url + "/v1/completions", json={"model": NAME, "prompt": "PLAIN"}), 500)
    assert "tokenizer exploded" in e["message"]
    monkeypatch.undo()
    r = scripted.client().completions.create(model=NAME, prompt="PLAIN", max_tokens=50)
    assert r.choices[0].text == SCRIPTS["PLAIN"]


def test_api_key_and_queue_full(btok):
    eng = ScriptedEngine(btok, SCRIPTS, max_waiting=1)
    s = _serve(eng, btok, SCTX, api_key="sekret")
    try:
        _error(httpx.get(s.url + "/v1/models"), 401)
        _error(httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        assert [m.id for m in s.client(api_key="sekret").models.list().data] == [NAME]
        assert httpx.get(s.url + "/health").status_code == 200  # /health and /metrics need no key
        eng.gate.clear()  # hold the running request: the next one waits, the one after finds the queue full
        c = s.client(api_key="sekret")
        with ThreadPoolExecutor(2) as pool:
            held = [pool.submit(c.completions.create, model=NAME, prompt="PLAIN", max_tokens=50)]
            for _ in range(100):
                if eng.stats()["running"] == 1:
                    break
                time.sleep(0.02)
            held.append(pool.submit(c.completions.create, model=NAME, prompt="PLAIN", max_tokens=50))
            for _ in range(100):
                if eng.stats()["waiting"] == 1:
                    break
                time.sleep(0.02)
            r = httpx.post(s.url + "/v1/completions", json={"model": NAME, "prompt": "PLAIN"},
                           headers={"Authorization": "Bearer sekret"})
            e = _error(r, 503)
            assert "busy" in e["message"]
            eng.gate.set()
            assert [f.result().choices[0].text for f in held] == [SCRIPTS["PLAIN"]] * 2
    finally:
        eng.gate.set()
        s.close()


def test_sampling_defaults_come_from_generation_config():
    btok = Tokenizer(default_model_path())
    btok.generation_config = {**btok.generation_config, "temperature": 0.6, "top_p": 0.95, "top_k": 20}
    eng = ScriptedEngine(btok, SCRIPTS)
    s = _serve(eng, btok, SCTX)
    try:
        c = s.client()
        a = c.completions.create(model=NAME, prompt="PLAIN", max_tokens=50)
        b = c.completions.create(model=NAME, prompt="PLAIN", max_tokens=50, temperature=0, top_p=0.5, seed=7,
                                 extra_body={"top_k": -1})
        ra, rb = eng.requests[a.id], eng.requests[b.id]
        assert (ra.temperature, ra.top_p, ra.top_k, ra.seed) == (0.6, 0.95, 20, None)
        assert (rb.temperature, rb.top_p, rb.top_k, rb.seed) == (0.0, 0.5, 0, 7)
        assert ra.max_tokens == 50 and set(ra.stop_token_ids) == set(btok.stop_token_ids)
    finally:
        s.close()


def test_models_and_metrics(scripted):
    assert httpx.get(scripted.url + "/version").json() == {"version": nemojax.__version__}
    models = scripted.client().models.list().data
    assert [(m.id, m.object) for m in models] == [(NAME, "model")] and models[0].max_model_len == SCTX
    scripted.client().completions.create(model=NAME, prompt="PLAIN", max_tokens=50)
    text = httpx.get(scripted.url + "/metrics").text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    stats = scripted.engine.stats()
    val = {s.name: s.value for f in fams.values() for s in f.samples if not s.labels}
    for key, name in (("prompt_tokens_total", "nemojax:prompt_tokens_total"),
                      ("generation_tokens_total", "nemojax:generation_tokens_total"),
                      ("prefix_cache_queries_total", "nemojax:prefix_cache_queries_total"),
                      ("prefix_cache_hits_total", "nemojax:prefix_cache_hits_total"),
                      ("running", "nemojax:num_requests_running"), ("waiting", "nemojax:num_requests_waiting")):
        assert val[name] == stats[key], name
    assert stats["prompt_tokens_total"] > 0 and stats["generation_tokens_total"] > 0
    ttft = val["nemojax:time_to_first_token_seconds_count"]
    assert ttft >= 1 and val["nemojax:time_per_output_token_seconds_count"] >= 1
    assert 0 < val["nemojax:time_to_first_token_seconds_sum"] < 10 * ttft
    assert "nemojax:expert_cache_hit_rate" not in text  # only when the experts are offloaded


def test_cli_serve_passes_its_options_and_refuses_what_it_cannot_run(monkeypatch, capsys):
    import nemojax.serve.engine as engine_mod
    import nemojax.serve.server as server_mod
    from nemojax.cli import main
    from nemojax.formats.kv import FP8

    seen = {}

    class RecordingEngine:
        def __init__(self, model, **kw):
            seen["engine"] = (model, kw)
            self.max_model_len = kw["max_model_len"]

    monkeypatch.setattr(engine_mod, "Engine", RecordingEngine, raising=False)
    monkeypatch.setattr(server_mod, "serve", lambda engine, tok, **kw: seen.setdefault("serve", (engine, tok, kw)))
    assert main(["serve", "--port", "8123", "--max-num-seqs", "4", "--max-model-len", "512", "--kv-cache-dtype",
                 "fp8", "--prefix-cache-gb", "0.5", "--chunk", "32", "--api-key", "k", "--served-model-name",
                 "nemo", "--mesh", "1,1,1"]) == 0
    model, kw = seen["engine"]
    assert kw == dict(max_num_seqs=4, max_model_len=512, chunk=32, prefix_cache_bytes=1 << 29, kv_dtype=FP8,
                      max_waiting=256)
    assert model.config.vocab_size == 1024  # the bundled model by default
    engine, tok, skw = seen["serve"]
    assert isinstance(engine, RecordingEngine) and tok.folder == default_model_path()
    assert skw == dict(served_model_name="nemo", max_model_len=512, api_key="k", host="127.0.0.1", port=8123,
                       log_level="info")
    capsys.readouterr()
    for argv, msg in ((["--mesh", "2,1,1"], "sharded serving is not supported"),
                      (["--mesh", "2,x"], "three positive integers"),
                      (["--max-model-len", "99999"], "exceeds the model's context of 1024"),
                      (["--max-num-seqs", "0"], "--max-num-seqs: must be an integer in [1,"),
                      (["--prefix-cache-gb", "-1"], "--prefix-cache-gb must be >= 0"),
                      (["--model", "/nonexistent/m"], "not a folder")):
        assert main(["serve", *argv]) == 2, argv
        assert msg in capsys.readouterr().err
    assert main(["serve", "--expert-cache", "2", "--cache-policy", "lru"]) == 0  # experts in host memory
    model, _ = seen["engine"]
    assert model.experts.host_driven and model.experts.policy == "lru" and model.experts.n_slots == 2
    capsys.readouterr()
    assert main(["serve", "--expert-cache", "2", "--cache-policy", "fifo"]) == 2
    assert "--cache-policy 'fifo': unknown" in capsys.readouterr().err


def test_offloaded_experts_serve_and_report_their_hit_rate(model, tok):
    """--expert-cache: the engine runs the offloaded experts; greedy answers equal the resident model's and
    /metrics carries the expert cache's hit rate."""
    off = model.offload(3, "lru")
    s = _serve(Engine(off, max_num_seqs=2, max_model_len=CTX, chunk=16, prefix_cache_bytes=1 << 24), tok)
    try:
        ids = tok.encode("the model is a hybrid of state spaces", add_special_tokens=True)
        r = s.client().completions.create(model=NAME, prompt=ids, max_tokens=6, temperature=0)
        want, _ = _reference(model, tok, ids, 6)
        assert r.choices[0].text == tok.decode(want)
        rate = _metric_values(s.url)["nemojax:expert_cache_hit_rate"]
        assert 0 < rate <= 1 and rate == pytest.approx(s.engine.stats()["expert_cache_hit_rate"])
    finally:
        s.close()


def _metric_values(url: str) -> dict:
    text = httpx.get(url + "/metrics").text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def test_cached_tokens_agree_with_the_prefix_cache_metrics(live, tok):
    ids = tok.encode("what is the answer plus the model " * 6, add_special_tokens=True)  # > 2 engine chunks
    c = live.client()
    first = c.completions.create(model=NAME, prompt=ids, max_tokens=8, temperature=0)
    before = _metric_values(live.url)
    again = c.completions.create(model=NAME, prompt=ids, max_tokens=8, temperature=0)
    after = _metric_values(live.url)
    assert again.choices[0].text == first.choices[0].text
    assert again.usage.prompt_tokens_details.cached_tokens == \
        after["nemojax:prefix_cache_hits_total"] - before["nemojax:prefix_cache_hits_total"]
    assert after["nemojax:prefix_cache_queries_total"] - before["nemojax:prefix_cache_queries_total"] == len(ids)
    assert after["nemojax:prompt_tokens_total"] - before["nemojax:prompt_tokens_total"] == len(ids)
    assert again.usage.prompt_tokens_details.cached_tokens >= 16  # whole engine chunks of the repeated prompt


def test_nemojax_serve_command_end_to_end():
    import os
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "nemojax", "serve", "--port", str(port), "--max-num-seqs", "2",
                             "--max-model-len", "256", "--chunk", "32", "--dtype", "float32", "--api-key", "k",
                             "--log-level", "warning"], cwd=root, env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        c = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        (m,) = c.models.list().data
        assert m.id == "default_model" and m.max_model_len == 256
        r = c.chat.completions.create(model=m.id, messages=[{"role": "user", "content": "What is 2 + 3?"}],
                                      max_tokens=24, temperature=0)
        assert r.usage.completion_tokens > 0 and r.choices[0].finish_reason in ("stop", "length")
        # a service manager's stop: uvicorn shuts down, then ends with the signal's own status (as under vLLM)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
