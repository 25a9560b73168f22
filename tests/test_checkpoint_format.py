"""The checkpoint's weight file (params.safetensors) round-trips, is checked against the
config and carries a checksum per tensor; checkpoints in the earlier Orbax layout still load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from safetensors import safe_open

from jaxmoe.checkpoint import CheckpointError, load, restore_params, save_params
from jaxmoe.checkpoint.legacy_params import UncheckedWeightsWarning
from jaxmoe.checkpoint.params_file import FILE, str_keys
from jaxmoe.checkpoint.random_model import TINY_OLMOE
from jaxmoe.checkpoint.safetensors_io import SafetensorsFile
from jaxmoe.checkpoint.safetensors_write import SafetensorsWriter
from jaxmoe.config import from_hf_dict, load_hf_config
from jaxmoe.model import MoEDecoder, dense_dict, init_experts
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
    assert_same(restore_params(path), (dense, experts))
    names = set(SafetensorsFile(path / FILE).entries)
    assert {"dense.layers.0.self_attn.q_proj.kernel", "experts.3.w_gate_up", "experts.3.w_down"} <= names
    with safe_open(str(path / FILE), "np") as f:  # the reference reader agrees with ours
        np.testing.assert_array_equal(f.get_tensor("experts.3.w_down"), np.asarray(experts[3].w_down))


def test_pinned_store_matches_the_stacks(tiny):
    _, experts, path = tiny
    store = HostExpertStore.from_checkpoint(path)
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


def test_an_orbax_checkpoint_loads_a_layer_at_a_time(tiny, tmp_path):
    """The earlier layout (one Orbax tree under params/) reads, layer by layer, exactly what
    restoring the whole tree gives, and says that it carries no checksums."""
    dense, experts, path = tiny
    cfg = load_hf_config(path)
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    tree = {"dense": str_keys(dense),
            "experts": {str(i): w._asdict() for i, w in enumerate(experts) if w is not None}}  # fmt: skip
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save((tmp_path / "params").resolve(), tree)
    with pytest.warns(UncheckedWeightsWarning, match="no checksums.*convert_hf.py"):
        got_dense, got_experts = restore_params(tmp_path)
    assert_same((got_dense, got_experts), (dense, experts))
    store = HostExpertStore.from_checkpoint(tmp_path)
    np.testing.assert_array_equal(store.weights(3, 7).w_down, np.asarray(experts[3].w_down[7]))


def test_every_tensor_carries_a_checksum_and_a_damaged_one_is_refused_by_name(tiny, tmp_path):
    dense, experts, path = tiny
    file = SafetensorsFile(path / FILE)
    assert set(file.checksums) == set(file.entries)
    damaged = tmp_path / "damaged"
    shutil.copytree(path, damaged)
    entry = file.entries["experts.2.w_down"]
    with open(damaged / FILE, "r+b") as f:  # 64 random bytes inside one tensor, as a bad disk or copy would
        header = int.from_bytes(f.read(8), "little")
        f.seek(8 + header + entry["data_offsets"][0] + 100)
        f.write(np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError, match=r"params\.safetensors: tensor 'experts\.2\.w_down' is damaged"):
        load(damaged)
    with pytest.raises(CheckpointError, match="is damaged"):  # the offloaded engine's store reads it too
        HostExpertStore.from_checkpoint(damaged)


def test_the_shipped_checkpoint_is_checked():
    file = SafetensorsFile(SHIPPED / FILE)
    assert not (SHIPPED / "params").exists() and set(file.checksums) == set(file.entries)
    for name in file.entries:  # every tensor reads back as written
        file.read(name)
