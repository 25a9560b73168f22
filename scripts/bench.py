"""Benchmark matrix: jaxmoe (resident and offloaded) against the peers users would pick, one
process per configuration.

  python scripts/bench.py         CPU matrix (under 5 minutes on 2 cores): the small OLMoE-like shape
                                  (resident, transformers, ondemand/lru/lfu/predictor offload at 0.25 and
                                  0.5 of all experts, every expert preloaded) and the shipped jaxmoe-tiny
                                  (its trained predictor), bf16, batch 1, prompts of 128 and 512 tokens
  python scripts/bench.py --gpu   OLMoE-1B-7B shape on the GPU at 5/8/16 GiB device budgets
  [--models olmoe-small,olmoe-1b-7b,qwen3-30b-a3b,mixtral-8x7b,jaxmoe-tiny,DIR] [--model DIR]
  [--engines jaxmoe,hf,hf-accelerate] [--policies ondemand,lru,lfu,predictor] [--sweep-policies lru]
  [--budgets 0.25,0.5,3.8GB,4GiB,auto] [--device-budgets-gib 5,8,16] [--device-gib 80] [--workspace-gib G]
  [--batch 1,4,16] [--prompt-tokens 128,512,2048] [--prefill-modes stream,stream-serial,routed,injit]
  [--dtypes bfloat16] [--formats dense,int8,int4] [--embed-scale X] [--temperature T] [--new-tokens N] [--repeats R] [--accelerate-new-tokens N] [--accelerate-repeats R]
  [--cpu-threads T] [--seed S] [--out-dir docs/bench] [--name STEM] [--no-plots]
  [--resume] [--stop-after SECONDS] [--worker-timeout SECONDS] [--json]

Models and where their weights come from: bench/shapes.py. The matrix: bench/matrix.py.
Each configuration runs in its own subprocess so its peak memory is its own; each
model's first worker measures the pinned host -> device bandwidth the bounds use.
Worker results are kept under OUT_DIR/raw-{cpu,gpu}/; `--resume` reuses those with the
same settings and `--stop-after` starts no new worker after that many seconds, so a long
matrix is finished over several commands. Writes STEM.json, STEM.md and STEM-*.png under
--out-dir (STEM: results-cpu, or results-gpu-MODELS); logs go to stderr; with --json,
stdout is exactly one JSON object {"device", "rows": [...], ...}. Exit status: 0 all rows
ran and agree, 1 a row failed, 2 an offloaded row's tokens differ from resident, 3 rows
left to run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import budgets as B  # noqa: E402
from bench import matrix, plots, workers  # noqa: E402
from bench.common import log  # noqa: E402
from bench.report import make_report, markdown  # noqa: E402
from bench.shapes import DEFAULT_CHECKPOINT, ROUTED_EMBED_SCALE, SHAPES, resolve  # noqa: E402
from jaxmoe.quant import parse_format  # noqa: E402

ENGINES = ("jaxmoe", "hf", "hf-accelerate")
POLICIES = ("ondemand", "lru", "lfu", "predictor")
CPU_MODELS = ("olmoe-small", DEFAULT_CHECKPOINT.name)


def _list(text: str, kind=str) -> list:
    return [kind(x.strip()) for x in text.split(",") if x.strip()]


def _check(p, flag: str, given: list, allowed) -> None:
    for bad in set(given) - set(allowed):
        p.error(f"{flag}: unknown {bad!r}; choose from {', '.join(allowed)}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", action="store_true", help="the GPU matrix (default: the CPU one)")
    p.add_argument("--models", help=f"comma list of {', '.join(SHAPES)}, {DEFAULT_CHECKPOINT.name} or checkpoint "
                   "directories (default: olmoe-small,jaxmoe-tiny on CPU, olmoe-1b-7b on GPU)")
    p.add_argument("--model", action="append", default=[], help="a converted jaxmoe checkpoint (repeatable)")
    p.add_argument("--dtypes", default="bfloat16", help="comma list (checkpoints keep their own dtype)")
    p.add_argument("--formats", default="dense", help="expert formats, comma list of dense, int8, int4, int4-gN "
                   "(checkpoints keep their own; transformers rows only for dense)")
    p.add_argument("--embed-scale", type=float, default=1.0, help="shapes: jaxmoe's random weights with token "
                   f"embeddings x X ({ROUTED_EMBED_SCALE:g}: a 4-layer cut routes like a trained model, though "
                   "greedy decoding of a deeper one falls into a loop; 1: almost every token picks the same experts); shapes built through transformers "
                   "switch to jaxmoe's random weights; not for checkpoints")
    p.add_argument("--temperature", type=float, default=0.0, help="jaxmoe's rows sample at this temperature "
                   "with the run's seed (resident and offloaded draw with the same key, so their tokens are still "
                   "compared); 0: greedy. transformers' rows decode greedily")
    p.add_argument("--engines", default=",".join(ENGINES), help="comma list of: " + ",".join(ENGINES))
    p.add_argument("--policies", default=",".join(POLICIES), help="offload policies, comma list ('' for none)")
    p.add_argument("--sweep-policies", default="lru", help="policies also run at the other batch/prompt points")
    p.add_argument("--budgets", help="expert budgets, comma list of: fractions of all experts (0.25), NGB "
                   "(N x 10^9 bytes), NGiB, auto (one per --device-budgets-gib); default 0.25,0.5,1 CPU, auto GPU")
    p.add_argument("--device-budgets-gib", help="total device budgets: 'auto' expert budgets and accelerate's "
                   "max_memory (default per model on GPU: OLMoE 5,8,16; Qwen3-30B-A3B 16,24,40; Mixtral 24; CPU 5)")
    p.add_argument("--device-gib", type=float, help="device memory for the does-it-fit-resident check (GPU: 80)")
    p.add_argument("--workspace-gib", type=float,
                   help="'auto': memory kept for activations (default: estimated from the prefill expert pass)")
    p.add_argument("--batch", default="1", help="comma list of batch sizes; the first is the main point")
    p.add_argument("--prompt-tokens", help="comma list; the first is the main point (default 128,512 CPU, 128 GPU)")
    p.add_argument("--prefill-modes", default="", help="offload prefill modes, run at every point (default: "
                   "the engine picks): " + ",".join(matrix.PREFILL_MODES))
    p.add_argument("--new-tokens", type=int, help="tokens per timed run (>= 2); default 32 CPU, 128 GPU")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row after the warm-up")
    p.add_argument("--accelerate-new-tokens", type=int, default=16,
                   help="new tokens for the accelerate peer (0.72 tok/s on an H100: 128 tokens is 3 min)")
    p.add_argument("--accelerate-repeats", type=int, default=1)
    p.add_argument("--cpu-threads", type=int, help="threads per worker on CPU (default 1; 0: library defaults)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(ROOT / "docs" / "bench"))
    p.add_argument("--name", help="output file stem (default results-cpu / results-gpu-MODELS)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--resume", action="store_true", help="reuse results under OUT_DIR/raw-* with the same settings")
    p.add_argument("--stop-after", type=float, help="start no worker after this many seconds (then exit 3)")
    p.add_argument("--worker-timeout", type=float, default=480.0, help="seconds before a worker is killed")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.add_argument("--worker-spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    names = _list(args.models) if args.models else ([] if args.model else list(("olmoe-1b-7b",) if args.gpu
                                                                                 else CPU_MODELS))
    try:
        args.models = [resolve(m) for m in names + args.model]
        formats = [parse_format(f).name for f in _list(args.formats)]
    except ValueError as e:
        p.error(str(e))
    if args.temperature < 0:
        p.error(f"--temperature: expected 0 (greedy) or more, got {args.temperature:g}")
    if args.embed_scale <= 0:
        p.error(f"--embed-scale: expected a positive factor, got {args.embed_scale:g}")
    if args.embed_scale != 1.0 and any(m.source == "checkpoint" for m in args.models):
        p.error("--embed-scale: a checkpoint routes as it was trained; the scale is for random-weight shapes")
    if args.embed_scale != 1.0:
        args.models = [dataclasses.replace(m, source="random", embed_scale=args.embed_scale) for m in args.models]
    args.models = [m if m.source == "checkpoint" else dataclasses.replace(m, expert_format=f)
                   for m in args.models for f in (formats if m.source != "checkpoint" else [None])]  # fmt: skip
    args.dtypes, args.engines, args.policies = _list(args.dtypes), _list(args.engines), _list(args.policies)
    args.sweep_policies, args.prefill_modes = _list(args.sweep_policies), _list(args.prefill_modes)
    _check(p, "--engines", args.engines, ENGINES)
    _check(p, "--policies", args.policies + args.sweep_policies, POLICIES)
    _check(p, "--prefill-modes", args.prefill_modes, matrix.PREFILL_MODES)
    args.budgets = args.budgets or ("auto" if args.gpu else "0.25,0.5,1")
    args.batch = _list(args.batch, int)
    args.prompt_tokens = _list(args.prompt_tokens or ("128" if args.gpu else "128,512"), int)
    args.device_budgets_gib = args.device_budgets_gib and _list(args.device_budgets_gib, float)
    args.new_tokens = args.new_tokens or (128 if args.gpu else 32)
    args.cpu_threads = (0 if args.gpu else 1) if args.cpu_threads is None else args.cpu_threads
    args.device_bytes = int((args.device_gib or (80 if args.gpu else 0)) * 1e9) or None
    args.workspace = None if args.workspace_gib is None else int(args.workspace_gib * B.GIB)
    if min(args.new_tokens, args.accelerate_new_tokens) < 2:
        p.error("new-token counts must be >= 2 (decode rate needs a token after the first)")
    args.script = Path(__file__).resolve()
    return args


def run_worker_here(args) -> int:
    result = workers.run(json.loads(Path(args.worker_spec).read_text()))
    Path(args.result).write_text(json.dumps(result))
    return 1 if "error" in result else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker_spec:
        return run_worker_here(args)
    start, args.loadavg = time.perf_counter(), os.getloadavg()[0]
    # This process only does arithmetic over shapes (jax.eval_shape); kept off the GPU so that it
    # holds no device memory while the workers measure theirs. Workers get the original environment.
    args.worker_base_env = dict(os.environ)
    os.environ["JAX_PLATFORMS"] = "cpu"
    todo, arithmetic = [], []
    for model in args.models:
        for dtype in model.dtypes(args.dtypes):
            jobs, lines = matrix.model_jobs(args, model, dtype)
            todo += jobs
            arithmetic += lines
    for line in arithmetic:
        log(f"expert budget {line}")
    report = make_report(args, todo, matrix.run_jobs(args, todo), arithmetic)
    report["wall_s"] = time.perf_counter() - start
    out = Path(args.out_dir)
    stem = args.name or ("results-gpu-" + "+".join(m.name for m in args.models) if args.gpu else "results-cpu")
    report["plots"] = [] if args.no_plots else [p.name for p in plots.write_all(report, out, stem)]
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(report))
    log(f"wrote {out / stem}.json, .md and {len(report['plots'])} plots in {report['wall_s']:.0f} s")
    for problem in report["problems"]:
        log(problem)
    print(json.dumps(report) if args.json else markdown(report))
    return report["status"]


if __name__ == "__main__":
    sys.exit(main())
