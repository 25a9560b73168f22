"""gpt-oss end to end: transformers' greedy tokens through convert_hf.py + generate.py for
bf16 and MXFP4 experts, offloaded == resident (minimum budget and half, batch 1 and 3),
MXFP4 experts kept at their size, YaRN frequencies, the sliding-window ring."""

from __future__ import annotations

import functools
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_models import tiny_hf_model, write_mxfp4
from jax_from_hf import jaxmoe_from_hf
from jaxmoe.engine import ResidentEngine
from jaxmoe.engine.offloaded import OffloadedEngine
from jaxmoe.model import init_kv_cache, num_unique_experts
from jaxmoe.offload.cache import gather_experts, minimum_experts
from jaxmoe.offload.host_store import HostExpertStore
from jaxmoe.quant import ExpertFormat, mxfp4
from test_cli import hf_greedy, script

PROMPTS = [[3, 14, 15, 9, 26, 5, 8, 11], [27, 18, 28]]
OFFLOAD_PROMPTS = [[5, 7, 9], list(range(3, 19)), [4, 0, 12, 31, 8] * 4]


def _dequantized_reference(model, path):
    """The transformers model with its experts replaced by transformers' own dequantization of
    the MXFP4 checkpoint at `path` (this venv has no accelerate, so from_pretrained cannot
    load MXFP4 itself; convert_moe_packed_tensors is what it would run on CPU)."""
    from safetensors.numpy import load_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    tensors = load_file(path / "model.safetensors")
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for proj in ("gate_up_proj", "down_proj"):
                name = f"model.layers.{i}.mlp.experts.{proj}"
                w = convert_moe_packed_tensors(torch.from_numpy(tensors[f"{name}_blocks"]),
                                               torch.from_numpy(tensors[f"{name}_scales"]), dtype=torch.float32)
                getattr(layer.mlp.experts, proj).copy_(w)  # fmt: skip
    return model


# bf16 parity is in the default run through test_model_parity (gpt_oss) and the cases below.
@pytest.mark.parametrize("experts", [pytest.param("bf16", marks=pytest.mark.slow), "mxfp4"])
def test_convert_then_generate_matches_transformers(tmp_path, experts):
    model = tiny_hf_model("gpt_oss", "wide")
    src, dst = tmp_path / "hf", tmp_path / "ckpt"
    if experts == "mxfp4":
        write_mxfp4(model, src)
        model = _dequantized_reference(model, src)
    else:
        model.save_pretrained(src)
    proc = script("convert_hf.py", str(src), str(dst))
    assert proc.returncode == 0, proc.stderr
    args = ["--model", str(dst), "--max-new-tokens", "20", "--json"]
    for p in PROMPTS:
        args += ["--prompt-ids", " ".join(map(str, p))]
    want = [hf_greedy(model, p, 20) for p in PROMPTS]
    resident = json.loads(script("generate.py", *args).stdout)
    assert [o["token_ids"] for o in resident["outputs"]] == want
    cfg_bytes = _mxfp4_bytes(hidden=64, width=32, bias_bytes=4)  # the tiny model is fp32
    m = resident["metrics"]
    if experts == "mxfp4":
        assert m["expert_format"] == "mxfp4" and m["expert_bytes"] == cfg_bytes
    # Offloaded at half the experts (24 of 48). MXFP4: the budget also holds the expert
    # program's gather of unpacked (fp32) experts, 7.5x an MXFP4 expert here (46 experts'
    # bytes), so 70 experts' bytes leave about 17 cache slots.
    budget = (24 if experts == "bf16" else 70) * m["expert_bytes"] / 1e9
    proc = script("generate.py", *args, "--expert-budget-gb", str(budget), "--policy", "lru")
    assert proc.returncode == 0, proc.stderr
    offloaded = json.loads(proc.stdout)
    assert [o["token_ids"] for o in offloaded["outputs"]] == want
    assert offloaded["metrics"]["expert_misses"] > 0


def _mxfp4_bytes(hidden: int, width: int, bias_bytes: int) -> int:
    """An expert's MXFP4 size: gate_up and down at half a byte a weight plus a byte per 32,
    and its biases (every part here is a multiple of 16 bytes, so no padding)."""
    weights = 3 * hidden * width
    return weights // 2 + weights // mxfp4.BLOCK + (2 * width + hidden) * bias_bytes


@functools.cache
def _setup(fmt: str = "dense"):
    cfg, model, experts = jaxmoe_from_hf(tiny_hf_model("gpt_oss", "wide"))
    store = HostExpertStore.from_stacks(cfg, experts, fmt=ExpertFormat(fmt))
    return cfg, model, experts, store


