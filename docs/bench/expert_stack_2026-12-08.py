"""Would one stack of experts for all layers ([L, E, ...], a static index per layer) cut the
decode step's arguments without copies? Deviceless H100 compile of L = 4 OLMoE-1B-7B-sized MoE
layers (E 64, D 2048, I 1024, top-8, bf16), each through model/experts.py's `moe_ffn`.

  JAX_PLATFORMS=cpu JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 PYTHONPATH=. .venv-aot/bin/python \
      docs/bench/expert_stack_2026-12-08.py N {layers,stacked,dynamic} [dsf]

N tokens; `layers`: one [E, ...] array per layer (today); `stacked`: [L, E, ...] indexed by the
layer's number; `dynamic`: the same indexed by an argument; `dsf`: with
--xla_gpu_enable_dynamic_slice_fusion."""

import sys

import jax
import jax.numpy as jnp

from bench import gpu_aot
from jaxmoe.model.experts import ExpertWeights, moe_ffn

L, E, D, I, K = 4, 64, 2048, 1024, 8
n, mode = int(sys.argv[1]), sys.argv[2]
options = {"xla_gpu_enable_dynamic_slice_fusion": True} if sys.argv[3:] == ["dsf"] else None
cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0], memory_kind="device")


def spec(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=cpu)


unique = min(E, n * K)
x, ids, weights = spec((n, D)), spec((n, K), jnp.int32), spec((n, K))
if mode == "layers":
    experts = [ExpertWeights(spec((E, D, 2 * I)), spec((E, I, D))) for _ in range(L)]
    at = lambda ex, layer: ex[layer]  # noqa: E731
else:
    experts = (ExpertWeights(spec((L, E, D, 2 * I)), spec((L, E, I, D))),)
    experts += (spec((L,), jnp.int32),) if mode == "dynamic" else ()

    def at(ex, layer):
        stack = ex[0]
        i = layer if mode == "stacked" else ex[1][layer]
        return ExpertWeights(*(jax.lax.dynamic_index_in_dim(a, i, keepdims=False) if mode == "dynamic" else a[i]
                               for a in stack[:2]))  # fmt: skip


def layers(x, ids, weights, ex):
    for layer in range(L):
        x = x + moe_ffn(x, (ids + layer) % E, weights, at(ex, layer), unique)
    return x


c = gpu_aot.compile_counts(f"stack_{mode}_{n}", layers, (x, ids, weights, experts), options=options)
print(n, mode, sys.argv[3:], {k: c[k] for k in ("kernels", "memcpy", "arguments", "temp_bytes")})
