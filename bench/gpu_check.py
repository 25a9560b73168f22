"""The prepared GPU check: every measurement a first GPU session needs, in one command that
fits a short lease, each step capped in time and recorded as it finishes.

Steps, in order (caps in seconds on a GPU; `--dry-run` runs the same code on the CPU with
tiny shapes):
  environment  devices, versions, memory kinds, memory_stats() keys
  pytest       `pytest -m gpu` (the GPU-only tests)
  bandwidth    pinned host -> device, one OLMoE-1B-7B expert and one layer's decode demand
  exactness    offloaded == resident tokens: shipped model + a tiny model of each family,
               lru / predictor, smallest legal budget / half the experts, batch 1 / 3, bf16 / fp32
  decode       OLMoE-1B-7B shape, batch 1, 128-token prompt, 64 new tokens, random weights with
               embeddings x40, sampled at T=1 (a trained model's routing at 8 layers; each row
               reports its hit rate): jaxmoe resident, transformers (greedy),
               transformers + accelerate at 5 GiB, jaxmoe offloaded within 5 GiB (lru, predictor)
               and 8 GiB (lru), judged against max(resident step, transfers); then the hit path
               (plain random weights decoded greedily, which route every token alike):
               resident, lru and predictor within 5 GiB
  phases       where one offloaded decode step's time goes (host phases; device time synced)
  prefill      512 and 2048 tokens: stream, stream without overlap, routed, injit; accelerate at 2048
  injit_probe  does a dynamic slice of a pinned_host stack inside jit copy only the slice, async?
and, only when named in --steps:
  quantized    int4 experts: OLMoE-1B-7B shape resident and offloaded (lru) within 5 GiB in total,
               Mixtral-8x7B shape offloaded at 24 GiB (random codes; tok/s, hit rate, bytes/token)
  exact_diagnosis  where offloaded tokens leave the resident ones on the decode shape (resident
               run twice, each prefill mode, every expert preloaded, expert computations bitwise)
  dispatch_probe   a trivial program's call cost by number of arguments, half donated and none;
               the phases measurement and the resident decode step with XLA's command buffers
               as they are, off, and with on-device control flow (where a decode call's host
               time goes)
  decode_profile   a jax.profiler trace of 8 offloaded (lru) and 8 resident decode tokens, kept
               in OUT/profile and summarised per process (device busy against span; the
               largest XLA modules and events)
Every step runs in its own process(es) (bench.matrix.spawn); a step that fails or overruns
its cap is recorded with its error, and the next one runs. OUT/gpu_check.json and
OUT/gpu_check.md are rewritten before and after every step, so the last files are valid
whenever the command is stopped.
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import datetime
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable

from bench import budgets as B
from bench import matrix
from bench.check_report import markdown
from bench.matrix import Job
from bench.report import code_version, make_report
from bench.shapes import DEFAULT_CHECKPOINT, ROUTED_EMBED_SCALE, ModelSpec, resolve
from bench.common import log

ROOT = Path(__file__).resolve().parents[1]
FAMILY_MODELS = ("mixtral-tiny16", "olmoe-tiny16", "qwen2-moe-tiny16", "qwen3-moe-tiny16")
# Random weights with scaled embeddings (bench/shapes.py): at 4 layers they route like a trained
# model's; decoded greedily at 8 and more they fall into a loop and hit like plain random weights,
# so each row reports its decode hit rate and says which weights it ran.
GPU_MODEL = ModelSpec("olmoe-1b-7b", "random", embed_scale=ROUTED_EMBED_SCALE)
CPU_MODEL = ModelSpec("olmoe-small", "random", embed_scale=ROUTED_EMBED_SCALE)
HIT_PATH = "hit-path:"  # --decode-rows prefix of the rows on plain random weights
# The scaled rows sample (seeded: resident and offloaded draw the same tokens): decoded greedily,
# the shape cut to 8 layers fell into a two-token loop and hit 0.985 at 20% of the experts.
DECODE_TEMPERATURE = 1.0
DEFAULT_DEADLINE_S = 420.0  # the 7 minutes, compilation included


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    title: str
    cap_s: float  # on a GPU; a dry run gets the same caps
    run: Callable[["Check"], tuple[str, dict]]  # -> (status, result); raising records an error
    default: bool = True  # run without --steps


class Check:
    """The run's settings, its bench arguments (for the benchmark's workers) and its record."""

    def __init__(self, opts):
        self.opts, self.dry = opts, opts.dry_run
        self.gpu = not self.dry
        self.out, self.work = Path(opts.out), Path(opts.work_dir or Path(opts.out) / "work")
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.model = CPU_MODEL if self.dry else GPU_MODEL
        self.bench = bench_args(self)
        self.deadline = time.perf_counter() + opts.deadline_s
        self.results: dict[str, dict] = {}  # step name -> result (later steps read earlier ones)
        self.record = {
            "check": "gpu_check", "dry_run": self.dry, "date": datetime.date.today().isoformat(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
            "code": code_version(ROOT), "deadline_s": opts.deadline_s, "model": self.model.name, "steps": [],
        }  # fmt: skip

    # -- running workers ------------------------------------------------------------
    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def spawn(self, job: Job, spec: dict, cap: float, env: dict | None = None) -> dict:
        """One worker process, killed after `cap` seconds, with `env` over the original
        environment; what it saved so far survives."""
        partial = self.work / f"{job.key}.partial.json"
        partial.unlink(missing_ok=True)
        bench = copy.copy(self.bench)  # this worker's settings, the check's own untouched
        bench.worker_timeout = max(1.0, cap)
        bench.worker_base_env = {**self.bench.worker_base_env, **(env or {})}
        result = matrix.spawn(bench, job, {**spec, "partial": str(partial)})
        if "error" in result and partial.exists():
            result = {**json.loads(partial.read_text()), "error": result["error"]}
        return result

    def worker(self, name: str, cap: float, model: ModelSpec | None = None, env: dict | None = None, **spec) -> dict:
        job = Job(name, model or self.model, "bfloat16")
        return self.spawn(job, {**matrix.spec(self.bench, job), **spec}, cap, env)

    # -- the record -----------------------------------------------------------------
    def write(self) -> None:
        self.record["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
        env = self.results.get("environment") or {}
        self.record["device"] = env.get("device_kind") or self.record.get("device")
        for path, text in (("gpu_check.json", json.dumps(self.record, indent=1, default=str) + "\n"),
                           ("gpu_check.md", markdown(self.record))):  # fmt: skip
            tmp = self.out / (path + ".tmp")
            tmp.write_text(text)
            tmp.replace(self.out / path)  # a reader never sees half a file


def _load_bench_cli():
    spec = importlib.util.spec_from_file_location("bench_cli", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_args(check: Check):
    """scripts/bench.py's arguments for this check's decode rows (the benchmark's own parser)."""
    argv = ["--models", check.model.name, "--policies", "lru,predictor", "--batch", "1", "--prompt-tokens", "128",
            "--new-tokens", "64" if check.gpu else "8", "--repeats", "1", "--accelerate-new-tokens", "8",
            "--temperature", str(DECODE_TEMPERATURE), "--out-dir", str(check.work), "--no-plots", "--engines",
            "jaxmoe" if check.opts.no_peers else "jaxmoe,hf,hf-accelerate"]  # fmt: skip
    argv += ["--gpu", "--budgets", "auto", "--device-budgets-gib", "5,8"] if check.gpu else ["--budgets", "0.5,0.75"]
    args = _load_bench_cli().parse_args(argv)
    args.models = [check.model]  # the random-weight OLMoE: no torch model to build per jaxmoe worker
    args.loadavg = os.getloadavg()[0]
    args.worker_base_env = dict(os.environ)
    return args


# -- steps ------------------------------------------------------------------------------
def step_environment(c: Check) -> tuple[str, dict]:
    r = c.worker("environment", c.cap)
    if "error" in r:
        return "error", r
    want = "cpu" if c.dry else "gpu"
    return ("passed" if r["backend"] == want else "failed"), r


def step_pytest(c: Check) -> tuple[str, dict]:
    junit = c.work / "pytest-gpu.xml"
    env = {**c.bench.worker_base_env, "JAX_PLATFORMS": "cpu" if c.dry else "cuda",
           "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}  # fmt: skip
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfE", "-p", "no:cacheprovider",
           f"--junitxml={junit}", str(ROOT / "tests")]  # fmt: skip
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=c.cap)
    except subprocess.TimeoutExpired as e:
        return "timeout", {"error": f"pytest killed after {c.cap:.0f} s", "output_tail": str(e.stdout or "")[-3000:]}
    result = {"returncode": proc.returncode, "output_tail": (proc.stdout + proc.stderr)[-3000:]}
    if junit.exists():
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        result |= {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        failed = [t for t in suite.iter("testcase") if t.find("failure") is not None or t.find("error") is not None]
        result["failed"] = [f"{t.get('classname')}::{t.get('name')}" for t in failed]
        # An Element with no children is falsy: test for None, not truth.
        problem = [t.find("failure") if t.find("failure") is not None else t.find("error") for t in failed]
        result["messages"] = [(p.get("message") or "")[:800] for p in problem]
    # 5: no test collected (the gpu marker matched nothing): a problem of the check itself.
    return ("passed" if proc.returncode == 0 else "failed"), result


def step_bandwidth(c: Check) -> tuple[str, dict]:
    job = Job("bandwidth", c.model, "bfloat16", 1, 128)
    r = c.spawn(job, matrix.spec(c.bench, job), c.cap)
    c.bandwidth_job = job
    return ("error" if "error" in r else "passed"), r


EXACT_OPTIONS = {"dtype": ("bfloat16", "float32"), "policy": ("lru", "predictor"), "budget": ("minimum", "half"),
                 "batch": (1, 3)}  # fmt: skip


# The dry run's one case per model (in FAMILY order after the shipped model): every option
# value still runs at least twice. The shipped (bf16) checkpoint runs in fp32 with its predictor:
# the cast path, and a predictor trained for the model as stored.
DRY_EXACT = [("float32", "predictor", "minimum", 1), ("float32", "lru", "half", 3),
             ("bfloat16", "predictor", "minimum", 3), ("bfloat16", "lru", "half", 1),
             ("bfloat16", "predictor", "half", 1)]  # fmt: skip


def exactness_cases(dry: bool) -> list[dict]:
    """Every combination on a GPU (bf16 first); on the CPU one case per model (DRY_EXACT)."""
    models = [DEFAULT_CHECKPOINT.name, *FAMILY_MODELS]
    keys = list(EXACT_OPTIONS)
    if dry:
        return [{"model": model, **dict(zip(keys, case))} for model, case in zip(models, DRY_EXACT)]
    combos = [dict(zip(keys, values)) for values in itertools.product(*EXACT_OPTIONS.values())]
    return [{"model": model, **combo} for model in models for combo in combos]


def step_exactness(c: Check) -> tuple[str, dict]:
    """One worker per model, run side by side: the cases are compile-bound (a cache size is a
    program shape), and the GPU machine has cores to spare."""
    cases = [x for x in exactness_cases(c.dry) if not c.opts.exact_models or x["model"] in c.opts.exact_models]
    cases = [x for x in cases if not c.opts.exact_policies or x["policy"] in c.opts.exact_policies]
    if not cases:
        return "not_run", {"error": "no case left after --exact-models / --exact-policies"}
    by_model: dict[str, list] = {}
    for case in cases:
        by_model.setdefault(case["model"], []).append(case)
    parallel = max(1, min(len(by_model), (os.cpu_count() or 1) // 3))

    def one(model: str) -> dict:
        job = Job("exactness", resolve(model), "bfloat16")
        spec = {**matrix.spec(c.bench, job), "cases": by_model[model], "new_tokens": 24 if c.gpu else 12}
        return c.spawn(job, spec, c.cap)

    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        results = list(pool.map(one, by_model))
    r = {"cases": [x for res in results for x in res.get("cases", [])], "parallel_workers": parallel,
         "errors": [res["error"] for res in results if "error" in res]}  # fmt: skip
    r["summary"] = {"cases": len(r["cases"]), "equal": sum(bool(x.get("equal")) for x in r["cases"]),
                    "planned": len(cases)}  # fmt: skip
    if r["errors"]:
        r["error"] = "; ".join(r["errors"])[:600]
        return ("timeout" if any("killed" in e for e in r["errors"]) else "error"), r
    return ("passed" if r["summary"]["equal"] == r["summary"]["planned"] else "failed"), r


def decode_jobs(c: Check) -> tuple[list[Job], list[str]]:
    """On the routed weights: resident, offloaded at the first device budget (lru, predictor)
    and the second (lru), transformers, accelerate at the first budget; then the hit path's
    resident and offloaded rows at the first budget (measured before: last)."""
    jobs, arithmetic = matrix.model_jobs(c.bench, c.model, "bfloat16")
    hit_path, _ = matrix.model_jobs(c.bench, dataclasses.replace(c.model, embed_scale=1.0), "bfloat16")
    first = lambda j: j.budget is not None and j.budget == first_budget(jobs)  # noqa: E731
    keep = [j for j in jobs if j.worker == "jaxmoe"]
    keep += [j for j in jobs if j.worker == "offload" and first(j)]
    keep += [j for j in jobs if j.worker == "offload" and not first(j) and j.policy == "lru"]
    keep += [j for j in jobs if j.worker == "hf"]
    keep += [j for j in jobs if j.worker == "hf-accelerate"][:1]
    keep += [dataclasses.replace(j, temperature=0.0) for j in hit_path  # the hit path: greedy, as runs 1-9
             if j.worker == "jaxmoe" or (j.worker == "offload" and first(j))]
    rows = c.opts.decode_rows
    return [j for j in keep if not rows or row_name(j) in rows], arithmetic


def row_name(job: Job) -> str:
    """--decode-rows names: resident, hf, hf-accelerate, lru@5GiB, predictor@5GiB, lru@8GiB, and
    hit-path:resident, hit-path:lru@5GiB, hit-path:predictor@5GiB (plain random weights)."""
    if job.worker == "offload":
        name = f"{job.policy}@{job.budget.spec.removeprefix('auto@')}"
    else:
        name = {"jaxmoe": "resident"}.get(job.worker, job.worker)
    plain = job.model.embed_scale == 1.0 and job.worker in ("jaxmoe", "offload")
    return HIT_PATH + name if plain else name


def first_budget(jobs: list[Job]) -> B.Budget | None:
    return next((j.budget for j in jobs if j.worker == "offload"), None)


def run_jobs(c: Check, step: str, jobs: list[Job]) -> dict:
    """Each job in its worker, in order, within the step's cap: a job that would start with
    under 10 s left is recorded as not run."""
    results, end = {}, time.perf_counter() + c.cap
    for job in jobs:
        left = end - time.perf_counter()
        if job.skipped:
            results[job] = {"skipped": job.skipped}
            continue
        if left < 10:
            results[job] = {"not_run": f"the {step} step's time cap was reached"}
            continue
        s = matrix.spec(c.bench, job)
        if job.worker == "hf-accelerate":
            s["prefill_tokens"] = [PREFILL_LENGTHS[c.dry][-1]]
        log(f"{step}: {job.key} ({left:.0f} s left)")
        results[job] = c.spawn(job, s, left) | {"settings": s}
    return results


def rows_status(report: dict) -> str:
    bad = any(r["error"] for r in report["rows"]) or any(p.startswith("MISMATCH") for p in report["problems"])
    return "failed" if bad else "timeout" if any(r["not_run"] for r in report["rows"]) else "passed"


def step_decode(c: Check) -> tuple[str, dict]:
    jobs, arithmetic = decode_jobs(c)
    results = run_jobs(c, "decode", jobs)
    bw_job = getattr(c, "bandwidth_job", None)
    if bw_job and "bandwidth" in c.results:
        results[bw_job] = c.results["bandwidth"]
    order = ([bw_job] if bw_job in results else []) + jobs
    report = make_report(c.bench, order, results, arithmetic)
    report["jobs"] = [j.key for j in jobs]
    c.decode_budget = first_budget(jobs)
    return rows_status(report), report


def decode_budget(c: Check) -> B.Budget:
    """The decode step's first offload budget, or the matrix's where that step did not run."""
    return getattr(c, "decode_budget", None) or first_budget(matrix.model_jobs(c.bench, c.model, "bfloat16")[0])


def phases_worker(c: Check, cap: float, env: dict | None = None, **extra) -> dict:
    """The phases worker: lru at the decode budget, 16 steps (4 on the CPU)."""
    budget = decode_budget(c)
    return c.worker("phases", cap, env=env, budget_bytes=budget.bytes, policy="lru", steps=16 if c.gpu else 4,
                    budget_spec=budget.spec, **extra)  # fmt: skip


def step_phases(c: Check) -> tuple[str, dict]:
    r = phases_worker(c, c.cap)
    return ("error" if "error" in r else "passed"), r


# XLA's command buffers (CUDA graphs) as the image has them, off, and with on-device control
# flow (CONDITIONAL, WHILE: CUDA 12.3+): does a decode call still wait for the device when
# its per-layer conditionals can be captured in the graph (run 5: 0.09 ms of device work
# left after a call returned)?
COMMAND_BUFFERS = {"as_is": "", "off": "--xla_gpu_enable_command_buffer=",
                   "control_flow": "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,"
                                   "CONDITIONAL,WHILE"}  # fmt: skip


def step_dispatch_probe(c: Check) -> tuple[str, dict]:
    """A trivial program's call cost by its number of arguments, then the phases measurement
    and the resident decode step once per COMMAND_BUFFERS variant."""
    base = c.bench.worker_base_env.get("XLA_FLAGS", "")
    r, start = {"variants": {}, "xla_flags": COMMAND_BUFFERS}, time.perf_counter()
    r["call_cost"] = c.worker("call_cost", min(30.0, c.cap / 4), arguments=[10, 100, 300], repeats=50)
    for i, (name, flags) in enumerate(COMMAND_BUFFERS.items()):
        cap = (c.cap - (time.perf_counter() - start)) / (len(COMMAND_BUFFERS) - i)  # what is left, split evenly
        env = {"XLA_FLAGS": f"{base} {flags}".strip()} if flags else None
        r["variants"][name] = phases_worker(c, max(1.0, cap), env, resident=True)
    errors = [f"{name}: {v['error']}" for name, v in {"call_cost": r["call_cost"], **r["variants"]}.items()
              if "error" in v]  # fmt: skip
    if errors:
        r["error"] = "; ".join(errors)[:600]
        return ("timeout" if any("killed" in e for e in errors) else "error"), r
    return "passed", r


def step_decode_profile(c: Check) -> tuple[str, dict]:
    """A profiler trace of the offloaded (lru at the decode budget) and the resident decode,
    summarised; the traces are kept in OUT/profile for a closer look."""
    budget = decode_budget(c)
    r = c.worker("decode_profile", c.cap, budget_bytes=budget.bytes, budget_spec=budget.spec,
                 steps=8 if c.gpu else 2, trace_out=str(c.out / "profile"))  # fmt: skip
    return ("error" if "error" in r else "passed"), r


PREFILL_LENGTHS = {False: (512, 2048), True: (64, 256)}  # by dry run
PREFILL_MODES = tuple(matrix.PREFILL_MODES)


def step_prefill(c: Check) -> tuple[str, dict]:
    lengths = c.opts.prefill_lengths or PREFILL_LENGTHS[c.dry]
    modes = c.opts.prefill_modes or list(PREFILL_MODES)
    cfg = c.model.config("bfloat16")
    if c.gpu:  # the budget that keeps the longest prompt's whole run within the first device budget
        size, lines = B.fit_within(cfg, 1, lengths[-1], 2, int(5 * B.GIB), None)
    else:
        size, lines = int(0.25 * B.num_experts(cfg)) * B.expert_bytes(cfg), ["a quarter of the experts"]
    r = c.worker("prefill_modes", c.cap, prompt_lengths=list(lengths), modes=modes, budget_bytes=size)
    r |= {"budget_bytes": size, "budget_arithmetic": lines}
    bad = any(row.get("error") or row.get("tokens_equal_resident") is False for row in r.get("rows", []))
    return ("error" if "error" in r else "failed" if bad else "passed"), r


# int4 experts: (shape, total device GiB) on a GPU; the dry run's stand-in (shape, budget fraction)
QUANT_ROWS = {False: (("olmoe-1b-7b", 5), ("mixtral-8x7b", 24)), True: (("olmoe-small", 0.5),)}


def quant_jobs(c: Check) -> tuple[list[Job], list[str]]:
    """int4 experts, batch 1: per shape, jaxmoe resident (OLMoE only: Mixtral's target is the
    offloaded row) and offloaded with lru at the expert budget that keeps the whole process
    within the device budget (OLMoE-1B-7B at 5 GiB: every expert should fit)."""
    jobs, arithmetic, new = [], [], c.bench.new_tokens
    for name, size in QUANT_ROWS[c.dry]:
        model = ModelSpec(name, "random", expert_format="int4")
        cfg, fmt = model.config("bfloat16"), model.fmt()
        if c.gpu:
            budget_bytes, lines = B.fit_within(cfg, 1, 128, new, int(size * B.GIB), None, fmt)
            spec = f"auto@{size:g}GiB"
        else:
            budget_bytes, lines, spec = int(size * B.num_experts(cfg)) * B.expert_bytes(cfg, fmt), [], f"{size:g}"
        experts = min(budget_bytes // B.expert_bytes(cfg, fmt), B.num_experts(cfg))
        budget = B.Budget(spec, budget_bytes, experts, "int4 experts", int(size * B.GIB) if c.gpu else None)
        arithmetic += [f"{model.label}: {line}" for line in lines]
        if name != "mixtral-8x7b":
            jobs.append(Job("jaxmoe", model, "bfloat16"))
        jobs.append(Job("offload", model, "bfloat16", policy="lru", budget=budget))
    return jobs, arithmetic


def step_quantized(c: Check) -> tuple[str, dict]:
    """The quantized-experts targets: OLMoE-1B-7B int4 within 5 GiB >= 0.5x resident bf16
    tok/s (the decode step's resident row, when it ran), Mixtral-8x7B int4 at 24 GiB."""
    jobs, arithmetic = quant_jobs(c)
    report = make_report(c.bench, jobs, run_jobs(c, "quantized", jobs), arithmetic)
    resident = next((r for r in (c.results.get("decode") or {}).get("rows", []) if r.get("policy") == "resident"), None)
    report["resident_bf16_tokens_per_s"] = resident and resident.get("decode_tokens_per_s")
    return rows_status(report), report


def step_exact_diagnosis(c: Check) -> tuple[str, dict]:
    budget = decode_budget(c)
    r = c.worker("exact_diagnosis", c.cap, budget_bytes=budget.bytes, new_tokens=64 if c.gpu else 8)
    if "error" in r:
        return "error", r
    agree, parts = r["agree_with_resident"], r["parts"]
    exact = all(v == r["new_tokens"] for v in agree.values()) and all(p["bitwise_equal"] for p in parts.values())
    return ("passed" if exact else "failed"), r


def step_injit_probe(c: Check) -> tuple[str, dict]:
    shape = dict(experts=8, hidden=64, width=128, picks=2, heavy=256) if c.dry else \
        dict(experts=64, hidden=2048, width=2048, picks=8, heavy=8192)  # OLMoE-1B-7B's w_gate_up, top-8
    r = c.worker("injit_probe", c.cap, **shape)
    return ("error" if "error" in r else "passed"), r


STEPS = (
    Step("environment", "Environment", 45, step_environment),
    Step("pytest", "pytest -m gpu", 90, step_pytest),
    Step("bandwidth", "Pinned host -> device bandwidth", 45, step_bandwidth),
    Step("exactness", "Exactness: offloaded vs resident tokens", 100, step_exactness),
    Step("exact_diagnosis", "Where offloaded tokens leave resident ones", 120, step_exact_diagnosis, default=False),
    Step("decode", "Decode: OLMoE-1B-7B shape, random embeddings x40, then plain random weights", 240, step_decode),
    Step("phases", "Where an offloaded decode step's time goes", 50, step_phases),
    Step("prefill", "Prefill modes", 90, step_prefill),
    Step("injit_probe", "In-jit selective fetch probe", 45, step_injit_probe),
    Step("dispatch_probe", "Decode call cost with XLA's command buffers as they are, off, and with control flow", 280,
         step_dispatch_probe, default=False),
    Step("decode_profile", "A profile of the decode: where device and host time go", 120, step_decode_profile,
         default=False),
    Step("quantized", "int4 experts: OLMoE-1B-7B within 5 GiB, Mixtral-8x7B at 24 GiB", 150, step_quantized,
         default=False),
)


def run(opts) -> int:
    # This process only plans and records; kept off the GPU so it holds no device memory while
    # the workers measure theirs (workers get the original environment).
    check = Check(opts)
    os.environ["JAX_PLATFORMS"] = "cpu"
    wanted = opts.steps or [s.name for s in STEPS if s.default]
    for step in STEPS:
        if step.name not in wanted:
            continue
        cap = min(opts.caps.get(step.name, step.cap_s), check.left())
        entry = {"name": step.name, "title": step.title, "cap_s": round(cap, 1), "status": "running"}
        check.record["steps"].append(entry)
        if cap < 1:
            entry |= {"status": "not_run", "error": f"the check's deadline ({opts.deadline_s:g} s) was reached"}
            check.write()
            continue
        check.write()
        check.cap, start = cap, time.perf_counter()
        log(f"step {step.name} (cap {cap:.0f} s)")
        try:
            status, result = step.run(check)
        except Exception as e:  # noqa: BLE001  recorded; the next step runs
            import traceback

            traceback.print_exc()
            status, result = "error", {"error": f"{type(e).__name__}: {e}"[:600]}
        if status == "error" and "killed after" in str(result.get("error")):
            status = "timeout"  # a worker over its cap
        entry |= {"status": status, "seconds": round(time.perf_counter() - start, 1), "result": result}
        entry["error"] = result.get("error") if isinstance(result, dict) else None
        check.results[step.name] = result
        check.write()
        log(f"step {step.name}: {status} in {entry['seconds']} s")
    statuses = [s["status"] for s in check.record["steps"]]
    log(f"wrote {check.out / 'gpu_check.json'} and gpu_check.md: " + ", ".join(
        f"{s['name']} {s['status']}" for s in check.record["steps"]))  # fmt: skip
    return 0 if all(s == "passed" for s in statuses) else 1