@functools.cache
def _resident(batch: int, fmt: str = "dense"):
    cfg, model, experts, store = _setup(fmt)
    if fmt != "dense":  # the resident engine holds the same packed rows
        from jaxmoe.quant import packed_experts

        experts = [None if w is None else packed_experts(jnp.asarray(store.rows(i)), store.format, cfg)
                   for i, w in enumerate(experts)]  # fmt: skip
    return ResidentEngine(cfg, model, experts).generate(OFFLOAD_PROMPTS[:batch], 24).token_ids


# Default run: minimum budget at batch 3 (bf16), half at batch 1 (MXFP4); the rest --slow.
SLOW = pytest.mark.slow
CASES = [pytest.param("min", 3, "dense", id="min-b3"), pytest.param("half", 1, "mxfp4", id="half-b1-mxfp4"),
         pytest.param("min", 1, "dense", id="min-b1", marks=SLOW), pytest.param("half", 3, "dense", id="half-b3", marks=SLOW),
         pytest.param("half", 1, "dense", id="half-b1", marks=SLOW),
         pytest.param("min", 3, "mxfp4", id="min-b3-mxfp4", marks=SLOW)]  # fmt: skip


@pytest.mark.parametrize("budget,batch,fmt", CASES)
def test_offloaded_matches_resident(budget, batch, fmt):
    cfg, model, _, store = _setup(fmt)
    unique = num_unique_experts(cfg.num_experts, batch, cfg.top_k)
    gather = gather_experts(unique, store.format, cfg)
    # "half": a pool of half the experts, beside the copies in flight, filler and gather.
    n = minimum_experts(unique, 0, gather) + (0 if budget == "min" else len(store.keys()) // 2 - unique)
    engine = OffloadedEngine(cfg, model, store, n * store.expert_bytes, "lru", check_budget=True)
    result = engine.generate(OFFLOAD_PROMPTS[:batch], 24)
    assert result.token_ids == _resident(batch, fmt)
    assert result.metrics["expert_misses"] > 0


def test_sliding_layers_keep_the_window_only():
    cfg, *_ = _setup()
    kv = init_kv_cache(cfg, 2, 256)
    assert [layer.k.shape[1] for layer in kv] == [5, 256, 5]  # sliding, full, sliding (window 5)


def test_mxfp4_round_trip_and_transformers_dequantization():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    w = (np.random.default_rng(0).standard_normal((64, 48)) * 0.3).astype(np.float32)
    parts = mxfp4.quantize(w)
    assert parts["q"].shape == (32, 48) and parts["scale"].shape == (2, 48)
    ours = np.asarray(mxfp4.dequantize(jnp.asarray(parts["q"]), jnp.asarray(parts["scale"]), jnp.float32))
    blocks, scales = mxfp4.to_hf(parts["q"], parts["scale"])
    theirs = convert_moe_packed_tensors(torch.from_numpy(blocks[None]), torch.from_numpy(scales[None]),
                                        dtype=torch.float32)[0].numpy()  # fmt: skip
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(ours, mxfp4.dequantize_np(parts["q"], parts["scale"]))
    # Half a step of the coarsest e2m1 spacing (2 at magnitude 4..6) times the block's scale.
    step = np.repeat(np.ldexp(1.0, parts["scale"].astype(int) - 127), 32, axis=0)
    assert np.all(np.abs(ours - w) <= step + 1e-7)


def test_yarn_frequencies_match_transformers():
    from transformers import GptOssConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from jaxmoe.config import from_hf_dict
    from jaxmoe.model.rope import config_frequencies

    for rope in (None, dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, beta_fast=32.0, beta_slow=1.0,
                            truncate=True, original_max_position_embeddings=64)):  # fmt: skip
        hf = GptOssConfig(head_dim=64, hidden_size=128, num_attention_heads=2, num_key_value_heads=2,
                          rope_parameters=rope)
        inv_freq, scaling = ROPE_INIT_FUNCTIONS["yarn"](hf, None)
        ours, our_scaling = config_frequencies(from_hf_dict({**hf.to_dict(), "architectures": ["GptOssForCausalLM"]}))
        # Within an ulp: torch's vectorised fp32 pow is not correctly rounded (model/rope.py).
        np.testing.assert_allclose(ours, inv_freq.numpy(), rtol=2.5e-7, atol=0)
        assert our_scaling == scaling
