"""polarengine (HLWQ / PolarQuant) checkpoints: ``polar_config.json`` (read; ``in_features`` / ``bits`` per layer
when present). The tensor layouts of a module (A, B, C) and the config nemojax writes live with the format
(``nemojax.formats.hlwq.checkpoint``)."""
from __future__ import annotations

import json
import os

from ..formats import QuantError

__all__ = ["read_polar_config"]


def read_polar_config(folder: str) -> dict | None:
    path = os.path.join(folder, "polar_config.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            pc = json.load(f)
    except ValueError as e:
        raise QuantError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(pc.get("layers", {}), dict):
        raise QuantError(f"{path}: 'layers' must be a mapping")
    return pc
