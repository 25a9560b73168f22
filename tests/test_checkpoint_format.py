"""The checkpoint's weight file (params.safetensors) round-trips and is checked against the
config; checkpoints in the earlier Orbax layout, like the shipped one, still load."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from safetensors import safe_open

from jaxmoe.checkpoint import CheckpointError, load, restore_params, save_params
from jaxmoe.checkpoint.params_file import FILE, str_keys
from jaxmoe.checkpoint.random_model import TINY_OLMOE
from jaxmoe.checkpoint.safetensors_io import SafetensorsFile
from jaxmoe.checkpoint.safetensors_write import SafetensorsWriter
from jaxmoe.config import from_hf_dict, load_hf_config
from jaxmoe.model import ExpertWeights, MoEDecoder, dense_dict, init_experts
from jaxmoe.offload.host_store import HostExpertStore

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "jaxmoe-tiny"


def assert_same(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(dense, experts, directory) of a random TINY_OLMOE written with save_params."""
    cfg = from_hf_dict(TINY_OLMOE)
    dense, experts = dense_dict(MoEDecoder(cfg, nnx.Rngs(0))), init_experts(cfg, jax.random.key(1))
    path = tmp_path_factory.mktemp("tiny")
    save_params(path, dense, experts)
    (path / "config.json").write_text(json.dumps(TINY_OLMOE))
    return dense, experts, path


def test_params_file_round_trips(tiny):
    dense, experts, path = tiny
    cfg = load_hf_config(path)
    assert_same(restore_params(path, cfg), (dense, experts))
    names = set(SafetensorsFile(path / FILE).entries)
    assert {"dense.layers.0.self_attn.q_proj.kernel", "experts.3.w_gate_up", "experts.3.w_down"} <= names
    with safe_open(str(path / FILE), "np") as f:  # the reference reader agrees with ours
        np.testing.assert_array_equal(f.get_tensor("experts.3.w_down"), np.asarray(experts[3].w_down))


def test_pinned_store_matches_the_stacks(tiny):
    _, experts, path = tiny
    store = HostExpertStore.from_checkpoint(path, load_hf_config(path))
    assert store.layer(2).sharding.memory_kind == "pinned_host"
    np.testing.assert_array_equal(store.weights(2, 5).w_gate_up, np.asarray(experts[2].w_gate_up[5]))
    np.testing.assert_array_equal(store.weights(3, 15).w_down, np.asarray(experts[3].w_down[15]))


def test_a_config_that_does_not_match_is_named(tiny, tmp_path):
    _, _, path = tiny
    (tmp_path / FILE).symlink_to(path / FILE)
    (tmp_path / "config.json").write_text(json.dumps({**TINY_OLMOE, "num_experts": 8}))
    wrong = r"'dense\.layers\.0\.mlp\.gate\.kernel' has shape \(128, 16\), .*config\.json implies \(128, 8\)"
    with pytest.raises(CheckpointError, match=wrong):
        load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**TINY_OLMOE, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match=r"does not match .*config\.json \(unexpected 'dense\.layers\.3\."):
        load(tmp_path)


def test_the_writer_refuses_a_wrong_or_missing_tensor(tmp_path):
    specs = {"a": ((2, 3), np.float32), "b": ((4,), np.int32)}
    with pytest.raises(CheckpointError, match=r"'a' is float32\[3, 2\], declared float32\[2, 3\]"):
        with SafetensorsWriter(tmp_path / "x.safetensors", specs) as out:
            out.write("a", np.zeros((3, 2), np.float32))
    with pytest.raises(CheckpointError, match=r"never written: 'b'"):
        with SafetensorsWriter(tmp_path / "y.safetensors", specs) as out:
            out.write("a", np.ones((2, 3), np.float32))


def test_shipped_orbax_checkpoint_loads_a_layer_at_a_time():
    """The earlier layout (one Orbax tree under params/) reads, layer by layer, exactly what
    restoring the whole tree gives."""
    assert (SHIPPED / "params").is_dir() and not (SHIPPED / FILE).exists()
    cfg = load_hf_config(SHIPPED)
    with ocp.StandardCheckpointer() as ckptr:
        whole = ckptr.restore((SHIPPED / "params").resolve())
    dense, experts = restore_params(SHIPPED, cfg)
    want = tuple(
        ExpertWeights(**whole["experts"][str(i)]) if cfg.moe_layers[i] else None for i in range(cfg.num_layers)
    )
    assert_same((str_keys(dense), experts), (whole["dense"], want))
    store = HostExpertStore.from_checkpoint(SHIPPED, cfg)
    np.testing.assert_array_equal(store.weights(5, 7).w_down, np.asarray(want[5].w_down[7]))
