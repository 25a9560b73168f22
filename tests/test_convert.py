"""HF checkpoint directory -> convert_hf -> load: logits match transformers; bad inputs fail cleanly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from hf_models import FAMILIES, VARIANTS
from jaxmoe.checkpoint import CheckpointError, SafetensorsCheckpoint, convert_hf, load, restore_params
from jaxmoe.config import ConfigError
from jaxmoe.model import init_kv_cache

REPO = Path(__file__).resolve().parents[1]
TOKENS = np.random.RandomState(0).randint(0, 32, (2, 7))
def jaxmoe_logits(loaded, tokens: np.ndarray) -> np.ndarray:
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    h, _, _ = loaded.model(jnp.asarray(tokens), positions, init_kv_cache(loaded.config, b, 16), loaded.experts)
    return np.asarray(loaded.model.logits(h))


CASES = [(f, v, "single") for f in FAMILIES for v in VARIANTS[f]]
CASES += [(f, "base", layout) for layout in ("sharded", "fused") for f in FAMILIES]


@pytest.mark.parametrize("family,variant,layout", CASES)
def test_convert_matches_transformers(hf_checkpoint, tmp_path, family, variant, layout):
    model, src = hf_checkpoint(family, variant, layout)
    dst = convert_hf(src, tmp_path / "ckpt", progress=False)
    loaded = load(dst)
    assert loaded.config.family == family and loaded.config.dtype == "float32"
    assert [w is not None for w in loaded.experts] == list(loaded.config.moe_layers)
    assert loaded.generation_config["eos_token_id"] == 2
    with torch.no_grad():
        want = model(torch.tensor(TOKENS)).logits.numpy()
    np.testing.assert_allclose(jaxmoe_logits(loaded, TOKENS), want, atol=1e-4, rtol=0)


def test_side_files_and_expert_placement(hf_checkpoint, tmp_path):
    _, src = hf_checkpoint("olmoe")
    shutil.copytree(src, tmp_path / "hf")
    (tmp_path / "hf" / "generation_config.json").unlink()
    (tmp_path / "hf" / "tokenizer.json").write_text('{"model": {}}')
    dst = convert_hf(tmp_path / "hf", tmp_path / "ckpt", progress=False)
    assert dst.stat().st_mode & 0o777 == 0o755
    assert json.loads((dst / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    loaded = load(dst)
    assert loaded.generation_config == {"bos_token_id": 1, "eos_token_id": 2}
    assert loaded.tokenizer_path == dst / "tokenizer.json" and loaded.tokenizer_path.read_text() == '{"model": {}}'

    pinned = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
    dense, experts = restore_params(dst, sharding=pinned)
    assert all(a.sharding.memory_kind == "pinned_host" for a in jax.tree.leaves(experts))
    assert jax.tree.leaves(dense)[0].sharding.memory_kind == "device"
    for got, want in zip(jax.tree.leaves(experts), jax.tree.leaves(loaded.experts)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# --- failures: a clear error naming the file or tensor, and nothing left behind ---


def hf_copy(hf_checkpoint, tmp_path, layout="single") -> Path:
    _, src = hf_checkpoint("mixtral", "base", layout)
    return Path(shutil.copytree(src, tmp_path / "hf"))


def rewrite_weights(src: Path, edit) -> None:
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, src / "model.safetensors")


def edit_config(src: Path, **changes) -> None:
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **changes}))


def assert_convert_fails(src: Path, tmp_path: Path, error: type, named: Path, *fragments: str) -> None:
    """The error names `named` and, outside the paths (they hold the test's name), each fragment."""
    dst = tmp_path / "out" / "ckpt"
    with pytest.raises(error) as info:
        convert_hf(src, dst, progress=False)
    assert str(named) in str(info.value)
    for fragment in fragments:
        assert fragment in str(info.value).replace(str(tmp_path), "<tmp>")
    assert not dst.exists()
    assert not (dst.parent.exists() and list(dst.parent.iterdir())), "temporary directory left behind"


def test_missing_tensor(hf_checkpoint, tmp_path):
    src = hf_copy(hf_checkpoint, tmp_path)
    name = "model.layers.1.post_attention_layernorm.weight"
    rewrite_weights(src, lambda t: t.pop(name))
    assert_convert_fails(src, tmp_path, CheckpointError, src / "model.safetensors", "missing", name)


def test_unexpected_tensor(hf_checkpoint, tmp_path):
    src = hf_copy(hf_checkpoint, tmp_path)
    name = "model.layers.0.self_attn.rope_scale.weight"
    rewrite_weights(src, lambda t: t.update({name: np.ones(4, np.float32)}))
    assert_convert_fails(src, tmp_path, CheckpointError, src / "model.safetensors", "unexpected", name)


def test_misshaped_tensor(hf_checkpoint, tmp_path):
    src = hf_copy(hf_checkpoint, tmp_path)
    name = "model.layers.0.block_sparse_moe.experts.3.w2.weight"
    rewrite_weights(src, lambda t: t.update({name: np.ascontiguousarray(t[name].T)}))
    assert_convert_fails(src, tmp_path, CheckpointError, src / "model.safetensors", name, "(24, 64)")


def test_quantization_config(hf_checkpoint, tmp_path):
    src = hf_copy(hf_checkpoint, tmp_path)
    edit_config(src, quantization_config={"quant_method": "gptq", "bits": 4})
    assert_convert_fails(src, tmp_path, ConfigError, src / "config.json", "quantization_config", "gptq")


def test_unknown_architecture(hf_checkpoint, tmp_path):
    src = hf_copy(hf_checkpoint, tmp_path)
    edit_config(src, architectures=["LlamaForCausalLM"])
    assert_convert_fails(src, tmp_path, ConfigError, src / "config.json", "LlamaForCausalLM")


@pytest.mark.parametrize("keep", [5, -100], ids=["header", "data"])
def test_truncated_safetensors(hf_checkpoint, tmp_path, keep):
    src = hf_copy(hf_checkpoint, tmp_path)
    file = src / "model.safetensors"
    file.write_bytes(file.read_bytes()[:keep])
    assert_convert_fails(src, tmp_path, CheckpointError, file, "truncated safetensors file")


def test_header_safetensors_rejects(hf_checkpoint, tmp_path):
    """A header whose shape disagrees with its byte range is refused before anything is read, naming the file."""
    src = hf_copy(hf_checkpoint, tmp_path)
    file = src / "model.safetensors"
    raw = file.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    header["model.norm.weight"]["shape"] = [65]
    new = json.dumps(header).encode()
    file.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + length :])
    assert_convert_fails(src, tmp_path, CheckpointError, file, "cannot read tensor")


