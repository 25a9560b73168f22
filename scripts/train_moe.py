"""Train an OLMoE-family MoE from scratch on the text corpus (scripts/fetch_corpus.sh).

  python scripts/train_moe.py --out runs/tiny --max-minutes 25 --ship checkpoints/jaxmoe-tiny

Starting again with the same --out resumes from the last checkpoint (same step,
optimizer state, data position). Progress goes to stderr; --json prints one JSON
object on stdout. On a shared CPU, pin it to one core:
  XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" taskset -c 1 python ...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

# This checkout's jaxmoe, before any installed one (a venv's editable install may point at another checkout).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax

from jaxmoe.train.loop import train_loop
from jaxmoe.train.run import RunConfig, open_run, prepare_tokens
from jaxmoe.train.ship import ship_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT / "data" / "corpus", help="folder of DOMAIN.txt files")
    p.add_argument("--out", type=Path, required=True, help="run directory (created, or resumed)")
    for f in dataclasses.fields(RunConfig):  # every run setting is a flag with the RunConfig default
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-windows", type=int, default=8, help="validation windows per domain")
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--max-minutes", type=float, help="training time budget, summed over resumes")
    p.add_argument("--until-step", type=int, help="stop this invocation after this step (the schedule still spans --steps)")
    p.add_argument("--token-cache", type=lambda s: Path(s) if s else None, default=ROOT / "data" / "tokens",
                   help="where tokenised corpora are cached ('' for no cache)")  # fmt: skip
    p.add_argument("--ship", type=Path, help="when the run finishes (or its time is up), write the model here")
    p.add_argument("--ship-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    run = RunConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig)})
    try:
        open_run(args.out, run)
        tok_path, eos, tokens = prepare_tokens(args.out, args.data, run, args.token_cache)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    params, meta = train_loop(
        run, args.out, eos, tokens, args.eval_every, args.eval_windows, args.ckpt_every,
        args.max_minutes, args.until_step, progress=not args.quiet,
    )  # fmt: skip
    train_tokens = {d: int(len(t[0])) for d, t in tokens.items()}
    report = {**meta, "finished": meta["step"] == run.steps, "device": str(jax.devices()[0]),
              "corpus_train_tokens": train_tokens, "run": dataclasses.asdict(run)}  # fmt: skip
    out_of_time = args.max_minutes is not None and meta["train_seconds"] >= args.max_minutes * 60
    if args.ship and (report["finished"] or out_of_time):  # not after --until-step or a kill: resume instead
        ship_checkpoint(args.ship, run, params, tok_path, eos, args.ship_dtype, report)
        report["shipped"] = str(args.ship)
    print(json.dumps(report) if args.json else json.dumps(report, indent=2), file=sys.stdout if args.json else sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
