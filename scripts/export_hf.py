"""Export a jaxmoe checkpoint as a Hugging Face directory that transformers loads.

  python scripts/export_hf.py checkpoints/jaxmoe-tiny ~/models/jaxmoe-tiny-hf [--json]

Writes config.json, model.safetensors (per-expert tensor names, as save_pretrained
writes them), generation_config.json and the tokenizer files; nothing is left at
DST if it fails. With --json, one object on stdout: {"dst", "tensors", "bytes"}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# This checkout's jaxmoe, before any installed one (a venv's editable install may point at another checkout).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxmoe.checkpoint import CheckpointError
from jaxmoe.checkpoint.export import export_hf
from jaxmoe.checkpoint.safetensors_io import read_header
from jaxmoe.config import ConfigError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="jaxmoe checkpoint directory")
    p.add_argument("dst", type=Path, help="new Hugging Face directory")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = p.parse_args(argv)
    try:
        dst = export_hf(args.src, args.dst)
    except (CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    weights = dst / "model.safetensors"
    report = {"dst": str(dst), "tensors": len(read_header(weights)), "bytes": weights.stat().st_size}
    print(json.dumps(report) if args.json else f"wrote {dst} ({report['tensors']} tensors, {report['bytes']:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
