"""Offloaded == resident tokens on the shipped model: a trained model's routing, so its cache
misses as it would in use (a random model's greedy decode repeats one token and hits). Needs
no torch or transformers, so it is also the engines' exactness check on the GPU image's jax
(scripts/test_gpu_jax.sh)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from jaxmoe.checkpoint import load
from jaxmoe.config import load_hf_config
from jaxmoe.engine import ResidentEngine
from jaxmoe.engine.offloaded import OffloadedEngine
from jaxmoe.offload.cache import batch_minimum_experts
from jaxmoe.offload.host_store import total_expert_bytes
from jaxmoe.quant import DENSE

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "jaxmoe-tiny"
# Held-out-style prompts (token ids of the shipped byte-pair tokenizer), ragged.
PROMPTS = [[12, 290, 263, 199, 83, 345], [7, 8, 9], [495, 287, 263, 953, 12, 290, 263, 40, 41]]
NEW = 12


@functools.cache
def resident_tokens(batch: int) -> list[list[int]]:
    m = load(SHIPPED)
    return ResidentEngine(m.config, m.model, m.experts).generate(PROMPTS[:batch], NEW).token_ids


def budget_bytes(budget: str, batch: int) -> int:
    cfg = load_hf_config(SHIPPED)
    if budget == "min":
        return batch_minimum_experts(batch, DENSE, cfg) * DENSE.nbytes(cfg)
    return int(float(budget) * total_expert_bytes(cfg, DENSE))


@pytest.mark.parametrize(
    "policy,budget,batch,prefill",
    [
        ("lru", "min", 3, "routed"),  # every layer evicts: misses inside the step program
        ("predictor", "0.25", 1, "stream"),  # the shipped predictor prefetches in the step program
        ("maps", "min", 1, "routed"),  # the host-planned decode (a missed layer resumes)
    ],
)
def test_offloaded_shipped_model_gives_the_resident_tokens(policy, budget, batch, prefill):
    predictor = SHIPPED / "predictor" if policy in ("predictor", "maps") else None
    engine = OffloadedEngine.from_checkpoint(SHIPPED, budget_bytes(budget, batch), policy, predictor=predictor,
                                             prefill=prefill, check_budget=True)  # fmt: skip
    result = engine.generate(PROMPTS[:batch], NEW)
    assert result.token_ids == resident_tokens(batch)
    m = result.metrics
    assert m["decode_expert_loads"] > 0  # the budget made it miss: a trained model's routing
    if policy == "maps":  # planned on the host: a missed layer returns to it
        assert m["resumes_per_token"] > 0
    else:  # misses inside the step program: one run and one read per token
        assert m["resumes_per_token"] == 0 and m["host_syncs_per_token"] == 1.0
