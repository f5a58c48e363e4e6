"""Process-level behaviour of the command line: Ctrl-C ends the run with exit code 130 at any moment, and a
standard output that cannot be written (a closed pipe, a full disk) is reported once instead of as a traceback.

Ctrl-C: Python turns SIGINT into a ``KeyboardInterrupt`` raised wherever the main thread is, and some places lose
it: one raised inside a garbage-collector callback (jax registers one) is printed as "Exception ignored" and the
run goes on; one raised while an extension module initialises (numpy, jaxlib during ``import jax``) comes out as an
``ImportError``, a printed traceback or a later crash; a library's broad ``except`` can drop it. :class:`Interrupts`
therefore (1) before the command starts (importing, parsing: nothing to clean up) exits at once; (2) afterwards
raises ``KeyboardInterrupt`` only outside imports, gc callbacks and ``__del__`` (there it tries again 10 ms later);
(3) remembers that SIGINT arrived (``seen``: the exit code is 130 whatever exception comes out) and raises it again
every ``RETRY_S`` seconds until it is being handled, so a lost one cannot let the run finish. While it is being
handled (an ``except`` / ``finally`` / ``__exit__`` cleaning up, such as the removal of a half-written output
folder) nothing more is raised.
"""
from __future__ import annotations

import gc
import os
import signal
import sys
import threading

__all__ = ["Interrupts", "GuardedStream", "OutputError", "silence_stdout"]

RETRY_S = 0.2  # a KeyboardInterrupt that got lost is raised again after this long
SOON_S = 0.01  # the signal came where raising is unsafe (an import, a gc callback): try again this soon


def _handling_interrupt() -> bool:
    """Whether a KeyboardInterrupt is being handled by the code the signal interrupted (directly, or as the
    context of the exception being handled)."""
    e = sys.exc_info()[1]
    while e is not None:
        if isinstance(e, KeyboardInterrupt):
            return True
        e = e.__context__
    return False


def _unsafe_to_raise(frame) -> bool:
    """Whether ``frame`` runs inside a garbage-collector callback or a ``__del__`` (an exception raised there is
    only printed, "Exception ignored in ...", and the interrupted code goes on), or inside an import (an
    extension module interrupted while it initialises can print its own traceback, turn the interrupt into an
    ImportError or leave the process to crash later)."""
    callbacks = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        code = frame.f_code
        if code in callbacks or code.co_name == "__del__" or code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


class Interrupts:
    """SIGINT handling for one run of the command line: ``install()`` before any heavy import; ``raising = False``
    once the run is over (a late SIGINT is then only recorded); ``restore()`` at the end (the previous handlers
    come back, for callers of ``main()`` in-process). The retry timer (SIGALRM) is set up only after a SIGINT."""

    def __init__(self, exit_code: int = 130, exit_early: bool = False):
        self.seen = False
        self.raising = True
        self.exit_code = exit_code
        self.exit_early = exit_early  # until started(): exit at once (a process that has done nothing yet)
        self._saved: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            return  # started ignoring SIGINT (nohup, a background job of a script): keep ignoring it
        self._saved[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)
        self._saved_hook, sys.unraisablehook = sys.unraisablehook, self._unraisable

    def restore(self) -> None:
        self.raising = False
        if signal.SIGALRM in self._saved:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        if self._saved:
            sys.unraisablehook = self._saved_hook
        self._saved.clear()

    def _arm(self, delay: float) -> None:
        if not hasattr(signal, "setitimer"):
            return
        if signal.SIGALRM not in self._saved:
            self._saved[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._on_retry)
        signal.setitimer(signal.ITIMER_REAL, delay)

    def _on_sigint(self, signum, frame):
        self.seen = True
        self._interrupt(frame)

    def _on_retry(self, signum, frame):
        if not _handling_interrupt():
            self._interrupt(frame)
        elif self.raising:
            self._arm(RETRY_S)

    def started(self) -> None:
        """The command starts doing work (from now on an interrupt unwinds it, so that it cleans up)."""
        self.exit_early = False

    def _interrupt(self, frame) -> None:
        """Raise KeyboardInterrupt in the interrupted code, unless that code would lose it (then soon again)."""
        if not self.raising:
            return
        if self.exit_early:  # still importing / parsing: nothing to clean up, and imports take seconds
            os._exit(self.exit_code)
        if _unsafe_to_raise(frame):
            self._arm(SOON_S)
            return
        self._arm(RETRY_S)
        raise KeyboardInterrupt

    def _unraisable(self, u) -> None:
        """sys.unraisablehook while the run lasts: a KeyboardInterrupt lost in a callback is not reported (it is
        raised again), anything else as before."""
        if not (self.seen and isinstance(u.exc_value, KeyboardInterrupt)):
            self._saved_hook(u)


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
