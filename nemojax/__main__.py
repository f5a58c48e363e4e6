"""``python -m nemojax`` and the ``nemojax`` program (``run``). Until ``main`` sets up its own handling, Ctrl-C
exits at once with code 130: the process has done nothing yet."""
import os
import signal
import sys

if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))

from .cli import main  # noqa: E402  (after the handler: importing the command line takes a while)


def run() -> None:
    rc = main()
    if rc == 130:  # interrupted: skip the interpreter's teardown, which can crash on device work cut short
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, AttributeError, ValueError):
                pass
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":
    run()
