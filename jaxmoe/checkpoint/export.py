"""jaxmoe checkpoint directory -> Hugging Face directory (the inverse of conversion).

The tensor names come from the same weight map conversion reads (`hf_keys`), walked
backwards: NNX kernels [in, out] become torch Linear weights [out, in], and each
layer's fused expert stacks become the per-expert tensors `save_pretrained` writes.
Streamed like conversion: one dense tensor or one layer of experts is in memory at a
time, written into a temporary sibling that is renamed at the end.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from jaxmoe.checkpoint.assemble import CheckpointError, np_dtype
from jaxmoe.checkpoint.atomic import atomic_directory
from jaxmoe.checkpoint.convert import TOKENIZER_FILES
from jaxmoe.checkpoint.gpt_oss_keys import hf_layer_tensors
from jaxmoe.checkpoint.hf_keys import dense_targets, expert_targets
from jaxmoe.checkpoint.targets import ExpertTarget
from jaxmoe.checkpoint.params_file import dense_name, expected
from jaxmoe.checkpoint.safetensors_write import SafetensorsWriter
from jaxmoe.checkpoint.store import open_checkpoint, open_params
from jaxmoe.config import MoEConfig
from jaxmoe.model import ExpertWeights
from jaxmoe.tokenizer import load_tokenizer


def _expert_tensor(w: ExpertWeights, target: ExpertTarget, width: int) -> np.ndarray:
    """One per-expert Hugging Face tensor, cut from the layer's stacks."""
    if target.part == "down":
        value = w.w_down[target.expert].T  # [I, D] -> [D, I]
    else:
        cols = slice(0, width) if target.part == "gate" else slice(width, 2 * width)
        value = w.w_gate_up[target.expert][:, cols].T  # [D, I] -> [I, D]
    return np.ascontiguousarray(value)


def _write_weights(path: Path, cfg: MoEConfig, params) -> None:
    """model.safetensors in the per-expert layout, one dense tensor or one layer of experts in
    memory at a time (plus the tensor being written)."""
    dtypes = {name: dtype for name, (_, dtype) in expected(cfg).items()}
    dense = dense_targets(cfg)
    # gpt-oss: its bf16 layout (fused, interleaved); the others: per-expert tensors.
    experts = expert_targets(cfg)[1 if cfg.family == "gpt_oss" else 0]
    specs = {name: (t.shape, dtypes[dense_name(t.path)]) for name, t in dense.items()}
    specs |= {name: (t.shape, np_dtype(cfg.dtype)) for name, t in experts.items()}
    by_path = {t.path: (name, t) for name, t in dense.items()}
    with SafetensorsWriter(path, specs, metadata={"format": "pt"}) as out:
        for key_path, value in params.dense():
            name, target = by_path[key_path]
            out.write(name, np.ascontiguousarray(value.T) if target.transpose else value)
        for layer in cfg.moe_layer_ids:
            w = params.experts(layer)
            if cfg.family == "gpt_oss":
                for name, value in hf_layer_tensors(cfg, layer, w).items():
                    out.write(name, value)
                continue
            for name, target in experts.items():
                if target.layer == layer:
                    out.write(name, _expert_tensor(w, target, cfg.expert_intermediate_size))
            del w  # before the next layer is read


def _tokenizer_config(src: Path, generation: dict) -> dict | None:
    """A minimal tokenizer_config.json so AutoTokenizer can open a bare tokenizer.json."""
    eos = generation.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    config = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if eos is not None:
        config["eos_token"] = load_tokenizer(src / "tokenizer.json").id_to_token(eos)
    return config


def export_hf(src: str | Path, dst: str | Path) -> Path:
    """Write `src` (a jaxmoe checkpoint) as a new Hugging Face directory at `dst`."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CheckpointError(f"{dst}: already exists and is not empty; choose a new destination")
    ckpt = open_checkpoint(src)
    cfg, fmt = ckpt.config, ckpt.expert_format
    if fmt.kind == "mxfp4":
        raise CheckpointError(
            f"{src}: its experts are MXFP4; export_hf writes dense experts, so it would have to widen them "
            "to the model dtype: not supported (convert the Hugging Face MXFP4 checkpoint instead)"
        )
    if fmt.kind != "dense":
        raise CheckpointError(
            f"{src}: its experts are quantized ({fmt.name}); export_hf writes dense checkpoints that "
            "transformers loads: export the checkpoint it was quantized from"
        )
    hf = json.loads((src / "config.json").read_text())
    hf["dtype"] = cfg.dtype  # what the tensors are stored in
    gen_path = src / "generation_config.json"
    generation = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    with open_params(ckpt) as params, atomic_directory(dst) as tmp:
        _write_weights(tmp / "model.safetensors", cfg, params)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        if gen_path.is_file():
            shutil.copyfile(gen_path, tmp / "generation_config.json")
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        if (src / "tokenizer.json").is_file() and not (src / "tokenizer_config.json").is_file():
            config = _tokenizer_config(src, generation)
            (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dst
