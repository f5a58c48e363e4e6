"""Conversion faults: a full disk in every form it shows, kill -9 mid-way, leftover partial folders, output modes.
Each leaves the source and any previous output byte-identical and no ``.partial`` folder behind."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import nemojax.checkpoint.orbax as orbax_mod
import nemojax.checkpoint.output as output_mod
import nemojax.checkpoint.write as write_mod
from nemojax.checkpoint import DiskFullError, convert_checkpoint, load_params, save_params
from nemojax.checkpoint.orbax import Scratch
from nemojax.checkpoint.output import is_disk_full
from nemojax.checkpoint.partials import MARKER, clean_partials
from nemojax.cli import main as cli_main
from nemojax.params import init_params_numpy

from .conftest import folder_files, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hashes(folder) -> dict:
    """sha256 of every file below ``folder`` (what a failed conversion must leave as it was)."""
    return {k: hashlib.sha256(v).hexdigest() for k, v in folder_files(folder).items()}


def _partials(parent) -> list[str]:
    return [n for n in os.listdir(parent) if ".partial-" in n]


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    cfg = tiny_config()
    params = init_params_numpy(cfg, seed=int(np.random.default_rng().integers(1 << 30)), dtype="bfloat16")
    src = root / "src"
    save_params(params, cfg, src)
    (src / "tokenizer_config.json").write_text('{"chat_template": "x"}')
    return {"cfg": cfg, "params": params, "src": str(src), "src_hash": _hashes(src)}


@pytest.fixture
def prev(ck, tmp_path):
    """A previous output (a BF16 checkpoint folder) that ``--force`` would replace."""
    out = tmp_path / "out"
    save_params(init_params_numpy(ck["cfg"], seed=3, dtype="bfloat16"), ck["cfg"], out)
    return out, _hashes(out)


def _assert_untouched(ck, prev) -> None:
    out, before = prev
    assert _hashes(out) == before
    assert _hashes(ck["src"]) == ck["src_hash"]
    assert _partials(os.path.dirname(out)) == []


ERRORS = {
    "ENOSPC": lambda: OSError(errno.ENOSPC, "No space left on device"),
    "EDQUOT": lambda: OSError(errno.EDQUOT, "Disk quota exceeded"),
    "no-errno": lambda: OSError("not enough free space"),
    "errno-None": lambda: OSError(None, "No space left"),
    "numpy-tofile": lambda: OSError("1024 requested and 512 written"),
}


@pytest.mark.parametrize("kind", list(ERRORS))
def test_disk_full_every_errno_form(ck, prev, monkeypatch, kind):
    calls = {"n": 0}
    real = write_mod.write_array

    def full(f, a, where):
        calls["n"] += 1
        if calls["n"] > 2:
            raise ERRORS[kind]()
        return real(f, a, where)

    monkeypatch.setattr(write_mod, "write_array", full)
    with pytest.raises(DiskFullError, match=r"out: the disk is full .* bytes free.*nothing was written") as e:
        convert_checkpoint(ck["src"], prev[0], "nvfp4", force=True, progress=False)
    assert e.value.path == str(prev[0]) and e.value.free > 0 and e.value.written > 0
    if kind == "numpy-tofile":
        assert e.value.need == 512
    _assert_untouched(ck, prev)


class _ShortFile:
    """A file whose writes store only half of what they are given: returning the half (``honest``) or claiming
    all of it."""

    def __init__(self, f, honest: bool):
        self.f, self.honest = f, honest

    def write(self, data):
        data = memoryview(data).cast("B")
        n = self.f.write(data[:len(data) // 2]) if len(data) > 1 else self.f.write(data)
        return n if self.honest else len(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


@pytest.mark.parametrize("honest", [True, False])
def test_short_write_is_disk_full(ck, prev, monkeypatch, honest):
    def fake_open(path, mode="r", *a, **k):
        f = open(path, mode, *a, **k)
        return _ShortFile(f, honest) if str(path).endswith(".data") and "w" in mode else f

    monkeypatch.setattr(write_mod, "open", fake_open, raising=False)
    with pytest.raises(DiskFullError, match="out: the disk is full") as e:
        convert_checkpoint(ck["src"], prev[0], "nvfp4", force=True, progress=False, max_shard_bytes=50_000)
    assert e.value.need > 0
    _assert_untouched(ck, prev)


def test_tensorstore_resource_exhausted(ck, prev, monkeypatch, capsys):
    msg = ('RESOURCE_EXHAUSTED: Error writing "a/0" in OCDBT database at local file "x/": Failed to write 550351 '
           "bytes to file 14: No space left on device [os_error_code='28']")

    def full(folder, tree):
        os.makedirs(folder)
        with open(os.path.join(folder, "half"), "wb") as f:
            f.write(os.urandom(4096))
        raise ValueError(msg)

    monkeypatch.setattr(orbax_mod, "_save_tree", full)
    with pytest.raises(DiskFullError, match="out: the disk is full") as e:
        convert_checkpoint(ck["src"], prev[0], "orbax", force=True, progress=False)
    tensors = sum(a.nbytes for a in _leaves(ck["params"]))
    assert e.value.need == tensors  # the orbax arrays that did not fit
    _assert_untouched(ck, prev)
    assert cli_main(["convert", ck["src"], str(prev[0]), "--to", "orbax", "--force", "--no-progress"]) == 2
    assert "the disk is full" in capsys.readouterr().err
    _assert_untouched(ck, prev)


def _leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_is_disk_full_forms():
    assert is_disk_full(OSError(errno.ENOSPC, "x")) and is_disk_full(OSError(errno.EDQUOT, "x"))
    assert not is_disk_full(OSError(errno.EACCES, "No space left on device"))  # errno decides when there is one
    assert not is_disk_full(ValueError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.0G"))
    assert not is_disk_full(RuntimeError("disk went away"))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("orbax save failed") from inner
    except RuntimeError as outer:
        assert is_disk_full(outer)
    assert is_disk_full(ExceptionGroup("save", [KeyError("k"), ValueError("RESOURCE_EXHAUSTED: write failed")]))


def test_scratch_reserves_disk_before_mapping(tmp_path, monkeypatch):
    s = Scratch(str(tmp_path / "s"))
    m = s.new((3, 5), np.float32)
    assert os.path.getsize(tmp_path / "s" / "1.bin") == 60 and os.stat(tmp_path / "s" / "1.bin").st_blocks > 0
    a = np.random.default_rng().standard_normal((3, 5)).astype(np.float32)
    m[...] = a
    np.testing.assert_array_equal(np.fromfile(tmp_path / "s" / "1.bin", np.float32).reshape(3, 5), a)

    def unsupported(fd, off, n):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    m = s.new((3_000_001,), np.uint8)  # zeros written instead, in several chunks
    assert os.path.getsize(tmp_path / "s" / "2.bin") == 3_000_001 and not m.any()

    def full(fd, off, n):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(DiskFullError, match=r"3\.bin: the disk is full .*reserving a scratch file: 800 more bytes"):
        s.new((10, 10), np.float64)
    assert s.new((0, 4), np.float32).shape == (0, 4)


# ------------------------------------------------------------------------------------------- a real full disk
@contextlib.contextmanager
def _tmpfs(path, size: str):
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip() or r.returncode})")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def test_real_full_disk(ck, tmp_path):
    """A 900 KiB tmpfs holding a previous output: the NVFP4 output does not fit beside it (safetensors writes),
    and in a 32 KiB one the first orbax scratch file does not (its disk is reserved before it is mapped: a sparse
    memory map died of SIGBUS here, so this runs in a subprocess)."""
    with _tmpfs(tmp_path / "mnt", "900k") as mnt:
        prev = mnt / "out"
        save_params(ck["params"], ck["cfg"], prev)
        before, free = _hashes(prev), os.statvfs(mnt).f_bavail
        with pytest.raises(DiskFullError, match="out: the disk is full.*bytes free") as e:
            convert_checkpoint(ck["src"], prev, "nvfp4", force=True, progress=False)
        assert e.value.written > 0
        assert _hashes(prev) == before and os.listdir(mnt) == ["out"] and os.statvfs(mnt).f_bavail == free
    with _tmpfs(tmp_path / "mnt2", "32k") as mnt:
        r = subprocess.run([sys.executable, "-m", "nemojax", "convert", ck["src"], str(mnt / "o"), "--to", "orbax",
                            "--no-progress"], capture_output=True, text=True, env=_env(), timeout=300)
        assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
        assert "the disk is full" in r.stderr and "reserving a scratch file" in r.stderr
        assert os.listdir(mnt) == []
    assert _hashes(ck["src"]) == ck["src_hash"]


# ------------------------------------------------------------------------------------------- kill -9, partials
_SLOW = """import sys, time
import nemojax.checkpoint.orbax as o
from nemojax.cli import main
put, n = o.Scratch.put, [0]
def slow(self, x):
    n[0] += 1
    if n[0] == 4:
        time.sleep(600)  # a long conversion, killed here
    return put(self, x)
