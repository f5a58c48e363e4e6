"""The command line's one error type, the argument checks the subcommands share, and how an exception is reported
(:func:`describe`: bad input -> exit 2, anything else -> exit 1)."""
from __future__ import annotations

import argparse
import errno
import json
import os

__all__ = ["UsageError", "need_folders", "int_in", "utf8_text", "describe", "one_line", "INT32_MAX"]

INT32_MAX = 2**31 - 1


class UsageError(Exception):
    """A user error: reported as ``nemojax COMMAND: error: ...`` with exit code 2."""


def load_option_error(e: ValueError) -> UsageError | None:
    """The UsageError naming the command-line option for a plain ValueError ``nemojax.load`` raises about its
    ``backend=`` (an unavailable --backend) or ``mmap=True`` (--mmap where it cannot work), else None."""
    if type(e) is not ValueError:
        return None
    msg = str(e)
    if "mmap=True" in msg:
        return UsageError(msg.replace("mmap=True", "--mmap"))
    if "backend=" in msg:
        return UsageError(msg.replace("backend=", "--backend "))
    return None


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


def int_in(lo: int, hi: int):
    """An argparse ``type``: a decimal integer in [lo, hi] (the message names the range)."""

    def parse(s: str) -> int:
        try:
            v = int(s, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be an integer in [{lo}, {hi}], got {s}")
        return v

    return parse


def utf8_text(s: str) -> str:
    """An argparse ``type``: text that is valid UTF-8 (argument bytes that do not decode arrive as surrogates)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("not valid UTF-8 text (pass the text UTF-8 encoded)") from None
    return s


def one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def _input_error_types() -> tuple[type, ...]:
    """The library's named bad-input errors (imported here, at error time: ``main`` installs its Ctrl-C handling
    before the heavy imports)."""
    types: list[type] = [UsageError, json.JSONDecodeError, UnicodeDecodeError]
    try:
        from ..checkpoint import (CheckpointError, ConvertError, OrbaxError, QuantConfigError,
                                  SafetensorsError)
        from ..config import ConfigError
        from ..formats import QuantError
        from ..tokenizer import TokenizerError

        types += [ConfigError, CheckpointError, ConvertError, OrbaxError, QuantConfigError, SafetensorsError,
                  QuantError, TokenizerError]
    except ImportError:  # a broken installation: whatever came out is an internal error
        pass
    try:
        from jinja2 import TemplateError

        types.append(TemplateError)
    except ImportError:
        pass
    return tuple(types)


# file errors that mean the input (or the output path) named on the command line is unusable
_PATH_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
# ... and the same told by errno: a read-only file system, a full disk or quota, a name too long, a link loop
_PATH_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG, errno.ELOOP}


def _path_message(e: OSError) -> str:
    if e.filename is None:
        return str(e)
    where = os.fsdecode(e.filename) + (f" -> {os.fsdecode(e.filename2)}" if e.filename2 else "")
    return f"{where}: {e.strerror or errno.errorcode.get(e.errno, 'error')}"


def describe(e: BaseException) -> tuple[int, str]:
    """(exit code, one-line message) for an exception that ended a command: 2 and the message for bad input (the
    library's named errors, a file that is missing / unreadable / a folder, a file that is not UTF-8 or not
    JSON, a chat template that fails; an output path on a read-only file system or a full disk); 1 and
    ``internal error: TYPE: message`` for anything else (another ``OSError``: 1 and its message)."""
    if isinstance(e, UnicodeDecodeError):
        return 2, one_line(f"an input file is not valid UTF-8 ({e})")
    if isinstance(e, json.JSONDecodeError):
        return 2, one_line(f"an input file is not valid JSON ({e})")
    if isinstance(e, _input_error_types()):
        return 2, one_line(e)
    if isinstance(e, _PATH_ERRORS) or (isinstance(e, OSError) and e.errno in _PATH_ERRNOS):
        return 2, one_line(_path_message(e))
    if isinstance(e, OSError):
        return 1, one_line(_path_message(e))
    return 1, one_line(f"internal error: {type(e).__name__}: {e}")
