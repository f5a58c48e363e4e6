"""The command line's one error type, and the argument checks the subcommands share."""
from __future__ import annotations

import os

__all__ = ["UsageError", "need_folders"]


class UsageError(Exception):
    """A user error: reported as ``nemojax COMMAND: error: ...`` with exit code 2."""


def need_folders(d: str, base: str | None = None) -> None:
    """UsageError unless ``d`` (and the ``--base`` folder ``base``, when given) is a Hugging Face model folder (a
    folder with config.json)."""
    for what, folder in (("", d), ("--base ", base)):
        if folder is None:
            continue
        if not os.path.isdir(folder):
            raise UsageError(f"{what}{folder}: not a folder")
        if not os.path.exists(os.path.join(folder, "config.json")):
            raise UsageError(f"{what}{folder}: no config.json (not a Hugging Face model folder)")
