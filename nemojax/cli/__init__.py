"""The ``nemojax`` command line: ``generate`` (streams text; prefill and decode speed on stderr), ``convert``,
``inspect`` and ``verify``, one module each; every command returns an exit code and raises :class:`UsageError`
for user errors.

Exit codes: 0 success, 2 bad arguments or unusable input (message on stderr, no traceback), 1 other errors.
"""
from __future__ import annotations

import argparse
import sys

from ..version import __version__
from . import convert, generate, inspect, serve, verify
from .errors import UsageError
from .generate import default_model_path

__all__ = ["main", "build_parser", "default_model_path", "UsageError"]

SUBCOMMANDS = (generate, convert, inspect, verify, serve)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nemojax", description="Pure-JAX inference for NVIDIA Nemotron-H models.")
    ap.add_argument("--version", action="version", version=f"nemojax {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in SUBCOMMANDS:
        cmd.add_parser(sub)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    try:
        return a.func(a)
    except UsageError as e:
        print(f"nemojax {a.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
