"""Hugging Face checkpoint directory -> jaxmoe checkpoint directory.

Streams: every name and shape is checked first, then each dense tensor is read,
converted and written, then each MoE layer's experts are assembled and written, so
host memory holds one layer of experts (plus the tensor being read), not the model.

Everything is written into a hidden temporary directory next to the destination
and renamed into place at the very end, so a failed or interrupted conversion
never leaves a half-written checkpoint where `load` would find it.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from jaxmoe.checkpoint.assemble import (
    CheckpointError,
    TensorPlan,
    dense_value,
    layer_experts,
    np_dtype,
    plan_tensors,
)
from jaxmoe.checkpoint.atomic import atomic_directory
from jaxmoe.checkpoint.expert_format import write_format
from jaxmoe.checkpoint.params_file import ParamsWriter, expected
from jaxmoe.checkpoint.safetensors_io import SafetensorsCheckpoint
from jaxmoe.config import MoEConfig, load_hf_config
from jaxmoe.model import dense_shapes
from jaxmoe.quant import DENSE, ExpertFormat, packed_rows

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


def _write_params(dst: Path, cfg: MoEConfig, plan: TensorPlan, read, fmt: ExpertFormat = DENSE) -> None:
    """params.safetensors: each dense tensor, then each layer's experts (quantized and packed
    when `fmt` asks), written as it is made."""
    dtype = np_dtype(cfg.dtype)  # conversion stores every weight in the config's dtype
    specs = {name: (shape, dt if fmt.kind != "dense" and dt == np.uint8 else dtype)
             for name, (shape, dt) in expected(cfg, fmt).items()}  # fmt: skip
    with ParamsWriter(dst, specs) as out:
        for name, target in plan.dense.items():
            out.dense(target.path, dense_value(target, read(name), dtype))
        for layer in cfg.moe_layer_ids:
            # No name holds a layer's experts past its write, so the next layer is built
            # after this one is freed (peak: one layer, not two).
            if fmt.kind == "dense":
                out.experts(layer, layer_experts(cfg, plan, layer, read))
            else:
                out.packed(layer, np.stack(list(packed_rows(cfg, layer_experts(cfg, plan, layer, read), fmt))))


def stored_format(cfg: MoEConfig, plan: TensorPlan, fmt: ExpertFormat, src: Path) -> ExpertFormat:
    """The format to write: a checkpoint whose experts ship in MXFP4 (gpt-oss) keeps them
    in the `mxfp4` format, byte for byte; any other format would have to widen them first."""
    from jaxmoe.checkpoint.gpt_oss_keys import is_mxfp4

    if not any(is_mxfp4(plan.experts[layer]) for layer in cfg.moe_layer_ids):
        return fmt
    if fmt.kind not in ("dense", "mxfp4"):
        raise CheckpointError(f"{src}: its experts are MXFP4 and convert keeps them so; converting them to "
                              f"{fmt.name} would dequantize them first (not supported)")  # fmt: skip
    return ExpertFormat("mxfp4")


def convert_hf(src: str | Path, dst: str | Path, progress: bool = True, fmt: ExpertFormat = DENSE) -> Path:
    """Convert `src` (config.json + safetensors) into a new jaxmoe checkpoint at `dst`, its
    routed experts quantized when `fmt` is int8 or int4.

    Raises ConfigError for configs jaxmoe cannot run and CheckpointError for
    weights that do not match the config; both name the offending file.
    """
    src, dst = Path(src), Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CheckpointError(f"{dst}: already exists and is not empty; choose a new destination")
    cfg = load_hf_config(src)
    try:
        fmt.check(cfg)
    except ValueError as e:
        raise CheckpointError(f"{src}/config.json: {e}") from e
    with SafetensorsCheckpoint(src) as weights:
        plan = plan_tensors(cfg, weights.names, weights.shape_of, str(weights.source))  # before any write
        fmt = stored_format(cfg, plan, fmt, src)
        total = len(plan.dense) + sum(len(names) for names in plan.experts.values())
        bar = tqdm(total=total, desc="convert", unit="tensor", file=sys.stderr, disable=not progress)

        def read(name: str):
            bar.update()
            return weights.read(name)

        with bar, atomic_directory(dst) as tmp:
            _write_params(tmp, cfg, plan, read, fmt)
            _copy_side_files(src, tmp)
            write_format(tmp, fmt, source=str(src))
    return dst
