"""The benchmark matrix: which configurations run (jobs), each in a fresh worker process,
with results kept per job for --resume.

Per model and dtype: a bandwidth job first (the bounds need it); then at the main point
(first batch, first prompt length) resident jaxmoe, the peers (accelerate at every device
budget), and every policy x expert budget; at every other (batch, prompt length) point
resident jaxmoe, the peers at the first device budget and the `--sweep-policies` at the first
expert budget; at every point, the `--prefill-modes` with the first sweep policy at the first
expert budget (without them the engine picks its prefill mode: "auto"). A budget that holds every expert preloads them all
and never evicts, so it gets one row whatever the policy (the offloaded engine's own cost,
with no transfers).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import budgets as B
from bench.common import PREFILL_MODES, log
from bench.shapes import GPU_DEVICE_BUDGETS_GIB, ModelSpec

# Workers that put a model's experts in pinned host memory.
PINNED_WORKERS = ("offload", "prefill_modes", "phases")


@dataclasses.dataclass(frozen=True)
class Job:
    worker: str  # bench.workers.WORKERS
    model: ModelSpec
    dtype: str
    batch: int = 1
    prompt_tokens: int = 128
    policy: str | None = None  # offload rows
    budget: B.Budget | None = None  # offload rows
    device_budget_bytes: int | None = None  # hf-accelerate rows
    prefill: str | None = None  # offload rows: a PREFILL_MODES key (None: the engine's default)
    skipped: str | None = None  # why this row is not run (decided before spawning anything)
    temperature: float = 0.0  # jaxmoe rows: 0 greedy, else sampled with the run's seed (same key resident/offloaded)

    @property
    def key(self) -> str:
        parts = [self.worker, self.model.label.replace("/", "-"), self.dtype, f"b{self.batch}", f"p{self.prompt_tokens}"]
        parts += [self.policy or "", str(self.budget.bytes) if self.budget else "", self.prefill or ""]
        parts += [f"dev{self.device_budget_bytes}" if self.device_budget_bytes else ""]
        parts += [f"t{self.temperature:g}" if self.temperature else ""]
        return "-".join(p for p in parts if p)

    @property
    def decoded_as(self) -> str:
        """The weights (model label) and, when sampled, the temperature: rows that agree on it
        must give the same tokens."""
        return self.model.label + (f"@t{self.temperature:g}" if self.temperature else "")


def fits_device(cfg, batch: int, prompt: int, new: int, device_bytes: int | None, fmt=None) -> str | None:
    """Why every weight cannot be resident on the device, or None."""
    if device_bytes is None:
        return None
    need = B.weight_bytes(cfg, fmt) + B.kv_bytes(cfg, batch, prompt, new)
    if need > 0.95 * device_bytes:
        return f"does not fit: weights + KV {need / 1e9:.1f} GB > 95% of the {device_bytes / 1e9:.0f} GB device"
    return None


def below_minimum(cfg, budget: B.Budget, batch: int, fmt=None) -> str | None:
    """The library's own refusal of a budget too small for this batch (the same for every
    policy: a prefetch lands in a cache slot), asked before a worker is spawned for it."""
    from jaxmoe.offload.cache import BudgetError, plan_geometry, workspace_experts
    from jaxmoe.quant import DENSE

    unique = min(cfg.num_experts, batch * cfg.top_k)
    try:
        plan_geometry(budget.bytes, B.expert_bytes(cfg, fmt), B.num_experts(cfg), unique,
                      workspace_experts(batch, fmt or DENSE, cfg))  # fmt: skip
    except BudgetError as e:
        return str(e)
    return None


def model_jobs(args, model: ModelSpec, dtype: str) -> tuple[list[Job], list[str]]:
    """(jobs, `auto` budget arithmetic lines) of one model in one dtype."""
    from bench.peers import hf_accelerate as hfa

    cfg, fmt = model.config(dtype), model.fmt()
    points = [(b, p) for b in args.batch for p in args.prompt_tokens]
    out = [Job("bandwidth", model, dtype, max(args.batch), points[0][1])] if args.policies else []
    arithmetic = []
    gib = args.device_budgets_gib or (GPU_DEVICE_BUDGETS_GIB.get(model.name, (5,)) if args.gpu else (5,))
    device_budgets = [int(g * B.GIB) for g in gib]
    total = B.num_experts(cfg)
    for batch, prompt in points:
        main = (batch, prompt) == points[0]
        at = dict(model=model, dtype=dtype, batch=batch, prompt_tokens=prompt)
        ours = at | {"temperature": getattr(args, "temperature", 0.0)}  # jaxmoe's rows: transformers decodes greedily
        no_fit = fits_device(cfg, batch, prompt, args.new_tokens, args.device_bytes, fmt)
        peers = model.has_peers and fmt.kind == "dense"  # transformers runs the dense weights only
        if "jaxmoe" in args.engines:
            out.append(Job("jaxmoe", **ours, skipped=no_fit))
        # transformers builds its own weights: an embedding scale is jaxmoe's random weights' only
        at_peer = at | {"model": dataclasses.replace(model, embed_scale=1.0)}
        if peers and "hf" in args.engines:
            out.append(Job("hf", **at_peer, skipped=no_fit))
        if peers and "hf-accelerate" in args.engines:
            why = hfa.unavailable(args.gpu)
            for d in device_budgets if main else device_budgets[:1]:
                out.append(Job("hf-accelerate", **at_peer, device_budget_bytes=d, skipped=why))
        fit = {"batch": batch, "prompt_tokens": prompt, "new_tokens": args.new_tokens, "workspace": args.workspace}
        budgets, lines = B.parse(args.budgets, cfg, fit, device_budgets, fmt)
        arithmetic += [f"{model.name}/{dtype} batch {batch} prompt {prompt}: {line}" for line in lines]
        policies = args.policies if main else [p for p in args.sweep_policies if p in args.policies]
        for budget in budgets if main else budgets[:1]:
            for policy in policies[:1] if budget.experts >= total else policies:
                why = below_minimum(cfg, budget, batch, fmt)
                out.append(Job("offload", **ours, policy=policy, budget=budget, skipped=why))
        sweep = [p for p in args.sweep_policies if p in args.policies] or ["lru"]
        out += [Job("offload", **ours, policy=sweep[0], budget=budgets[0], prefill=m) for m in args.prefill_modes]
    return out, arithmetic


def spec(args, job: Job) -> dict:
    """Everything a worker's result depends on: its arguments, and the key --resume matches on."""
    accelerate = job.worker == "hf-accelerate"
    cfg = job.model.config(job.dtype)
    s = {"worker": job.worker, "model": dataclasses.asdict(job.model), "dtype": job.dtype, "gpu": args.gpu,
         "batch": job.batch, "prompt_tokens": job.prompt_tokens, "seed": args.seed, "cpu_threads": args.cpu_threads,
         "new_tokens": args.accelerate_new_tokens if accelerate else args.new_tokens,
         "repeats": args.accelerate_repeats if accelerate else args.repeats,
         "device_budget_bytes": job.device_budget_bytes, "policy": job.policy,
         "budget_bytes": job.budget and job.budget.bytes}  # fmt: skip
    if job.temperature:
        s["temperature"] = job.temperature
    if job.policy == "predictor":
        s["predictor"] = job.model.predictor
    if job.prefill:
        s["engine_kwargs"] = PREFILL_MODES[job.prefill]
    if job.worker == "bandwidth":
        s["demands"] = sorted({min(cfg.num_experts, b * cfg.top_k) for b in args.batch})
    if job.worker in ("hf", "hf-accelerate") and args.gpu and fits_device(cfg, 1, 1, 1, args.device_bytes):
        s["torch_device"] = "cpu"  # too big to build on the GPU: accelerate starts from CPU memory anyway
    return s


