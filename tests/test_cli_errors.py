"""The command line never shows a traceback: bad input is one line and exit 2, an internal failure one line and
exit 1 (the traceback with --debug / NEMOJAX_DEBUG=1), Ctrl-C exit 130 at any moment, a reader that left exit
141 quietly, a closed or full standard output one line and exit 1. Most cases run ``main()`` in-process; the
process-level ones (signals, pipes, /dev/full) run ``python -m nemojax``."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jinja2
import pytest

import nemojax
from nemojax.checkpoint import (CheckpointError, ConvertError, OrbaxError, QuantConfigError, SafetensorsError,
                                save_params)
from nemojax.cli import build_parser, main
from nemojax.cli.errors import describe
from nemojax.config import ConfigError
from nemojax.formats import QuantError
from nemojax.params import init_params_numpy
from nemojax.tokenizer import Tokenizer, TokenizerError

from .conftest import tiny_config
from .tiny_tokenizer import CHAT_TEMPLATE, make_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random model that never stops on its own (config.json has no eos token): generation runs to
    --max-new-tokens, so a signal or a closed pipe meets a running stream."""
    d = tmp_path_factory.mktemp("tiny_model")
    make_tokenizer(d, vocab_size=512)
    cfg = tiny_config(max_position_embeddings=4096, eos_token_id=None)
    save_params(init_params_numpy(cfg, seed=11), cfg, d)
    with open(d / "generation_config.json", "w") as f:
        json.dump({"pad_token_id": 0}, f)
    return d


@pytest.fixture
def copy_of(model_dir, tmp_path):
    def make(name="m"):
        dst = tmp_path / name
        shutil.copytree(model_dir, dst)
        return dst
    return make


def run(capsys, *args):
    """main(args) -> (exit code, stdout, stderr lines), after checking stderr holds no traceback."""
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err.strip().splitlines()


def one_error(capsys, code, *args, cmd):
    """Run main(args); assert exit ``code`` and exactly one stderr line ``nemojax CMD: error: ...``; return it."""
    rc, _, lines = run(capsys, *args)
    assert rc == code, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"nemojax {cmd}: error: " if code == 2 else f"nemojax {cmd}: "), lines
    return lines[0]


def python_m(*args, **kw):
    """``python -m nemojax ARGS`` as a user starts it from a terminal: SIGINT at its default even where this test
    process ignores it (pytest-xdist workers do, and a child inherits an ignored signal; coreutils' ``env
    --default-signal`` resets it without a fork in this multithreaded process)."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    reset = ["env", "--default-signal=INT"] if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else []
    return subprocess.Popen([*reset, sys.executable, "-m", "nemojax", *map(str, args)], env=env, cwd=ROOT, **kw)


@pytest.fixture(autouse=True)
def _interruptible():
    """Each test starts with Python's own SIGINT handler, as a program started from a terminal has (pytest-xdist
    workers ignore SIGINT); the previous handler comes back after."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


# ---------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("args,name", [
    (["--top-k", str(2**31)], "--top-k"), (["--top-k", "-1"], "--top-k"), (["--seed", "-1"], "--seed"),
    (["--seed", str(2**32)], "--seed"), (["--seed", str(2**64)], "--seed"), (["--seed", "1.5"], "--seed"),
    (["--max-new-tokens", "0"], "--max-new-tokens"), (["--max-new-tokens", str(2**31)], "--max-new-tokens"),
    (["--expert-cache", "0"], "--expert-cache"), (["--expert-cache", str(2**40)], "--expert-cache"),
    (["--prompt", "caf\udce9"], "--prompt"), (["--system", "\udcff"], "--system"),
])
def test_generate_arguments_checked_before_any_work(capsys, tmp_path, args, name):
    # the model folder does not exist: the argument is refused first
    line = one_error(capsys, 2, "generate", "--model", tmp_path / "nope", "--prompt", "hi", *args, cmd="generate")
    assert f"argument {name}:" in line