o.Scratch.put = slow
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_mid_conversion_then_rerun(ck, prev, capsys):
    """SIGKILL while a --force conversion onto a previous output fills its scratch files: the source and the previous
    output are as they were; the next run removes the dead run's partial (saying so) and completes."""
    out, tmp_path = prev[0], prev[0].parent
    log = open(tmp_path.parent / f"{tmp_path.name}.log", "w+")
    p = subprocess.Popen([sys.executable, "-c", _SLOW, "convert", ck["src"], str(out), "--to", "orbax", "--force",
                          "--no-progress"], env=_env(), stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and p.poll() is None:
            parts = _partials(tmp_path)
            scratch = tmp_path / parts[0] / ".scratch" if parts else None
            if scratch is not None and scratch.is_dir() and len(os.listdir(scratch)) >= 3:
                break
            time.sleep(0.05)
        assert p.poll() is None, (log.seek(0), log.read()[-2000:])
        os.kill(p.pid, signal.SIGKILL)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        log.close()
    left = _partials(tmp_path)
    assert len(left) == 1 and _hashes(out) == prev[1] and _hashes(ck["src"]) == ck["src_hash"]
    assert json.loads((tmp_path / left[0] / MARKER).read_text())["pid"] == p.pid
    capsys.readouterr()
    assert cli_main(["convert", ck["src"], str(out), "--to", "orbax", "--force", "--no-progress", "--json"]) == 0
    cap = capsys.readouterr()
    assert f"removed the leftover partial output {tmp_path / left[0]}" in cap.err and f"pid {p.pid}" in cap.err
    assert json.loads(cap.out)["removed_partials"] and sorted(os.listdir(tmp_path)) == ["out"]
    for a, b in zip(_leaves(load_params(out, ck["cfg"], "bfloat16")), _leaves(ck["params"])):
        assert a.tobytes() == b.tobytes()
    assert _hashes(ck["src"]) == ck["src_hash"]


def _partial(parent, name, marker: dict | None, age_s: float = 0) -> str:
    path = os.path.join(parent, name)
    os.makedirs(path)
    with open(os.path.join(path, "x.bin"), "wb") as f:
        f.write(os.urandom(64))
    if marker is not None:
        with open(os.path.join(path, MARKER), "w") as f:
            json.dump(marker, f)
    t = time.time() - age_s
    for p in (os.path.join(path, MARKER), path):
        if os.path.exists(p):
            os.utime(p, (t, t))
    return path


def test_only_stale_partials_are_removed(tmp_path):
    from nemojax.checkpoint.partials import _start_time

    host, day = socket.gethostname(), 25 * 3600
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        keep = [_partial(tmp_path, ".a.partial-live0001", {"pid": live.pid, "host": host,
                                                            "start": _start_time(live.pid)}),
                _partial(tmp_path, ".a.partial-remote01", {"pid": 1, "host": "elsewhere"}, age_s=3600),
                _partial(tmp_path, ".a.partial-nomark01", None),  # ours by name, recent
                _partial(tmp_path, ".b.partial-nomark02", None, age_s=day),  # another output's, no marker
                _partial(tmp_path, ".a.partial-notdir01.txt", None)]
        gone = [_partial(tmp_path, ".a.partial-dead0001", {"pid": dead.pid, "host": host}),
                _partial(tmp_path, ".b.partial-dead0002", {"pid": dead.pid, "host": host}),
                _partial(tmp_path, ".a.partial-reused01", {"pid": os.getpid(), "host": host, "start": "-1"}),
                _partial(tmp_path, ".a.partial-remote02", {"pid": 1, "host": "elsewhere"}, age_s=day),
                _partial(tmp_path, ".a.partial-nomark03", None, age_s=day)]
        done = clean_partials(str(tmp_path), "a")
        assert sorted(done) == sorted(
            f"removed the leftover partial output {g} ({why})" for g, why in zip(gone, [
                f"its writer, pid {dead.pid} on {host}, has exited", f"its writer, pid {dead.pid} on {host}, has exited",
                f"its writer, pid {os.getpid()} on {host}, has exited",
                "its writer on elsewhere (pid 1) has been silent for 25.0 h", "no writer marker, untouched for 25.0 h"]))
        assert all(os.path.isdir(k) for k in keep) and not any(os.path.exists(g) for g in gone)
    finally:
        live.kill()
        live.wait()


def test_moved_aside_previous_output_is_put_back(tmp_path):
    """A run that died between moving the previous output aside and renaming the new one into place: the next run
    puts the previous output back (or drops it when the new one made it)."""
    aside = _partial(tmp_path, ".m.partial-abcd1234.previous", None)
    content = _hashes(aside)
    done = clean_partials(str(tmp_path), "m")
    assert done == [f"restored the previous output {tmp_path / 'm'} from {aside} (its replacement finished)"]
    assert _hashes(tmp_path / "m") == content and _partials(tmp_path) == []
    _partial(tmp_path, ".m.partial-abcd1234.previous", None)
    clean_partials(str(tmp_path), "m")
    assert _partials(tmp_path) == [] and _hashes(tmp_path / "m") == content


@pytest.mark.parametrize("swap", [True, False])
def test_modes_follow_the_umask(ck, prev, monkeypatch, swap):
    """mkdtemp makes 0700 and copies keep the source's modes; the output gets 0o777 / 0o666 less the umask, with
    the previous output replaced in one swap or (``swap`` False: a filesystem without RENAME_EXCHANGE) moved
    aside."""
    os.chmod(os.path.join(ck["src"], "tokenizer_config.json"), 0o600)
    if not swap:
        monkeypatch.setattr(output_mod, "_exchange", lambda a, b: False)
    old = os.umask(0o022)
    try:
        convert_checkpoint(ck["src"], prev[0], "orbax", force=True, progress=False)
    finally:
        os.umask(old)
    modes = {}
    for d, dirs, files in os.walk(prev[0]):
        modes[os.path.relpath(d, prev[0])] = os.stat(d).st_mode & 0o777
        for f in files:
            modes[os.path.relpath(os.path.join(d, f), prev[0])] = os.stat(os.path.join(d, f)).st_mode & 0o777
    dirs = {k for k in modes if os.path.isdir(os.path.join(prev[0], k))}
    assert {"."} < dirs and "tokenizer_config.json" in modes and len(modes) > 5
    assert {k: v for k, v in modes.items() if v != (0o755 if k in dirs else 0o644)} == {}
    assert sorted(os.listdir(os.path.dirname(prev[0]))) == ["out"] and MARKER not in os.listdir(prev[0])
    for a, b in zip(_leaves(load_params(prev[0], ck["cfg"], "bfloat16")), _leaves(ck["params"])):
        assert a.tobytes() == b.tobytes()
