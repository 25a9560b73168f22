"""The engine's decode programs compiled for an H100/H200 without a GPU, and what they would run.

`report(shape_or_dir, target, batch, budget_frac, policy)` builds the programs from shapes alone
(nothing is allocated: weights are abstract) and compiles each with bench/gpu_aot.py:
  resident_decode    the resident engine's step (every expert in its layer stack)
  offloaded_decode   the offloaded engine's step with the cache on the device (misses fetched
                     in the program; engine/device_step.py), as `policy` runs it
  offloaded_resume   the host-planned step (engine/step.py through engine/offloaded_decode.py:
                     a missed layer returns to the host), which the maps policy runs
Must run under the CUDA plugin's Python (3.12, jax 0.11.2); see scripts/gpu_compile.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench import gpu_aot
from jaxmoe.engine.device_step import device_step_at
from jaxmoe.engine.offloaded_decode import offloaded_step
from jaxmoe.runtime.programs import COMPILER_OPTIONS
from jaxmoe.engine.executor import Piece, pack_module
from jaxmoe.engine.sampling import SamplingParams
from jaxmoe.engine.step import forward_step
from jaxmoe.model import MoEDecoder, init_kv_cache, num_unique_experts
from jaxmoe.model.decoder import init_experts
from jaxmoe.offload import device_cache as dc
from jaxmoe.offload.cache import plan_geometry, workspace_experts
from jaxmoe.offload.host_store import total_expert_bytes
from jaxmoe.offload.policy import PolicyShape
from jaxmoe.offload.policies import make_policy
from jaxmoe.offload.prefetch import GateAhead
from jaxmoe.quant import DENSE


def _config(model: str, dtype: str):
    from pathlib import Path

    if Path(model).is_dir():
        from jaxmoe.config import load_hf_config

        return load_hf_config(model)
    from bench.shapes import resolve

    return resolve(model).config(dtype)


def _on_cpu(tree, memory_kind: str = "device"):
    """Shapes placed on the CPU device with a memory kind (which a compile-only device lacks)."""
    sharding = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0], memory_kind=memory_kind)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def _resident(model_at, experts, tokens, positions, step, kv, root, sampling):
    token, kv = forward_step(model_at(None), tokens[:, None], positions[:, None], kv, experts, root, step,
                             sampling=sampling, merge=model_at)  # fmt: skip
    return token, positions + 1, step + 1, kv


def report(model: str = "olmoe-1b-7b", target: str = "h100", batch: int = 1, budget_frac: float = 0.25,
           policy: str = "lru", cache_len: int = 256, dtype: str = "bfloat16", keep: str | None = None,
           serve: bool = False) -> dict:  # fmt: skip
    """The decode programs' counts (gpu_aot.count); `serve`: also the server's offloaded rows
    step (`serve_decode`: the device step with each row's experts, head and sampling its own)."""
    cfg = _config(model, dtype)
    graphdef_model = nnx.eval_shape(lambda: MoEDecoder(cfg, nnx.Rngs(0)))
    piece = Piece(graphdef_model, pack_module(graphdef_model))  # the engines' packed weights
    merged = lambda leaves: functools.partial(piece.merge, leaves)  # (after) -> the model, the engines' lazy form  # noqa: E731
    leaves = _on_cpu(piece.leaves)
    spec = jax.ShapeDtypeStruct
    rows = _on_cpu(spec((batch,), jnp.int32))
    scalar = _on_cpu(spec((), jnp.int32))
    kv = _on_cpu(jax.eval_shape(lambda: init_kv_cache(cfg, batch, cache_len)))
    root = _on_cpu(jax.eval_shape(lambda: jax.random.key(0)))
    sampling = SamplingParams()
    options = dict(COMPILER_OPTIONS)
    programs = {}

    experts = _on_cpu(jax.eval_shape(lambda: init_experts(cfg, jax.random.key(1))))
    programs["resident_decode"] = gpu_aot.compile_counts(
        "resident_decode", lambda leaves, *a, sampling: _resident(merged(leaves), *a, sampling=sampling),
        (leaves, experts, rows, rows, scalar, kv, root), target=target, static={"sampling": sampling},
        donate=(5,), options=options, keep=keep)  # fmt: skip

    # The offloaded cache at this budget (the engine's geometry).
    fmt, nbytes = DENSE, DENSE.nbytes(cfg)
    unique = num_unique_experts(cfg.num_experts, batch, cfg.top_k)
    prefetch = unique if policy == "predictor" else 0
    budget = int(budget_frac * total_expert_bytes(cfg, fmt))
    slots = plan_geometry(budget, nbytes, cfg.num_experts * len(cfg.moe_layer_ids), unique,
                          workspace_experts(batch, fmt, cfg))  # fmt: skip
    pool = spec((slots, nbytes), jnp.uint8)
    hosts = tuple(_on_cpu(spec((cfg.num_experts, nbytes), jnp.uint8), "pinned_host") if moe else None
                  for moe in cfg.moe_layers)  # fmt: skip
    host_policy = make_policy(policy, PolicyShape(tuple(cfg.moe_layer_ids), cfg.num_experts, cfg.top_k))
    state = _on_cpu(jax.eval_shape(lambda: dc.new_state(jnp.zeros(pool.shape, pool.dtype), {}, slots, cfg.num_layers,
                                                        cfg.num_experts, reuse=host_policy.device_arrays(cfg.num_layers))))  # fmt: skip
    scorer = _RouterTable(cfg) if policy == "predictor" else None
    device_policy = dc.DevicePolicy.of(host_policy, cfg.moe_layer_ids, prefetch=prefetch,
                                       picks=cfg.top_k if prefetch else 0)  # fmt: skip
    static = {"sampling": sampling, "policy": device_policy, "fmt": fmt, "scorer": scorer}
    scorer_leaves = _on_cpu(scorer.leaves) if scorer else ()
    step_args = (leaves, rows, rows, _on_cpu(spec((batch,), jnp.bool_)), kv, state, hosts, root, scalar, scorer_leaves)
    programs["offloaded_decode"] = gpu_aot.compile_counts(
        "offloaded_decode", lambda leaves, *a, **s: device_step_at(merged(leaves), *a, **s), step_args,
        target=target, static=static, donate=(4, 5), options={**options, **dc.FETCH_OPTIONS}, keep=keep)  # fmt: skip
    if serve:
        from jaxmoe.serve.rows.offloaded import rows_device_step
        from jaxmoe.serve.rows.sampling import row_sampling

        sampling_rows = _on_cpu(jax.eval_shape(lambda: row_sampling([None] * batch, np.zeros(batch))))
        programs["serve_decode"] = gpu_aot.compile_counts(
            "serve_decode", lambda leaves, *a, **s: rows_device_step(merged(leaves), *a, **s),
            (*step_args, sampling_rows), target=target, static={k: v for k, v in static.items() if k != "sampling"},
            donate=(4, 5), options={**options, **dc.FETCH_OPTIONS}, keep=keep)  # fmt: skip

    x = spec((batch, 1, cfg.hidden_size), jnp.dtype(cfg.dtype))
    resume_args = (leaves, rows, rows, _on_cpu(spec((batch,), jnp.bool_)), kv, _on_cpu(pool),
                   _on_cpu(spec((cfg.num_layers, cfg.num_experts), jnp.int32)), scalar, _on_cpu(x), root, scalar, ())
    programs["offloaded_resume"] = gpu_aot.compile_counts(
        "offloaded_resume", lambda leaves, *a, **s: offloaded_step(merged(leaves), *a, **s), resume_args, target=target,
        static={"sampling": sampling, "scorer": None, "picks": 0, "fmt": fmt}, donate=(4, 5), options=options,
        keep=keep)  # fmt: skip
    return {"target": target, "jax": jax.__version__, "model": model, "batch": batch, "budget_frac": budget_frac,
            "policy": policy, "pool_slots": slots, "programs": programs}  # fmt: skip


class _RouterTable(GateAhead):
    """Gate-ahead from shapes alone: a [L, D, E] table of routers (the scorer's cost)."""

    def __init__(self, cfg):
        self.leaves = (jax.ShapeDtypeStruct((cfg.num_layers, cfg.hidden_size, cfg.num_experts), jnp.dtype(cfg.dtype)),)
