"""Benchmark matrix: jaxmoe (resident and offloaded) vs peers on random-weight MoE models, one process per row.

  python scripts/bench.py         small OLMoE-like shape on CPU: resident and transformers (fp32, bf16),
                                  ondemand/lru/lfu offload (bf16) at 0.25 and 0.5 of all experts, and
                                  the offloaded engine with every expert preloaded
  python scripts/bench.py --gpu   OLMoE-1B-7B shape, bf16: resident jaxmoe and transformers, and
                                  within a 5 GiB device budget transformers + accelerate and
                                  ondemand/lru/lfu offload (plus the preloaded offloaded engine)
  [--engines jaxmoe,hf,hf-accelerate] [--policies ondemand,lru,lfu] [--budgets 0.25,0.5,3.8GB,4GiB,auto]
  [--device-budget-gib 5] [--workspace-gib G] [--offload-dtypes D] [--new-tokens N] [--repeats R]
  [--accelerate-new-tokens N] [--accelerate-repeats R] [--prompt-tokens P] [--batch B]
  [--dtypes float32,bfloat16] [--cpu-threads T] [--seed S] [--out-dir docs/bench]
  [--resume] [--stop-after SECONDS] [--worker-timeout SECONDS] [--json]

Every engine is built from one Hugging Face config and torch seed (jaxmoe's weights
are assembled from the transformers model's state dict), gets the same random
prompt, decodes greedily, and is timed after a warm-up generate, so compilation is
excluded (reported as compile_ms). Each configuration runs in its own subprocess
(`--worker`) so its peak memory is its own; the first worker measures the pinned
host -> device bandwidth that the offload rows' bound uses. Worker results are kept
under OUT_DIR/raw-{cpu,gpu}/; `--resume` reuses those with the same settings and
`--stop-after` starts no new worker after that many seconds, so a long matrix can
be finished over several commands. Writes results-{cpu,gpu}.json and .md under
--out-dir; logs go to stderr; with --json, stdout is exactly one JSON object
{"device", "rows": [...], ...}. Exit status: 0 all rows ran and agree, 1 a row
failed, 2 an offloaded row's tokens differ from resident, 3 rows left to run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import budgets as B  # noqa: E402
from bench.report import make_report, markdown  # noqa: E402

# Hugging Face OlmoeConfig fields. "olmoe-1b-7b" is allenai/OLMoE-1B-7B's shape (6.92 B params).
SHAPES = {
    "olmoe-small": dict(
        vocab_size=1024, hidden_size=256, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, num_experts=16, num_experts_per_tok=4,
        max_position_embeddings=4096,
    ),
    "olmoe-1b-7b": dict(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
        max_position_embeddings=4096,
    ),
}  # fmt: skip
ENGINES = ("jaxmoe", "hf", "hf-accelerate")
POLICIES = ("ondemand", "lru", "lfu")
WORKERS = ENGINES + ("offload", "bandwidth")


def log(*parts) -> None:
    print("[bench]", *parts, file=sys.stderr, flush=True)


def _list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", action="store_true", help="OLMoE-1B-7B shape on the GPU (default: small shape on CPU)")
    p.add_argument("--shape", choices=sorted(SHAPES), help="override the shape --gpu selects")
    p.add_argument("--dtypes", help="comma list; default float32,bfloat16 on CPU, bfloat16 on GPU")
    p.add_argument("--offload-dtypes", help="dtypes of the offload rows (default bfloat16 if in --dtypes, else all)")
    p.add_argument("--engines", default=",".join(ENGINES), help="comma list of: " + ",".join(ENGINES))
    p.add_argument("--policies", default=",".join(POLICIES), help="offload policies, comma list ('' for none)")
    p.add_argument("--budgets", help="expert budgets, comma list of: fractions of all experts (0.25), NGB "
                   "(N x 10^9 bytes), NGiB, auto (fit --device-budget-gib); default 0.25,0.5,1 CPU, auto,1 GPU")
    p.add_argument("--device-budget-gib", type=float, default=5.0,
                   help="device memory of the budget-bound rows: accelerate's max_memory, and 'auto'")
    p.add_argument("--workspace-gib", type=float,
                   help="'auto': memory kept for activations (default: estimated from the prefill expert pass)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, help="tokens per timed run (>= 2); default 64 CPU, 128 GPU")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row after the warm-up")
    p.add_argument("--accelerate-new-tokens", type=int, default=16,
                   help="new tokens for the accelerate peer (0.72 tok/s on an H100: 128 tokens is 3 min)")
    p.add_argument("--accelerate-repeats", type=int, default=1)
    p.add_argument("--cpu-threads", type=int, help="threads per worker on CPU (default 1; 0: library defaults)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(ROOT / "docs" / "bench"))
    p.add_argument("--resume", action="store_true", help="reuse results under OUT_DIR/raw-* with the same settings")
    p.add_argument("--stop-after", type=float, help="start no worker after this many seconds (then exit 3)")
    p.add_argument("--worker-timeout", type=float, default=480.0, help="seconds before a worker is killed")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--policy", help=argparse.SUPPRESS)
    p.add_argument("--budget-bytes", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.shape = args.shape or ("olmoe-1b-7b" if args.gpu else "olmoe-small")
    args.dtypes = _list(args.dtypes or ("bfloat16" if args.gpu else "float32,bfloat16"))
    args.engines, args.policies = _list(args.engines), _list(args.policies)
    default = ["bfloat16"] if "bfloat16" in args.dtypes else args.dtypes
    args.offload_dtypes = _list(args.offload_dtypes) if args.offload_dtypes is not None else default
    for bad in set(args.offload_dtypes) - set(args.dtypes):
        p.error(f"--offload-dtypes: {bad!r} is not in --dtypes")
    for bad in set(args.engines) - set(ENGINES):
        p.error(f"--engines: unknown engine {bad!r}; choose from {', '.join(ENGINES)}")
    for bad in set(args.policies) - set(POLICIES):
        p.error(f"--policies: unknown policy {bad!r}; choose from {', '.join(POLICIES)}")
    args.budgets = args.budgets or ("auto,1" if args.gpu else "0.25,0.5,1")
    args.new_tokens = args.new_tokens or (128 if args.gpu else 64)
    if args.cpu_threads is None:
        args.cpu_threads = 0 if args.gpu else 1
    if min(args.new_tokens, args.accelerate_new_tokens) < 2:
        p.error("new-token counts must be >= 2 (decode rate needs a token after the first)")
    args.device_budget_bytes = int(args.device_budget_gib * B.GIB)
    return args


def prompts(args) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(args.seed)
    return rng.integers(0, SHAPES[args.shape]["vocab_size"], (args.batch, args.prompt_tokens)).tolist()


# -- workers: one configuration per process --------------------------------------
def timed_runs(generate, repeats: int, warmup=None) -> dict:
    """Warm up once, then `repeats` timed runs: per-metric medians, the raw decode rates, the last run."""
    import statistics

    (warmup or generate)()  # compilation (jaxmoe), allocator and kernel selection (torch)
    runs = [generate() for _ in range(repeats)]
    timed = ("ttft_ms", "tpot_ms", "decode_tokens_per_s", "stall_ms", "decode_stall_ms")
    out = {k: statistics.median(r[k] for r in runs) for k in timed if runs[0].get(k) is not None}
    return {**runs[-1], **out, "decode_tokens_per_s_runs": [r["decode_tokens_per_s"] for r in runs],
            "tpot_ms_runs": [r["tpot_ms"] for r in runs]}


def device_name(gpu: bool) -> str:
    if gpu:
        import torch

        return torch.cuda.get_device_name(0)
    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
    return f"CPU {model or platform.processor()} ({os.cpu_count()} cores)"


def hf_model(args):
    """The transformers model every worker starts from (on the GPU with --gpu: all use CUDA's RNG)."""
    from bench.peers import hf_transformers as hf

    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--gpu: torch sees no CUDA device")
    cfg = hf.olmoe_config(SHAPES[args.shape], args.dtypes[0])
    return hf.build(cfg, args.seed, "cuda" if args.gpu else "cpu")


def torch_versions() -> dict:
    import torch

    return {"torch": torch.__version__, "transformers": __import__("transformers").__version__}


def jax_versions() -> dict:
    import jax

    return {"jax": jax.__version__, "flax": __import__("flax").__version__, "backend": jax.default_backend()}


def worker_hf(args) -> dict:
    import torch

    from bench.peers import hf_transformers as hf

    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    model = hf_model(args)
    log(f"hf: {hf.weight_bytes(model) / 1e9:.3f} GB of weights on {model.device}")
    if args.gpu:
        torch.cuda.reset_peak_memory_stats()
    out = timed_runs(lambda: hf.generate(model, prompts(args), args.new_tokens), args.repeats)
    c = model.config
    kv = 2 * c.num_hidden_layers * args.batch * (args.prompt_tokens + args.new_tokens) * c.hidden_size
    peak = torch.cuda.max_memory_allocated() if args.gpu else hf.weight_bytes(model) + kv * model.dtype.itemsize
    return {**out, "peak_device_bytes": peak, "expert_bytes": hf.expert_bytes(model), "compile_ms": None,
            "versions": torch_versions()}  # fmt: skip


def worker_hf_accelerate(args) -> dict:
    from bench.peers import hf_accelerate as hfa

    reason = hfa.unavailable(args.gpu)
    if reason:
        return {"skipped": reason}
    import torch

    from bench.peers import hf_transformers as hf

    if not torch.cuda.is_available():
        return {"skipped": "torch sees no CUDA device"}
    model = hf_model(args).to("cpu")  # built on the GPU like every row (same weights), then moved off it
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model, placement = hfa.dispatch(model, args.device_budget_bytes)
    log(f"hf-accelerate: {placement['layers_on_device']} of {placement['layers']} layers on the GPU "
        f"at max_memory {args.device_budget_bytes / B.GIB:g} GiB")  # fmt: skip
    run = lambda n: hf.generate(model, prompts(args), n, device="cuda")  # noqa: E731
    out = timed_runs(lambda: run(args.new_tokens), args.repeats, warmup=lambda: run(2))
    versions = {**torch_versions(), "accelerate": __import__("accelerate").__version__}
    return {**out, "peak_device_bytes": torch.cuda.max_memory_allocated(), "expert_bytes": None,
            "compile_ms": None, "placement": placement, "versions": versions}  # fmt: skip


def jaxmoe_parts(args):
    """(config, model with its dense weights on the device, per-layer expert stacks in numpy),
    assembled from the transformers model's state dict."""
    import jax

    if args.gpu and jax.default_backend() != "gpu":
        raise SystemExit(f"--gpu: jax backend is {jax.default_backend()!r}, not gpu")
    import torch

    from bench.peers import hf_transformers as hf
    from jaxmoe.checkpoint.assemble import assemble
    from jaxmoe.config import from_hf_dict
    from jaxmoe.model import build_model

    torch_model = hf_model(args)
    cfg = from_hf_dict(torch_model.config.to_dict(), source=f"{args.shape} (transformers config)")
    dense, experts = assemble(cfg, *hf.tensors(torch_model), source=f"{args.shape} random state dict")
    del torch_model
    if args.gpu:
        torch.cuda.empty_cache()  # torch's copy is gone before jax allocates its own
    return cfg, build_model(cfg, dense), list(experts)


def worker_jaxmoe(args) -> dict:
    import jax

    from jaxmoe.engine import ResidentEngine
    from jaxmoe.engine.metrics import tree_bytes

    cfg, model, experts = jaxmoe_parts(args)
    experts = jax.device_put(experts)
    engine = ResidentEngine(cfg, model, experts)

    def run():
        res = engine.generate(prompts(args), args.new_tokens)
        return {**res.metrics, "token_ids": res.token_ids}

    out = timed_runs(run, args.repeats)
    return {**out, "expert_bytes": tree_bytes(experts), "versions": jax_versions()}


def plan_counts(plan) -> dict:
    """Loads and hits of the executed plan, prefill (step 0) apart from decode (steps >= 1)."""
    decode = [p for p in plan if p.step >= 1]
    prefill = [p for p in plan if p.step == 0]
    return {
        "decode_steps": max((p.step for p in plan), default=0),
        "decode_loads": sum(len(p.loads) for p in decode),
        "decode_hits": sum(len(p.hits) for p in decode),
        "prefill_loads": sum(len(p.loads) for p in prefill),
        "prefill_passes": len(prefill),
        "evictions": sum(len(p.evicted) for p in plan),
    }


def worker_offload(args) -> dict:
    from jaxmoe.engine.offloaded import OffloadedEngine
    from jaxmoe.offload.host_store import HostExpertStore

    cfg, model, experts = jaxmoe_parts(args)
    # Hand the stacks over without keeping a reference: from_stacks frees each layer's
    # numpy stack once it is in pinned memory, so the host holds one extra layer at most.
    store = HostExpertStore.from_stacks(cfg, (experts.pop(0) for _ in range(len(experts))))
    engine = OffloadedEngine(cfg, model, store, args.budget_bytes, args.policy)

    def run():
        engine.cache = None  # a cold cache every run: no contents or use counts from the run before
        at_first_token = {}

        def on_token(_):  # called first right after the prefill's token: its stall so far is the prefill's
            if not at_first_token:
                at_first_token["stall_ms"] = 1e3 * engine.cache.counters.stall_s

        res = engine.generate(prompts(args), args.new_tokens, on_token=on_token)
        m = res.metrics
        return {**m, "token_ids": res.token_ids, "prefill_stall_ms": at_first_token["stall_ms"],
                "decode_stall_ms": m["stall_ms"] - at_first_token["stall_ms"]}  # fmt: skip

    out = timed_runs(run, args.repeats)
    kv = B.kv_bytes(SHAPES[args.shape], args.dtypes[0], args.batch, args.prompt_tokens, args.new_tokens)
    return {**out, **plan_counts(engine.plan), "expert_bytes": store.expert_bytes, "dense_bytes": engine.dense_bytes,
            "kv_bytes": kv, "versions": jax_versions()}  # fmt: skip


def worker_bandwidth(args) -> dict:
    import jax

    from bench import bandwidth

    if args.gpu and jax.default_backend() != "gpu":
        raise SystemExit(f"--gpu: jax backend is {jax.default_backend()!r}, not gpu")
    s = SHAPES[args.shape]
    batched = min(s["num_experts"], args.batch * s["num_experts_per_tok"])  # one layer's decode demand
    by_dtype = {}
    for dtype in args.dtypes:
        by_dtype[dtype] = bandwidth.measure(s["hidden_size"], s["intermediate_size"], dtype, batched, seed=args.seed)
        b = by_dtype[dtype]
        log(f"bandwidth {dtype}: one expert {b['expert_bytes'] / 1e6:.2f} MB {b['one_expert_GBps']:.2f} GB/s; "
            f"{batched} in one call {b['batched_GBps']:.2f} GB/s")  # fmt: skip
    return {"bandwidth": by_dtype, "versions": jax_versions()}


def run_worker_here(args) -> int:
    load = os.getloadavg()[0]  # the machine may be shared: record how busy it was
    fn = {"jaxmoe": worker_jaxmoe, "hf": worker_hf, "hf-accelerate": worker_hf_accelerate,
          "offload": worker_offload, "bandwidth": worker_bandwidth}[args.worker]  # fmt: skip
    try:
        result = fn(args)
    except BaseException as e:  # the report names the failure instead of "status 1"
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}".strip()[:500]}
    result |= {"device": device_name(args.gpu), "peak_device_measured": args.gpu, "loadavg_at_start": load,
               "peak_host_rss_bytes": 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}  # fmt: skip
    Path(args.result).write_text(json.dumps(result))
    return 1 if "error" in result else 0


