"""What a decode step costs, as a model (never a measurement): the figures the prefetch
gate weighs and the simulator's time estimates come from.

The host-planned decode (engine/offloaded_decode.py) pays, per token, one dispatch, one
host read and the compute of every layer; each layer that misses adds a resume: a copy
call, the bytes at the host-to-device bandwidth, the step program again from that layer
(its dispatch and host read) and that layer's attention again. Every copy is on the
critical path: the resumed program reads the pool the copies are written into, so a
prefetch is paid for when it is made.

The defaults are an H200's figures on the OLMoE-1B-7B shape in bf16; where each comes from
and what it does not cover: docs/DECODE.md ("Figures behind the code's constants").
Derived figures are a model: label them so wherever they are shown.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class CostModel:
    name: str = "h200-olmoe"
    layer_ms: float = 5.28 / 16  # device compute of one layer in one decode step, batch 1 (an upper figure)
    dispatch_ms: float = 0.34  # one program dispatch with many arguments
    read_ms: float = 0.35  # one host read of a step's small outputs
    copy_call_ms: float = 0.21  # the fixed part of one batched device_put
    h2d_gbps: float = 41.0  # pinned host -> device, batched expert copies
    expert_bytes: int = 12_580_000  # one OLMoE-1B-7B expert in bf16
    recompute_layers: float = 1.0  # a resume recomputes the missed layer's attention; counted as a whole layer

    def expert_ms(self, expert_bytes: int | None = None) -> float:
        """One expert's bytes at the bandwidth."""
        size = self.expert_bytes if expert_bytes is None else expert_bytes
        return size / (self.h2d_gbps * 1e9) * 1e3

    def resume_ms(self) -> float:
        """A layer that misses, apart from its copies' bytes: the copy call, the step
        dispatched again (writing the copies into the pool) and read again, the layer's
        attention again."""
        return self.copy_call_ms + self.dispatch_ms + self.read_ms + self.recompute_layers * self.layer_ms

    def token_ms(self, layers: int, tokens: int, resumes: int, loads: int, predictions: int = 0,
                 predictor_ms: float = 0.0, expert_bytes: int | None = None, copy_calls: int = 0) -> dict:  # fmt: skip
        """Modelled decode time per token and its parts, from counts over `tokens` steps of a
        model with `layers` layers; `predictions`: scorer evaluations, each `predictor_ms`;
        `copy_calls`: copies made outside a resume (at a token boundary), each a device_put
        call whose copies the next step program writes (no program of their own)."""
        if tokens <= 0:
            raise ValueError("token_ms needs at least one token")
        parts = {
            "compute_ms": layers * self.layer_ms,
            "step_ms": self.dispatch_ms + self.read_ms,
            "resume_ms": resumes / tokens * self.resume_ms(),
            "copy_call_ms": copy_calls / tokens * self.copy_call_ms,
            "copy_ms": loads / tokens * self.expert_ms(expert_bytes),
            "predictor_ms": predictions / tokens * predictor_ms,
        }
        return {"ms_per_token": sum(parts.values()), **parts}

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "label": "model"}


# H100: the H200's figures (the same Hopper chip and PCIe Gen5 host link) under its own name, so
# that measured H100 figures have a place to go; the H100 runs so far timed whole steps, not
# these parts (docs/DECODE.md). Not a measurement.
COST_MODELS = {"h200-olmoe": CostModel(), "h100-olmoe": CostModel(name="h100-olmoe (assumed: the h200 figures)")}


def cost_model(name: str) -> CostModel:
    if name not in COST_MODELS:
        raise ValueError(f"unknown cost model {name!r}; choose one of {sorted(COST_MODELS)}")
    return COST_MODELS[name]
