"""jaxmoe checkpoint directory -> Hugging Face directory (the inverse of conversion).

The tensor names come from the same weight map conversion reads (`hf_keys`), walked
backwards: NNX kernels [in, out] become torch Linear weights [out, in], and each
layer's fused expert stacks become the per-expert tensors `save_pretrained` writes.
Written into a temporary sibling and renamed at the end, like conversion.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from jaxmoe.checkpoint.assemble import CheckpointError
from jaxmoe.checkpoint.atomic import atomic_directory
from jaxmoe.checkpoint.convert import TOKENIZER_FILES
from jaxmoe.checkpoint.hf_keys import dense_targets, expert_targets
from jaxmoe.checkpoint.store import restore_params
from jaxmoe.config import MoEConfig, load_hf_config
from jaxmoe.model import ExpertWeights
from jaxmoe.tokenizer import load_tokenizer


def hf_tensors(cfg: MoEConfig, dense: dict, experts: tuple[ExpertWeights | None, ...]) -> dict[str, np.ndarray]:
    """Every tensor of the Hugging Face checkpoint, by name, in the per-expert layout."""
    out = {}
    for name, target in dense_targets(cfg).items():
        value = dense
        for key in target.path:
            value = value[key]
        value = np.asarray(value)
        out[name] = np.ascontiguousarray(value.T) if target.transpose else value
        assert out[name].shape == target.shape, (name, out[name].shape, target.shape)
    width = cfg.expert_intermediate_size
    for name, target in expert_targets(cfg)[0].items():
        w = experts[target.layer]
        if target.part == "down":
            value = np.asarray(w.w_down[target.expert]).T  # [I, D] -> [D, I]
        else:
            cols = slice(0, width) if target.part == "gate" else slice(width, 2 * width)
            value = np.asarray(w.w_gate_up[target.expert][:, cols]).T  # [D, I] -> [I, D]
        out[name] = np.ascontiguousarray(value)
    return out


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
    cfg = load_hf_config(src)
    dense, experts = restore_params(src, cfg)
    hf = json.loads((src / "config.json").read_text())
    hf["dtype"] = cfg.dtype  # what the tensors are stored in
    gen_path = src / "generation_config.json"
    generation = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    with atomic_directory(dst) as tmp:
        save_file(hf_tensors(cfg, dense, experts), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "model.safetensors").chmod(0o644)  # safetensors creates it owner-only
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
