"""Checkpoint I/O: Hugging Face safetensors folders (original or transformers-5 naming; float, ModelOpt and
polarengine quantized) and nemojax's orbax format, read into the parameter pytree, written from it, converted,
inspected and verified.

- ``safetensors``: the memory-mapped safetensors reader / writer;
- ``source``: which files form a checkpoint (the Hugging Face convention), ``Checkpoint``, ``CheckpointError``;
- ``modelopt`` / ``polar``: the quantization configs (``hf_quant_config.json``, ``polar_config.json``);
- ``plan``: every parameter matched to its tensors (``PlanItem``), checked before anything is read;
- ``read``: the one ``Reader`` of plan items, ``load_params``; ``sharded``: ``load_sharded``;
- ``write``: checkpoint tensor names, the quantization configs, the shard writer, ``save_params``;
- ``orbax``: nemojax's orbax format; ``output``: the atomic output folder, disk-full errors and the side files;
  ``partials``: owner markers of partial output folders, stale ones removed;
- ``convert``: reader -> transform -> writer; ``inspect`` and ``verify``: ``nemojax inspect`` / ``verify``.
"""
from .convert import (DEFAULT_MAX_SHARD_BYTES, TARGETS, ConvertError, DiskFullError, convert_checkpoint,
                      convert_to_orbax, dequantize_checkpoint)
from .inspect import inspect_checkpoint
from .modelopt import QuantConfigError
from .orbax import OrbaxError, is_orbax_checkpoint, load_orbax, save_orbax
from .read import MapReport, load_params, resolve_dtype, stack_banks
from .safetensors import SafeFile, SafetensorsError, save_file
from .sharded import load_sharded
from .source import Checkpoint, CheckpointError
from .verify import verify_checkpoint
from .write import checkpoint_tensors, save_params

__all__ = ["CheckpointError", "Checkpoint", "load_params", "resolve_dtype", "save_params", "checkpoint_tensors",
           "load_sharded", "convert_checkpoint", "dequantize_checkpoint", "convert_to_orbax", "ConvertError",
           "DiskFullError", "TARGETS", "DEFAULT_MAX_SHARD_BYTES", "inspect_checkpoint", "verify_checkpoint",
           "save_orbax", "load_orbax", "is_orbax_checkpoint", "OrbaxError", "QuantConfigError", "SafeFile", "SafetensorsError",
           "save_file", "MapReport", "stack_banks"]
