"""Quantized experts (int8, int4): error bounds, the in-program computation against a
dequantize-first per-expert loop, offloaded == resident for quantized models, quantized
checkpoints (conversion, quantize script, refusals, nothing half-written)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe.checkpoint import CheckpointError, convert_hf, load
from jaxmoe.checkpoint.expert_format import FILE as FORMAT_FILE
from jaxmoe.checkpoint.quantize import quantize_checkpoint
from jaxmoe.engine import ResidentEngine
from jaxmoe.engine.offloaded import OffloadedEngine
from jaxmoe.model.experts import PAIR_TOKENS
from jaxmoe.model import ExpertWeights, moe_ffn, moe_ffn_reference, num_unique_experts
from jaxmoe.offload.cache import BudgetError, minimum_experts, workspace_experts
from jaxmoe.runtime.metrics import fmt_bytes
from jaxmoe.offload.host_store import HostExpertStore
from jaxmoe.offload.prefetch import GateAhead
from jaxmoe.quant import DENSE, ExpertFormat, packed_experts, packed_rows
from jaxmoe.quant.nibbles import pack_nibbles, unpack_nibbles
from jaxmoe.quant.quantize import quantize_int4, quantize_int8

REPO = Path(__file__).resolve().parents[1]
INT8, INT4 = ExpertFormat("int8"), ExpertFormat("int4", 16)
PROMPTS = [[5, 7, 9], list(range(3, 19)), [4, 0, 12, 31, 8] * 4]


def test_nibbles_round_trip():
    values = np.random.default_rng(0).integers(0, 16, (64, 24)).astype(np.uint8)
    packed = pack_nibbles(values)
    assert packed.shape == (32, 24) and packed.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(unpack_nibbles(jnp.asarray(packed))), values)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_quantize_dequantize_error_is_within_half_a_step(dtype):
    w = (np.random.default_rng(1).standard_normal((128, 48)) * 0.05).astype(dtype)
    wf = w.astype(np.float32)
    q8 = quantize_int8(w, np.dtype(dtype))
    deq8 = q8["q"].astype(np.float32) * q8["scale"].astype(np.float32)
    # Half a quantization step, plus the rounding of the result to the storage dtype.
    slack = 0 if dtype == np.float32 else 2**-8
    assert np.all(np.abs(deq8 - wf) <= q8["scale"].astype(np.float32) / 2 * (1 + 1e-6) + slack * np.abs(wf))
    q4 = quantize_int4(w, np.dtype(dtype), group_size=16)
    values = np.asarray(unpack_nibbles(jnp.asarray(q4["q"]))).astype(np.float32).reshape(8, 16, 48)
    deq4 = ((values - q4["zero"].astype(np.float32)[:, None]) * q4["scale"].astype(np.float32)[:, None]).reshape(128, 48)
    step = np.repeat(q4["scale"].astype(np.float32), 16, axis=0)
    # The zero point is an integer, so the grid covers [min, max] up to one step at the ends.
    assert np.all(np.abs(deq4 - wf) <= step * (1 + 1e-6))
    assert np.mean(np.abs(deq4 - wf)) < np.mean(step) / 3  # most within half a step


@pytest.mark.parametrize("fmt", [DENSE, INT8, INT4], ids=lambda f: f.name)
def test_unpacking_equals_the_quantizer_and_the_buffer_is_the_format_size(fmt, tiny_cfg):
    cfg = tiny_cfg
    rng = np.random.default_rng(2)
    gate_up = (rng.standard_normal((cfg.hidden_size, 2 * cfg.expert_intermediate_size)) * 0.05).astype(np.float32)
    down = (rng.standard_normal((cfg.expert_intermediate_size, cfg.hidden_size)) * 0.05).astype(np.float32)
    e = cfg.num_experts
    rows = np.stack(list(packed_rows(cfg, ExpertWeights(gate_up[None].repeat(e, 0), down[None].repeat(e, 0)), fmt)))
    assert rows.shape == (e, fmt.nbytes(cfg)) and rows.dtype == np.uint8
    w = fmt.unpack(cfg, jnp.asarray(rows))
    if fmt.kind == "dense":
        np.testing.assert_array_equal(np.asarray(w.w_gate_up[0]), gate_up)
    else:
        assert np.max(np.abs(np.asarray(w.w_gate_up[1]) - gate_up)) < 0.05 * (0.1 if fmt.kind == "int8" else 0.5)
    dense_bytes = 3 * cfg.hidden_size * cfg.expert_intermediate_size * 4
    # fp32 model: int8 is a byte a weight plus a scale a column; int4 half a byte plus a scale
    # and a zero point per group of 16.
    assert fmt.nbytes(cfg) <= {"dense": 1.0, "int8": 0.27, "int4": 0.26}[fmt.kind] * dense_bytes + 64


@pytest.fixture(scope="module")
def tiny_cfg():
    from jaxmoe.config import from_hf_dict

    return from_hf_dict({"architectures": ["OlmoeForCausalLM"], "vocab_size": 32, "hidden_size": 64,
                         "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
                         "num_experts": 8, "num_experts_per_tok": 2, "dtype": "float32"})  # fmt: skip


@pytest.mark.parametrize("fmt", [INT8, INT4], ids=lambda f: f.name)
@pytest.mark.parametrize("tokens", [1, 5])
def test_the_packed_expert_computation_equals_dequantize_first_per_expert_loop(fmt, tokens, tiny_cfg):
    """The fast path (gather rows, unpack, batched contraction) against the naive reference
    run on weights dequantized beforehand."""
    cfg = tiny_cfg
    key = jax.random.key(3)
    stack = ExpertWeights(0.05 * jax.random.normal(key, (8, 64, 64)), 0.05 * jax.random.normal(key, (8, 32, 64)))
    rows = jnp.asarray(np.stack(list(packed_rows(cfg, stack, fmt))))
    dequantized = fmt.unpack(cfg, rows)  # [E, ...] in the model dtype
    x = jax.random.normal(jax.random.key(4), (tokens, 64))
    ids = jax.lax.top_k(jax.random.normal(jax.random.key(5), (tokens, 8)), 2)[1].astype(jnp.int32)
    weights = jax.nn.softmax(jax.random.normal(jax.random.key(6), (tokens, 2)))
    unique = num_unique_experts(8, tokens, 2)
    fast = moe_ffn(x, ids, weights, packed_experts(rows, fmt, cfg), unique)
    ref = moe_ffn_reference(x, ids, weights, dequantized)
    np.testing.assert_allclose(np.asarray(fast), np.asarray(ref), rtol=1e-5, atol=1e-5)


# -- engines --------------------------------------------------------------------------
def quantized_setup(family: str, fmt: ExpertFormat):
    from hf_models import tiny_hf_model
    from jax_from_hf import jaxmoe_from_hf

    cfg, model, experts = jaxmoe_from_hf(tiny_hf_model(family, "wide"))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    resident = [None if w is None else packed_experts(jax.device_put(np.stack(list(packed_rows(cfg, w, fmt))), device),
                                                       fmt, cfg) for w in experts]  # fmt: skip
    store = HostExpertStore.from_stacks(cfg, experts, fmt=fmt)
    return cfg, model, resident, store


_SETUPS: dict = {}


def setup(family, fmt):
    if (family, fmt) not in _SETUPS:
        _SETUPS[family, fmt] = quantized_setup(family, fmt)
    return _SETUPS[family, fmt]


# Each format once by default; the other six pairs with --slow.
FAST_PAIRS = {("int4", "olmoe"), ("int8", "mixtral")}
PAIRS = [pytest.param(fmt, family, marks=() if (fmt.kind, family) in FAST_PAIRS else pytest.mark.slow,
                      id=f"{fmt.name}-{family}")
         for fmt in (INT8, INT4) for family in ("olmoe", "mixtral", "qwen2_moe", "qwen3_moe")]  # fmt: skip


@pytest.mark.parametrize("fmt,family", PAIRS)
def test_offloaded_quantized_equals_resident_quantized(family, fmt):
    cfg, model, resident, store = setup(family, fmt)
    want = ResidentEngine(cfg, model, resident).generate(PROMPTS, 12).token_ids
    unique = num_unique_experts(cfg.num_experts, 3, cfg.top_k)
    workspace = workspace_experts(3, fmt, cfg)
    # the minimum working set, and three experts short of caching every one
    for policy, experts in (("lru", minimum_experts(unique, workspace)), ("lfu", len(store.keys()) + workspace - 3)):
        engine = OffloadedEngine(cfg, model, store, experts * store.expert_bytes, policy, check_budget=True)
        result = engine.generate(PROMPTS, 12)
        assert result.token_ids == want, (family, fmt.name, policy)
        assert result.metrics["expert_format"] == fmt.name
        assert result.metrics["h2d_bytes"] == result.metrics["expert_misses"] * fmt.nbytes(cfg)


@pytest.mark.parametrize("batch", [pytest.param(1, marks=pytest.mark.slow), 3])
def test_quantized_prefetch_and_streamed_prefill_keep_the_tokens(batch):
    cfg, model, resident, store = setup("olmoe", INT4)
    want = ResidentEngine(cfg, model, resident).generate(PROMPTS[:batch], 10).token_ids
    unique = num_unique_experts(cfg.num_experts, batch, cfg.top_k)
    budget = (minimum_experts(unique, workspace_experts(batch, INT4, cfg)) + 2) * store.expert_bytes
    engine = OffloadedEngine(cfg, model, store, budget, "predictor", predictor=GateAhead(model), prefill="stream")
    assert engine.generate(PROMPTS[:batch], 10).token_ids == want


def test_a_quantized_budget_pays_for_the_unpacked_gather():
    """Beyond PAIR_TOKENS rows a decode step gathers its U experts: a budget between the minimum
    that counts the gather as U stored rows and the one that also counts their unpacked weights
    is refused for such a batch, naming the true minimum. Up to PAIR_TOKENS rows nothing is
    gathered (each expert is read in place): the minimum is the U experts alone, and at it the
    cache's own accounting stays within the budget and the tokens are the resident ones."""
    cfg, model, resident, store = setup("olmoe", INT4)
    batch = PAIR_TOKENS + 1
    unique = num_unique_experts(cfg.num_experts, batch, cfg.top_k)
    least = minimum_experts(unique, workspace_experts(batch, INT4, cfg))
    rows_only = minimum_experts(unique, unique)  # the gather as U stored rows: the under-count
    assert rows_only < least - 1
    engine = OffloadedEngine(cfg, model, store, (least - 1) * store.expert_bytes, "lru")
    with pytest.raises(BudgetError, match=f"minimum working set of {fmt_bytes(least * store.expert_bytes)}"):
        engine.check_batch(batch)
    OffloadedEngine(cfg, model, store, least * store.expert_bytes, "lru").check_batch(batch)

    one = num_unique_experts(cfg.num_experts, 1, cfg.top_k)
    assert workspace_experts(1, INT4, cfg) == 0 and minimum_experts(one, 0) == one
    with pytest.raises(BudgetError, match=f"minimum working set of {fmt_bytes(one * store.expert_bytes)}"):
        OffloadedEngine(cfg, model, store, (one - 1) * store.expert_bytes, "lru")
    engine = OffloadedEngine(cfg, model, store, one * store.expert_bytes, "lru", check_budget=True)
    got = engine.generate(PROMPTS[:1], 4)
    assert got.token_ids == ResidentEngine(cfg, model, resident).generate(PROMPTS[:1], 4).token_ids
    assert engine.cache.counters.peak_bytes == one * store.expert_bytes