def test_argument_bounds_accepted():
    p = build_parser()
    a = p.parse_args(["generate", "--prompt", "héllo", "--seed", str(2**32 - 1), "--top-k", str(2**31 - 1),
                      "--max-new-tokens", "1", "--expert-cache", "1"])
    assert (a.seed, a.top_k, a.max_new_tokens, a.expert_cache, a.prompt) == (2**32 - 1, 2**31 - 1, 1, 1, "héllo")
    a = p.parse_args(["convert", "a", "b", "--to", "bf16", "--max-shard-size", "1.5GiB"])
    assert a.max_shard_bytes == 3 * 2**29


@pytest.mark.parametrize("size", ["0", "0.1", ".", "1.2.3", "5XB", "9" * 30 + "T", "-5GB", "GiB"])
def test_convert_bad_sizes(capsys, tmp_path, size):
    line = one_error(capsys, 2, "convert", tmp_path, tmp_path / "out", "--to", "bf16", "--max-shard-size", size,
                     cmd="convert")
    assert "--max-shard-size" in line


def test_usage_errors_are_one_line(capsys):
    rc, _, lines = run(capsys, "frobnicate")
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("nemojax: error: argument COMMAND: invalid choice")
    line = one_error(capsys, 2, "generate", cmd="generate")
    assert "--prompt" in line
    rc, out, lines = run(capsys, "--version")
    assert rc == 0 and out.strip() == f"nemojax {nemojax.__version__}" and lines == []


# ---------------------------------------------------------------------------------------------- classification
@pytest.mark.parametrize("exc,code,text", [
    (ConfigError("config field 'x': bad"), 2, "config field 'x'"), (CheckpointError("a: b"), 2, "a: b"),
    (TokenizerError("t.json: bad"), 2, "t.json"), (QuantError("w: bad scale"), 2, "w: bad scale"),
    (QuantConfigError("q.json: field"), 2, "q.json"), (SafetensorsError("m.safetensors: cut"), 2, "m.safetensors"),
    (ConvertError("out: exists"), 2, "out: exists"), (OrbaxError("o: bad"), 2, "o: bad"),
    (PermissionError(errno.EACCES, "Permission denied", "/m/w.safetensors"), 2, "/m/w.safetensors: Permission"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/m/config.json"), 2, "/m/config.json: Is a directory"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/m/x"), 2, "/m/x: No such file"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/m/f/x"), 2, "/m/f/x: Not a directory"),
    (jinja2.TemplateError("no system role"), 2, "no system role"),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), 2, "not valid UTF-8"),
    (OSError(errno.ENOSPC, "No space left on device", "/out/x"), 2, "/out/x: No space left on device"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/out"), 2, "/ro/out: Read-only file system"),
    (OSError(errno.EIO, "Input/output error", "/m/w"), 1, "/m/w: Input/output error"),
    (RuntimeError("boom\nmore"), 1, "internal error: RuntimeError: boom more"),
])
def test_describe(exc, code, text):
    got, msg = describe(exc)
    assert got == code and text in msg and "\n" not in msg


def test_internal_error_one_line_and_debug_traceback(capsys, monkeypatch, model_dir):
    def boom(d):
        raise RuntimeError("inspect blew up\nsecond line")

    monkeypatch.setattr("nemojax.cli.inspect.inspect_checkpoint", boom)
    line = one_error(capsys, 1, "inspect", model_dir, cmd="inspect")
    assert line == ("nemojax inspect: internal error: RuntimeError: inspect blew up second line "
                    "(run with --debug for the traceback)")
    for argv, env in ((["--debug", "inspect", model_dir], None), (["inspect", model_dir, "--debug"], None),
                      (["inspect", model_dir], "1")):
        if env:
            monkeypatch.setenv("NEMOJAX_DEBUG", env)
        assert main([str(a) for a in argv]) == 1
        err = capsys.readouterr().err
        assert "Traceback" in err and "in boom" in err
        assert err.strip().splitlines()[-1].startswith("nemojax inspect: internal error: RuntimeError")


