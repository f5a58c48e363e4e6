"""Owner markers of partial output folders (``.OUT.partial-XXXXXXXX`` beside an output being written) and the
removal of those a killed run left behind.

Each partial folder holds :data:`MARKER`, ``{"pid", "host", "start", "dst"}`` (``start``: the writer's process start
time, so a reused pid is not taken for the writer), touched every :data:`HEARTBEAT_S` seconds while the writer
lives. A partial is stale when its writer on this host has exited, or, for a writer on another host, when its
marker has not been touched for :data:`STALE_AFTER_S` seconds; a partial without a marker only after that long
too. ``.OUT.partial-XXXXXXXX.previous`` is a previous output moved aside while an output is replaced (where the
filesystem cannot swap two folders in one step): put back when OUT is missing, removed otherwise.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
import time

__all__ = ["MARKER", "STALE_AFTER_S", "HEARTBEAT_S", "write_marker", "Heartbeat", "stale_reason",
           "clean_partials", "PARTIAL_INFIX", "PREVIOUS_SUFFIX"]

MARKER = ".nemojax-partial.json"
STALE_AFTER_S = 24 * 3600
HEARTBEAT_S = 600
PARTIAL_INFIX = ".partial-"
PREVIOUS_SUFFIX = ".previous"
_NAME = re.compile(r"^\.(?P<out>.+)\.partial-[A-Za-z0-9_]+(?P<previous>\.previous)?$")


def _start_time(pid: int) -> str | None:
    """Start time of process ``pid`` (clock ticks since boot, /proc/PID/stat field 22); None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def write_marker(folder: str, dst: str) -> None:
    """Record this process as the writer of the partial ``folder`` (destination ``dst``)."""
    info = {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid()), "dst": dst,
            "created": time.time()}
    with open(os.path.join(folder, MARKER), "w") as f:
        json.dump(info, f)


class Heartbeat:
    """Touches ``folder``'s marker every ``every`` seconds (a daemon thread) until :meth:`stop`, so a writer on
    another host is seen alive however long it runs."""

    def __init__(self, folder: str, every: float = HEARTBEAT_S):
        self.path = os.path.join(folder, MARKER)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True, name="nemojax-partial")
        self._thread.start()

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                os.utime(self.path)
            except OSError:
                return

    def stop(self) -> None:
        self._stop.set()


def _alive(pid: int, start: str | None) -> bool:
    """Whether process ``pid`` of this host is running and is the one that started at ``start``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    now = _start_time(pid)
    return start is None or now is None or now == start


def stale_reason(folder: str, stale_after_s: float = STALE_AFTER_S) -> str | None:
    """Why the partial ``folder`` belongs to no live writer, or None when it may (a live or recent writer)."""
    path = os.path.join(folder, MARKER)
    try:
        with open(path) as f:
            info = json.load(f)
        pid, host = int(info["pid"]), str(info["host"])
        age = time.time() - os.stat(path).st_mtime
    except (OSError, ValueError, KeyError, TypeError):
        try:
            age = time.time() - os.stat(folder).st_mtime
        except OSError:
            return None
        return f"no writer marker, untouched for {age / 3600:.1f} h" if age > stale_after_s else None
    if host == socket.gethostname():
        start = info.get("start")
        return None if _alive(pid, start if isinstance(start, str) else None) else \
            f"its writer, pid {pid} on {host}, has exited"
    return f"its writer on {host} (pid {pid}) has been silent for {age / 3600:.1f} h" if age > stale_after_s else None


def clean_partials(parent: str, name: str, stale_after_s: float = STALE_AFTER_S) -> list[str]:
    """Remove the stale partial folders in ``parent`` (any output's with a marker; ``name``'s also without one),
    putting a moved-aside previous output back where its output is missing. Returns what was done, one line each."""
    done = []
    try:
        entries = sorted(os.listdir(parent))
    except OSError:
        return done
    for entry in entries:
        m = _NAME.match(entry)
        path = os.path.join(parent, entry)
        if m is None or os.path.islink(path) or not os.path.isdir(path):
            continue
        if m.group("previous"):
            owner = path.removesuffix(PREVIOUS_SUFFIX)
            why = stale_reason(owner, stale_after_s) if os.path.isdir(owner) else "its replacement finished"
            if why is None:
                continue
            out = os.path.join(parent, m.group("out"))
            if not os.path.lexists(out):
                try:
                    os.rename(path, out)
                except OSError:  # another run got there first
                    continue
                done.append(f"restored the previous output {out} from {path} ({why})")
                continue
        else:
            if not os.path.isfile(os.path.join(path, MARKER)) and m.group("out") != name:
                continue
            why = stale_reason(path, stale_after_s)
            if why is None:
                continue
        shutil.rmtree(path, ignore_errors=True)
        done.append(f"removed the leftover partial output {path} ({why})")
    return done