def raw_dir(args) -> Path:
    """Per-worker results (and JAX's compilation cache), kept between commands; git-ignored."""
    return Path(args.out_dir) / f"raw-{'gpu' if args.gpu else 'cpu'}"


def worker_env(args, job: Job) -> dict:
    env = {**getattr(args, "worker_base_env", os.environ), "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "PYTHONPATH": str(Path(__file__).parents[1])}
    if job.worker in PINNED_WORKERS:
        # Raise the pinned pool limit before XLA starts (Mixtral's experts are ~90 GB; the default is 64).
        need = B.num_experts(job.model.config(job.dtype)) * B.expert_bytes(job.model.config(job.dtype), job.model.fmt())
        env.setdefault("XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB", str(max(64, int(need / 1e9 * 1.05) + 2)))
    # Workers of one model compile the same programs: JAX's persistent cache lets the later ones
    # load them (compile_ms is then a load), and lets a resumed GPU matrix skip compiling again.
    cache = raw_dir(args) / "jax-cache"
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache.resolve()))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    if args.cpu_threads:
        # Multithreaded CPU kernels collapse (up to 30x) when another process takes a core mid-barrier.
        xla = f"--xla_cpu_multi_thread_eigen={'false' if args.cpu_threads == 1 else 'true'} "
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {xla}intra_op_parallelism_threads={args.cpu_threads}"
    return env


def spawn(args, job: Job, s: dict) -> dict:
    """Run one configuration in a fresh process; a failure becomes {"error": ...}, not an abort."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_file, out = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_file.write_text(json.dumps(s))
        cmd = [sys.executable, str(args.script), "--worker-spec", str(spec_file), "--result", str(out)]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=worker_env(args, job), stdout=sys.stderr, stderr=sys.stderr,
                                  timeout=args.worker_timeout)  # fmt: skip
        except subprocess.TimeoutExpired:
            return {"error": f"worker killed after {args.worker_timeout:g} s (--worker-timeout)"}
        finally:
            log(f"{job.key}: worker took {time.perf_counter() - start:.1f} s")
        if not out.exists():
            return {"error": f"worker exited with status {proc.returncode} and no result"}
        return json.loads(out.read_text())


def run_jobs(args, todo: list[Job]) -> dict[Job, dict]:
    raw = raw_dir(args)
    raw.mkdir(parents=True, exist_ok=True)
    start, results = time.perf_counter(), {}
    for job in todo:
        if job.skipped:
            results[job] = {"skipped": job.skipped}
            continue
        s, path = spec(args, job), raw / f"{job.key}.json"
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