def test_file_errors_name_the_path(capsys, monkeypatch, model_dir):
    def denied(d, base=None, **_):
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(d, "model.safetensors"))

    monkeypatch.setattr("nemojax.cli.verify.verify_checkpoint", denied)
    line = one_error(capsys, 2, "verify", model_dir, cmd="verify")
    assert line == f"nemojax verify: error: {model_dir}/model.safetensors: Permission denied"


# ---------------------------------------------------------------------------------------------- checkpoints
def test_verify_unusable_weights_and_config_exit_2(capsys, copy_of):
    d = copy_of("dir")
    os.remove(d / "model.safetensors")
    os.mkdir(d / "model.safetensors")
    assert "model.safetensors" in one_error(capsys, 2, "verify", d, cmd="verify")
    d = copy_of("cut")
    with open(d / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    assert main(["verify", str(d), "--json"]) == 2
    out, err = capsys.readouterr()
    assert json.loads(out)["ok"] is False and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    d = copy_of("cfg")
    (d / "config.json").write_text('{"vocab_size": ')
    assert "config.json: not valid JSON" in one_error(capsys, 2, "verify", d, cmd="verify")


def test_force_onto_file_or_link_exit_2(capsys, model_dir, tmp_path):
    f = tmp_path / "file"
    f.write_text("keep me")
    (tmp_path / "folder").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "folder")
    for out in (f, tmp_path / "link"):
        line = one_error(capsys, 2, "convert", model_dir, out, "--to", "nvfp4", "--force", "--no-progress",
                         cmd="convert")
        assert str(out) in line and "nothing was written" in line
    assert f.read_text() == "keep me" and os.path.islink(tmp_path / "link")


def test_output_on_read_only_places_exit_2(capsys, model_dir, tmp_path):
    """An output folder on a read-only file system (a real read-only tmpfs where mounting is allowed) or, for a
    user without root, a read-only folder: one line naming the place, exit 2, nothing left behind."""
    import subprocess

    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)],
                             capture_output=True).returncode == 0
    try:
        if not mounted:
            if os.geteuid() == 0:
                pytest.skip("cannot mount a read-only tmpfs here, and root writes into read-only folders")
            ro.chmod(0o555)
        line = one_error(capsys, 2, "convert", model_dir, ro / "out", "--to", "nvfp4", "--no-progress",
                         cmd="convert")
        assert str(ro) in line and ("Read-only file system" in line or "Permission denied" in line), line
        assert os.listdir(ro) == []
    finally:
        if mounted:
            subprocess.run(["umount", str(ro)], check=True)
        else:
            ro.chmod(0o755)


# ---------------------------------------------------------------------------------------------- tokenizer files
def _write(path, data: bytes | str | object):
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data if isinstance(data, str) else json.dumps(data))


