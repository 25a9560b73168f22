"""Hugging Face safetensors -> jaxmoe checkpoints (params.safetensors), and loading them."""

from jaxmoe.checkpoint.assemble import CheckpointError, assemble
from jaxmoe.checkpoint.convert import convert_hf, count_params
from jaxmoe.checkpoint.safetensors_io import SafetensorsCheckpoint
from jaxmoe.checkpoint.store import Checkpoint, LoadedModel, load, open_checkpoint, restore_params, save_params

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "LoadedModel",
    "SafetensorsCheckpoint",
    "assemble",
    "convert_hf",
    "count_params",
    "load",
    "open_checkpoint",
    "restore_params",
    "save_params",
]
