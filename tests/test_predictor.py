"""The predictor's offline half: trace files, the MLP, its checkpoint and the scripts."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmoe.checkpoint import load
from jaxmoe.checkpoint.random_model import TINY_OLMOE, make_random_checkpoint
from jaxmoe.config import from_hf_dict
from jaxmoe.model import init_kv_cache
from jaxmoe.predictor import PredictorMismatch, TraceError, TraceSet, load_predictor, model_hash, router_hash, save_predictor
from jaxmoe.predictor.collect import collect_traces, text_tokens
from jaxmoe.predictor.fingerprint import layer_pairs, model_summary
from jaxmoe.predictor.metrics import recall_at
from jaxmoe.predictor.mlp import ExpertPredictor
from jaxmoe.predictor.evaluate import evaluate_on_traces
from jaxmoe.predictor.store import build_module
from jaxmoe.predictor.train import PairData, TrainConfig, fit
from jaxmoe.tokenizer import load_tokenizer

SMALL = {**TINY_OLMOE, "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 3, "num_experts": 8,
         "num_experts_per_tok": 2}  # fmt: skip
TEXT = "The quick brown fox jumps over the lazy dog.\nPack my box with five dozen liquor jugs!\n" * 12
ARGS = dict(window=32, batch=2, chunk_windows=2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("pred")
    text = root / "train.txt"
    text.write_text(TEXT)
    return make_random_checkpoint(root / "model", SMALL), text


@pytest.fixture(scope="module")
def traces(checkpoint):
    """200 tokens of text -> 6 windows of 32 in 3 chunks."""
    ckpt, text = checkpoint
    out = ckpt.parent / "traces"
    return collect_traces(ckpt, text, out, max_tokens=200, **ARGS), out


def test_model_hash_covers_config_fields():
    cfg = from_hf_dict(SMALL)
    assert model_hash(cfg) == model_hash(from_hf_dict(dict(SMALL)))
    assert model_hash(cfg) != model_hash(cfg.replace(rope_theta=500.0))
    assert model_hash(cfg) != model_hash(cfg.replace(dtype="bfloat16"))


def test_traces_round_trip_against_the_model(checkpoint, traces):
    ckpt, text = checkpoint
    manifest, path = traces
    ts = TraceSet(path)
    assert manifest["complete"] and ts.token_count == 192 == manifest["token_count"]  # 6 windows of 32
    assert [c["tokens"] for c in ts.chunks] == [64, 64, 64]
    assert ts.model == model_summary(from_hf_dict(SMALL)) and ts.manifest["probs"] == "full"
    a = ts.load()
    assert a["ids"].dtype == np.uint8 and a["inputs"].dtype == np.float16 and a["probs"].dtype == np.float16
    # Recompute window 3 directly: the stored routing is the model's.
    loaded = load(ckpt)
    cfg = loaded.config
    assert ts.manifest["router_hash"] == router_hash(loaded.model, cfg)
    tokens = text_tokens(load_tokenizer(loaded.tokenizer_path), text, 200)[96:128][None]
    assert (a["tokens"][96:128] == tokens[0]).all() and (a["positions"][96:128] == np.arange(32)).all()
    pos = jnp.arange(32, dtype=jnp.int32)[None]
    graphdef, state = nnx.split(loaded.model)
    forward = jax.jit(lambda state, experts, tok: nnx.merge(graphdef, state)(tok, pos, init_kv_cache(cfg, 1, 32), experts))
    _, _, routings = forward(state, loaded.experts, jnp.asarray(tokens))
    for j, layer in enumerate(cfg.moe_layer_ids):
        r = routings[layer]
        np.testing.assert_array_equal(a["ids"][96:128, j], np.asarray(r.ids))
        np.testing.assert_allclose(a["inputs"][96:128, j], np.asarray(r.inputs), rtol=2e-3, atol=2e-3)
        probs = jax.nn.softmax(r.logits.astype(jnp.float32), -1)
        np.testing.assert_allclose(a["probs"][96:128, j], np.asarray(probs), atol=1e-3)
    # A sub-range crossing chunk boundaries equals the slice of the whole.
    part = ts.load(50, 150)
    for k in a:
        np.testing.assert_array_equal(part[k], a[k][50:150])


def test_projection_is_stored_and_applied(checkpoint, traces, tmp_path):
    ckpt, text = checkpoint
    collect_traces(ckpt, text, tmp_path / "proj", max_tokens=64, proj_dim=16, **ARGS)
    full, proj = TraceSet(traces[1]), TraceSet(tmp_path / "proj")
    p = proj.projection()
    assert p.shape == (64, 16) and proj.manifest["input_dim"] == 16 and proj.token_count == 64
    expect = full.load(0, 64)["inputs"].astype(np.float32) @ p
    np.testing.assert_allclose(proj.load()["inputs"].astype(np.float32), expect, rtol=1e-2, atol=1e-2)


def test_resume_skips_done_chunks_and_redoes_unlisted_ones(checkpoint, traces, tmp_path):
    ckpt, text = checkpoint
    out = tmp_path / "tr"
    shutil.copytree(traces[1], out)
    reference = TraceSet(out).load()
    stamps = {f.name: f.stat().st_mtime_ns for f in out.glob("chunk-*.npz")}
    # A crash after chunk 1 was renamed but before the manifest listed it, with chunk 2 half-written.
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["chunks"] = manifest["chunks"][:1]
    manifest["complete"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "chunk-00002.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(TraceError, match="complete=false"):
        TraceSet(out)
    calls = []
    collect_traces(ckpt, text, out, max_tokens=200, **ARGS, progress=calls.append)
    assert sum(calls) == 192
    after = {f.name: f.stat().st_mtime_ns for f in out.glob("chunk-*.npz")}
    assert after["chunk-00000.npz"] == stamps["chunk-00000.npz"]  # skipped, not rewritten
    assert after["chunk-00002.npz"] != stamps["chunk-00002.npz"]
    again = TraceSet(out).load()
    for k in reference:
        np.testing.assert_array_equal(again[k], reference[k])
    with pytest.raises(TraceError, match="window=32"):
        collect_traces(ckpt, text, out, max_tokens=200, window=16, batch=2, chunk_windows=2)


def test_a_crash_mid_chunk_never_reaches_the_manifest(checkpoint, tmp_path, monkeypatch):
    ckpt, text = checkpoint
    out = tmp_path / "tr"
    real_savez, writes = np.savez, []

    def crashing_savez(f, **arrays):
        writes.append(1)
        if len(writes) == 2:  # the second chunk: write part of it, then die
            f.write(b"PK\x03\x04 partial")
            raise KeyboardInterrupt("simulated crash")
        real_savez(f, **arrays)

    monkeypatch.setattr(np, "savez", crashing_savez)
    with pytest.raises(KeyboardInterrupt):
        collect_traces(ckpt, text, out, max_tokens=200, **ARGS)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [c["file"] for c in manifest["chunks"]] == ["chunk-00000.npz"] and not manifest["complete"]
    assert sorted(p.name for p in out.iterdir()) == ["chunk-00000.npz", "manifest.json"]  # no temp file left
    partial = TraceSet(out, allow_incomplete=True)
    assert partial.token_count == 64 and partial.load()["ids"].shape == (64, 3, 2)


def _save_tiny_predictor(cfg, path, arch="heads", projection=None):
    meta = {"model": model_summary(cfg), "pairs": [list(p) for p in layer_pairs(cfg)], "arch": arch, "width": 8,
            "projection": None if projection is None else {"dim": projection.shape[1], "seed": 0}}  # fmt: skip
    module = build_module(meta, projection, seed=3)
    save_predictor(path, module, meta)
    return module


@pytest.mark.parametrize("arch", ["embed", "heads"])
def test_predictor_round_trips_and_runs_as_one_program_for_every_layer(tmp_path, arch):
    cfg = from_hf_dict(SMALL)
    proj = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    module = _save_tiny_predictor(cfg, tmp_path / "p", arch, proj)
    loaded = load_predictor(tmp_path / "p", cfg)
    h = jax.random.normal(jax.random.key(0), (5, 64))
    graphdef, state = nnx.split(loaded.module)
    step = jax.jit(lambda state, h, layer: nnx.merge(graphdef, state)(h, layer))
    rows = module.rows(jnp.stack([h, h]))
    for layer in range(cfg.num_layers):
        out = step(state, h, jnp.int32(layer))
        assert out.shape == (5, 8)
        if layer < 2:  # layers 0 and 1 predict MoE layers 1 and 2
            np.testing.assert_allclose(out, rows[layer], rtol=1e-5, atol=1e-6)
        else:  # the last MoE layer has no next one
            assert not np.asarray(out).any()
    assert step._cache_size() == 1


def test_a_damaged_or_unchecked_predictor_is_refused_or_flagged(tmp_path):
    """A predictor carries the CRC32 of its parameter files: a damaged one is refused, naming the
    file, before anything is read; one saved before checksums loads with a warning."""
    from jaxmoe.checkpoint import CheckpointError
    from jaxmoe.checkpoint.legacy_params import UncheckedWeightsWarning

    cfg = from_hf_dict(SMALL)
    _save_tiny_predictor(cfg, tmp_path / "p")
    meta = json.loads((tmp_path / "p" / "predictor.json").read_text())
    assert meta["checksums"] and all(isinstance(v, int) for v in meta["checksums"].values())
    shutil.copytree(tmp_path / "p", tmp_path / "old")
    biggest = max((tmp_path / "p" / "params").rglob("*"), key=lambda f: f.stat().st_size if f.is_file() else -1)
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    biggest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{biggest.name}: damaged"):
        load_predictor(tmp_path / "p", cfg)
    old = {k: v for k, v in meta.items() if k != "checksums"}
    (tmp_path / "old" / "predictor.json").write_text(json.dumps(old))
    with pytest.warns(UncheckedWeightsWarning, match="without checksums"):
        load_predictor(tmp_path / "old", cfg)


def test_a_predictor_for_another_model_is_refused(tmp_path):
    cfg = from_hf_dict(SMALL)
    _save_tiny_predictor(cfg, tmp_path / "p")
    load_predictor(tmp_path / "p", cfg)
    others = {
        "num_experts": from_hf_dict({**SMALL, "num_experts": 16}),
        "hidden_size": from_hf_dict({**SMALL, "hidden_size": 128}),
        "moe_layers": from_hf_dict({**SMALL, "num_hidden_layers": 4}),
        "top_k": from_hf_dict({**SMALL, "num_experts_per_tok": 3}),
        "model_hash": cfg.replace(rope_theta=1234.0),
    }
    for field, other in others.items():
        with pytest.raises(PredictorMismatch, match=field):
            load_predictor(tmp_path / "p", other)


def test_a_predictor_for_other_weights_is_refused_when_the_model_is_given(checkpoint, tmp_path):
    loaded = load(checkpoint[0])
    cfg = loaded.config
    meta = {"model": model_summary(cfg), "pairs": [list(p) for p in layer_pairs(cfg)], "arch": "embed", "width": 8,
            "projection": None, "router_hash": router_hash(loaded.model, cfg)}  # fmt: skip
    save_predictor(tmp_path / "p", build_module(meta), meta)
    load_predictor(tmp_path / "p", cfg, loaded.model)
    gate = loaded.model.layers[2].mlp.gate.kernel
    gate.value = gate.value * 0.5
    load_predictor(tmp_path / "p", cfg)  # the config alone cannot tell
    with pytest.raises(PredictorMismatch, match="router_hash"):
        load_predictor(tmp_path / "p", cfg, loaded.model)


def _synthetic(n, rows, dim, experts, k, seed, shared=False):
    """Next-layer experts = top-k of a fixed random linear map of the input (per row unless shared)."""
    rng = np.random.default_rng(seed)
    maps = np.random.default_rng(99).standard_normal((1 if shared else rows, dim, experts))
    x = rng.standard_normal((n, rows, dim)).astype(np.float32)
    logits = np.einsum("nrd,rde->nre", x, np.broadcast_to(maps, (rows, dim, experts)))
    ids = np.argsort(-logits, -1)[..., :k]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return PairData(x.astype(np.float16), (probs / probs.sum(-1, keepdims=True)).astype(np.float16), ids.astype(np.int32))


@pytest.mark.parametrize("arch,shared", [("heads", False), ("embed", True)])
def test_mlp_learns_a_synthetic_routing_rule(arch, shared):
    rows, dim, experts, k = 3, 16, 8, 2
    train, val = _synthetic(4000, rows, dim, experts, k, 0, shared), _synthetic(1000, rows, dim, experts, k, 1, shared)
    module = ExpertPredictor(num_layers=4, pairs=[(0, 1), (1, 2), (2, 3)], hidden_size=dim, num_experts=experts,
                             width=64, arch=arch, rngs=nnx.Rngs(0))  # fmt: skip
    before = recall_at(np.swapaxes(np.asarray(module.rows(jnp.swapaxes(val.x, 0, 1))), 0, 1), val.ids)
    tc = TrainConfig(arch=arch, width=64, batch_tokens=128, steps=400, warmup_steps=40, lr=5e-3, eval_every=100)
    module, result = fit(module, train, val, tc)
    after = recall_at(np.swapaxes(np.asarray(module.rows(jnp.swapaxes(val.x, 0, 1))), 0, 1), val.ids)
    assert before < 0.5 and after > 0.9, (before, after)
    assert abs(result["val_recall"] - after) < 1e-6  # the kept module is the best-validation one


def test_scripts_train_and_evaluate_on_traces(checkpoint, tmp_path, capsys):
    """The three scripts in sequence, each through main(), with the contract JSON checked."""
    scripts = str(Path(__file__).resolve().parents[1] / "scripts")
    sys.path.insert(0, scripts)
    try:
        import build_expert_maps
        import collect_traces as collect_script
        import eval_predictor
        import train_predictor
    finally:
        sys.path.remove(scripts)

    ckpt, text = checkpoint
    assert collect_script.main(["--model", str(ckpt), "--text", str(text), "--out", str(tmp_path / "tr"),
                                "--window", "32", "--json", "--quiet"]) == 0  # fmt: skip
    collected = json.loads(capsys.readouterr().out)
    assert collected["complete"] and collected["tokens"] > 0
    assert train_predictor.main(["--model", str(ckpt), "--traces", str(tmp_path / "tr"), "--out", str(tmp_path / "p"),
                                 "--steps", "60", "--eval-every", "20", "--json", "--quiet"]) == 0  # fmt: skip
    trained = json.loads(capsys.readouterr().out)
    assert set(trained["candidates"]) == {"embed", "heads"} and trained["arch"] in trained["candidates"]
    assert trained["bytes"] < 2_000_000
    assert build_expert_maps.main(["--traces", str(tmp_path / "tr"), "--out", str(tmp_path / "maps.npz"),
                                   "--model", str(ckpt), "--json", "--quiet"]) == 0  # fmt: skip
    built = json.loads(capsys.readouterr().out)
    assert built["token_maps"] > 0 and built["request_maps"] > 0 and built["split"] == "train"
    argv = ["--traces", str(tmp_path / "tr"), "--predictor", str(tmp_path / "p"), "--budget-frac", "0.5", "--json",
            "--quiet"]  # fmt: skip
    assert eval_predictor.main(argv + ["--model", str(ckpt), "--maps", str(tmp_path / "maps.npz")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["recall"]) == {"mlp", "gate_ahead", "prev_token", "frequency", "maps"}  # the contract, plus maps
    assert all(0 <= v <= 1 for v in out["recall"].values())
    assert {"ondemand", "lru", "lfu", "predictor", "belady", "lfru", "reuse", "maps"} <= set(out["policies"])
    for r in out["policies"].values():
        assert r["total_loads"] >= r["demand_misses"] >= 0
        assert r["total_loads"] >= out["policies"]["belady"]["total_loads"]
        assert r["time"]["label"] == "model" and r["time"]["ms_per_token"] > 0
    assert out["time_model"]["label"] == "model" and set(out["policy_variants"]) == {"mlp_prob_freq", "mlp_need_distance"}
    assert out["split"] == "test"
    assert eval_predictor.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["recall"]["gate_ahead"] is None
    # Same config, other router weights: the traces are refused for that model.
    other = load(ckpt)
    gate = other.model.layers[1].mlp.gate.kernel
    gate.value = gate.value + 1.0
    with pytest.raises(TraceError, match="router_hash"):
        evaluate_on_traces(tmp_path / "tr", tmp_path / "p", 0.5, other)


def test_the_shipped_predictor_restores_onto_this_device_not_its_saved_topology(monkeypatch):
    """Every restore target names where the arrays go: without it Orbax restores onto the
    topology the predictor was saved on (a CPU), which a GPU refuses ("Topology mismatch")."""
    import orbax.checkpoint as ocp

    shipped = Path(__file__).resolve().parents[1] / "checkpoints" / "jaxmoe-tiny" / "predictor"
    targets = []
    restore = ocp.StandardCheckpointer.restore

    def spy(self, path, target=None, *a, **kw):
        targets.append(target)
        return restore(self, path, target, *a, **kw)

    monkeypatch.setattr(ocp.StandardCheckpointer, "restore", spy)
    load_predictor(shipped, None)
    leaves = jax.tree.leaves(targets)
    assert leaves and all(getattr(x, "sharding", None) is not None for x in leaves)


def test_the_shipped_predictor_was_made_for_the_shipped_model():
    """A field added to MoEConfig (a new family's option) must not change an existing model's
    hash, or every predictor, trace set and expert map made for it is refused."""
    import json

    from jaxmoe.config import load_hf_config
    from jaxmoe.predictor.fingerprint import model_hash

    shipped = Path(__file__).resolve().parents[1] / "checkpoints" / "jaxmoe-tiny"
    meta = json.loads((shipped / "predictor" / "predictor.json").read_text())
    assert meta["model"]["model_hash"] == model_hash(load_hf_config(shipped))
