"""jaxmoe models for a worker: (config, model with dense weights on the device, experts), from
a transformers model ("hf"), seeded random weights ("random") or a checkpoint (bench/shapes.py).

Experts come back either resident (per-layer stacks on the device) or as a
HostExpertStore (pinned host memory, one array pair per expert). For "random" both are
made by the same per-layer function, so resident and offloaded rows run the same weights.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from bench.shapes import ModelSpec

EXPERT_STD = 0.02  # as jaxmoe.model.init_experts


@functools.partial(jax.jit, static_argnums=(0,))
def random_layer_experts(cfg, seed: int, layer: int):
    """Layer `layer`'s routed experts ([E, D, 2I], [E, I, D]) on the device, from (seed, layer) alone,
    generated in the model's dtype (no float32 copy of a whole layer)."""
    from jaxmoe.model import ExpertWeights

    e, d, i = cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size
    k1, k2 = jax.random.split(jax.random.fold_in(jax.random.key(seed), layer))
    dtype = jnp.dtype(cfg.dtype)
    w = ExpertWeights(EXPERT_STD * jax.random.normal(k1, (e, d, 2 * i), dtype),
                      EXPERT_STD * jax.random.normal(k2, (e, i, d), dtype))  # fmt: skip
    if cfg.expert_bias:  # gpt-oss: zero biases, as transformers initialises them
        from jaxmoe.model.experts import expert_activation

        w = w._replace(b_gate_up=jnp.zeros((e, 2 * i), dtype), b_down=jnp.zeros((e, d), dtype),
                       act=expert_activation(cfg))  # fmt: skip
    return w


def random_dense(cfg, seed: int, embed_scale: float = 1.0):
    """The dense weights, seeded; token embeddings x `embed_scale` (bench/shapes.py: ROUTED_EMBED_SCALE)."""
    from flax import nnx

    from jaxmoe.model import MoEDecoder

    model = MoEDecoder(cfg, nnx.Rngs(seed))
    if embed_scale != 1.0:
        table = model.embed_tokens.embedding
        table.value = table.value * jnp.asarray(embed_scale, table.value.dtype)
    return model


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def random_layer_rows(cfg, seed: int, layer: int, fmt):
    """Layer `layer`'s experts as packed rows [E, bytes] on the device, from (seed, layer) alone.
    Dense: the random_layer_experts weights. Quantized: random codes with one scale (and
    zero point 8 for int4) chosen so the dequantized weights have EXPERT_STD, made on the
    device: quantizing random weights on the host would take minutes for Mixtral-8x7B and
    measure nothing the codes do not (the bytes moved and the unpacking are the same)."""
    if fmt.kind == "dense":
        w = random_layer_experts(cfg, seed, layer)
        from jaxmoe.offload.cache import dense_parts

        return fmt.pack_stacks(cfg, dense_parts(w))
    e = cfg.num_experts
    # std of uniform codes: int8 in [-128, 127] ~ 73.9; int4 in [0, 15] around 8 ~ 4.61
    scale = EXPERT_STD / (73.9 if fmt.kind == "int8" else 4.61)
    if fmt.kind == "mxfp4":  # codes are e2m1 values (std about 2.9): a power-of-two scale near EXPERT_STD / 2.9
        scale = 127 + round(math.log2(EXPERT_STD / 2.9))
    key, parts = jax.random.fold_in(jax.random.key(seed), layer), {}
    for i, part in enumerate(fmt.parts(cfg)):
        shape = (e, *part.shape)
        if part.role == "q":
            bits = jax.random.bits(jax.random.fold_in(key, i), shape, jnp.uint8)
            parts[part.matrix, part.role] = jax.lax.bitcast_convert_type(bits, part.dtype)
        elif part.role == "bias":
            parts[part.matrix, part.role] = jnp.zeros(shape, part.dtype)
        else:
            parts[part.matrix, part.role] = jnp.full(shape, scale if part.role == "scale" else 8.0, part.dtype)
    return fmt.pack_stacks(cfg, parts)


