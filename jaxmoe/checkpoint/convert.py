"""Hugging Face checkpoint directory -> jaxmoe checkpoint directory.

Everything is written into a hidden temporary directory next to the destination
and renamed into place at the very end, so a failed or interrupted conversion
never leaves a half-written checkpoint where `load` would find it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import jax
from tqdm import tqdm

from jaxmoe.checkpoint.assemble import CheckpointError, assemble
from jaxmoe.checkpoint.safetensors_io import SafetensorsCheckpoint
from jaxmoe.checkpoint.store import save_params
from jaxmoe.config import MoEConfig, load_hf_config
from jaxmoe.model import dense_shapes

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


def count_params(cfg: MoEConfig) -> int:
    """Dense plus routed-expert parameters, from the config alone."""
    dense = sum(math.prod(s.shape) for s in jax.tree.leaves(dense_shapes(cfg)))
    return dense + len(cfg.moe_layer_ids) * cfg.num_experts * cfg.expert_params


def _copy_side_files(src: Path, dst: Path) -> None:
    shutil.copyfile(src / "config.json", dst / "config.json")
    if (src / "generation_config.json").is_file():
        shutil.copyfile(src / "generation_config.json", dst / "generation_config.json")
    else:
        hf = json.loads((src / "config.json").read_text())
        ids = {k: hf[k] for k in ("bos_token_id", "eos_token_id") if hf.get(k) is not None}
        (dst / "generation_config.json").write_text(json.dumps(ids, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def convert_hf(src: str | Path, dst: str | Path, progress: bool = True) -> Path:
    """Convert `src` (config.json + safetensors) into a new jaxmoe checkpoint at `dst`.

    Raises ConfigError for configs jaxmoe cannot run and CheckpointError for
    weights that do not match the config; both name the offending file.
    """
    src, dst = Path(src), Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CheckpointError(f"{dst}: already exists and is not empty; choose a new destination")
    cfg = load_hf_config(src)
    with SafetensorsCheckpoint(src) as weights:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
        try:
            names = tqdm(weights.names, desc="convert", unit="tensor", file=sys.stderr, disable=not progress)
            dense, experts = assemble(cfg, names, weights.shape_of, weights.read, str(weights.source))
            save_params(tmp, dense, experts)
            _copy_side_files(src, tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; the checkpoint should not be
            os.rename(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dst