# -- checkpoints ----------------------------------------------------------------------
def test_quantized_conversion_equals_quantizing_the_dense_conversion(hf_checkpoint, tmp_path):
    _, src = hf_checkpoint("mixtral")
    dense, direct, later = tmp_path / "dense", tmp_path / "direct", tmp_path / "later"
    fmt = ExpertFormat("int4", 8)  # the tiny model's expert width is 24
    convert_hf(src, dense, progress=False)
    convert_hf(src, direct, progress=False, fmt=fmt)
    quantize_checkpoint(dense, later, fmt, progress=False)
    a, b = load(direct), load(later)
    assert a.expert_format == b.expert_format == fmt
    for wa, wb in zip(a.experts, b.experts):
        if wa is not None:
            np.testing.assert_array_equal(np.asarray(wa.parts[0]), np.asarray(wb.parts[0]))
    tokens = ResidentEngine(a.config, a.model, a.experts).generate(PROMPTS, 8).token_ids
    cfg = a.config
    unique = num_unique_experts(cfg.num_experts, 3, cfg.top_k)
    budget = minimum_experts(unique, workspace_experts(unique, fmt, cfg)) * fmt.nbytes(cfg)
    offloaded = OffloadedEngine.from_checkpoint(direct, budget, "lru")
    assert offloaded.generate(PROMPTS, 8).token_ids == tokens


