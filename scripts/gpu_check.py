"""The prepared GPU check: one command that measures what a first GPU session needs, within
about 7 minutes on one H100 or H200, compilation included.

  python scripts/gpu_check.py --out DIR            on a CUDA GPU
  python scripts/gpu_check.py --out DIR --dry-run  every step on the CPU with tiny shapes

Writes DIR/gpu_check.json and DIR/gpu_check.md before and after every step (a step that
fails or overruns its cap is recorded with its error, and the next one runs); worker
results and caches go under --work-dir (default DIR/work). The steps: bench/gpu_check.py.
Exit status 0 when every step passed, 1 otherwise (the files say which and why).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import gpu_check  # noqa: E402
from bench.matrix import PREFILL_MODES  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory for gpu_check.json and gpu_check.md")
    p.add_argument("--dry-run", action="store_true", help="run every step on the CPU with tiny shapes")
    p.add_argument("--work-dir", help="worker results and compilation cache (default OUT/work)")
    p.add_argument("--no-peers", action="store_true", help="skip the transformers and accelerate rows")
    p.add_argument("--steps", help="comma list of steps to run (default all): " + ",".join(s.name for s in gpu_check.STEPS))
    p.add_argument("--cap", action="append", default=[], metavar="STEP=SECONDS", help="override a step's time cap")
    p.add_argument("--exact-models", help="exactness step: only these models (comma list)")
    p.add_argument("--exact-policies", help="exactness step: only these policies (comma list)")
    p.add_argument("--decode-rows", help="decode step: only these rows (comma list of resident, hf, hf-accelerate, "
                   "lru@5GiB, predictor@5GiB, lru@8GiB on random weights with embeddings x40; hit-path:resident, "
                   "hit-path:lru@5GiB, hit-path:predictor@5GiB on plain random weights)")
    p.add_argument("--prefill-modes", help="prefill step: only these offloaded modes (comma list of "
                   + ", ".join(PREFILL_MODES) + ")")
    p.add_argument("--prefill-lengths", help="prefill step: only these prompt lengths (comma list of tokens)")
    p.add_argument("--deadline", type=float, default=gpu_check.DEFAULT_DEADLINE_S, dest="deadline_s",
                   help="seconds for the whole check (later steps get what is left)")
    args = p.parse_args(argv)
    names = {s.name for s in gpu_check.STEPS}
    args.steps = [s.strip() for s in args.steps.split(",") if s.strip()] if args.steps else None
    for bad in set(args.steps or ()) - names:
        p.error(f"--steps: unknown step {bad!r}; choose from {', '.join(sorted(names))}")
    for name in ("exact_models", "exact_policies", "decode_rows", "prefill_modes", "prefill_lengths"):
        value = getattr(args, name)
        setattr(args, name, [x.strip() for x in value.split(",") if x.strip()] if value else None)
    for bad in set(args.prefill_modes or ()) - set(PREFILL_MODES):
        p.error(f"--prefill-modes: unknown mode {bad!r}; choose from {', '.join(PREFILL_MODES)}")
    if args.prefill_lengths:
        if not all(x.isdigit() and int(x) > 0 for x in args.prefill_lengths):
            p.error(f"--prefill-lengths: expected positive token counts, got {','.join(args.prefill_lengths)}")
        args.prefill_lengths = [int(x) for x in args.prefill_lengths]
    args.caps = {}
    for item in args.cap:
        name, _, seconds = item.partition("=")
        if name not in names or not seconds:
            p.error(f"--cap {item!r}: expected STEP=SECONDS with STEP one of {', '.join(sorted(names))}")
        args.caps[name] = float(seconds)
    return args


if __name__ == "__main__":
    sys.exit(gpu_check.run(parse_args()))
