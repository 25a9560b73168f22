"""jaxmoe: Mixture-of-Experts language models on a GPU too small for them, in JAX."""

from jaxmoe.checkpoint import LoadedModel, convert_hf, load
from jaxmoe.config import ConfigError, MoEConfig, from_hf_dict, load_hf_config
from jaxmoe.engine import OffloadedEngine, ResidentEngine, SamplingParams

__all__ = [
    "ConfigError",
    "LoadedModel",
    "MoEConfig",
    "OffloadedEngine",
    "ResidentEngine",
    "SamplingParams",
    "convert_hf",
    "from_hf_dict",
    "load",
    "load_hf_config",
]
