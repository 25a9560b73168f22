"""A randomly initialised jaxmoe checkpoint: the demo model until a trained one ships.

Its text is noise. It exists so the whole path (checkpoint -> load -> generate)
runs from a fresh clone with nothing downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
from flax import nnx

from jaxmoe.checkpoint.store import save_params
from jaxmoe.config import from_hf_dict
from jaxmoe.model import MoEDecoder, dense_dict, init_experts
from jaxmoe.tokenizer import byte_level_tokenizer

# OLMoE family, sized to build and run in seconds on a CPU.
TINY_OLMOE = {
    "architectures": ["OlmoeForCausalLM"],
    "model_type": "olmoe",
    "vocab_size": 257,
    "hidden_size": 128,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "num_experts": 16,
    "num_experts_per_tok": 4,
    "norm_topk_prob": False,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": None,
    "eos_token_id": 256,
    "pad_token_id": None,
    "dtype": "float32",
}


def make_random_checkpoint(dst: str | Path, hf_config: dict = TINY_OLMOE, seed: int = 0) -> Path:
    """Write a random-weight checkpoint with a byte-level tokenizer; atomically, like conversion."""
    dst = Path(dst)
    cfg = from_hf_dict(hf_config)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        model = MoEDecoder(cfg, nnx.Rngs(seed))
        save_params(tmp, dense_dict(model), init_experts(cfg, jax.random.key(seed + 1)))
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        gen = {"eos_token_id": hf_config["eos_token_id"], "bos_token_id": hf_config["bos_token_id"]}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        byte_level_tokenizer().save(str(tmp / "tokenizer.json"))
        (tmp / "README.md").write_text("Random weights (seed %d): generated text is noise.\n" % seed)
        tmp.chmod(0o755)  # mkdtemp makes it private
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
