"""nemojax: a pure-JAX inference and conversion toolkit for NVIDIA Nemotron-H hybrid models."""
from .api import Model, load
from .checkpoint import CheckpointError
from .config import Config, ConfigError
from .params import abstract_params, count_params, init_params
from .version import __version__

__all__ = ["Model", "load", "Config", "ConfigError", "CheckpointError", "abstract_params", "count_params",
           "init_params", "__version__"]