def test_malformed_quantized_checkpoints_are_refused_by_name(hf_checkpoint, tmp_path):
    _, src = hf_checkpoint("olmoe")
    ckpt = tmp_path / "q"
    convert_hf(src, ckpt, progress=False, fmt=ExpertFormat("int8"))
    meta = json.loads((ckpt / FORMAT_FILE).read_text())
    (ckpt / FORMAT_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=FORMAT_FILE):
        load(ckpt)
    (ckpt / FORMAT_FILE).write_text(json.dumps({**meta, "format": "int4", "group_size": 8}))  # the bytes are int8
    with pytest.raises(CheckpointError, match=r"experts\.0\.packed"):
        load(ckpt)
    (ckpt / FORMAT_FILE).unlink()  # claims dense: the packed tensors are unexpected, the stacks missing
    with pytest.raises(CheckpointError, match="w_gate_up"):
        load(ckpt)


def test_a_failed_quantization_leaves_nothing_and_existing_output_is_refused(hf_checkpoint, tmp_path, monkeypatch):
    import jaxmoe.checkpoint.quantize as q

    _, src = hf_checkpoint("olmoe")
    dense, dst = tmp_path / "dense", tmp_path / "q"
    convert_hf(src, dense, progress=False)
    calls = []

    def fail_second(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return real(*a, **kw)

    real = q.packed_layer
    monkeypatch.setattr(q, "packed_layer", fail_second)
    with pytest.raises(RuntimeError, match="interrupted"):
        quantize_checkpoint(dense, dst, INT8, progress=False)
    assert not dst.exists() and [p.name for p in tmp_path.iterdir()] == ["dense"]
    monkeypatch.setattr(q, "packed_layer", real)
    quantize_checkpoint(dense, dst, INT8, progress=False)
    with pytest.raises(CheckpointError, match="not empty"):
        quantize_checkpoint(dense, dst, INT8, progress=False)
    with pytest.raises(CheckpointError, match="already quantized"):
        quantize_checkpoint(dst, tmp_path / "again", INT4, progress=False)


@pytest.mark.e2e
def test_scripts_quantize_generate_and_refuse_export(tmp_path):
    q4 = tmp_path / "q4"
    run = [sys.executable, str(REPO / "scripts" / "quantize.py"), str(REPO / "checkpoints" / "jaxmoe-tiny"), str(q4),
           "--format", "int4", "--json"]  # fmt: skip
    proc = subprocess.run(run, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["format"] == "int4-g64" and report["expert_bytes"] < 0.3 * report["dense_expert_bytes"]
    gen = [sys.executable, str(REPO / "scripts" / "generate.py"), "--model", str(q4), "--prompt-ids", "5 6 7",
           "--max-new-tokens", "6", "--json"]  # fmt: skip
    resident = json.loads(subprocess.run(gen, capture_output=True, text=True, cwd=REPO).stdout)
    offloaded = json.loads(subprocess.run(gen + ["--expert-budget-frac", "0.4", "--policy", "lru"],
                                          capture_output=True, text=True, cwd=REPO).stdout)  # fmt: skip
    assert resident["outputs"][0]["token_ids"] == offloaded["outputs"][0]["token_ids"]
    assert offloaded["metrics"]["expert_format"] == "int4-g64"
    assert offloaded["metrics"]["expert_bytes"] == report["expert_bytes"]
    export = [sys.executable, str(REPO / "scripts" / "export_hf.py"), str(q4), str(tmp_path / "hf")]
    proc = subprocess.run(export, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "quantized" in proc.stderr and not (tmp_path / "hf").exists()
