"""Quantize a jaxmoe checkpoint's routed experts (int8 or int4) into a new checkpoint.

    python scripts/quantize.py SRC DST --format int8|int4|mxfp4 [--group-size N] [--refine R] [--json]

int8: per output channel, symmetric; int4: groups of N input rows (default 64) with a
scale and a zero point each, two values per byte. Dense weights, routers and shared
experts are kept as they are. Streams a layer at a time; nothing is left at DST if it
fails. With --json, one object on stdout: {"dst", "format", "expert_bytes", "dense_expert_bytes", "seconds"}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# This checkout's jaxmoe, before any installed one (a venv's editable install may point at another checkout).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxmoe.checkpoint import CheckpointError
from jaxmoe.checkpoint.quantize import quantize_checkpoint
from jaxmoe.config import ConfigError, load_hf_config
from jaxmoe.quant import DENSE, ExpertFormat


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path, help="jaxmoe checkpoint directory (dense experts)")
    p.add_argument("dst", type=Path, help="new checkpoint directory (must not exist or be empty)")
    p.add_argument("--format", required=True, choices=("int8", "int4", "mxfp4"), help="expert format")
    p.add_argument("--group-size", type=int, default=64, help="int4: input rows per scale and zero point")
    p.add_argument("--refine", type=int, default=0, help="int4: rounds of zero-point refinement (0: round to nearest)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = p.parse_args(argv)
    try:
        fmt = ExpertFormat(args.format, args.group_size)
    except ValueError as e:
        p.error(f"--group-size: {e}")
    start = time.perf_counter()
    try:
        dst = quantize_checkpoint(args.src, args.dst, fmt, refine=args.refine)
    except (CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = load_hf_config(dst)
    report = {"dst": str(dst), "format": fmt.name, "expert_bytes": fmt.nbytes(cfg),
              "dense_expert_bytes": DENSE.nbytes(cfg), "seconds": round(time.perf_counter() - start, 3)}  # fmt: skip
    if args.json:
        print(json.dumps(report))
    else:
        print(f"wrote {dst}: {fmt.name} experts, {report['expert_bytes']:,} bytes each "
              f"({report['expert_bytes'] / report['dense_expert_bytes']:.2f}x dense) in {report['seconds']} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
