"""The GPU check's own workers (scripts/gpu_check.py), run like the benchmark's: one process
each, started by bench.matrix.spawn, returning a JSON-able dict (registered in bench.workers.WORKERS).

  environment   devices, versions, memory kinds, memory_stats() keys
  exactness     offloaded == resident greedy tokens, case by case (a mismatch is a result)
  prefill_modes one model, every prefill mode and prompt length in one process (TTFT only)
  phases        where one offloaded decode step's time goes (jaxmoe.runtime.phases)
  injit_probe   does a dynamic slice of a pinned_host stack inside jit copy only the slice,
                and asynchronously?
  exact_diagnosis  where offloaded tokens leave the resident ones (not in the default steps)
A worker given `partial` (a path) writes its results so far there after each case, so a
step killed at its time cap still leaves what it measured.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

from bench.common import PREFILL_MODES, check_jax_backend, jax_versions, log, model_spec, prompts


def _save_partial(spec: dict, result: dict) -> None:
    if spec.get("partial"):
        Path(spec["partial"]).write_text(json.dumps(result))


# -- environment -------------------------------------------------------------------
PACKAGES = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin", "jax-cuda13-pjrt", "flax",
            "optax", "orbax-checkpoint", "chex", "numpy", "ml_dtypes", "transformers", "torch", "accelerate",
            "safetensors", "tokenizers")  # fmt: skip


def worker_environment(spec: dict) -> dict:
    import jax

    check_jax_backend(spec["gpu"])
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    dev = jax.devices()[0]
    stats = dev.memory_stats()
    smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True) if spec["gpu"] else None
    return {
        "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
        "device_kind": dev.device_kind, "memory_kinds": [m.kind for m in dev.addressable_memories()],
        "default_memory_kind": dev.default_memory().kind, "memory_stats_keys": sorted(stats) if stats else None,
        "bytes_limit": stats and stats.get("bytes_limit"), "package_versions": versions,
        "env": {k: v for k, v in os.environ.items() if k.startswith(("XLA_", "JAX_", "CUDA_VISIBLE"))},
        "nvidia_smi": smi and smi.stdout.strip(), "versions": jax_versions(),
    }  # fmt: skip


# -- exactness ---------------------------------------------------------------------
def exact_model(name: str, dtype: str, seed: int):
    """(config, dense model, resident expert stacks, host store, predictor spec) of one model
    in `dtype`: a tiny random family shape, or the shipped checkpoint (cast when asked)."""
    import jax

    from bench import models
    from bench.shapes import resolve
    from jaxmoe.model import cast_floats, cast_model
    from jaxmoe.offload.host_store import HostExpertStore
    from jaxmoe.predictor.store import load_scorer

    m = resolve(name)
    if m.source == "random":
        cfg = m.config(dtype)
        resident = models.random_resident(cfg, seed)
        return cfg, models.random_dense(cfg, seed), resident, HostExpertStore.from_stacks(cfg, resident), "gate-ahead"
    from jaxmoe.checkpoint import load

    loaded = load(m.path)
    cfg, model, resident = loaded.config, loaded.model, list(loaded.experts)
    predictor = m.predictor
    if dtype != cfg.dtype:
        # The shipped predictor was trained for the checkpoint as stored (its config hash
        # names the dtype): checked against that model, then used with the cast one.
        predictor = load_scorer(predictor, model)
        cfg = dataclasses.replace(cfg, dtype=dtype)
        model = cast_model(cfg, model)
        resident = [None if s is None else cast_floats(s, dtype) for s in resident]
        jax.block_until_ready(resident)
    return cfg, model, resident, HostExpertStore.from_stacks(cfg, resident), predictor


def min_experts(cfg, batch: int) -> int:
    """The smallest cache (in experts) the offloaded engine accepts for this batch."""
    from jaxmoe.offload.cache import batch_minimum_experts
    from jaxmoe.quant import DENSE

    return batch_minimum_experts(batch, DENSE, cfg)


def exact_prompts(vocab: int, batch: int, seed: int) -> list[list[int]]:
    """Ragged prompts (lengths 5, 9, 13, ...) so padding and per-row positions are exercised."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, 5 + 4 * i).tolist() for i in range(batch)]


