"""Build expert maps (FineMoE) from routing traces, for the "maps" cache policy.

  python scripts/build_expert_maps.py --traces traces/NAME --out checkpoints/NAME/expert_maps.npz \
      [--model checkpoints/NAME] [--split train|all] [--json]

The maps count, per input token and per pair of MoE layers, which experts the traced
tokens used (jaxmoe/offload/expert_maps.py); with --model every traced window also
becomes a request map keyed by its prompt's mean input embedding. --split train (the
default) uses only the split the predictor trains on, so the held-out text stays
unseen. Saved next to a model as expert_maps.npz, `generate.py --policy maps` starts
from them; without them the policy learns its maps while it runs. Progress goes to
stderr; --json prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# This checkout's jaxmoe, before any installed one (a venv's editable install may point at another checkout).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxmoe.checkpoint import load
from jaxmoe.predictor.pipeline import (INPUT_ERRORS, build_maps_on_traces, maps_token_range, progress_bar, refuse,
                                       script_parser)  # fmt: skip
from jaxmoe.predictor.traces import TraceSet


def parse_args(argv=None) -> argparse.Namespace:
    p = script_parser(__doc__)
    p.add_argument("--traces", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="the .npz to write (replaced when the build succeeds)")
    p.add_argument("--model", type=Path, help="the checkpoint the traces came from (adds request maps)")
    p.add_argument("--split", choices=("train", "all"), default="train")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        model = load(args.model) if args.model else None
        start, stop = maps_token_range(TraceSet(args.traces), args.split)
        with progress_bar(args, total=stop - start, desc="maps", unit="tok") as bar:
            maps = build_maps_on_traces(args.traces, args.out, model, args.split, progress=bar.update)
    except INPUT_ERRORS as e:
        return refuse(e)
    out = {"out": str(args.out), "bytes": args.out.stat().st_size, "tokens": maps.tokens_seen,
           "token_maps": len(maps.token_counts), "request_maps": len(maps.requests), "split": args.split}  # fmt: skip
    print(json.dumps(out) if args.json else "\n".join(f"{k}: {v}" for k, v in out.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
