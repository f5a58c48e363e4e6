"""nemojax: a pure-JAX inference and conversion toolkit for NVIDIA Nemotron-H hybrid models.

The names below are imported on first use (PEP 562), so ``import nemojax`` — which ``python -m nemojax`` does
before the command line starts — does not import jax: the command line sets up its Ctrl-C handling first."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .version import __version__

if TYPE_CHECKING:
    from .api import Model, load
    from .checkpoint import CheckpointError
    from .config import Config, ConfigError
    from .params import abstract_params, count_params, init_params

__all__ = ["Model", "load", "Config", "ConfigError", "CheckpointError", "abstract_params", "count_params",
           "init_params", "__version__"]

# public name -> the module that defines it
_HOME = {"Model": "api", "load": "api", "Config": "config", "ConfigError": "config", "CheckpointError": "checkpoint",
         "abstract_params": "params", "count_params": "params", "init_params": "params"}


def __getattr__(name: str):
    """A public name (imported now), or a submodule (``nemojax.checkpoint`` after a bare ``import nemojax``)."""
    if name in _HOME:
        value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    elif name.startswith("_"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    else:
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
