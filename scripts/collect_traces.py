"""Record a model's routing over text: per token and MoE layer, the router input,
the top-k experts and the router's full distribution (see jaxmoe/predictor/traces.py).

  python scripts/collect_traces.py --model checkpoints/NAME --text train.txt --out traces/NAME
  python scripts/collect_traces.py ... --max-tokens 50000 --proj-dim 256 --json

Running it again with the same arguments resumes: finished chunks are skipped.
Progress goes to stderr; --json prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# This checkout's jaxmoe, before any installed one (a venv's editable install may point at another checkout).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxmoe.predictor.collect import collect_traces
from jaxmoe.predictor.pipeline import INPUT_ERRORS, progress_bar, refuse, script_parser


def parse_args(argv=None) -> argparse.Namespace:
    p = script_parser(__doc__)
    p.add_argument("--model", type=Path, required=True, help="jaxmoe checkpoint directory")
    p.add_argument("--text", type=Path, required=True, help="UTF-8 text file (use training text only)")
    p.add_argument("--out", type=Path, required=True, help="trace directory (created, or resumed)")
    p.add_argument("--max-tokens", type=int, help="stop after this many tokens (rounded down to windows)")
    p.add_argument("--window", type=int, default=256, help="tokens per independent forward")
    p.add_argument("--batch", type=int, default=8, help="windows per forward call")
    p.add_argument("--chunk-windows", type=int, default=16, help="windows per chunk file")
    p.add_argument("--proj-dim", type=int, help="store router inputs through a fixed random projection to this dim")
    p.add_argument("--proj-seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    bar = progress_bar(args, desc="traces", unit="tok")
    t0 = time.perf_counter()
    try:
        manifest = collect_traces(
            args.model, args.text, args.out, args.max_tokens, args.window, args.batch, args.chunk_windows,
            args.proj_dim, args.proj_seed, progress=bar.update, total=lambda n: setattr(bar, "total", n),
        )  # fmt: skip
    except INPUT_ERRORS as e:
        return refuse(e)
    finally:
        bar.close()
    summary = {
        "out": str(args.out),
        "tokens": manifest["token_count"],
        "chunks": len(manifest["chunks"]),
        "complete": manifest["complete"],
        "model": manifest["model"],
        "input_dim": manifest["input_dim"],
        "bytes": sum((args.out / c["file"]).stat().st_size for c in manifest["chunks"]),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['tokens']} tokens in {summary['chunks']} chunks, {summary['bytes'] / 1e6:.1f} MB -> {args.out}",
              file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