def random_host_store(cfg, seed: int, fmt=None):
    """Every expert into pinned host memory, one layer on the device at a time: packed there
    and copied device -> pinned (no numpy round trip, nothing on disk)."""
    from jaxmoe.offload.host_store import HostExpertStore
    from jaxmoe.quant import DENSE

    fmt = fmt or DENSE
    pinned = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
    layers = {}
    for layer in cfg.moe_layer_ids:
        rows = random_layer_rows(cfg, seed + 1, layer, fmt)
        layers[layer] = jax.block_until_ready(jax.device_put(rows, pinned))
        del rows  # one layer on the device at a time
    return HostExpertStore(cfg, layers, fmt)


def random_resident(cfg, seed: int, fmt=None) -> list:
    """Every layer's experts on the device: dense stacks, or (quantized) the packed rows
    random_host_store holds, so resident and offloaded compute with the same bytes."""
    from jaxmoe.quant import packed_experts

    if fmt is None or fmt.kind == "dense":
        return [random_layer_experts(cfg, seed + 1, layer) if moe else None for layer, moe in enumerate(cfg.moe_layers)]
    return [packed_experts(random_layer_rows(cfg, seed + 1, layer, fmt), fmt, cfg) if moe else None
            for layer, moe in enumerate(cfg.moe_layers)]  # fmt: skip


def resident_experts(cfg, stacks: list, fmt=None) -> list:
    """Dense stacks as the resident engine holds them in `fmt`: as they are, or quantized into
    packed rows on the device (the same bytes an offloaded store of that format holds)."""
    from jaxmoe.checkpoint.quantize import packed_layer
    from jaxmoe.quant import packed_experts

    if fmt is None or fmt.kind == "dense":
        return jax.device_put(stacks)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return [None if w is None else packed_experts(jax.device_put(packed_layer(cfg, w, fmt), device), fmt, cfg)
            for w in stacks]  # fmt: skip


def from_torch(spec: ModelSpec, dtype: str, seed: int, gpu: bool):
    """(config, dense model, per-layer numpy expert stacks) assembled from the transformers model."""
    import torch

    from bench.peers import hf_transformers as hf
    from jaxmoe.checkpoint.assemble import assemble
    from jaxmoe.config import from_hf_dict
    from jaxmoe.model import build_model

    torch_model = hf.build(hf.config(spec.hf_fields(dtype)), seed, "cuda" if gpu else "cpu")
    cfg = from_hf_dict(torch_model.config.to_dict(), source=f"{spec.name} (transformers config)")
    dense, experts = assemble(cfg, *hf.tensors(torch_model), source=f"{spec.name} random state dict")
    del torch_model
    if gpu:
        torch.cuda.empty_cache()  # torch's copy is gone before jax allocates its own
    return cfg, build_model(cfg, dense), list(experts)


def build(spec: ModelSpec, dtype: str, seed: int, gpu: bool, offload: bool):
    """(config, dense model on the device, experts: a HostExpertStore if `offload`, else device stacks)."""
    from jaxmoe.offload.host_store import HostExpertStore, ensure_host_memory, total_expert_bytes

    if spec.source == "checkpoint":
        from jaxmoe.checkpoint import load, open_checkpoint

        ckpt = open_checkpoint(spec.path)
        cfg = ckpt.config
        if offload:
            ensure_host_memory(total_expert_bytes(cfg, ckpt.expert_format))  # before the backend starts
            # Experts a layer at a time from disk into pinned memory: one copy, never on the device.
            return cfg, load(ckpt, experts=False).model, HostExpertStore.from_checkpoint(ckpt)
        loaded = load(spec.path)
        return cfg, loaded.model, list(loaded.experts)
    fmt = spec.fmt()
    if spec.source == "random":
        cfg = spec.config(dtype)
        if offload:
            ensure_host_memory(total_expert_bytes(cfg, fmt))  # before random_dense starts the backend
            return cfg, random_dense(cfg, seed, spec.embed_scale), random_host_store(cfg, seed, fmt)
        return cfg, random_dense(cfg, seed, spec.embed_scale), random_resident(cfg, seed, fmt)
    cfg, model, stacks = from_torch(spec, dtype, seed, gpu)
    if offload:
        # from_stacks frees each layer's numpy stack once it is pinned: one extra layer at most.
        return cfg, model, HostExpertStore.from_stacks(cfg, (stacks.pop(0) for _ in range(len(stacks))), fmt=fmt)
    return cfg, model, resident_experts(cfg, stacks, fmt)
