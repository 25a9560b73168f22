"""The model configuration: MoEConfig (moe_config.py), built from a Hugging Face `config.json`
by family (hf.py, deepseek.py, gpt_oss.py)."""

from jaxmoe.config.hf import from_hf_dict, load_hf_config
from jaxmoe.config.moe_config import (
    ARCHITECTURES,
    DEEPSEEK,
    DTYPES,
    ConfigError,
    MoEConfig,
    YarnRope,
    hf_dtype,
    resolve_yarn,
    rope_params,
)

__all__ = [
    "ARCHITECTURES",
    "DEEPSEEK",
    "DTYPES",
    "ConfigError",
    "MoEConfig",
    "YarnRope",
    "from_hf_dict",
    "hf_dtype",
    "load_hf_config",
    "resolve_yarn",
    "rope_params",
]
