"""Tokenizer, chat template, reasoning / tool-call parsing, and the ``nemojax generate`` CLI end to end."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import nemojax
from nemojax.chat import parse_response
from nemojax.cli import main
from nemojax.params import init_params_numpy
from nemojax.tokenizer import Tokenizer

from .conftest import tiny_config
from .tiny_tokenizer import make_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_model")
    make_tokenizer(d, vocab_size=512)
    cfg = tiny_config(max_position_embeddings=256)
    nemojax.checkpoint.save_params(init_params_numpy(cfg, seed=40), cfg, d)
    return d


def test_tokenizer_round_trip_and_stop_ids(model_dir):
    tok = Tokenizer(model_dir)
    text = "hello world, the answer is 42 <think>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and ids[-1] == tok.token_to_id("<think>")
    assert tok.stop_token_ids == [tok.token_to_id("<|im_end|>"), 2]


def test_chat_template_thinking_on_and_off(model_dir):
    tok = Tokenizer(model_dir)
    msgs = [{"role": "user", "content": "what is 2 + 3"}]
    on = tok.apply_chat_template(msgs)
    off = tok.apply_chat_template(msgs, enable_thinking=False)
    assert on == "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nwhat is 2 + 3<|im_end|>\n" \
                 "<|im_start|>assistant\n<think>\n"
    assert off.endswith("<|im_start|>assistant\n<think></think>")
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    assert '"name": "add"' in tok.apply_chat_template(msgs, tools=tools)


def test_reasoning_split():
    def split(text, thinking=True):
        r = parse_response(text, thinking=thinking)
        return r["reasoning"], r["content"]
    assert split("step one\nstep two\n</think>\nThe answer is 5.<|im_end|>") == \
        ("step one\nstep two", "The answer is 5.")
    assert split("<think>why</think>ok") == ("why", "ok")
    assert split("plain answer", thinking=False) == (None, "plain answer")
    assert split("still thinking") == ("still thinking", "")


def test_tool_calls_parsed_into_json():
    out = ("I need the weather.\n</think>\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
           "</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n"
           "<function=now>\n</function>\n</tool_call><|im_end|>")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}},
        {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}]
    r = parse_response(out, thinking=True, tools=tools)
    assert r["reasoning"] == "I need the weather."
    assert r["tool_calls"] == [{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}},
                               {"name": "now", "arguments": {}}]
    assert r["content"] == ""
    # a name the tools do not define stays text
    r = parse_response(out, thinking=True, tools=tools[:1])
    assert r["tool_calls"] == [{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}]
    assert r["content"] == "<tool_call>\n<function=now>\n</function>\n</tool_call>"
    # without a schema the values stay raw strings; multi-line values keep inner newlines
    r = parse_response("<tool_call>\n<function=f>\n<parameter=code>\na\nb\n</parameter>\n</function>\n</tool_call>",
                       thinking=False)
    assert r["tool_calls"] == [{"name": "f", "arguments": {"code": "a\nb"}}]
    # the model omitted </think> before the tool call
    r = parse_response("let me call it\n<tool_call>\n<function=f>\n<parameter=x>\n1\n</parameter>\n</function>\n"
                       "</tool_call>", thinking=True)
    assert r["reasoning"] == "let me call it" and r["tool_calls"] == [{"name": "f", "arguments": {"x": "1"}}]
    json.dumps(r)


def test_cli_generate_end_to_end(model_dir, capsys):
    rc = main(["generate", "--model", str(model_dir), "--prompt", "hello world", "--max-new-tokens", "12",
               "--dtype", "float32", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["prompt_tokens"] > 0 and 1 <= res["new_tokens"] <= 12 and res["decode_tok_s"] > 0
    # the CLI's tokens are the library's greedy tokens
    tok = Tokenizer(model_dir)
    m = nemojax.load(model_dir, dtype="float32")
    ref = m.generate([tok.encode("hello world")], 12, stop_token_ids=[2])[0].tolist()
    n = res["new_tokens"]
    assert res["token_ids"] == ref[:n]
    rc = main(["generate", "--model", str(model_dir), "--prompt", "what is 2 + 3", "--chat", "--max-new-tokens",
               "6", "--temperature", "0.8", "--top-p", "0.9", "--seed", "3", "--dtype", "float32"])
    out, err = capsys.readouterr()
    assert rc == 0 and "decode" in err and "tok/s" in err


@pytest.mark.parametrize("args,match", [
    (["--temperature", "-1"], "--temperature"), (["--top-p", "0"], "--top-p"), (["--top-k", "-3"], "--top-k"),
    (["--max-new-tokens", "0"], "--max-new-tokens"), (["--max-new-tokens", "255"], "context"),
])
def test_cli_errors(model_dir, capsys, args, match):
    rc = main(["generate", "--model", str(model_dir), "--prompt", "hello world hello world"] + args)
    err = capsys.readouterr().err
    assert rc == 2 and match in err and "Traceback" not in err


def test_cli_bad_model_folder(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "not a folder" in capsys.readouterr().err
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "error" in err and "Traceback" not in err


def test_cli_help_and_module_entry():
    out = subprocess.run([sys.executable, "-m", "nemojax", "generate", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--max-new-tokens" in out.stdout
    out = subprocess.run([sys.executable, "-m", "nemojax", "frobnicate"], capture_output=True, text=True)
    assert out.returncode == 2


def test_main_job_on_the_bundled_default_model(capsys):
    """README's main job: the bundled trained model answers a held-out-style sum correctly (greedy)."""
    rc = main(["generate", "--chat", "--prompt", "What is 248 + 377?", "--json"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert res["content"] == "The answer is 625." and "carry" in res["reasoning"]