# -- orchestration ----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Job:
    worker: str  # one of WORKERS
    dtype: str  # bandwidth: every dtype, comma-joined
    policy: str | None = None  # offload rows
    budget: B.Budget | None = None  # offload rows

    @property
    def key(self) -> str:
        tail = f"-{self.policy}-{self.budget.bytes}" if self.budget else ""
        return f"{self.worker}-{self.dtype.replace(',', '+')}{tail}"


def jobs(args, budgets: dict[str, list[B.Budget]]) -> list[Job]:
    """Bandwidth first (the bound needs it), then resident and peers, then each policy x budget.
    A budget that holds every expert preloads them all and never evicts: one row, whatever the policy
    (it measures the offloaded engine's own cost, with no transfers)."""
    out = [Job("bandwidth", ",".join(args.offload_dtypes))] if args.policies and any(budgets.values()) else []
    total = B.num_experts(SHAPES[args.shape])
    for dtype in args.dtypes:
        out += [Job(e, dtype) for e in args.engines]
        for b in budgets.get(dtype, []):
            out += [Job("offload", dtype, p, b) for p in (args.policies[:1] if b.experts >= total else args.policies)]
    return out


def settings(args, job: Job) -> dict:
    """What a worker's result depends on: a saved result is reused only when these match."""
    accelerate = job.worker == "hf-accelerate"
    return {"shape": args.shape, "dtypes": job.dtype, "gpu": args.gpu, "batch": args.batch,
            "prompt_tokens": args.prompt_tokens, "seed": args.seed, "cpu_threads": args.cpu_threads,
            "new_tokens": args.accelerate_new_tokens if accelerate else args.new_tokens,
            "repeats": args.accelerate_repeats if accelerate else args.repeats,
            "device_budget_bytes": args.device_budget_bytes if accelerate else None,
            "policy": job.policy, "budget_bytes": job.budget and job.budget.bytes}  # fmt: skip


