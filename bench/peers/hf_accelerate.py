"""Peer: transformers + accelerate offload at a device-memory budget (GPU only).

What users do today when a MoE model does not fit: `infer_auto_device_map` with
`max_memory={0: budget, "cpu": ...}` places whole decoder layers on the GPU until
the budget is spent and the rest in CPU memory; `dispatch_model` then adds hooks
that copy an offloaded layer's weights to the GPU for every forward (as
measured here: 0.72 tok/s at 5 GiB on an H100, 0.80 on an H200, docs/BENCHMARKS.md).
The model is the one `hf_transformers.build` makes on the GPU (same seed, same
weights as every other row), moved to the CPU before it is dispatched.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path


def unavailable(gpu: bool) -> str | None:
    """Why this peer cannot run here, or None. Checked without importing torch or accelerate."""
    reasons = []
    if importlib.util.find_spec("accelerate") is None:
        reasons.append("accelerate is not installed")
    if not gpu:
        reasons.append("CPU run: it offloads CPU memory to a GPU, and there is no GPU here")
    return "; ".join(reasons) or None


def host_bytes_available() -> int:
    """MemAvailable, less a tenth: the CPU side of max_memory."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 * 9 // 10
    return 64 * 2**30


def dispatch(model, device_bytes: int):
    """Place `model` (on the CPU) across GPU 0 and the CPU with at most `device_bytes` of
    weights on the GPU; returns (dispatched model, {"layers_on_device", "layers",
    "offloaded_bytes_per_forward", "device_map"})."""
    from accelerate import dispatch_model, infer_auto_device_map

    assert next(model.parameters()).device.type == "cpu", "dispatch a model that is on the CPU"
    no_split = list(getattr(model, "_no_split_modules", None) or ["OlmoeDecoderLayer"])
    device_map = infer_auto_device_map(
        model, max_memory={0: int(device_bytes), "cpu": host_bytes_available()}, no_split_module_classes=no_split
    )
    placed = {name: str(dev) for name, dev in device_map.items()}

    def placement(param: str) -> str:
        owner = max((m for m in placed if m == "" or param == m or param.startswith(m + ".")), key=len)
        return placed[owner]

    # The hooks copy every CPU-placed weight to the GPU on each forward, i.e. once per decode step.
    offloaded = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if placement(n) == "cpu")
    model = dispatch_model(model, device_map=device_map)
    layers = [placement(name) for name, _ in model.named_modules() if re.search(r"(^|\.)layers\.\d+$", name)]
    on_gpu = sum(dev in ("0", "cuda", "cuda:0") for dev in layers)
    summary = {"layers_on_device": on_gpu, "layers": model.config.num_hidden_layers,
               "offloaded_bytes_per_forward": offloaded, "device_map": placed}  # fmt: skip
    return model, summary
