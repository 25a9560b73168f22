"""Where a Hugging Face tensor goes in jaxmoe: a dense parameter or a part of a layer's experts
(the weight maps of hf_keys.py and gpt_oss_keys.py produce these)."""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass(frozen=True)
class DenseTarget:
    path: tuple  # key path into the dense pure dict
    shape: tuple[int, ...]  # the Hugging Face tensor's shape
    transpose: bool  # torch Linear weight -> NNX kernel


@dataclasses.dataclass(frozen=True)
class ExpertTarget:
    layer: int
    # gpt-oss adds its own parts (jaxmoe/checkpoint/gpt_oss_keys.py).
    part: Literal["gate", "up", "down", "gate_up_fused", "down_fused"] | str
    expert: int | None  # None for the fused layout (all experts in one tensor)
    shape: tuple[int, ...]
