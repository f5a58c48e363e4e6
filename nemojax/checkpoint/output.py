"""Output folders: written into a temporary folder beside the destination and renamed only when complete, so a
failed or interrupted run leaves nothing half-written; a full disk, however it shows, is one :class:`DiskFullError`;
the side files (tokenizer, chat template, generation config) copied from the source folder."""
from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import tempfile

import numpy as np

from .partials import MARKER, PREVIOUS_SUFFIX, Heartbeat, clean_partials, write_marker

__all__ = ["atomic_output", "check_apart", "check_output", "copy_side_files", "ConvertError", "DiskFullError",
           "is_disk_full", "write_array", "check_size", "preallocate", "insert_front", "folder_bytes",
           "current_umask"]

# the checkpoint's own files: written anew by every writer, never copied from the source
_WEIGHT_FILES = {"config.json", "polar_config.json", "hf_quant_config.json", "model.safetensors.index.json"}


class ConvertError(ValueError):
    """A conversion that cannot be done (unsupported input/target pair, disk full, ...)."""


class DiskFullError(ConvertError):
    """No space left while writing ``path``: ENOSPC / EDQUOT, a short write, tensorstore's RESOURCE_EXHAUSTED.
    ``need``: bytes the failed write asked for (None: unknown); ``free``: bytes free on the filesystem; ``written``:
    bytes of the partial output when it was removed (None: not an output folder's error)."""

    def __init__(self, path: str, need: int | None = None, free: int | None = None, written: int | None = None,
                 what: str = "writing"):
        if free is None:
            free = _free_bytes(path)
        self.path, self.need, self.free, self.written, self.what = path, need, free, written, what
        need_text = f"{need} more bytes needed" if need is not None else "more space needed"
        msg = f"{path}: the disk is full (no space left on device while {what}: {need_text}, {free} bytes free)"
        if written is not None:
            msg += (f"; nothing was written (the partial output, {written} bytes, was removed; the source and any "
                    f"previous output are untouched)")
        super().__init__(msg)

    def __reduce__(self):
        return type(self), (self.path, self.need, self.free, self.written, self.what)


_FULL_TEXT = re.compile(r"no space left|not enough (free )?space|disk (is )?full|quota exceeded|"
                        r"os_error_code='?(28|122)\b|\d+ requested and \d+ written", re.I)
_NOT_DISK = re.compile(r"memory|allocat", re.I)  # XLA's RESOURCE_EXHAUSTED out of memory is not a full disk
_NEED = re.compile(r"failed to write (\d+) bytes|(\d+) requested and (\d+) written", re.I)


def _full(exc: BaseException) -> bool:
    if isinstance(exc, DiskFullError):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(exc, OSError) and exc.errno is not None:
        return False
    text = str(exc)
    return bool(_FULL_TEXT.search(text)) or ("RESOURCE_EXHAUSTED" in text and not _NOT_DISK.search(text))


def _chain(exc: BaseException | None):
    """``exc``, its causes / contexts and the members of exception groups."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, None if e.__suppress_context__ else e.__context__, *getattr(e, "exceptions", ())]


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what caused it) says the disk is full: OSError ENOSPC / EDQUOT, an OSError without errno
    saying so (NumPy's ``tofile``: "N requested and M written"), tensorstore / orbax "RESOURCE_EXHAUSTED" or
    "No space left on device", a :class:`DiskFullError`."""
    return any(_full(e) for e in _chain(exc))


def _need(exc: BaseException | None) -> tuple[int | None, str]:
    """The bytes the failed write asked for, where the error says, and what was being done."""
    for e in _chain(exc):
        if isinstance(e, DiskFullError) and e.need is not None:
            return e.need, e.what
        m = _NEED.search(str(e))
        if m:
            return (int(m.group(1)) if m.group(1) else int(m.group(2)) - int(m.group(3))), "writing"
    return None, "writing"


def _free_bytes(path: str) -> int | None:
    p = os.path.abspath(path)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def folder_bytes(folder: str) -> int:
    """Bytes allocated to the files below ``folder`` (what removing it frees)."""
    total = 0
    for d, _, files in os.walk(folder):
        for f in files:
            try:
                st = os.lstat(os.path.join(d, f))
            except OSError:
                continue
            total += getattr(st, "st_blocks", 0) * 512 or st.st_size
    return total