@pytest.mark.parametrize("name,content,field", [
    ("tokenizer.json", "{not json", "tokenizer.json"),
    ("tokenizer.json", {"version": "1.0"}, "tokenizer.json"),
    ("tokenizer_config.json", "[1, 2", "tokenizer_config.json: not valid JSON"),
    ("tokenizer_config.json", b'{"chat_template": "\xff\xfe"}', "tokenizer_config.json: not valid JSON"),
    ("tokenizer_config.json", [1, 2], "tokenizer_config.json: expected a JSON object"),
    ("tokenizer_config.json", {"chat_template": 5}, "'chat_template'"),
    ("tokenizer_config.json", {"chat_template": [{"name": "default"}]}, "'chat_template'"),
    ("tokenizer_config.json", {"eos_token": 3}, "'eos_token'"),
    ("generation_config.json", "null", "generation_config.json: expected a JSON object"),
    ("generation_config.json", {"eos_token_id": "2"}, "'eos_token_id'"),
    ("generation_config.json", {"eos_token_id": [2, True]}, "'eos_token_id'"),
    ("generation_config.json", {"eos_token_id": 512}, "token id 512 is outside the vocabulary [0, 512)"),
    ("generation_config.json", {"pad_token_id": -1}, "'pad_token_id': token id -1"),
    ("generation_config.json", {"pad_token_id": 1.5}, "'pad_token_id'"),
    ("generation_config.json", {"pad_token_id": [0, 1]}, "'pad_token_id': expected one token id"),
])
def test_bad_tokenizer_files(capsys, copy_of, name, content, field):
    d = copy_of()
    _write(d / name, content)
    with pytest.raises(TokenizerError, match=None) as e:
        Tokenizer(d)
    assert field in str(e.value) and str(d / name) in str(e.value)
    line = one_error(capsys, 2, "generate", "--model", d, "--prompt", "hi", cmd="generate")
    assert field in line and str(d / name) in line


@pytest.mark.parametrize("template,text", [
    ("{% if messages %}", "not valid jinja"),
    ("{{ raise_exception('system messages are not supported') }}", "system messages are not supported"),
    ("{{ messages[0].content.nope.deeper }}", "UndefinedError"),
    ("{{ messages | length + 'x' }}", "TypeError"),
])
def test_bad_chat_template(capsys, copy_of, template, text):
    d = copy_of()
    _write(d / "tokenizer_config.json", {"chat_template": template, "eos_token": "</s>"})
    with pytest.raises(TokenizerError) as e:
        Tokenizer(d).apply_chat_template([{"role": "user", "content": "hi"}])
    assert text in str(e.value) and "tokenizer_config.json" in str(e.value)
    line = one_error(capsys, 2, "generate", "--model", d, "--prompt", "hi", "--chat", "--dtype", "float32",
                     cmd="generate")
    assert text in line and "chat_template" in line


def test_good_chat_template_still_renders(model_dir):
    tok = Tokenizer(model_dir)
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think></think>")


@pytest.mark.parametrize("field,value,expect", [
    ("eos_token_id", 512, "token id 512 is outside the vocabulary [0, 512)"),
    ("eos_token_id", [2, 700], "token id 700"), ("pad_token_id", -1, "token id -1"),
    ("bos_token_id", 9999, "token id 9999"),
])
def test_config_token_ids_inside_vocab(capsys, copy_of, field, value, expect):
    d = copy_of()
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    _write(d / "config.json", cfg)
    with pytest.raises(ConfigError) as e:
        nemojax.Config.from_json(d)
    assert expect in str(e.value) and field in str(e.value) and "config.json" in str(e.value)
    assert expect in one_error(capsys, 2, "verify", d, cmd="verify")


# ---------------------------------------------------------------------------------------------- interrupts
def _sigint_and_spin(s: float = 5.0) -> None:
    """SIGINT to this process, then busy Python code for ``s`` seconds (where the KeyboardInterrupt lands)."""
    os.kill(os.getpid(), signal.SIGINT)
    t = time.perf_counter()
    while time.perf_counter() - t < s:
        pass


def _interrupted_main(monkeypatch, capsys, body):
    """main(["inspect", ...]) whose work is ``body`` -> (exit code, seconds); the handlers are restored after."""
    monkeypatch.setattr("nemojax.cli.inspect.inspect_checkpoint", lambda d: body())
    t0 = time.perf_counter()
    rc = main(["inspect", ROOT])
    dt = time.perf_counter() - t0
    assert "Traceback" not in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored for this process
    assert signal.getsignal(signal.SIGALRM) is signal.SIG_DFL
    return rc, dt


