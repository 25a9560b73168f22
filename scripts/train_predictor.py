"""Train the next-layer expert predictor on routing traces (scripts/collect_traces.py).

  python scripts/train_predictor.py --model checkpoints/NAME --traces traces/NAME --out checkpoints/NAME/predictor

Both architectures (a layer embedding, per-layer heads) are trained unless --arch
picks one; the one with the better validation recall@top_k is saved. The traces'
tokens are split contiguously into train / validation / test (the test split is
what scripts/eval_predictor.py evaluates on). Progress goes to stderr; --json
prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

# This checkout's jaxmoe, before any installed one (a venv's editable install may point at another checkout).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxmoe.config import load_hf_config
from jaxmoe.predictor.mlp import ARCHS
from jaxmoe.predictor.pipeline import INPUT_ERRORS, progress_bar, refuse, script_parser, train_on_traces
from jaxmoe.predictor.train import LOSSES, TrainConfig


def parse_args(argv=None) -> argparse.Namespace:
    p = script_parser(__doc__)
    p.add_argument("--model", type=Path, required=True, help="the jaxmoe checkpoint the traces came from")
    p.add_argument("--traces", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="predictor directory (replaced when training succeeds)")
    p.add_argument("--arch", choices=("auto",) + ARCHS, default="auto", help="auto: train both, keep the better")
    p.add_argument("--loss", choices=LOSSES, default=TrainConfig.loss)
    for name in ("width", "batch_tokens", "steps", "warmup_steps", "eval_every", "patience", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(TrainConfig, name))
    for name in ("lr", "weight_decay", "clip_norm"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(TrainConfig, name))
    p.add_argument("--val-frac", type=float, default=0.1)
    p.add_argument("--test-frac", type=float, default=0.2)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    tc = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields and k != "arch"})
    archs = ARCHS if args.arch == "auto" else (args.arch,)
    bars = {}

    def progress(arch, step, entry):
        if arch not in bars:
            for b in bars.values():
                b.close()
            bars[arch] = progress_bar(args, total=tc.steps, desc=f"train {arch}", unit="step")
        bar = bars[arch]
        bar.update(step - bar.n)
        bar.set_postfix({k: round(v, 4) for k, v in entry.items() if k != "step"})

    try:
        cfg = load_hf_config(args.model)
        meta = train_on_traces(cfg, args.traces, args.out, archs, tc, args.val_frac, args.test_frac, progress)
    except INPUT_ERRORS as e:
        return refuse(e)
    finally:
        for b in bars.values():
            b.close()
    rows = [(a, r["params"], r["best_step"], r["steps_run"], r["seconds"], r["val_recall"]) for a, r in meta["candidates"].items()]
    print(f"\n{'arch':<8}{'params':>10}{'best step':>11}{'steps':>8}{'seconds':>10}{'val recall@k':>14}", file=sys.stderr)
    for a, n, best, steps, secs, rec in rows:
        mark = "  <- saved" if a == meta["arch"] else ""
        print(f"{a:<8}{n:>10}{best:>11}{steps:>8}{secs:>10.1f}{rec:>14.4f}{mark}", file=sys.stderr)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    if args.json:
        out = {k: meta[k] for k in ("arch", "width", "input_dim", "projection", "recall", "param_count", "pairs")}
        out["candidates"] = {a: {k: v for k, v in r.items() if k != "history"} for a, r in meta["candidates"].items()}
        print(json.dumps({"out": str(args.out), "bytes": size, "model_hash": meta["model"]["model_hash"], **out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
