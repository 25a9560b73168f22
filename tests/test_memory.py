"""Reading and writing checkpoints keeps one layer in memory, not the model.

Each tool runs in a fresh interpreter (tests/rss.py) on a checkpoint big enough that an
extra copy of the experts, or of a few layers, stands above the bounds: 4 MoE layers of
32 bf16 experts, 96 MiB of experts per layer (stacks of 64 and 32 MiB, at or above glibc's
mmap threshold, see tests/rss.py), 384 MiB in all, and 33 MiB of dense weights.
"""

from __future__ import annotations

import json
import math

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from rss import measure, peak_growth
from jaxmoe.checkpoint import convert_hf
from jaxmoe.checkpoint.hf_keys import dense_targets, expert_targets
from jaxmoe.checkpoint.random_model import TINY_OLMOE
from jaxmoe.config import from_hf_dict
from jaxmoe.offload.host_store import expert_bytes, total_expert_bytes

HF_CONFIG = dict(
    TINY_OLMOE, hidden_size=1024, intermediate_size=512, num_hidden_layers=4, num_experts=32,
    num_attention_heads=8, num_key_value_heads=8, vocab_size=256, dtype="bfloat16",
)  # fmt: skip
CFG = from_hf_dict(HF_CONFIG)
MiB = 2**20
EXPERTS = total_expert_bytes(CFG)
LAYER = expert_bytes(CFG) * CFG.num_experts
DENSE_TENSORS = {name: t.shape for name, t in dense_targets(CFG).items()}
DENSE = sum(math.prod(shape) for shape in DENSE_TENSORS.values()) * 2
# What a run costs beside the weights: modules a tool imports on first use, thread pools,
# allocator slack. Measured at 2-5 MiB here; the bounds leave room for that, not for a
# second copy of anything big.
RUNTIME = 16 * MiB


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if parts[1] == "layers" else None


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """The model as a sharded Hugging Face checkpoint: one shard of embeddings and head, one per layer."""
    path = tmp_path_factory.mktemp("hf-olmoe-400mb")
    shapes = DENSE_TENSORS | {name: t.shape for name, t in expert_targets(CFG)[0].items()}
    shards: dict[int, list[str]] = {}
    for name in shapes:
        layer = _layer_of(name)
        shards.setdefault(-1 if layer is None else layer, []).append(name)
    rng = np.random.default_rng(0)
    weight_map = {}
    for i, (_, names) in enumerate(sorted(shards.items())):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: rng.standard_normal(shapes[n], np.float32).astype(ml_dtypes.bfloat16) for n in names}
        save_file(tensors, path / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names, file)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(HF_CONFIG))
    return path


@pytest.fixture(scope="module")
def checkpoint(hf_dir, tmp_path_factory):
    return convert_hf(hf_dir, tmp_path_factory.mktemp("jaxmoe") / "ckpt", progress=False)


def test_conversion_holds_one_layer(hf_dir, tmp_path):
    growth = peak_growth(
        f"convert_hf({str(hf_dir)!r}, {str(tmp_path / 'ckpt')!r}, progress=False)",
        setup="from jaxmoe.checkpoint import convert_hf",
    )
    # One layer's experts being assembled, plus the tensor being read.
    assert growth <= LAYER + RUNTIME, f"{growth / MiB:.0f} MiB for {LAYER / MiB:.0f} MiB layers"


def test_export_holds_one_layer(checkpoint, tmp_path):
    growth = peak_growth(
        f"export_hf({str(checkpoint)!r}, {str(tmp_path / 'hf')!r})",
        setup="from jaxmoe.checkpoint.export import export_hf",
    )
    assert growth <= LAYER + RUNTIME, f"{growth / MiB:.0f} MiB for {LAYER / MiB:.0f} MiB layers"


@pytest.mark.parametrize(
    "load",
    [
        f"OffloadedEngine.from_checkpoint(PATH, {64 * expert_bytes(CFG)})",  # experts to pinned host memory
        "jaxmoe.load(PATH)",  # resident: on CPU the device is host memory too
    ],
    ids=["offloaded", "resident"],
)
def test_loading_holds_the_experts_once(checkpoint, load):
    growth = peak_growth(
        load.replace("PATH", repr(str(checkpoint))),
        setup="import jaxmoe\nfrom jaxmoe.engine.offloaded import OffloadedEngine",
    )
    # Kept: the experts and (on CPU, where the device is host memory) the dense weights.
    # In flight: one layer's experts read from disk, and 10% for the allocator's slack.
    bound = EXPERTS + LAYER + EXPERTS // 10 + DENSE + RUNTIME
    assert growth <= bound, f"{growth / MiB:.0f} MiB, bound {bound / MiB:.0f} MiB ({EXPERTS / MiB:.0f} MiB of experts)"


@pytest.mark.gpu
def test_offloaded_load_keeps_the_experts_off_the_device(checkpoint):
    """On a GPU the experts go from host numpy to pinned host memory; the device allocator
    sees the dense weights only (a restore into pinned_host through Orbax was reported to
    pass through the device)."""
    run = measure(
        f"OffloadedEngine.from_checkpoint({str(checkpoint)!r}, {64 * expert_bytes(CFG)})",
        setup="from jaxmoe.engine.offloaded import OffloadedEngine",
        platform=None,
    )
    assert run["device_peak"] <= DENSE + RUNTIME, f"{run['device_peak'] / MiB:.0f} MiB on the device"
