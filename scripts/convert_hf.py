"""Convert a Hugging Face MoE checkpoint directory into a jaxmoe checkpoint.

    python scripts/convert_hf.py SRC_DIR DST_DIR [--quantize int8|int4 [--group-size N]] [--json]

--quantize stores the routed experts quantized (as scripts/quantize.py does), layer by layer
during the conversion; dense weights, routers and shared experts stay in the config's dtype.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# This checkout's jaxmoe, before any installed one (a venv's editable install may point at another checkout).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxmoe.checkpoint import CheckpointError, convert_hf, count_params
from jaxmoe.config import ConfigError, load_hf_config
from jaxmoe.quant import DENSE, ExpertFormat


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="Hugging Face directory: config.json and *.safetensors")
    parser.add_argument("dst", help="new jaxmoe checkpoint directory (must not exist or be empty)")
    parser.add_argument("--quantize", choices=("int8", "int4", "mxfp4"), help="store the routed experts quantized")
    parser.add_argument("--group-size", type=int, default=64, help="--quantize int4: input rows per scale and zero point")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = parser.parse_args(argv)
    try:
        fmt = ExpertFormat(args.quantize, args.group_size) if args.quantize else DENSE
    except ValueError as e:
        parser.error(f"--group-size: {e}")

    start = time.perf_counter()
    try:
        dst = convert_hf(args.src, args.dst, progress=True, fmt=fmt)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = load_hf_config(dst)
    result = {
        "dst": str(dst),
        "family": cfg.family,
        "num_params": count_params(cfg),
        "expert_format": fmt.name,
        "seconds": round(time.perf_counter() - start, 3),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"wrote {result['dst']}: {cfg.family}, {result['num_params']:,} parameters in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
