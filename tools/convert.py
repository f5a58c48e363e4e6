#!/usr/bin/env python
"""``python tools/convert.py SRC OUT --to {nvfp4,hlwq-q5,hlwq-q5-converged,bf16} [...]`` — the same as
``nemojax convert SRC OUT --to ...`` (streaming checkpoint conversion; see ``--help``)."""
from __future__ import annotations

import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)


def main(argv=None) -> int:
    from nemojax.cli import main as cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    return cli_main(["convert", *argv])


if __name__ == "__main__":
    sys.exit(main())
