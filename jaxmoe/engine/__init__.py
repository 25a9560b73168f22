"""Generation engines: resident (every weight on the device)."""

from jaxmoe.engine.resident import ContextError, GenerationResult, ResidentEngine
from jaxmoe.engine.sampling import SamplingParams, sample

__all__ = ["ContextError", "GenerationResult", "ResidentEngine", "SamplingParams", "sample"]
