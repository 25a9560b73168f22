"""Trained params -> a jaxmoe checkpoint directory that `jaxmoe.load` reads.

Written like conversion: into a temporary sibling, renamed into place at the end.
Weights are stored in `dtype` (bf16 halves the file; the model then runs in bf16).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from jaxmoe.checkpoint import save_params
from jaxmoe.checkpoint.atomic import atomic_directory
from jaxmoe.train.run import RunConfig
from jaxmoe.train.step import split_params


def ship_checkpoint(
    dst: Path, run: RunConfig, params: dict, tokenizer: Path, eos_id: int, dtype: str, training: dict
) -> Path:
    """Replace `dst` with the checkpoint; `training` (settings, tokens, time) goes to training.json."""
    dst = Path(dst)
    hf = run.hf_config(eos_id, dtype)
    dense, experts = split_params(run.model_config(eos_id).replace(dtype=dtype), params)
    with atomic_directory(dst, replace=True) as tmp:
        save_params(tmp, dense, experts)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        gen = {"bos_token_id": None, "eos_token_id": eos_id, "pad_token_id": None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        shutil.copyfile(tokenizer, tmp / "tokenizer.json")
        (tmp / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    return dst