def test_existing_destination(hf_checkpoint, tmp_path):
    _, src = hf_checkpoint("mixtral")
    dst = tmp_path / "ckpt"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists"):
        convert_hf(src, dst, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"] and [p.name for p in dst.iterdir()] == ["keep.txt"]


def test_no_weights_file(hf_checkpoint, tmp_path):
    src = hf_copy(hf_checkpoint, tmp_path)
    (src / "model.safetensors").unlink()
    assert_convert_fails(src, tmp_path, CheckpointError, src, "no model.safetensors")


def test_index_names_missing_shard(hf_checkpoint, tmp_path):
    src = hf_copy(hf_checkpoint, tmp_path, "sharded")
    index = src / "model.safetensors.index.json"
    shard = sorted(set(json.loads(index.read_text())["weight_map"].values()))[-1]
    (src / shard).unlink()
    assert_convert_fails(src, tmp_path, CheckpointError, index, f"names shard {shard!r}")


def test_tensor_in_two_shards(hf_checkpoint, tmp_path):
    src = hf_copy(hf_checkpoint, tmp_path, "sharded")
    weight_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.norm.weight"
    other = next(s for s in sorted(set(weight_map.values())) if s != weight_map[name])
    tensors = load_file(src / other)
    tensors[name] = load_file(src / weight_map[name])[name]
    save_file(tensors, src / other)
    assert_convert_fails(src, tmp_path, CheckpointError, src / other, name, "also in", weight_map[name])


def test_reader_is_lazy_and_ordered(hf_checkpoint):
    model, src = hf_checkpoint("qwen3_moe", "base", "sharded")
    state = model.state_dict()
    with SafetensorsCheckpoint(src) as weights:
        assert weights.source.name == "model.safetensors.index.json"
        assert len({weights.file_of(n) for n in weights.names}) > 1
        name = "model.layers.1.self_attn.q_norm.weight"
        assert weights.shape_of(name) == (24,)
        np.testing.assert_array_equal(weights.read(name), state[name].numpy())


# --- the CLI ---


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # exercise the repo-root fallback
    cmd = [sys.executable, str(REPO / "scripts" / "convert_hf.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


@pytest.mark.e2e
def test_cli_json(hf_checkpoint, tmp_path):
    model, src = hf_checkpoint("mixtral", "mha_tied")
    start = time.perf_counter()
    proc = run_cli(str(src), str(tmp_path / "ckpt"), "--json")
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["dst"] == str(tmp_path / "ckpt") and result["family"] == "mixtral"
    assert result["num_params"] == sum(p.numel() for p in model.parameters())
    assert 0 < result["seconds"] < wall  # the conversion's own time, inside the process's


@pytest.mark.e2e
def test_cli_error(hf_checkpoint, tmp_path):
    src = hf_copy(hf_checkpoint, tmp_path)
    edit_config(src, quantization_config={"quant_method": "awq"})
    proc = run_cli(str(src), str(tmp_path / "ckpt"), "--json")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith("error: ") and str(src / "config.json") in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "ckpt").exists()
