"""Block kinds, one module per kind: Mamba2 (``M``), MoE (``E``), attention (``*``), MLP (``-``). ``base``: what a
kind declares, and the registry ``BLOCKS`` that importing this package fills (``from .blocks.base import BLOCKS``)."""
from . import mamba, moe, attention, mlp  # noqa: F401  (the registered kinds; a new kind: its module here)
