"""The KV cache: one stack per kind of layer cache, so a program takes a few arrays, not two
per layer.

A layer's attention owns its cache type: `LayerKV` (grouped-query attention), `RingKV`
(a sliding window, model/window.py) or `LatentKV` (MLA, model/mla.py), each a NamedTuple of
[B, S, ...] arrays. Every layer of one kind has the same type and shapes, so the cache holds
one value of that type per kind whose leaves stack those layers: [Lk, B, S, ...]. A layer
reads and writes its own entry of the stack in place (`LayerSlot`): XLA updates a donated
stack where it is, and a call of a compiled program costs host time per argument (about
4.8 us each on an H200), which two arrays per layer made 32 arguments for OLMoE's KV alone.

The cache is a tuple of these stacks (`init_kv_cache`); `kv_layout(cfg)` says where each
layer's entry is. Every leaf has layers first, rows second and keys third.

Shapes: Lk layers of a kind, B batch rows, S key slots, Hk key/value heads, Dh head dim.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from jaxmoe.config import MoEConfig
from jaxmoe.model.window import RingKV

LAYER_AXIS, ROW_AXIS, KEY_AXIS = 0, 1, 2  # of every leaf of the cache


class LayerKV(NamedTuple):
    k: jax.Array  # [B, S, Hk, Dh] (stacked in the cache: [Lk, B, S, Hk, Dh])
    v: jax.Array


class LatentKV(NamedTuple):
    latent: jax.Array  # [B, S, C] kv_a_layernorm's output
    rope_key: jax.Array  # [B, S, Dr] after RoPE


LayerCache = LayerKV | RingKV | LatentKV  # one layer's cache: its attention's KV type


def layer_kind(cfg: MoEConfig, layer: int) -> str:
    if cfg.attention == "mla":
        return "latent"
    return "ring" if cfg.is_sliding(layer) else "full"


@functools.lru_cache(maxsize=None)
def kv_layout(cfg: MoEConfig) -> tuple[tuple[int, int], ...]:
    """Per layer: (its kind's stack in the cache, its index in that stack); stacks in the
    order their kinds first appear."""
    kinds: dict[str, int] = {}
    sizes: list[int] = []
    out = []
    for layer in range(cfg.num_layers):
        stack = kinds.setdefault(layer_kind(cfg, layer), len(kinds))
        if stack == len(sizes):
            sizes.append(0)
        out.append((stack, sizes[stack]))
        sizes[stack] += 1
    return tuple(out)


def init_kv_cache(cfg: MoEConfig, batch: int, length: int) -> tuple[LayerCache, ...]:
    """Every layer's empty cache for a context of `length`, stacked per kind (`kv_layout`)."""
    layout = kv_layout(cfg)
    stacks = []
    for stack in range(max(s for s, _ in layout) + 1):
        layers = [layer for layer, (s, _) in enumerate(layout) if s == stack]
        kind, first = layer_kind(cfg, layers[0]), layers[0]
        if kind == "latent":
            shapes = [(cfg.kv_lora_rank,), (cfg.qk_rope_head_dim,)]
            kind_type = LatentKV
        else:
            shapes = [(cfg.num_kv_heads, cfg.head_dim)] * 2
            kind_type = RingKV if kind == "ring" else LayerKV
        keys = cfg.kv_length(first, length)
        stacks.append(kind_type(*(jnp.zeros((len(layers), batch, keys) + s, cfg.dtype) for s in shapes)))
    return tuple(stacks)


class LayerSlot(NamedTuple):
    """One layer's entry of the cache: its kind's stack and its index there (an int, or an
    int32 array where one program serves every layer of the kind)."""

    stack: Any  # the kind's cache type, leaves [Lk, B, S, ...]
    index: Any  # int | jax.Array

    def read(self) -> LayerCache:
        """The layer's own cache, leaves [B, S, ...]."""
        return type(self.stack)(*(a[self.index] for a in self.stack))

    def write(self, write: Callable, new: Sequence[jax.Array], positions: jax.Array) -> "LayerSlot":
        """The slot with each leaf's new entries new[i] [B, T, ...] written in place by
        write(leaf [Lk, B, S, ...], new [B, T, ...], positions [B, T], index)."""
        leaves = (write(a, n, positions, self.index) for a, n in zip(self.stack, new, strict=True))
        return self._replace(stack=type(self.stack)(*leaves))


def layer_slot(kv: Sequence[LayerCache], cfg: MoEConfig, layer: int) -> LayerSlot:
    stack, index = kv_layout(cfg)[layer]
    return LayerSlot(kv[stack], index)


def with_slot(kv: Sequence[LayerCache], cfg: MoEConfig, layer: int, slot: LayerSlot) -> tuple[LayerCache, ...]:
    """kv with layer `layer`'s stack replaced by the slot's (after the layer wrote it)."""
    stack = kv_layout(cfg)[layer][0]
    return tuple(slot.stack if i == stack else s for i, s in enumerate(kv))
