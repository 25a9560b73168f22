"""A jaxmoe checkpoint -> a new one whose routed experts are quantized (int8 or int4).

Streams like conversion: the dense weights are copied a tensor at a time, then each MoE
layer's experts are read, quantized and packed (one byte row per expert), and written,
so host memory holds one layer. Dense weights, routers and shared experts stay as they
are; tokenizer, generation config and a trained predictor are copied (they depend only
on those). Written into a temporary directory renamed into place at the end: a failed or
interrupted run leaves nothing at the destination.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from jaxmoe.checkpoint.assemble import CheckpointError
from jaxmoe.checkpoint.atomic import atomic_directory
from jaxmoe.checkpoint.convert import TOKENIZER_FILES
from jaxmoe.checkpoint.expert_format import write_format
from jaxmoe.checkpoint.params_file import ParamsWriter, expected
from jaxmoe.checkpoint.store import open_checkpoint, open_params
from jaxmoe.config import MoEConfig
from jaxmoe.quant import ExpertFormat, packed_rows

SIDE_FILES = ("config.json", "generation_config.json", "training.json", *TOKENIZER_FILES)


def packed_layer(cfg: MoEConfig, stacks, fmt: ExpertFormat, refine: int = 0) -> np.ndarray:
    """One layer's dense expert stacks as [E, bytes] uint8 rows in `fmt`."""
    return np.stack(list(packed_rows(cfg, stacks, fmt, refine)))


def quantize_checkpoint(src: str | Path, dst: str | Path, fmt: ExpertFormat, refine: int = 0,
                        progress: bool = True) -> Path:  # fmt: skip
    """Write `src` with its experts in `fmt` as a new checkpoint at `dst`."""
    src, dst = Path(src), Path(dst)
    if fmt.kind == "dense":
        raise ValueError("quantize to int8 or int4; dense is what the source already is")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CheckpointError(f"{dst}: already exists and is not empty; choose a new destination")
    ckpt = open_checkpoint(src)
    cfg = ckpt.config
    if ckpt.expert_format.kind != "dense":
        raise CheckpointError(f"{src}: its experts are already quantized ({ckpt.expert_format.name})")
    try:
        fmt.check(cfg)
    except ValueError as e:
        raise CheckpointError(f"{src}/config.json: {e}") from e
    bar = tqdm(total=len(cfg.moe_layer_ids), desc=f"quantize {fmt.name}", unit="layer", file=sys.stderr,
               disable=not progress)  # fmt: skip
    with bar, open_params(ckpt) as params, atomic_directory(dst) as tmp:
        with ParamsWriter(tmp, expected(cfg, fmt)) as out:
            for key_path, value in params.dense():
                out.dense(key_path, value)
            for layer in cfg.moe_layer_ids:
                out.packed(layer, packed_layer(cfg, params.experts(layer), fmt, refine))
                bar.update()
        for name in SIDE_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        if (src / "predictor").is_dir():
            shutil.copytree(src / "predictor", tmp / "predictor")
        write_format(tmp, fmt, refine=refine, source=str(src))
    return dst
