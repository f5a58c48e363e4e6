"""The ``nemojax`` command line: ``generate`` (streams text; prefill and decode speed on stderr), ``convert``,
``inspect``, ``verify`` and ``serve`` (the OpenAI-compatible server), one module each (named in ``SUBCOMMANDS``;
each has ``add_parser(sub)`` and a command function that returns an exit code). Every error of every command goes
through :func:`main`'s one handler, so a command never prints a traceback.

Exit codes: 0 success; 2 bad arguments or unusable input (one line ``nemojax COMMAND: error: ...`` naming the
argument or file); 1 an internal failure (one line ``nemojax COMMAND: internal error: TYPE: message``; with
``--debug`` or ``NEMOJAX_DEBUG=1`` the traceback too) or a file system error such as a full disk, and a standard
output that cannot be written (closed, full); 130 interrupted (Ctrl-C, at any moment); 141 the reader of the
standard output went away (``nemojax generate ... | head -c1``; the exit status a shell reports for a command
killed by SIGPIPE, as for coreutils), nothing printed.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from ..version import __version__
from .errors import UsageError, describe, one_line
from .generate import default_model_path
from .process import GuardedStream, Interrupts, OutputError, silence_stdout

__all__ = ["main", "build_parser", "default_model_path", "UsageError", "SUBCOMMANDS"]

# the modules of nemojax.cli that are subcommands (imported when the parser is built, after Ctrl-C is handled)
SUBCOMMANDS = ("generate", "convert", "inspect", "verify", "serve")

EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (``nemojax COMMAND: error: argument --x: ...``) and no exit of its own."""

    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="nemojax", description="Pure-JAX inference for NVIDIA Nemotron-H models.")
    ap.add_argument("--version", action="version", version=f"nemojax {__version__}")
    debug = dict(action="store_true", help="print the traceback of an internal error (also NEMOJAX_DEBUG=1)")
    ap.add_argument("--debug", **debug)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    for p in sub.choices.values():  # `nemojax COMMAND ... --debug` too
        p.add_argument("--debug", **debug, default=argparse.SUPPRESS)
    return ap


def _command_name(argv: list[str]) -> str:
    """``nemojax COMMAND`` for the messages, from the arguments (before or without a successful parse)."""
    cmd = next((x for x in argv if not x.startswith("-")), None)
    return f"nemojax {cmd}" if cmd in SUBCOMMANDS else "nemojax"


def _say(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, AttributeError, ValueError):  # no usable stderr: the exit code is all there is
        pass


def _run(argv: list[str], interrupts: Interrupts) -> int:
    """Parse and run one command under the one error handler; returns the exit code."""
    debug = "--debug" in argv or os.environ.get("NEMOJAX_DEBUG", "").lower() in ("1", "true", "yes")
    prog = _command_name(argv)
    stdout = sys.stdout
    try:
        try:
            if stdout is None:  # started with `>&-`
                raise OutputError(OSError(9, "closed"))
            sys.stdout = GuardedStream(stdout)
            a = build_parser().parse_args(argv)
            interrupts.started()
            rc = a.func(a)
            sys.stdout.flush()
            return rc
        finally:
            sys.stdout = stdout
    except SystemExit as e:  # --help, --version
        if isinstance(e.code, str):
            _say(f"{prog}: error: {one_line(e.code)}")
            return 1
        return 0 if e.code is None else e.code
    except (OutputError, BrokenPipeError) as e:
        if stdout is sys.__stdout__:
            silence_stdout()
        if isinstance(e, BrokenPipeError) or isinstance(e.cause, BrokenPipeError):
            return EXIT_BROKEN_PIPE
        _say(f"{prog}: error: standard output: {one_line(e)}")
        return 1
    except Exception as e:  # noqa: BLE001  (the one place every error of every command is reported)
        if interrupts.seen:  # Ctrl-C that came out as another exception (an ImportError while jaxlib initialises)
            return EXIT_INTERRUPTED
        rc, msg = describe(e)
        if debug:
            traceback.print_exception(e)
        elif msg.startswith("internal error:"):
            msg += " (run with --debug for the traceback)"
        _say(f"{prog}: {msg}" if msg.startswith("internal error:") else f"{prog}: error: {msg}")
        return rc


def main(argv=None) -> int:
    """Run one command; returns its exit code (see the module docstring) and never raises (``--help`` /
    ``--version`` return 0)."""
    program = argv is None  # the program itself (not a caller in-process): Ctrl-C while starting exits at once
    argv = list(sys.argv[1:] if argv is None else argv)
    interrupts = Interrupts(EXIT_INTERRUPTED, exit_early=program)
    interrupts.install()
    try:
        rc = _run(argv, interrupts)
    except KeyboardInterrupt:
        rc = EXIT_INTERRUPTED
    finally:
        interrupts.raising = False  # a plain store: no signal handler runs before it
        interrupts.restore()
    return EXIT_INTERRUPTED if interrupts.seen else rc
