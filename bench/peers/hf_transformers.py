"""Peer: Hugging Face transformers `generate` (OLMoE, Qwen3-MoE, Mixtral), every weight on one device.

Kept out of the library (jaxmoe never imports torch). For "hf"-sourced shapes the
benchmark builds the jaxmoe model from the model built here, so both engines run the
same weights: same config, same seed, same torch device (CPU and CUDA random streams
differ).
"""

from __future__ import annotations

import time

import ml_dtypes
import numpy as np
import torch
import transformers
from transformers.generation.streamers import BaseStreamer


def config(fields: dict) -> transformers.PretrainedConfig:
    """The family's config class from config.json fields (bench.shapes gives them with no EOS,
    so every run generates exactly the tokens asked for)."""
    fields = dict(fields)
    return transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)


def build(config: transformers.PretrainedConfig, seed: int, device: str) -> transformers.PreTrainedModel:
    """Random init (transformers' default initializers) directly on `device`, in the config's dtype."""
    dtype = config.dtype if isinstance(config.dtype, torch.dtype) else getattr(torch, config.dtype)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def tensors(model: torch.nn.Module):
    """(names, shape_of, read) over the state dict, the arguments `jaxmoe.checkpoint.assemble` takes."""
    sd = model.state_dict()

    def read(name: str) -> np.ndarray:
        t = sd[name].detach().to("cpu").contiguous()
        if t.dtype == torch.bfloat16:  # numpy has no bf16: reinterpret the bits
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()

    return list(sd), lambda name: tuple(sd[name].shape), read


def expert_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


class _Clock(BaseStreamer):
    """generate() hands the streamer the prompt, then each new token once it is on the host."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def generate(model, prompts: list[list[int]], new_tokens: int, device=None) -> dict:
    """Greedy `model.generate`; TTFT and decode rate from the streamer's per-token timestamps.
    `device`: where the inputs go (default the model's; a dispatched model's is its first layer's)."""
    device = torch.device(device) if device is not None else model.device
    ids = torch.tensor(prompts, device=device)
    clock = _Clock()
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            streamer=clock,
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
    first, last = clock.times[1], clock.times[-1]  # times[0]: the prompt; then one per step
    steps = len(clock.times) - 2
    decoded = steps * len(prompts)
    return {
        "token_ids": out[:, ids.shape[1] :].tolist(),
        "ttft_ms": 1e3 * (first - start),
        "tpot_ms": 1e3 * (last - first) / steps if steps else None,
        "decode_tokens_per_s": decoded / (last - first) if steps else None,
        "token_times": clock.times[1:],
    }
