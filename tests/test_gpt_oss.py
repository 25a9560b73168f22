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
from jaxmoe.model import init_kv_cache, kv_layout, num_unique_experts
from jaxmoe.model.kv import KEY_AXIS
from jaxmoe.offload.cache import minimum_experts, workspace_experts
from jaxmoe.offload.host_store import HostExpertStore
from jaxmoe.quant import mxfp4, parse_format
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
    # Offloaded at half the experts (24 of 48). The prompts are a batch, whose decode step
    # gathers its experts: MXFP4's gather also holds them unpacked (fp32), 7.5x an MXFP4
    # expert here (46 experts' bytes), so 70 experts' bytes leave 24 cache slots.
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
    store = HostExpertStore.from_stacks(cfg, experts, fmt=parse_format(fmt))
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


# Quantized from bf16 (biases kept in the model dtype), every other policy, each prefill mode, at the minimum budget and batch 3: --slow.
CASES += [pytest.param("min", 3, fmt, id=f"min-b3-{fmt}", marks=SLOW) for fmt in ("int8", "int4-g16")]
CASES += [pytest.param("min", 3, "dense", policy, "auto", id=f"min-b3-{policy}", marks=SLOW)
          for policy in ("ondemand", "lfu", "lfru", "reuse", "predictor")]  # fmt: skip
CASES += [pytest.param("min", 3, "dense", "lru", mode, id=f"min-b3-{mode}", marks=SLOW)
          for mode in ("stream", "routed", "injit")]  # fmt: skip


@pytest.mark.parametrize("budget,batch,fmt,policy,prefill", [
    pytest.param(*(c.values + ("lru", "auto"))[:5], id=c.id, marks=c.marks) for c in CASES])  # fmt: skip
def test_offloaded_matches_resident(budget, batch, fmt, policy, prefill):
    from jaxmoe.offload.prefetch import GateAhead

    cfg, model, _, store = _setup(fmt)
    unique = num_unique_experts(cfg.num_experts, batch, cfg.top_k)
    # "half": a pool of half the experts, beside any workspace (a gather of the experts).
    n = minimum_experts(unique, workspace_experts(batch, store.format, cfg))
    n += 0 if budget == "min" else len(store.keys()) // 2 - unique
    engine = OffloadedEngine(cfg, model, store, n * store.expert_bytes, policy, check_budget=True, prefill=prefill,
                             predictor=GateAhead(model) if policy == "predictor" else None)  # fmt: skip
    result = engine.generate(OFFLOAD_PROMPTS[:batch], 24)
    assert result.token_ids == _resident(batch, fmt)
    assert result.metrics["expert_misses"] > 0
    if prefill != "auto":
        assert result.metrics["prefill_mode"] == prefill


def test_sliding_layers_keep_the_window_only():
    cfg, *_ = _setup()
    kv = init_kv_cache(cfg, 2, 256)
    # sliding, full, sliding (window 5): the two rings stacked, the full layer on its own
    assert [(type(s).__name__, s.k.shape[:3]) for s in kv] == [("RingKV", (2, 2, 5)), ("LayerKV", (1, 2, 256))]
    assert kv_layout(cfg) == ((0, 0), (1, 0), (0, 1))


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
    from jaxmoe.model.rope import inv_freq

    for rope in (None, dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, beta_fast=32.0, beta_slow=1.0,
                            truncate=True, original_max_position_embeddings=64)):  # fmt: skip
        hf = GptOssConfig(head_dim=64, hidden_size=128, num_attention_heads=2, num_key_value_heads=2,
                          rope_parameters=rope)
        theirs, scaling = ROPE_INIT_FUNCTIONS["yarn"](hf, None)
        cfg = from_hf_dict({**hf.to_dict(), "architectures": ["GptOssForCausalLM"]})
        ours = np.asarray(inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_yarn))
        # Within an ulp: neither torch's vectorised fp32 pow nor XLA's is correctly rounded.
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=2.5e-7, atol=0)
        assert cfg.rope_yarn.attention_factor == scaling


