"""Resident generation: batching, buckets, sampling, EOS and context errors."""

from __future__ import annotations

import pytest

from hf_models import tiny_hf_model
from jax_from_hf import jaxmoe_from_hf
from jaxmoe.engine import ContextError, ResidentEngine, SamplingParams

PROMPTS = [[5, 7, 9], list(range(3, 19)), [4, 0, 12, 31, 8] * 4]  # 3, 16 and 20 tokens: two buckets


@pytest.fixture(scope="module", params=["qwen2_moe", pytest.param("mixtral", marks=pytest.mark.slow)])
def engine(request):
    return ResidentEngine(*jaxmoe_from_hf(tiny_hf_model(request.param)))


def test_batch_equals_each_prompt_alone(engine):
    batched = engine.generate(PROMPTS, 24).token_ids
    alone = [engine.generate([p], 24).token_ids[0] for p in PROMPTS]
    assert batched == alone
    assert all(len(t) == 24 for t in batched)


def test_no_recompile_within_a_bucket(engine):
    engine.generate([[1, 2, 3, 4, 5]], 4)
    programs = len(engine.programs)
    engine.generate([[9, 8, 7, 6, 5, 4, 3, 2, 1]], 4)  # same prompt and cache buckets
    assert len(engine.programs) == programs


def test_seeded_sampling_is_reproducible(engine):
    params = SamplingParams(temperature=1.0, top_k=8, top_p=0.95)
    first = engine.generate(PROMPTS, 16, params, seed=7).token_ids
    assert engine.generate(PROMPTS, 16, params, seed=7).token_ids == first
    assert engine.generate(PROMPTS, 16, params, seed=8).token_ids != first
    # Row 0 draws from the same key alone or in a batch.
    assert engine.generate(PROMPTS[:1], 16, params, seed=7).token_ids[0] == first[0]


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, top_k=1), SamplingParams(2.0, top_p=1e-6)])
def test_filters_that_leave_one_token_are_greedy(engine, params):
    greedy = engine.generate(PROMPTS, 12).token_ids
    assert engine.generate(PROMPTS, 12, params, seed=3).token_ids == greedy


def test_eos_stops_each_row(engine):
    greedy = engine.generate(PROMPTS, 12).token_ids
    eos = greedy[1][2]  # row 1 stops at its third token; others stop at their first eos, if any
    out = engine.generate(PROMPTS, 12, eos_ids=[eos]).token_ids
    for row, tokens in enumerate(out):
        cut = greedy[row].index(eos) + 1 if eos in greedy[row] else len(greedy[row])
        assert tokens == greedy[row][:cut]
    assert len(out[1]) <= 3


def test_context_overflow_is_refused(engine):
    with pytest.raises(ContextError, match="max_position_embeddings"):
        engine.generate([[1] * 200], 57)  # 257 > 256
    engine.generate([[1] * 200], 56)  # exactly the context fits


@pytest.mark.parametrize("prompts,match", [([[]], "at least one token"), ([[99]], "outside the vocabulary")])
def test_bad_prompts_are_refused(engine, prompts, match):
    with pytest.raises(ValueError, match=match):
        engine.generate(prompts, 4)
