"""Benchmark matrix: jaxmoe vs peers on random-weight MoE models, one process per row.

  python scripts/bench.py         small OLMoE-like shape on CPU, fp32 and bf16
  python scripts/bench.py --gpu   OLMoE-1B-7B shape, bf16, on the GPU
  [--new-tokens N] [--prompt-tokens P] [--batch B] [--dtypes float32,bfloat16]
  [--engines jaxmoe,hf] [--repeats R] [--cpu-threads T] [--seed S] [--out-dir docs/bench] [--json]

Both engines are built from one Hugging Face config and torch seed (jaxmoe's
weights are assembled from the transformers model's state dict), get the same
random prompt, decode greedily, and are timed after a warm-up generate, so
compilation is excluded (reported as compile_ms). Each configuration runs in its
own subprocess (`--worker`) so its peak memory is its own. Writes
results-{cpu,gpu}.json and .md under --out-dir; logs go to stderr; with --json,
stdout is exactly one JSON object {"device", "rows": [...], ...}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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
POLICY = {"jaxmoe": "resident", "hf": "hf-transformers"}
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def log(*parts) -> None:
    print("[bench]", *parts, file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", action="store_true", help="OLMoE-1B-7B shape on the GPU (default: small shape on CPU)")
    p.add_argument("--shape", choices=sorted(SHAPES), help="override the shape --gpu selects")
    p.add_argument("--dtypes", help="comma list; default float32,bfloat16 on CPU, bfloat16 on GPU")
    p.add_argument("--engines", default="jaxmoe,hf", help="comma list of: " + ",".join(POLICY))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per timed run (>= 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per row after the warm-up; medians reported")
    p.add_argument("--cpu-threads", type=int, help="threads per worker on CPU (default 1; 0: library defaults)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(ROOT / "docs" / "bench"))
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.add_argument("--worker", choices=sorted(POLICY), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.shape = args.shape or ("olmoe-1b-7b" if args.gpu else "olmoe-small")
    args.dtypes = (args.dtypes or ("bfloat16" if args.gpu else "float32,bfloat16")).split(",")
    args.engines = args.engines.split(",")
    if args.cpu_threads is None:
        args.cpu_threads = 0 if args.gpu else 1
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (decode rate needs a token after the first)")
    return args


def prompts(args) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(args.seed)
    return rng.integers(0, SHAPES[args.shape]["vocab_size"], (args.batch, args.prompt_tokens)).tolist()


# -- workers: one configuration per process --------------------------------------
def timed_runs(generate, repeats: int) -> dict:
    """Warm up once, then `repeats` timed runs: per-metric medians, the raw decode rates, the last tokens."""
    import statistics

    generate()  # warm-up: compilation (jaxmoe), allocator and kernel selection (torch)
    runs = [generate() for _ in range(repeats)]
    out = {k: statistics.median(r[k] for r in runs) for k in ("ttft_ms", "tpot_ms", "decode_tokens_per_s")}
    return {**out, "decode_tokens_per_s_runs": [r["decode_tokens_per_s"] for r in runs],
            "token_ids": runs[-1]["token_ids"]}  # fmt: skip


def device_name(gpu: bool) -> str:
    if gpu:
        import torch

        return torch.cuda.get_device_name(0)
    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
    return f"CPU {model or platform.processor()} ({os.cpu_count()} cores)"


def hf_model(args):
    """The transformers model both workers start from (on the GPU with --gpu: both use CUDA's RNG)."""
    from bench.peers import hf_transformers as hf

    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--gpu: torch sees no CUDA device")
    cfg = hf.olmoe_config(SHAPES[args.shape], args.dtypes[0])
    return hf.build(cfg, args.seed, "cuda" if args.gpu else "cpu")


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
    versions = {"torch": torch.__version__, "transformers": __import__("transformers").__version__}
    return {**out, "peak_device_bytes": peak, "expert_bytes": hf.expert_bytes(model), "compile_ms": None,
            "versions": versions}  # fmt: skip


def worker_jaxmoe(args) -> dict:
    import jax

    if args.gpu and jax.default_backend() != "gpu":
        raise SystemExit(f"--gpu: jax backend is {jax.default_backend()!r}, not gpu")
    import torch
    from bench.peers import hf_transformers as hf
    from jaxmoe.checkpoint.assemble import assemble
    from jaxmoe.config import from_hf_dict
    from jaxmoe.engine import ResidentEngine
    from jaxmoe.engine.metrics import tree_bytes
    from jaxmoe.model import build_model

    torch_model = hf_model(args)
    cfg = from_hf_dict(torch_model.config.to_dict(), source=f"{args.shape} (transformers config)")
    dense, experts = assemble(cfg, *hf.tensors(torch_model), source=f"{args.shape} random state dict")
    del torch_model
    if args.gpu:
        torch.cuda.empty_cache()  # torch's copy is gone before jax allocates its own
    model, experts = build_model(cfg, dense), jax.device_put(experts)
    del dense
    engine = ResidentEngine(cfg, model, experts)
    last = {}

    def run():
        res = engine.generate(prompts(args), args.new_tokens)
        last.update(res.metrics)
        return {**res.metrics, "token_ids": res.token_ids}

    out = timed_runs(run, args.repeats)
    versions = {"jax": jax.__version__, "flax": __import__("flax").__version__, "backend": jax.default_backend()}
    return {**out, "peak_device_bytes": last["peak_device_bytes"], "compile_ms": last["compile_ms"],
            "expert_bytes": tree_bytes(experts), "versions": versions}  # fmt: skip


def run_worker_here(args) -> None:
    result = {"jaxmoe": worker_jaxmoe, "hf": worker_hf}[args.worker](args)
    result |= {"device": device_name(args.gpu), "peak_device_measured": args.gpu,
               "peak_host_rss_bytes": 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}  # fmt: skip
    Path(args.result).write_text(json.dumps(result))


# -- orchestration ----------------------------------------------------------------
def spawn(args, engine: str, dtype: str) -> dict:
    """Run one configuration in a fresh process; a failure becomes {"error": ...}, not an abort."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        flags = {"--worker": engine, "--result": out, "--shape": args.shape, "--dtypes": dtype, "--batch": args.batch,
                 "--prompt-tokens": args.prompt_tokens, "--new-tokens": args.new_tokens, "--repeats": args.repeats,
                 "--seed": args.seed, "--cpu-threads": args.cpu_threads}  # fmt: skip
        cmd = [sys.executable, str(Path(__file__).resolve())] + [str(x) for kv in flags.items() for x in kv]
        cmd += ["--gpu"] * args.gpu
        env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "PYTHONPATH": str(ROOT)}
        if args.cpu_threads:
            # Multithreaded CPU kernels collapse (up to 30x) when another process takes a core mid-barrier.
            xla = f"--xla_cpu_multi_thread_eigen={'false' if args.cpu_threads == 1 else 'true'} "
            env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {xla}intra_op_parallelism_threads={args.cpu_threads}"
        log(f"{engine} {args.shape} {dtype}: starting worker")
        proc = subprocess.run(cmd, env=env, stdout=sys.stderr, stderr=sys.stderr)
        if proc.returncode or not out.exists():
            return {"error": f"worker exited with status {proc.returncode}"}
        return json.loads(out.read_text())


def leading_agreement(a: list[list[int]], b: list[list[int]]) -> int:
    """Tokens, from the first, on which two greedy runs agree (minimum over the batch)."""
    counts = []
    for x, y in zip(a, b):
        n = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        counts.append(n)
    return min(counts)


def make_report(args, results: dict) -> dict:
    rows, ratios = [], {}
    for dtype in args.dtypes:
        model = f"{args.shape}/{SHORT.get(dtype, dtype)}"
        jx, hf = results.get(("jaxmoe", dtype), {}), results.get(("hf", dtype), {})
        agree = leading_agreement(jx["token_ids"], hf["token_ids"]) if "token_ids" in jx and "token_ids" in hf else None
        ratio = None
        if jx.get("decode_tokens_per_s") and hf.get("decode_tokens_per_s"):
            ratio = ratios[model] = jx["decode_tokens_per_s"] / hf["decode_tokens_per_s"]
        for engine in args.engines:
            r = results[(engine, dtype)]
            rows.append({
                "model": model, "policy": POLICY[engine], "expert_budget_bytes": r.get("expert_bytes"),
                "batch": args.batch, "prompt_tokens": args.prompt_tokens, "ttft_ms": r.get("ttft_ms"),
                "decode_tokens_per_s": r.get("decode_tokens_per_s"), "peak_device_bytes": r.get("peak_device_bytes"),
                # jaxmoe resident: every expert always on the device. transformers: no expert cache at all.
                "hit_rate": 1.0 if engine == "jaxmoe" else None, "h2d_bytes_per_token": 0,
                "dtype": dtype, "new_tokens": args.new_tokens, "tpot_ms": r.get("tpot_ms"),
                "compile_ms": r.get("compile_ms"), "peak_device_measured": r.get("peak_device_measured"),
                "peak_host_rss_bytes": r.get("peak_host_rss_bytes"), "greedy_agree": agree,
                "speedup_vs_hf": ratio if engine == "jaxmoe" else None, "repeats": args.repeats,
                "decode_tokens_per_s_runs": r.get("decode_tokens_per_s_runs"), "error": r.get("error"),
            })  # fmt: skip
    device = next((r["device"] for r in results.values() if "device" in r), "unknown (every worker failed)")
    versions = {k: v for r in results.values() for k, v in r.get("versions", {}).items()}
    cmd = "python scripts/bench.py " + " ".join(sys.argv[1:])
    return {"device": device, "rows": rows, "ratios": ratios, "date": datetime.date.today().isoformat(),
            "command": cmd.strip(), "versions": versions, "loadavg_at_start": args.loadavg,
            "cpu_threads": args.cpu_threads or None}  # fmt: skip


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown(report: dict) -> str:
    v = report["versions"]
    lines = [
        f"Device: {report['device']}. Date: {report['date']}. Command: `{report['command']}`.",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in sorted(v.items())) + ".",
        f"Medians of {report['rows'][0]['repeats']} timed runs after a warm-up (decode: median [min-max]); "
        f"threads per worker: {report['cpu_threads'] or 'library default'}; "
        f"1-min load average at start: {report['loadavg_at_start']}.",
        "",
        "| model | engine | batch | prompt | new | TTFT ms | decode tok/s [range] | TPOT ms | peak device GB "
        "| compile s | greedy agree | jaxmoe / HF |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["rows"]:
        if r["error"]:
            lines.append(f"| {r['model']} | {r['policy']} | failed: {r['error']} |")
            continue
        peak = _fmt(r["peak_device_bytes"] and r["peak_device_bytes"] / 1e9, ".3f")
        peak += "" if r["peak_device_measured"] else " (est.)"
        runs = r["decode_tokens_per_s_runs"]
        span = f"{min(runs):.0f}-{max(runs):.0f}"
        agree = "-" if r["greedy_agree"] is None else f"{r['greedy_agree']}/{r['new_tokens']}"
        lines.append(
            f"| {r['model']} | {r['policy']} | {r['batch']} | {r['prompt_tokens']} | {r['new_tokens']} "
            f"| {_fmt(r['ttft_ms'], '.1f')} | {_fmt(r['decode_tokens_per_s'], '.1f')} [{span}] "
            f"| {_fmt(r['tpot_ms'], '.2f')} | {peak} | {_fmt(r['compile_ms'] and r['compile_ms'] / 1e3, '.1f')} "
            f"| {agree} | {_fmt(r['speedup_vs_hf'], '.2f')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker_here(args)
        return 0
    args.loadavg = open("/proc/loadavg").read().split()[0] if os.path.exists("/proc/loadavg") else None
    results = {(e, d): spawn(args, e, d) for d in args.dtypes for e in args.engines}
    report = make_report(args, results)
    out, name = Path(args.out_dir), "results-gpu" if args.gpu else "results-cpu"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{name}.md").write_text(markdown(report))
    log(f"wrote {out / name}.json and .md; jaxmoe/HF decode ratio: "
        + ", ".join(f"{m} {x:.2f}x" for m, x in report["ratios"].items()))  # fmt: skip
    print(json.dumps(report) if args.json else markdown(report))
    return 1 if any(r["error"] for r in report["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
