"""One benchmark configuration per process (so its peak memory is its own).

`run(spec)` takes the job's settings (bench/matrix.py) and returns a JSON-able
result: the timed runs' medians, per-step latencies, the engine's counters, sizes
and versions; a failure is returned as {"error": ...}.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
import traceback

from bench import budgets as B
from bench import check_workers as check
from bench import stats
from bench.common import check_jax_backend, jax_versions, log, model_spec, prompts


def timed_runs(generate, repeats: int, warmup=None) -> dict:
    """Warm up once, then `repeats` timed runs: per-metric medians, raw decode rates, per-step
    latency percentiles pooled over the runs (from each run's token timestamps), the last run."""
    (warmup or generate)()  # compilation (jaxmoe), allocator and kernel selection (torch)
    runs = [generate() for _ in range(repeats)]
    timed = ("ttft_ms", "tpot_ms", "decode_tokens_per_s", "stall_ms", "decode_stall_ms", "prefill_stall_ms")
    out = {k: statistics.median(r[k] for r in runs) for k in timed if runs[0].get(k) is not None}
    latencies = [stats.step_latencies_ms(r.pop("token_times")) for r in runs]
    return {**runs[-1], **out, **stats.latency_summary(latencies),
            "decode_tokens_per_s_runs": [r["decode_tokens_per_s"] for r in runs],
            "tpot_ms_runs": [r["tpot_ms"] for r in runs]}  # fmt: skip


def device_name(gpu: bool) -> str:
    if gpu:
        import torch

        return torch.cuda.get_device_name(0)
    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
    return f"CPU {model or platform.processor()} ({os.cpu_count()} cores)"


def torch_versions() -> dict:
    import torch

    return {"torch": torch.__version__, "transformers": __import__("transformers").__version__}


def stamped(engine_generate, spec: dict, vocab: int, **kw) -> dict:
    """One jaxmoe generate with a timestamp per step from its on_token callback."""
    import time as _time

    times: list[float] = []
    extra = kw.pop("on_token", None)

    def on_token(n):
        times.append(_time.perf_counter())
        if extra:
            extra(n)

    if spec.get("temperature"):  # sampled: every run and row kind draws with the same key
        from jaxmoe.engine.sampling import SamplingParams

        kw |= {"sampling": SamplingParams(temperature=spec["temperature"]), "seed": spec["seed"]}
    res = engine_generate(prompts(spec, vocab), spec["new_tokens"], on_token=on_token, **kw)
    return {**res.metrics, "token_ids": res.token_ids, "token_times": times}


# -- workers -------------------------------------------------------------------
def torch_model(spec: dict):
    """The transformers model of this row, on the GPU with --gpu (every "hf" row uses CUDA's RNG)."""
    import torch

    from bench.peers import hf_transformers as hf

    if spec["gpu"] and not torch.cuda.is_available():
        raise SystemExit("--gpu: torch sees no CUDA device")
    device = "cuda" if spec["gpu"] and spec.get("torch_device", "cuda") == "cuda" else "cpu"
    return hf.build(hf.config(model_spec(spec).hf_fields(spec["dtype"])), spec["seed"], device)


def worker_hf(spec: dict) -> dict:
    import torch

    from bench.peers import hf_transformers as hf

    if spec["cpu_threads"]:
        torch.set_num_threads(spec["cpu_threads"])
    model = torch_model(spec)
    log(f"hf: {hf.weight_bytes(model) / 1e9:.3f} GB of weights on {model.device}")
    if spec["gpu"]:
        torch.cuda.reset_peak_memory_stats()
    vocab = model.config.vocab_size
    out = timed_runs(lambda: hf.generate(model, prompts(spec, vocab), spec["new_tokens"]), spec["repeats"])
    cfg = model_spec(spec).config(spec["dtype"])
    kv = B.kv_bytes(cfg, spec["batch"], spec["prompt_tokens"], spec["new_tokens"])
    peak = torch.cuda.max_memory_allocated() if spec["gpu"] else hf.weight_bytes(model) + kv
    return {**out, "peak_device_bytes": peak, "expert_bytes": hf.expert_bytes(model), "compile_ms": None,
            "versions": torch_versions()}  # fmt: skip


def worker_hf_accelerate(spec: dict) -> dict:
    from bench.peers import hf_accelerate as hfa

    reason = hfa.unavailable(spec["gpu"])
    if reason:
        return {"skipped": reason}
    import torch

    from bench.peers import hf_transformers as hf

    if not torch.cuda.is_available():
        return {"skipped": "torch sees no CUDA device"}
    model = torch_model(spec).to("cpu")  # built where the "hf" rows build it (same weights), then moved off
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model, placement = hfa.dispatch(model, spec["device_budget_bytes"])
    log(f"hf-accelerate: {placement['layers_on_device']} of {placement['layers']} layers on the GPU "
        f"at max_memory {spec['device_budget_bytes'] / B.GIB:g} GiB")  # fmt: skip
    vocab = model.config.vocab_size
    run = lambda n: hf.generate(model, prompts(spec, vocab), n, device="cuda")  # noqa: E731
    out = timed_runs(lambda: run(spec["new_tokens"]), spec["repeats"], warmup=lambda: run(2))
    # TTFT at other prompt lengths (the GPU check's prefill table): one token each, after a warm-up.
    ttft = {}
    for n in spec.get("prefill_tokens", ()):
        ids = prompts({**spec, "prompt_tokens": n}, vocab)
        hf.generate(model, ids, 1, device="cuda")
        ttft[str(n)] = hf.generate(model, ids, 1, device="cuda")["ttft_ms"]
    versions = {**torch_versions(), "accelerate": __import__("accelerate").__version__}
    return {**out, "peak_device_bytes": torch.cuda.max_memory_allocated(), "expert_bytes": None,
            "compile_ms": None, "placement": placement, "versions": versions, "ttft_ms_at": ttft}  # fmt: skip


def after_build() -> dict:
    """Device memory once the model is built: what the peak owes to building it, not generating."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return {"device_bytes_after_build": stats.get("bytes_in_use"), "device_peak_after_build": stats.get("peak_bytes_in_use")}


def worker_jaxmoe(spec: dict) -> dict:
    from bench import models
    from jaxmoe.engine import ResidentEngine
    from jaxmoe.runtime.metrics import tree_bytes

    check_jax_backend(spec["gpu"])
    cfg, model, experts = models.build(model_spec(spec), spec["dtype"], spec["seed"], spec["gpu"], offload=False)
    built = after_build()
    engine = ResidentEngine(cfg, model, experts, own_model=True)
    out = timed_runs(lambda: stamped(engine.generate, spec, cfg.vocab_size), spec["repeats"])
    return {**out, **built, "expert_bytes": tree_bytes(experts), "versions": jax_versions()}


def plan_counts(plan, metrics: dict) -> dict:
    """Loads and hits of the decode (the engine's decode counters: a decode on the device plans
    nothing on the host; prefetches count as loads) and of the prefill's executed plan (step 0);
    evictions are the host-planned passes' (a decode on the device does not count them)."""
    prefill = [p for p in plan if p.step == 0]
    return {
        "decode_steps": metrics["decode_steps"],
        "decode_loads": metrics["decode_expert_loads"],
        "decode_hits": metrics["decode_expert_hits"],
        "prefill_loads": sum(len(p.loads) for p in prefill),
        "prefill_passes": len([p for p in prefill if p.kind == "demand"]),
        "evictions": sum(len(p.evicted) for p in plan),
    }


def worker_offload(spec: dict) -> dict:
    from bench import models
    from jaxmoe.engine.offloaded import OffloadedEngine
    from jaxmoe.predictor.store import load_scorer

    check_jax_backend(spec["gpu"])
    cfg, model, store = models.build(model_spec(spec), spec["dtype"], spec["seed"], spec["gpu"], offload=True)
    built = after_build()
    predictor = load_scorer(spec["predictor"], model) if spec["policy"] == "predictor" else None
    engine = OffloadedEngine(cfg, model, store, spec["budget_bytes"], spec["policy"], predictor=predictor,
                             own_model=True, **spec.get("engine_kwargs", {}))  # fmt: skip

    def run():
        engine.reset_cache()  # a cold cache every run: no contents or use counts from the run before
        return stamped(engine.generate, spec, cfg.vocab_size)  # metrics: prefill and decode stall apart

    out = timed_runs(run, spec["repeats"])
    kv = B.kv_bytes(cfg, spec["batch"], spec["prompt_tokens"], spec["new_tokens"])
    return {**out, **plan_counts(engine.plan, out), **built, "expert_bytes": store.expert_bytes,
            "dense_bytes": engine.dense_bytes, "kv_bytes": kv, "versions": jax_versions()}  # fmt: skip


def worker_bandwidth(spec: dict) -> dict:
    """Pinned H2D bandwidth with buffers the size of this model's experts (in its format), for
    one expert and for each decode demand (batch x top-k experts of one layer) in one call."""
    from bench import bandwidth

    check_jax_backend(spec["gpu"])
    m = model_spec(spec)
    cfg = m.config(spec["dtype"])
    by_demand = {}
    for n in spec["demands"]:
        by_demand[str(n)] = bandwidth.measure(B.expert_bytes(cfg, m.fmt()), n, seed=spec["seed"])
        b = by_demand[str(n)]
        log(f"bandwidth {cfg.dtype}: one expert {b['expert_bytes'] / 1e6:.2f} MB {b['one_expert_GBps']:.2f} GB/s; "
            f"{n} in one call {b['batched_GBps']:.2f} GB/s")  # fmt: skip
    return {"bandwidth": by_demand, "versions": jax_versions()}


# Every worker a job may name (Job.worker): the benchmark's, then the GPU check's.
WORKERS = {
    "jaxmoe": worker_jaxmoe, "hf": worker_hf, "hf-accelerate": worker_hf_accelerate, "offload": worker_offload,
    "bandwidth": worker_bandwidth,
    "environment": check.worker_environment, "exactness": check.worker_exactness,
    "prefill_modes": check.worker_prefill_modes, "phases": check.worker_phases, "injit_probe": check.worker_injit_probe,
    "call_cost": check.worker_call_cost, "exact_diagnosis": check.worker_exact_diagnosis,
    "decode_profile": check.worker_decode_profile,
}  # fmt: skip


def run(spec: dict) -> dict:
    load = os.getloadavg()[0]  # the machine may be shared: record how busy it was
    start = time.perf_counter()
    try:
        result = WORKERS[spec["worker"]](spec)
    except BaseException as e:  # the report names the failure instead of "status 1"
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}".strip()[:500]}
    return result | {"device": device_name(spec["gpu"]), "peak_device_measured": spec["gpu"],
                     "loadavg_at_start": load, "worker_s": time.perf_counter() - start,
                     "peak_host_rss_bytes": 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}  # fmt: skip