def write_array(f, a: np.ndarray, where: str) -> int:
    """Append array ``a``'s bytes to the open binary file ``f``; a short write is a DiskFullError naming
    ``where``. Returns the bytes written."""
    flat = np.ascontiguousarray(a).reshape(-1)
    data = memoryview(flat.view(np.uint8)) if flat.size else b""
    n = f.write(data)
    if n is None or n < len(data):
        raise DiskFullError(where, need=len(data) - (n or 0), what=f"writing ({n or 0} of {len(data)} bytes written)")
    return len(data)


def check_size(f, size: int, where: str) -> None:
    """DiskFullError naming ``where`` if the open file ``f``, flushed, is shorter than ``size`` bytes."""
    f.flush()
    have = os.fstat(f.fileno()).st_size
    if have < size:
        raise DiskFullError(where, need=size - have, what=f"writing ({have} of {size} bytes on disk)")


_NO_FALLOCATE = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS}


def preallocate(f, nbytes: int, where: str) -> None:
    """Reserve ``nbytes`` of disk for the open binary file ``f`` before it is memory-mapped, so a full disk is a
    DiskFullError naming ``where`` here rather than a SIGBUS when a page is written (``posix_fallocate``; zeros
    written where the filesystem cannot)."""
    try:
        os.posix_fallocate(f.fileno(), 0, nbytes)
        return
    except OSError as e:
        if is_disk_full(e):
            raise DiskFullError(where, need=nbytes, what="reserving a scratch file") from e
        if e.errno not in _NO_FALLOCATE:
            raise
    except AttributeError:  # no posix_fallocate on this platform
        pass
    chunk = np.zeros(min(nbytes, 1 << 20), np.uint8)
    f.seek(0)
    try:
        for start in range(0, nbytes, chunk.size):
            write_array(f, chunk[:min(chunk.size, nbytes - start)], where)
        check_size(f, nbytes, where)
    except OSError as e:
        if is_disk_full(e):
            raise DiskFullError(where, need=nbytes, what="reserving a scratch file") from e
        raise


_FALLOC_FL_INSERT_RANGE = 0x20  # linux/falloc.h


def insert_front(fd: int, nbytes: int, where: str) -> bool:
    """Shift the whole content of the open file ``fd`` forward by ``nbytes`` without copying it (Linux
    ``fallocate(FALLOC_FL_INSERT_RANGE)``: ext4, XFS; ``nbytes`` a multiple of the filesystem's block size),
    leaving a zero-filled gap at the start; DiskFullError naming ``where`` when there is no room for it. False
    where the platform or filesystem cannot (nothing changed)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    if fn(fd, _FALLOC_FL_INSERT_RANGE, 0, nbytes) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSPC, errno.EDQUOT):
        raise DiskFullError(where, need=nbytes, what="inserting a header")
    return False


def current_umask() -> int:
    """The process umask (read from /proc where it can be, so it is never changed, even for a moment)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _normal_modes(folder: str) -> None:
    """Folders 0o777 and files 0o666 less the umask below ``folder`` (mkdtemp makes 0o700; copies keep the
    source's modes)."""
    mask = current_umask()
    os.chmod(folder, 0o777 & ~mask)
    for d, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(d, name), 0o777 & ~mask)
        for name in files:
            p = os.path.join(d, name)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)