def worker_exactness(spec: dict) -> dict:
    """For each case (model, dtype, policy, budget, batch): offloaded greedy tokens against the
    resident engine's on the same weights. A case that raises is recorded with its error."""
    from bench.shapes import resolve
    from jaxmoe.engine import OffloadedEngine, ResidentEngine
    from jaxmoe.predictor.store import load_scorer

    check_jax_backend(spec["gpu"])
    cases, new = [], spec["new_tokens"]
    result = {"cases": cases, "versions": jax_versions()}
    by_model: dict[tuple, list] = {}
    for c in spec["cases"]:
        by_model.setdefault((c["model"], c["dtype"]), []).append(c)
    for (name, dtype), wanted in by_model.items():
        cfg, model, resident, store, predictor = exact_model(name, dtype, spec["seed"])
        reference, scorer = {}, None
        for c in wanted:
            start, row = time.perf_counter(), dict(c)
            try:
                batch = c["batch"]
                ps = exact_prompts(cfg.vocab_size, batch, spec["seed"] + batch)
                if batch not in reference:
                    reference[batch] = ResidentEngine(cfg, model, resident).generate(ps, new).token_ids
                use_predictor = c["policy"] == "predictor"
                low = min_experts(cfg, batch)
                total = len(store.keys())
                experts = low if c["budget"] == "minimum" else max(low, total // 2)
                if use_predictor and scorer is None:  # once per model; a refusal is each case's result
                    scorer = load_scorer(predictor, model)
                engine = OffloadedEngine(cfg, model, store, experts * store.expert_bytes, c["policy"],
                                         predictor=scorer if use_predictor else None)  # fmt: skip
                got = engine.generate(ps, new).token_ids
                row |= {"experts": experts, "of": total, "predictor": resolve(name).predictor if use_predictor else None,
                        "equal": got == reference[batch], "agree": _agree(got, reference[batch]), "compared": new,
                        "hit_rate": engine.cache.counters.hit_rate}  # fmt: skip
            except Exception as e:  # noqa: BLE001  a failing case is a result; the others still run
                row |= {"equal": False, "error": f"{type(e).__name__}: {e}"[:400]}
            row["seconds"] = time.perf_counter() - start
            log(f"exactness {row}")
            cases.append(row)
            _save_partial(spec, result)
    return result


# -- where offloaded and resident tokens part -----------------------------------------
def _agree(a: list[list[int]], b: list[list[int]]) -> int:
    return min(next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), len(x)) for x, y in zip(a, b))