@pytest.mark.slow  # 22 s; the ring's resize and insert are what it adds
def test_served_rows_with_ring_caches_equal_offline_generation():
    """The server's continuous batch: two requests joining at different times, the batch cache
    grown between them (its sliding layers' rings keep the window), each row's tokens what
    generate gives the prompt alone."""
    from jaxmoe.serve.batch_kv import BatchKV
    from jaxmoe.serve.rows.resident import ResidentRows
    from jaxmoe.serve.rows.sampling import row_sampling

    cfg, model, experts, _ = _setup()
    engine = ResidentEngine(cfg, model, experts)
    prompts, new = [OFFLOAD_PROMPTS[1], OFFLOAD_PROMPTS[0]], 12
    want = [engine.generate([p], new).token_ids[0] for p in prompts]
    rows, batch = ResidentRows(engine, exact=True), BatchKV(engine.programs, 2)
    got, pos = [[], []], [0, 0]
    for step in range(new + 4):
        if step in (0, 4):  # request r joins at step 0 or 4
            r = step // 4
            prefill = rows.prefill(prompts[r], rows.cache_length(len(prompts[r]), new))
            while not prefill.done:
                prefill.step()
            token, row_kv = prefill.first_token(row_sampling([None], np.zeros(1)))
            batch.fit(r + 1, max(rows.cache_length(len(p), new) for p in prompts[: r + 1]), rows.new_kv)
            assert batch.put(r, row_kv) == r
            got[r], pos[r] = [token], len(prompts[r])
            continue
        live = [r for r in (0, 1) if got[r] and len(got[r]) < new]
        if not live:
            break
        b = batch.rows  # one row until the second request joins
        tokens = np.array([got[r][-1] if got[r] else 0 for r in range(b)], np.int32)
        positions = np.array(pos[:b], np.int32)
        out, batch.kv = rows.decode(batch.kv, tokens, positions, np.ones(b, bool), row_sampling([None] * b, np.zeros(b)))
        for r in live:
            got[r].append(int(out[r]))
            pos[r] += 1
    assert got == want
    rings = {kv_layout(cfg)[i][0] for i in range(cfg.num_layers) if cfg.is_sliding(i)}
    assert {batch.kv[s].k.shape[KEY_AXIS] for s in rings} == {cfg.sliding_window}


def test_export_round_trips_bf16_and_refuses_mxfp4(tmp_path):
    import transformers

    from jaxmoe.checkpoint import CheckpointError, convert_hf
    from jaxmoe.checkpoint.export import export_hf

    model = tiny_hf_model("gpt_oss", "base")
    model.save_pretrained(tmp_path / "hf")
    export_hf(convert_hf(tmp_path / "hf", tmp_path / "ckpt", progress=False), tmp_path / "back")
    back = transformers.GptOssForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[name].numpy(), value.numpy(), err_msg=name)
    write_mxfp4(model, tmp_path / "hf4")
    with pytest.raises(CheckpointError, match="MXFP4.*widen"):
        export_hf(convert_hf(tmp_path / "hf4", tmp_path / "ckpt4", progress=False), tmp_path / "back4")


GPT_OSS_RANDOM = {
    "architectures": ["GptOssForCausalLM"], "vocab_size": 257, "hidden_size": 64, "intermediate_size": 32,
    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": 8, "max_position_embeddings": 2048,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"], "bos_token_id": None,
    "eos_token_id": 256, "dtype": "float32",
}  # fmt: skip