def _exchange(a: str, b: str) -> bool:
    """Swap folders ``a`` and ``b`` in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), a, None, b)


def _inside(path: str, folder: str) -> bool:
    return path == folder or os.path.commonpath([path, folder]) == folder


def _is_checkpoint_output(path: str) -> bool:
    """Whether ``path`` looks like what a nemojax writer leaves: a real folder with config.json and weights
    (safetensors files or nemojax's orbax description), whose only subfolder is orbax's ``params``."""
    if os.path.islink(path) or not os.path.isdir(path):
        return False
    names = os.listdir(path)
    weights = any(n.endswith(".safetensors") for n in names) or "nemojax_orbax.json" in names
    subfolders = [n for n in names if os.path.isdir(os.path.join(path, n))]
    return "config.json" in names and weights and set(subfolders) <= {"params"}


def check_apart(dst: str | os.PathLike, source: str | os.PathLike) -> None:
    """ConvertError if the output ``dst`` would be, hold or lie inside the checkpoint ``source`` (links resolved)."""
    src = os.path.realpath(os.fspath(source))
    real = os.path.realpath(os.path.abspath(os.fspath(dst)))
    if _inside(real, src) or _inside(src, real):
        how = "be" if real == src else "lie inside" if _inside(real, src) else "hold"
        raise ConvertError(f"{os.path.abspath(os.fspath(dst))}: the output would {how} the source checkpoint {src}; "
                           f"nothing was written (choose a folder outside it)")


def check_output(dst: str | os.PathLike, force: bool = False, source: str | os.PathLike | None = None) -> str:
    """The absolute output path, after refusing what would lose data: an output that is, holds or lies inside
    ``source`` (the checkpoint being read), even with ``force``; an existing output without ``force``
    (FileExistsError); with ``force``, an existing output that is not a checkpoint folder (a file, a link, a folder
    of other things: ``--force`` replaces only a previous output)."""
    out = os.path.abspath(os.fspath(dst))
    if source is not None:
        check_apart(out, source)
    if os.path.lexists(out):
        if not force:
            raise FileExistsError(f"{out}: already exists (use force=True / --force to overwrite)")
        if not _is_checkpoint_output(out):
            raise ConvertError(f"{out}: exists and is not a checkpoint folder (config.json + weights); --force only "
                               f"replaces a previous output, so nothing was written")
    return out


class atomic_output:
    """``with atomic_output(dst, force, source) as tmp: ...write into tmp...`` -> renamed to ``dst`` on success
    (the checks of :func:`check_output` first; an existing ``dst`` is replaced only once the new output is
    complete, by swapping the two folders in one step where the filesystem can).

    ``tmp`` is ``.NAME.partial-XXXXXXXX`` beside ``dst`` with this process's owner marker
    (``nemojax.checkpoint.partials``); stale partials a killed run left in the same parent are removed first, and
    ``removed`` lists them. Any error removes ``tmp``; a full disk becomes one :class:`DiskFullError` naming
    ``dst``. The finished output has the modes of the umask (folders 0o777, files 0o666, less the umask)."""

    def __init__(self, dst: str | os.PathLike, force: bool = False, source: str | os.PathLike | None = None):
        self.dst = check_output(dst, force, source)
        parent = os.path.dirname(self.dst)
        os.makedirs(parent, exist_ok=True)
        self.force = force
        self.removed = clean_partials(parent, os.path.basename(self.dst))
        self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.dst)}.partial-", dir=parent)
        try:
            write_marker(self.tmp, self.dst)
        except BaseException as e:
            self._fail(e)
            raise
        self._beat = Heartbeat(self.tmp)

    def __enter__(self) -> str:
        return self.tmp

    def _fail(self, exc: BaseException | None) -> None:
        """Remove the partial; DiskFullError naming ``dst`` when ``exc`` says the disk is full."""
        full = is_disk_full(exc)
        written = folder_bytes(self.tmp) if full else None
        shutil.rmtree(self.tmp, ignore_errors=True)
        if full:
            need, what = _need(exc)
            raise DiskFullError(self.dst, need=need, written=written, what=what) from exc

    def __exit__(self, exc_type, exc, tb):
        self._beat.stop()
        if exc_type is not None:
            self._fail(exc)
            return False
        try:
            os.remove(os.path.join(self.tmp, MARKER))
            _normal_modes(self.tmp)
            if not os.path.exists(self.dst):
                os.rename(self.tmp, self.dst)
            elif _exchange(self.tmp, self.dst):
                shutil.rmtree(self.tmp, ignore_errors=True)  # now the previous output
            else:
                self._replace_aside()
        except BaseException as e:
            self._fail(e)
            raise
        return False

    def _replace_aside(self) -> None:
        """Replace ``dst`` where folders cannot be swapped in one step: the previous output moved aside beside
        ``tmp`` (put back by the next run if this one dies before the new output is in place), then ``tmp``
        renamed in."""
        aside = self.tmp + PREVIOUS_SUFFIX
        os.rename(self.dst, aside)
        try:
            os.rename(self.tmp, self.dst)
        except BaseException:
            os.rename(aside, self.dst)
            raise
        shutil.rmtree(aside, ignore_errors=True)


def copy_side_files(src: str, dst: str) -> None:
    """Tokenizer, chat template, generation config: every small non-weight file except the quant configs."""
    for f in os.listdir(src):
        p = os.path.join(src, f)
        if os.path.isfile(p) and f not in _WEIGHT_FILES and not f.endswith(".safetensors"):
            shutil.copy2(p, os.path.join(dst, f))
