"""Generation engines: resident (every weight on the device) and offloaded (experts in
pinned host memory behind a budgeted device cache)."""

from jaxmoe.engine.offloaded import OffloadedEngine
from jaxmoe.engine.inputs import ContextError
from jaxmoe.engine.outputs import GenerationResult
from jaxmoe.engine.resident import ResidentEngine
from jaxmoe.engine.sampling import SamplingParams, sample

__all__ = ["ContextError", "GenerationResult", "OffloadedEngine", "ResidentEngine", "SamplingParams", "sample"]
