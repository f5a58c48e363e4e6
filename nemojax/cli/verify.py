"""``nemojax verify``: loads a checkpoint and runs one forward pass (``nemojax.checkpoint.verify``). Exit code 0
OK, 1 failed check, 2 unusable input."""
from __future__ import annotations

import json
import os
import sys

from ..checkpoint import verify_checkpoint
from .errors import describe, load_option_error, need_folders
from .generate import MMAP_HELP

__all__ = ["add_parser", "cmd_verify"]


def add_parser(sub) -> None:
    p = sub.add_parser("verify", help="load a checkpoint and run one forward pass",
                       description="Load a checkpoint with nemojax.load (checks every tensor's shape and dtype), "
                                   "run one forward pass on a few tokens and check the logits are finite. "
                                   "Exit code 0 OK, 1 failed check, 2 unusable input.")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--base", default=None, help="BF16 checkpoint supplying buffers HLWQ checkpoints lack")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--mmap", action="store_true", help=MMAP_HELP)
    p.set_defaults(func=cmd_verify)


def cmd_verify(a) -> int:
    need_folders(a.dir, a.base)
    try:
        r = verify_checkpoint(a.dir, a.base, mmap=a.mmap)
    except Exception as e:  # noqa: BLE001  (unusable input: exit 2 from main; a failed forward: a failed check)
        if isinstance(e, ValueError) and load_option_error(e) is not None:
            e = load_option_error(e)  # --mmap where it cannot work
        code, msg = describe(e)
        if code == 2:
            if a.json:
                print(json.dumps({"path": os.path.abspath(a.dir), "ok": False, "error": msg}))
            raise e from None
        r = {"path": os.path.abspath(a.dir), "ok": False, "error": f"{type(e).__name__}: {e}"}
    if a.json:
        print(json.dumps(r))
    elif r["ok"]:
        print(f"OK {r['path']}: loaded in {r['load_s']:.1f} s, forward on {r['tokens']} tokens -> finite logits "
              f"{r['logits_shape']}")
    else:
        print(f"FAILED {r['path']}: {r['error']}", file=sys.stderr)
    return 0 if r["ok"] else 1