@pytest.mark.slow
def test_predictor_pipeline_on_a_random_gpt_oss(tmp_path, capsys):
    """Traces, training and evaluation through the scripts' main()s, on a random gpt-oss checkpoint."""
    import sys
    from pathlib import Path

    from jaxmoe.checkpoint.random_model import make_random_checkpoint

    scripts = str(Path(__file__).resolve().parents[1] / "scripts")
    sys.path.insert(0, scripts)
    try:
        import collect_traces as collect_script
        import eval_predictor
        import train_predictor
    finally:
        sys.path.remove(scripts)
    ckpt = make_random_checkpoint(tmp_path / "model", GPT_OSS_RANDOM)
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n" * 20)
    assert collect_script.main(["--model", str(ckpt), "--text", str(text), "--out", str(tmp_path / "tr"),
                                "--window", "32", "--json", "--quiet"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["complete"]
    assert train_predictor.main(["--model", str(ckpt), "--traces", str(tmp_path / "tr"), "--out", str(tmp_path / "p"),
                                 "--steps", "40", "--eval-every", "20", "--json", "--quiet"]) == 0  # fmt: skip
    capsys.readouterr()
    assert eval_predictor.main(["--traces", str(tmp_path / "tr"), "--predictor", str(tmp_path / "p"),
                                "--budget-frac", "0.5", "--json", "--quiet"]) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert 0 <= out["recall"]["mlp"] <= 1


def test_bf16_experts_quantize_to_mxfp4_while_converting(tmp_path):
    """--quantize mxfp4 of a bf16 checkpoint: the same bytes as quantizing each expert (the
    quantizer the MXFP4 test checkpoints use); an MXFP4 source refuses another format."""
    from jaxmoe.checkpoint import convert_hf, load

    model = tiny_hf_model("gpt_oss", "base")
    model.save_pretrained(tmp_path / "hf")
    write_mxfp4(model, tmp_path / "hf4")
    a = convert_hf(tmp_path / "hf", tmp_path / "a", progress=False, fmt=parse_format("mxfp4"))
    b = convert_hf(tmp_path / "hf4", tmp_path / "b", progress=False)
    la, lb = load(a), load(b)
    for x, y in zip(la.experts, lb.experts):
        np.testing.assert_array_equal(np.asarray(x.parts[0]), np.asarray(y.parts[0]))
    with pytest.raises(Exception, match="MXFP4"):
        convert_hf(tmp_path / "hf4", tmp_path / "c", progress=False, fmt=parse_format("int8"))


@pytest.mark.slow
def test_chunked_prefill_longer_than_the_window_matches_transformers():
    """A 40-token prompt prefilled in chunks of 16 through rings of 5 slots."""
    hf = tiny_hf_model("gpt_oss", "wide")
    cfg, model, experts = jaxmoe_from_hf(hf)
    prompts = [[5, 7, 9], [4, 0, 12, 31, 8] * 8]
    got = ResidentEngine(cfg, model, experts, prefill_chunk=16).generate(prompts, 16).token_ids
    want = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                              eos_token_id=None, pad_token_id=0)  # fmt: skip
        want.append(out[0, len(p) :].tolist())
    assert got == want


def test_gpt_oss_20b_shape_and_refusals():
    from bench.shapes import SHAPES
    from jaxmoe.checkpoint.convert import count_params
    from jaxmoe.config import ConfigError, from_hf_dict

    hf = SHAPES["gpt-oss-20b"]
    cfg = from_hf_dict(hf)
    assert count_params(cfg) == pytest.approx(20.9e9, rel=0.005)  # published: 20.9 B
    assert cfg.kv_length(0, 8192) == 128 and cfg.kv_length(1, 8192) == 8192
    assert parse_format("mxfp4").nbytes(cfg) == 13_236_480  # blocks + scales + bf16 biases, per expert
    with pytest.raises(ConfigError, match="layer_types"):
        from_hf_dict({**hf, "layer_types": ["chunked_attention"] * 24})
    with pytest.raises(ConfigError, match="quant_method"):
        from_hf_dict({**hf, "quantization_config": {"quant_method": "gptq"}})
    with pytest.raises(ConfigError, match="rope_type"):
        from_hf_dict({**hf, "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}})