def test_interrupt_exit_130_even_when_swallowed(monkeypatch, capsys):
    rc, dt = _interrupted_main(monkeypatch, capsys, _sigint_and_spin)
    assert rc == 130 and dt < 2

    def swallow():  # a library's broad except loses the first KeyboardInterrupt: it comes again
        try:
            _sigint_and_spin()
        except BaseException:
            pass
        t = time.perf_counter()
        while time.perf_counter() - t < 5:
            pass
        return 0

    rc, dt = _interrupted_main(monkeypatch, capsys, swallow)
    assert rc == 130 and dt < 2

    def converted():  # an extension module turns it into an ImportError
        try:
            _sigint_and_spin()
        except KeyboardInterrupt:
            raise ImportError("Encountered an error while initializing the extension.") from None

    rc, dt = _interrupted_main(monkeypatch, capsys, converted)
    assert rc == 130 and dt < 2

    cleaned = []

    def cleanup_not_cut_short():  # an interrupted write removes its partial output: not interrupted again
        try:
            _sigint_and_spin()
        except KeyboardInterrupt:
            time.sleep(0.6)  # three retry periods
            cleaned.append(True)
            raise

    rc, _ = _interrupted_main(monkeypatch, capsys, cleanup_not_cut_short)
    assert rc == 130 and cleaned == [True]


def test_interrupted_convert_leaves_nothing(monkeypatch, capsys, model_dir, tmp_path):
    from nemojax.checkpoint.write import ShardWriter

    add, calls = ShardWriter.add, []

    def add_then_interrupt(self, name, a):
        calls.append(name)
        add(self, name, a)
        if len(calls) == 5:  # a few tensors are written into the temporary folder
            assert list(tmp_path.iterdir())  # the temporary output folder
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(ShardWriter, "add", add_then_interrupt)
    assert main(["convert", str(model_dir), str(tmp_path / "out"), "--to", "nvfp4", "--no-progress"]) == 130
    assert "Traceback" not in capsys.readouterr().err
    assert len(calls) >= 5 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("when", ["starting", "streaming"])
def test_sigint_subprocess_exit_130(model_dir, when):
    """SIGINT after 0.5 s (importing jax, loading) and after >= 3 s once text streams (generating): exit 130."""
    t0 = time.perf_counter()
    p = python_m("generate", "--model", model_dir, "--prompt", "hello world", "--max-new-tokens", "4000",
                 "--dtype", "float32", "--expert-cache", "2", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if when == "starting":
        time.sleep(0.5)
    else:
        assert p.stdout.read(1), "no text streamed"
        time.sleep(max(0.0, 3.0 - (time.perf_counter() - t0)))
    assert p.poll() is None, "the run ended before the signal"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    err = err.decode()
    assert p.returncode == 130 and "Traceback" not in err and "Exception ignored" not in err, err


# ---------------------------------------------------------------------------------------------- standard output
def test_reader_gone_quiet_141(model_dir):
    r, w = os.pipe()
    p = python_m("generate", "--model", model_dir, "--prompt", "hello world", "--max-new-tokens", "16",
                 "--dtype", "float32", stdout=w, stderr=subprocess.PIPE, text=True)
    os.close(w)
    os.close(r)  # the reader is gone before the first token is written
    _, err = p.communicate(timeout=120)
    assert p.returncode == 141 and err == "", err


def test_full_stdout_one_line(model_dir):
    with open("/dev/full", "w") as full:
        p = python_m("inspect", model_dir, stdout=full, stderr=subprocess.PIPE, text=True)
        _, err = p.communicate(timeout=120)
    assert p.returncode == 1, err
    assert err.strip().splitlines() == ["nemojax inspect: error: standard output: No space left on device"]


def test_closed_stdout_one_line(capsys, monkeypatch, model_dir):
    monkeypatch.setattr(sys, "stdout", None)
    rc = main(["inspect", str(model_dir)])
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert rc == 1 and err.strip().splitlines() == ["nemojax inspect: error: standard output: closed"]