def spawn(args, job: Job, s: dict) -> dict:
    """Run one configuration in a fresh process; a failure becomes {"error": ...}, not an abort."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        flags = {"--worker": job.worker, "--result": out, "--shape": args.shape, "--dtypes": job.dtype,
                 "--batch": args.batch, "--prompt-tokens": args.prompt_tokens, "--new-tokens": s["new_tokens"],
                 "--repeats": s["repeats"], "--seed": args.seed, "--cpu-threads": args.cpu_threads,
                 "--device-budget-gib": args.device_budget_gib}  # fmt: skip
        if job.policy:
            flags |= {"--policy": job.policy, "--budget-bytes": job.budget.bytes}
        cmd = [sys.executable, str(Path(__file__).resolve())] + [str(x) for kv in flags.items() for x in kv]
        cmd += ["--gpu"] * args.gpu
        env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "PYTHONPATH": str(ROOT)}
        if args.cpu_threads:
            # Multithreaded CPU kernels collapse (up to 30x) when another process takes a core mid-barrier.
            xla = f"--xla_cpu_multi_thread_eigen={'false' if args.cpu_threads == 1 else 'true'} "
            env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {xla}intra_op_parallelism_threads={args.cpu_threads}"
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, stdout=sys.stderr, stderr=sys.stderr, timeout=args.worker_timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"worker killed after {args.worker_timeout:g} s (--worker-timeout)"}
        finally:
            log(f"{job.key}: worker took {time.perf_counter() - start:.1f} s")
        if not out.exists():
            return {"error": f"worker exited with status {proc.returncode} and no result"}
        return json.loads(out.read_text())


def run_jobs(args, todo: list[Job]) -> dict[Job, dict]:
    raw = Path(args.out_dir) / f"raw-{'gpu' if args.gpu else 'cpu'}"
    raw.mkdir(parents=True, exist_ok=True)
    start, results = time.perf_counter(), {}
    for job in todo:
        s, path = settings(args, job), raw / f"{job.key}.json"
        if args.resume and path.exists():
            saved = json.loads(path.read_text())
            if saved.get("settings") == s and "error" not in saved:
                log(f"{job.key}: reusing {path}")
                results[job] = saved
                continue
        if args.stop_after is not None and time.perf_counter() - start > args.stop_after:
            results[job] = {"not_run": f"--stop-after {args.stop_after:g} s reached; rerun with --resume"}
            continue
        log(f"{job.key}: starting worker")
        results[job] = spawn(args, job, s) | {"settings": s}
        path.write_text(json.dumps(results[job]))
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_worker_here(args)
    args.loadavg = os.getloadavg()[0]
    shape = SHAPES[args.shape]
    fit = {"batch": args.batch, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
           "device_bytes": args.device_budget_bytes,
           "workspace": None if args.workspace_gib is None else int(args.workspace_gib * B.GIB)}  # fmt: skip
    budgets, arithmetic = {}, {}
    for dtype in args.offload_dtypes if args.policies else []:
        budgets[dtype], arithmetic[dtype] = B.parse(args.budgets, shape, dtype, fit)
        for line in arithmetic[dtype]:
            log(f"expert budget ({dtype}): {line}")
    todo = jobs(args, budgets)
    report = make_report(args, todo, run_jobs(args, todo), arithmetic)
    out, name = Path(args.out_dir), "results-gpu" if args.gpu else "results-cpu"
    (out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{name}.md").write_text(markdown(report))
    log(f"wrote {out / name}.json and .md")
    for problem in report["problems"]:
        log(problem)
    print(json.dumps(report) if args.json else markdown(report))
    return report["status"]


if __name__ == "__main__":
    sys.exit(main())