def expert_parts(cfg, seed: int) -> dict:
    """Bitwise comparisons, at this model's real shapes, of the expert computations the two
    engines run: the resident prefill (every expert in place) against the streamed prefill
    (the layer's uint8 rows stacked and unpacked) and the routed one (U gathered from a
    pool); the resident decode (K gathered from the layer's stack) against the offloaded one (K gathered from a pool);
    both with the pool as the engine holds it too (uint8 rows unpacked in the program)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxmoe.runtime.programs import COMPILER_OPTIONS
    from jaxmoe.model import ExpertWeights, expert_rows
    from jaxmoe.offload.cache import pool_experts, stack_experts
    from jaxmoe.quant.format import DENSE

    e, d, i, k = cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size, cfg.top_k
    dt = jnp.dtype(cfg.dtype)
    keys = jax.random.split(jax.random.key(seed), 5)
    stack = ExpertWeights(0.02 * jax.random.normal(keys[0], (e, d, 2 * i), dt),
                          0.02 * jax.random.normal(keys[1], (e, i, d), dt))  # fmt: skip
    slots = e + 37  # a pool larger than the layer, experts at shuffled slots
    slot_of = np.random.default_rng(seed).permutation(slots)[:e]
    pool = ExpertWeights(*(jnp.zeros((slots,) + w.shape[1:], dt).at[slot_of].set(w) for w in stack))
    # What the offloaded engine really holds: each expert as one uint8 row, unpacked in the program.
    rows = DENSE.pack_stacks(cfg, {("w_gate_up", "w"): stack.w_gate_up, ("w_down", "w"): stack.w_down})
    packed = jnp.zeros((slots, rows.shape[1]), jnp.uint8).at[slot_of].set(rows)

    def run(fn, *args):
        return np.asarray(jax.jit(fn).lower(*args).compile(compiler_options=COMPILER_OPTIONS)(*args).astype(jnp.float32))

    out = {}
    for n in (128, 1):
        h = jax.random.normal(keys[2], (n, d), dt)
        ids = jax.lax.top_k(jax.random.normal(keys[3], (n, e)), k)[1].astype(jnp.int32)
        slot_ids = jnp.asarray(slot_of, jnp.int32)[ids]
        u = min(e, n * k)
        ref = run(lambda h, ids, w: expert_rows(h, ids, w, u), h, ids, stack)
        variants = {"offloaded_pool": run(lambda h, ids, w: expert_rows(h, ids, w, u), h, slot_ids, pool),
                    "offloaded_packed_pool": run(lambda h, ids, p: expert_rows(h, ids, pool_experts(p, DENSE, cfg), u),
                                                 h, slot_ids, packed)}  # fmt: skip
        if n > 1:  # the streamed prefill: the layer's rows, one buffer each, stacked by their own program
            stacked = jax.jit(stack_experts, static_argnums=(1, 2))(tuple(rows), DENSE, cfg)
            variants["streamed_stack"] = run(lambda h, ids, w: expert_rows(h, ids, w, u), h, ids, stacked)
        for name, got in variants.items():
            out[f"n{n}_{name}"] = {"bitwise_equal": bool(np.array_equal(got, ref)),
                                   "max_abs_diff": float(np.max(np.abs(got - ref)))}  # fmt: skip
    return out


def worker_exact_diagnosis(spec: dict) -> dict:
    """Where offloaded tokens leave the resident ones on this device: the resident engine run
    twice (is it deterministic?), offloaded with each prefill mode and with every expert
    preloaded (program structure alone, no cache), and the expert computations bitwise."""
    from bench import models
    from jaxmoe.engine import OffloadedEngine, ResidentEngine

    check_jax_backend(spec["gpu"])
    m, dtype, seed = model_spec(spec), spec["dtype"], spec["seed"]
    cfg, model, store = models.build(m, dtype, seed, spec["gpu"], offload=True)
    result = {"parts": expert_parts(cfg, seed), "versions": jax_versions()}
    _save_partial(spec, result)
    ps, new = prompts(spec, cfg.vocab_size), spec["new_tokens"]
    resident = ResidentEngine(cfg, model, models.random_resident(cfg, seed))
    ref = resident.generate(ps, new).token_ids
    runs = {"resident_again": resident.generate(ps, new).token_ids}
    del resident
    everything = len(store.keys()) * store.expert_bytes
    for name, budget, kw in (("stream", spec["budget_bytes"], {"prefill": "stream"}),
                             ("routed", spec["budget_bytes"], {"prefill": "routed"}),
                             ("all_experts_preloaded", everything, {})):  # fmt: skip
        engine = OffloadedEngine(cfg, model, store, budget, "lru", **kw)
        runs[name] = engine.generate(ps, new).token_ids
        del engine
    result["agree_with_resident"] = {name: _agree(tokens, ref) for name, tokens in runs.items()}
    result["new_tokens"] = new
    log(f"exact diagnosis: {result}")
    return result


# -- prefill modes -----------------------------------------------------------------
def worker_prefill_modes(spec: dict) -> dict:
    """TTFT of the resident engine and of each offloaded prefill mode at each prompt length,
    one model build for all (peak memory is not measured here: the decode rows do that)."""
    import jax

    from bench import models
    from jaxmoe.engine import OffloadedEngine, ResidentEngine

    check_jax_backend(spec["gpu"])
    m, dtype, seed = model_spec(spec), spec["dtype"], spec["seed"]
    cfg, model, store = models.build(m, dtype, seed, spec["gpu"], offload=True)
    rows: list[dict] = []
    result = {"rows": rows, "expert_bytes": store.expert_bytes, "versions": jax_versions()}
    lengths = spec["prompt_lengths"]

    def ids(n):
        return prompts({**spec, "prompt_tokens": n, "batch": 1}, cfg.vocab_size)

    def timed(engine, n, before=None) -> dict:
        """Warm-up (compiles), then one timed run from a cold cache; 2 tokens: TTFT and one decode."""
        for _ in range(2):
            before and before()
            res = engine.generate(ids(n), 2)
        return {**{k: v for k, v in res.metrics.items() if k.startswith(("ttft", "prefill"))},
                "token_ids": res.token_ids}  # fmt: skip

    resident = ResidentEngine(cfg, model, models.random_resident(cfg, seed))
    reference = {}
    for n in lengths:
        r = timed(resident, n)
        reference[n] = r["token_ids"]
        rows.append({"engine": "resident", "prompt_tokens": n, **r})
        _save_partial(spec, result)
    del resident
    for mode in spec["modes"]:
        engine = OffloadedEngine(cfg, model, store, spec["budget_bytes"], "lru", **PREFILL_MODES[mode])
        for n in lengths:
            try:
                r = timed(engine, n, before=engine.reset_cache)
                r["tokens_equal_resident"] = r["token_ids"] == reference[n]
            except Exception as e:  # noqa: BLE001
                r = {"error": f"{type(e).__name__}: {e}"[:400]}
            rows.append({"engine": "offload", "mode": mode, "prompt_tokens": n, **r})
            log(f"prefill {mode} {n}: {rows[-1].get('ttft_ms')} ms")
            _save_partial(spec, result)
        engine.reset_cache()
        jax.block_until_ready(jax.numpy.zeros(()))
    return result


# -- phases of one offloaded decode step --------------------------------------------
def worker_phases(spec: dict) -> dict:
    """Decode `steps` tokens twice with the phase clock on: as the engine runs (host phases),
    then with a block after every program and copy (each one's device time); with
    `resident`, also the resident engine's decode step on the same weights."""
    from bench import models
    from jaxmoe.engine import ResidentEngine
    from jaxmoe.engine.offloaded import OffloadedEngine
    from jaxmoe.runtime.phases import PhaseClock
    from jaxmoe.predictor.store import load_scorer

    check_jax_backend(spec["gpu"])
    cfg, model, store = models.build(model_spec(spec), spec["dtype"], spec["seed"], spec["gpu"], offload=True)
    predictor = load_scorer(spec["predictor"], model) if spec["policy"] == "predictor" else None
    engine = OffloadedEngine(cfg, model, store, spec["budget_bytes"], spec["policy"], predictor=predictor)
    ps, steps = prompts(spec, cfg.vocab_size), spec["steps"]
    engine.generate(ps, 4)  # compiles every program
    out = {"steps": steps, "policy": spec["policy"], "budget_bytes": spec["budget_bytes"],
           "budget_spec": spec.get("budget_spec"), "versions": jax_versions()}  # fmt: skip
    for mode, sync in (("natural", False), ("synced", True)):
        engine.reset_cache()
        engine.clock = PhaseClock(enabled=True, sync=sync)
        at_prefill = {}

        def on_token(_):  # the first call follows the prefill: count decode steps only
            if not at_prefill:
                engine.clock.reset()
                at_prefill.update(dataclasses.asdict(engine.cache.counters))

        res = engine.generate(ps, steps + 1, on_token=on_token)
        c = {k: v - at_prefill[k] for k, v in dataclasses.asdict(engine.cache.counters).items()}
        m = res.metrics
        out[mode] = {"step_ms": m["tpot_ms"], "phases": engine.clock.per_step(steps),
                     "loads_per_step": c["expert_misses"] / steps, "hits_per_step": c["expert_hits"] / steps,
                     "prefetch_per_step": c["prefetch_issued"] / steps, "h2d_bytes_per_step": c["h2d_bytes"] / steps,
                     "host_syncs_per_token": m["host_syncs_per_token"],
                     "resumes_per_token": m["resumes_per_token"]}  # fmt: skip
        log(f"phases {mode}: {out[mode]}")
        _save_partial(spec, out)  # a worker killed later (its cap, teardown) keeps this pass
    out["expert_bytes"] = store.expert_bytes
    if spec.get("resident"):
        del engine
        resident = ResidentEngine(cfg, model, models.random_resident(cfg, spec["seed"]))
        resident.generate(ps, 4)  # compiles
        out["resident_step_ms"] = resident.generate(ps, steps + 1).metrics["tpot_ms"]
        log(f"phases resident: {out['resident_step_ms']:.2f} ms per step")
        _save_partial(spec, out)
    return out


# -- in-jit selective fetch probe ----------------------------------------------------
def _median_ms(fn, repeats: int = 7) -> float:
    import jax

    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _copy_lines(hlo: str) -> list[str]:
    """The HLO lines that move data out of host memory (S(5)): copy-starts, dynamic-slice-starts."""
    return [line.strip()[:240] for line in hlo.splitlines() if "copy-start" in line or "S(5)" in line and "slice" in line]


def _moved_shapes(lines: list[str]) -> list[str]:
    """The device-side result shape of each host -> device move: what it copies."""
    import re

    out = []
    for line in lines:
        m = re.search(r"\),\s*(\w+\[[\d,]*\])\{[^}]*\},\s*u32\[\]\)", line)
        out.append(m.group(1) if m else "?")
    return out


def worker_injit_probe(spec: dict) -> dict:
    """A pinned_host stack [E, D, F]; inside one jitted program pick `k` experts by device
    indices with lax.dynamic_index_in_dim, move each to device memory, use it. Compared with:
    the same math on a device-resident stack, one whole-stack copy, and (for asynchrony)
    independent heavy work in the same program with and without the fetch."""
    import jax
    import jax.numpy as jnp

    check_jax_backend(spec["gpu"])
    e, d, f, k = spec["experts"], spec["hidden"], spec["width"], spec["picks"]
    dev = jax.devices()[0]
    host = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
    device = jax.sharding.SingleDeviceSharding(dev, memory_kind="device")
    stack_dev = jax.random.normal(jax.random.key(1), (e, d, f), jnp.bfloat16)
    stack_host = jax.device_put(stack_dev, host)
    x = jax.random.normal(jax.random.key(2), (1, d), jnp.bfloat16)
    ids = jnp.arange(k, dtype=jnp.int32) * (e // k)  # k distinct experts
    heavy_n = spec["heavy"]
    big = jax.random.normal(jax.random.key(3), (heavy_n, heavy_n), jnp.bfloat16)
    slice_bytes, stack_bytes = d * f * 2, e * d * f * 2
    out = {"stack_bytes": stack_bytes, "slice_bytes": slice_bytes, "picks": k, "versions": jax_versions()}

    def use(w, x, ids, big, fetch, heavy):
        acc = jnp.zeros((1, f), jnp.float32)
        for j in range(k):
            we = jax.lax.dynamic_index_in_dim(w, ids[j], keepdims=False)
            if fetch:
                we = jax.device_put(we, jax.memory.Space.Device)
            acc = acc + (x @ we).astype(jnp.float32)
        if not heavy:
            return acc, jnp.zeros((), big.dtype)
        # Independent of the fetch (so it could run while the copies do), and returned so that
        # XLA keeps it.
        y = jax.lax.fori_loop(0, 4, lambda i, y: (y @ big) * 0.01, big)
        return acc, y[0, 0]

    def compiled(fetch, heavy, lhs, w):
        fn = jax.jit(lambda w, x, i, b: use(w, x, i, b, fetch, heavy),
                     in_shardings=(host if fetch else device, device, device, device),
                     out_shardings=(device, device))  # fmt: skip
        opts = {"xla_gpu_enable_latency_hiding_scheduler": lhs} if spec["gpu"] else {}
        return fn.lower(w, x, ids, big).compile(compiler_options=opts)

    reference, reference_heavy = compiled(False, False, False, stack_dev), compiled(False, True, False, stack_dev)
    want = reference(stack_dev, x, ids, big)[0]
    out["resident_ms"] = _median_ms(lambda: reference(stack_dev, x, ids, big))
    out["resident_heavy_ms"] = _median_ms(lambda: reference_heavy(stack_dev, x, ids, big))
    out["whole_stack_copy_ms"] = _median_ms(lambda: jax.device_put(stack_host, device))
    out["k_slices_copy_ms"] = _median_ms(lambda: jax.device_put([stack_host[int(i)] for i in ids], device))
    variants = {}
    for lhs in (False, True) if spec["gpu"] else (False,):
        for heavy in (False, True):
            tag = f"lhs{int(lhs)}_heavy{int(heavy)}"
            try:
                prog = compiled(True, heavy, lhs, stack_host)
                got = prog(stack_host, x, ids, big)
                hlo = prog.as_text()
                variants[tag] = {
                    "ms": _median_ms(lambda: prog(stack_host, x, ids, big)),
                    "max_abs_diff": float(jnp.max(jnp.abs(got[0] - want))),
                    "copy_starts": hlo.count("copy-start"), "copy_lines": _copy_lines(hlo)[:2],
                    "moved_shapes": sorted(set(_moved_shapes(_copy_lines(hlo)))),
                }  # fmt: skip
            except Exception as err:  # noqa: BLE001  an unsupported pattern is the answer, not a crash
                variants[tag] = {"error": f"{type(err).__name__}: {err}"[:400]}
            log(f"injit {tag}: {variants[tag]}")
    out["variants"] = variants
    out["answer"] = injit_answer(out)
    return out


def injit_answer(out: dict) -> dict:
    """Selective: the fetch costs about k slices, well under one whole-stack copy. Asynchronous:
    with independent heavy work, fetch + heavy takes clearly less than their sum."""
    v = out["variants"]
    plain = [x for t, x in v.items() if t.endswith("heavy0") and "ms" in x]
    heavy = [(t, x) for t, x in v.items() if t.endswith("heavy1") and "ms" in x]
    if not plain:
        return {"selective": None, "asynchronous": None, "why": "no in-jit fetch variant compiled and ran"}
    fetch_ms = min(x["ms"] for x in plain) - out["resident_ms"]
    selective = fetch_ms < 0.5 * out["whole_stack_copy_ms"]
    serial = out["resident_heavy_ms"] + fetch_ms
    best = min(heavy, key=lambda tx: tx[1]["ms"]) if heavy else None
    overlap = best and serial - best[1]["ms"]
    return {
        "selective": selective, "fetch_ms": fetch_ms, "whole_stack_copy_ms": out["whole_stack_copy_ms"],
        "k_slices_copy_ms": out["k_slices_copy_ms"],
        "asynchronous": bool(overlap is not None and overlap > 0.5 * fetch_ms) if best else None,
        "hidden_ms": overlap, "best_heavy_variant": best and best[0],
    }  # fmt: skip


# -- the host cost of calling a compiled program, by its number of arguments -------------
def worker_call_cost(spec: dict) -> dict:
    """A compiled program that adds one to its first argument, called with n small device
    arrays, half of them donated (as the step program donates its cache and pool) and then
    none: the median host time of the call (until it returns) and of the call plus its
    completion."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    check_jax_backend(spec["gpu"])
    rows = []
    for n, donating in ((n, donating) for donating in (True, False) for n in spec["arguments"]):
        args = [jnp.ones((4,), jnp.float32) for _ in range(n)]
        donate = tuple(range(n // 2, n)) if donating else ()
        program = jax.jit(lambda *a: (a[0] + 1, *a[n // 2 :]), donate_argnums=donate).lower(*args).compile()
        calls, completed = [], []
        for i in range(spec["repeats"] + 5):
            start = time.perf_counter()
            out = program(*args)
            returned = time.perf_counter()
            jax.block_until_ready(out)
            if i >= 5:  # after a warm-up
                calls.append(returned - start)
                completed.append(time.perf_counter() - start)
            args = [out[0], *args[1 : n // 2], *out[1:]]  # the donated ones come back as outputs
        rows.append({"arguments": n, "donated": len(donate), "call_ms": 1e3 * float(np.median(calls)),
                     "call_and_done_ms": 1e3 * float(np.median(completed))})  # fmt: skip
        log(f"call cost {rows[-1]}")
    return {"rows": rows, "versions": jax_versions()}


# -- a profile of the decode ---------------------------------------------------------
def worker_decode_profile(spec: dict) -> dict:
    """A profiler trace of `steps` decode tokens (the prefill left out) of the offloaded
    engine (lru at the budget), then of the resident engine on the same weights, each
    summarised (bench/trace_summary.py); the perfetto traces are kept in `trace_out`."""
    import shutil
    import tempfile

    import jax

    from bench import models
    from bench.trace_summary import summarize
    from jaxmoe.engine import OffloadedEngine, ResidentEngine

    check_jax_backend(spec["gpu"])
    cfg, model, store = models.build(model_spec(spec), spec["dtype"], spec["seed"], spec["gpu"], offload=True)
    ps, steps, keep_dir = prompts(spec, cfg.vocab_size), spec["steps"], Path(spec["trace_out"])
    keep_dir.mkdir(parents=True, exist_ok=True)
    result = {"steps": steps, "budget_bytes": spec["budget_bytes"], "budget_spec": spec.get("budget_spec"),
              "versions": jax_versions(), "traces": {}}  # fmt: skip

    def traced(name: str, engine) -> dict:
        engine.generate(ps, 4)  # compiles every program
        raw, started = Path(tempfile.mkdtemp(prefix=f"jaxmoe-trace-{name}-")), []

        def on_token(_):  # the first call follows the prefill: trace the decode steps only
            if not started:
                jax.profiler.start_trace(str(raw), create_perfetto_trace=True)
                started.append(True)

        try:
            metrics = engine.generate(ps, steps + 1, on_token=on_token).metrics
        finally:
            if started:
                jax.profiler.stop_trace()
        found = sorted(raw.rglob("perfetto_trace.json.gz"))
        if not found:
            raise RuntimeError(f"the profiler wrote no perfetto trace under {raw}")
        kept = keep_dir / f"{name}.perfetto.json.gz"
        shutil.copyfile(found[0], kept)
        shutil.rmtree(raw, ignore_errors=True)
        counts = {k: metrics[k] for k in ("host_syncs_per_token", "resumes_per_token") if k in metrics}
        summary = {"file": kept.name, "tokens": steps, "tpot_ms_under_profiler": metrics["tpot_ms"], **counts,
                   **summarize(kept)}  # fmt: skip
        log(f"decode profile {name}: " + ", ".join(f"{p['name']} span {p['span_ms']} ms busy {p['busy_ms']} ms"
                                                   for p in summary["processes"]))  # fmt: skip
        return summary

    result["traces"]["offloaded"] = traced("offloaded", OffloadedEngine(cfg, model, store, spec["budget_bytes"], "lru"))
    _save_partial(spec, result)
    resident = ResidentEngine(cfg, model, models.random_resident(cfg, spec["seed"]))
    result["traces"]["resident"] = traced("resident", resident)
    return result

