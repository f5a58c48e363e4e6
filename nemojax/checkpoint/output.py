"""Output folders: written into a temporary folder beside the destination and renamed only when complete, so a
failed or interrupted run leaves nothing half-written; the side files (tokenizer, chat template, generation
config) copied from the source folder."""
from __future__ import annotations

import os
import shutil
import tempfile

__all__ = ["atomic_output", "check_apart", "check_output", "copy_side_files", "ConvertError"]

# the checkpoint's own files: written anew by every writer, never copied from the source
_WEIGHT_FILES = {"config.json", "polar_config.json", "hf_quant_config.json", "model.safetensors.index.json"}


class ConvertError(ValueError):
    """A conversion that cannot be done (unsupported input/target pair, disk full, ...)."""


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
    complete)."""

    def __init__(self, dst: str | os.PathLike, force: bool = False, source: str | os.PathLike | None = None):
        self.dst = check_output(dst, force, source)
        parent = os.path.dirname(self.dst)
        os.makedirs(parent, exist_ok=True)
        self.force = force
        self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.dst)}.partial-", dir=parent)

    def __enter__(self) -> str:
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if os.path.exists(self.dst):
            shutil.rmtree(self.dst)
        os.replace(self.tmp, self.dst)
        return False


def copy_side_files(src: str, dst: str) -> None:
    """Tokenizer, chat template, generation config: every small non-weight file except the quant configs."""
    for f in os.listdir(src):
        p = os.path.join(src, f)
        if os.path.isfile(p) and f not in _WEIGHT_FILES and not f.endswith(".safetensors"):
            shutil.copy2(p, os.path.join(dst, f))
