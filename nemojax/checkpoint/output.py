"""Output folders: written into a temporary folder beside the destination and renamed only when complete, so a
failed or interrupted run leaves nothing half-written; the side files (tokenizer, chat template, generation
config) copied from the source folder."""
from __future__ import annotations

import os
import shutil
import tempfile

__all__ = ["atomic_output", "copy_side_files", "ConvertError"]

# the checkpoint's own files: written anew by every writer, never copied from the source
_WEIGHT_FILES = {"config.json", "polar_config.json", "hf_quant_config.json", "model.safetensors.index.json"}


class ConvertError(ValueError):
    """A conversion that cannot be done (unsupported input/target pair, disk full, ...)."""


class atomic_output:
    """``with atomic_output(dst, force) as tmp: ...write into tmp...`` -> renamed to ``dst`` on success."""

    def __init__(self, dst: str | os.PathLike, force: bool = False):
        self.dst = os.path.abspath(os.fspath(dst))
        if os.path.exists(self.dst) and not force:
            raise FileExistsError(f"{self.dst}: already exists (use force=True / --force to overwrite)")
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
