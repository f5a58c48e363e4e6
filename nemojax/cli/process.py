"""Process-level behaviour of the command line: Ctrl-C ends the run with exit code 130 at any moment, and a
standard output that cannot be written (a closed pipe, a full disk) is reported once instead of as a traceback.

Ctrl-C: Python turns SIGINT into a ``KeyboardInterrupt`` raised wherever the main thread is, and some places lose
it: one raised inside a garbage-collector callback (jax registers one) is printed as "Exception ignored" and the
run goes on; one raised while an extension module initialises (numpy, jaxlib during ``import jax``) comes out as an
``ImportError``. :class:`Interrupts` therefore remembers that SIGINT arrived (``seen``: the command line then exits
130 whatever exception comes out) and raises ``KeyboardInterrupt`` again every ``RETRY_S`` seconds until it is
being handled, so a lost one cannot let the run finish. While it is being handled (an ``except`` / ``finally`` /
``__exit__`` cleaning up, such as the removal of a half-written output folder) nothing more is raised.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

__all__ = ["Interrupts", "GuardedStream", "OutputError", "silence_stdout"]

RETRY_S = 0.2


def _handling_interrupt() -> bool:
    """Whether a KeyboardInterrupt is being handled by the code the signal interrupted (directly, or as the
    context of the exception being handled)."""
    e = sys.exc_info()[1]
    while e is not None:
        if isinstance(e, KeyboardInterrupt):
            return True
        e = e.__context__
    return False


class Interrupts:
    """SIGINT handling for one run of the command line: ``install()`` before any heavy import; ``raising = False``
    once the run is over (a late SIGINT is then only recorded); ``restore()`` at the end (the previous handlers
    come back, for callers of ``main()`` in-process). The retry timer (SIGALRM) is set up only after a SIGINT."""

    def __init__(self):
        self.seen = False
        self.raising = True
        self._saved: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            return  # started ignoring SIGINT (nohup, a background job of a script): keep ignoring it
        self._saved[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)

    def restore(self) -> None:
        self.raising = False
        if signal.SIGALRM in self._saved:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved.clear()

    def _arm(self) -> None:
        if not hasattr(signal, "setitimer"):
            return
        if signal.SIGALRM not in self._saved:
            self._saved[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._on_retry)
        signal.setitimer(signal.ITIMER_REAL, RETRY_S)

    def _on_sigint(self, signum, frame):
        self.seen = True
        if self.raising:
            self._arm()
            raise KeyboardInterrupt

    def _on_retry(self, signum, frame):
        if not self.raising:
            return
        self._arm()
        if not _handling_interrupt():
            raise KeyboardInterrupt


class OutputError(Exception):
    """Standard output could not be written (``cause``: the OSError; a BrokenPipeError when the reader left)."""

    def __init__(self, cause: OSError):
        super().__init__(cause.strerror or str(cause))
        self.cause = cause


class GuardedStream:
    """``sys.stdout`` for the duration of a command: the same stream, but an OSError from ``write`` / ``flush``
    becomes an :class:`OutputError`, so it is told apart from an error writing a file."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s):
        try:
            return self.stream.write(s)
        except OSError as e:
            raise OutputError(e) from None

    def flush(self):
        try:
            return self.stream.flush()
        except OSError as e:
            raise OutputError(e) from None

    def __getattr__(self, name):
        return getattr(self.stream, name)


def silence_stdout() -> None:
    """Point file descriptor 1 at /dev/null so that the interpreter's last flush of what is still buffered for a
    gone reader (or a full disk) does not fail again at exit (the recipe of Python's ``signal`` documentation)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.__stdout__.fileno())
        os.close(devnull)
    except (OSError, AttributeError, ValueError):
        pass
