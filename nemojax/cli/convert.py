"""``nemojax convert``: a checkpoint folder to another format, streaming (``nemojax.checkpoint.convert``)."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import textwrap
from fractions import Fraction

from ..checkpoint import TARGETS, convert_checkpoint
from ..quant import RECIPES
from .errors import UsageError, need_folders

__all__ = ["add_parser", "cmd_convert", "MAX_SHARD_BYTES"]

MAX_SHARD_BYTES = 10**15  # 1 PB: far above any file system's file size a shard could need

_CONVERT_EPILOG = """\
supported conversions:
  bf16  -> RECIPE             quantized with a recipe (below), in its format's checkpoint layout (ModelOpt formats:
                              hf_quant_config.json + config.json quantization_config). WEIGHT-ONLY: there is no
                              calibration, so no input_scale (no activation modes such as W4A4) and no FP8 KV-cache
                              scales are written. --exclude GLOB keeps more modules in high precision.
{recipes}
  nvfp4 -> bf16, hlwq -> bf16 dequantized plain BF16 checkpoint (like polarquant-convert; --base for HLWQ files
                              that lack e_score_correction_bias); any quantized format likewise
  any   -> orbax              the parameter pytree as an orbax checkpoint (params/ + nemojax_orbax.json + config and
                              tokenizer files), quantized nodes kept as they are; --quant RECIPE quantizes a bf16
                              source on the way. nemojax.load and `nemojax generate --model OUT` read it.
Conversion streams one parameter at a time (peak memory ~ one parameter + small buffers); output is written to
a temporary folder beside OUT and renamed when complete, so an error (or a full disk) leaves nothing behind."""


def _epilog() -> str:
    """The epilog with each recipe and its ``about`` (``QuantFormat.recipes``)."""
    return _CONVERT_EPILOG.format(recipes="\n".join(
        textwrap.fill(r.about, 116, initial_indent=f"    {name:26s}", subsequent_indent=" " * 30)
        for name, r in RECIPES.items()))


def _size(text: str) -> int:
    """A byte count: a number and an optional unit (K, M, G, T: powers of 1000; KiB, MiB, ...: of 1024)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([KMGT]?I?B?)\s*", text.upper())
    if not m or m.group(2) in ("I", "IB"):
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 5GB, 500MB, 2GiB, 1000000)")
    unit = m.group(2).rstrip("B")
    mult = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
            "KI": 1 << 10, "MI": 1 << 20, "GI": 1 << 30, "TI": 1 << 40}[unit]
    v = int(Fraction(m.group(1)) * mult)  # exact: no float rounding or overflow
    if not 0 < v <= MAX_SHARD_BYTES:
        raise argparse.ArgumentTypeError(f"size must be in [1 byte, {MAX_SHARD_BYTES // 10**12} TB], got {text!r}")
    return v


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint (bf16 <-> a quantized format), streaming",
                       description="Convert a Nemotron-H checkpoint folder, one parameter at a time.",
                       epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="input checkpoint folder")
    p.add_argument("dst", metavar="OUT", help="output folder (must not exist unless --force)")
    p.add_argument("--to", required=True, choices=TARGETS, help="target format (see below)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--max-shard-size", type=_size, default="5GB", dest="max_shard_bytes",
                   help="maximum safetensors shard size (default 5GB; e.g. 500MB, 2GiB)")
    p.add_argument("--base", default=None, help="BF16 checkpoint supplying buffers HLWQ checkpoints lack")
    p.add_argument("--quant", default=None, metavar="RECIPE",
                   help="with --to orbax: quantize a bf16 source with this recipe (nvfp4, hlwq-q5, ...)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="also keep the modules matching GLOB (checkpoint names, e.g. 'backbone.layers.3.*') in high "
                        "precision; repeatable")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=cmd_convert)


def cmd_convert(a) -> int:
    need_folders(a.src, a.base)
    try:
        res = convert_checkpoint(a.src, a.dst, a.to, force=a.force, max_shard_bytes=a.max_shard_bytes, base=a.base,
                                 progress=not a.no_progress, quant=a.quant, exclude=tuple(a.exclude))
    except FileExistsError as e:
        if e.filename is not None:  # a file error of the file system, not the existing OUT
            raise
        raise UsageError(f"{os.path.abspath(a.dst)}: already exists (use --force to overwrite)") from None
    for line in res["removed_partials"]:
        print(f"nemojax convert: {line}", file=sys.stderr)
    if a.json:
        print(json.dumps(res))
    else:
        print(f"wrote {res['output']} ({res['from']} -> {res['to']}: {res['parameters']} parameters, "
              f"{res['tensor_bytes'] / 1e9:.3f} GB in {res['shards']} shard(s))")
    return 0
