"""A sample of a model's training text, for traces that never see its evaluation text
(and, separately, of its held-out text, to evaluate a predictor on text the model never saw).

The corpus is split exactly as jaxmoe.train.data splits it for training (the last
`val_frac` of each of 20 spans per domain is validation); this takes `chars`
characters from the middle of every training span, interleaving the domains span
by span, so any contiguous part of the sample mixes all of them.
  python -m jaxmoe.predictor.text --data data/corpus --val-frac 0.02 --chars 4000 --out train_sample.txt
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxmoe.train.data import domain_files, split_text


def corpus_sample(data_dir: Path, val_frac: float, chars: int, split: str = "train") -> str:
    """`chars` characters from the middle of each span of `split` ("train", or "val": the model's
    held-out text, only ever for evaluating a predictor, never for training one)."""
    which = {"train": 0, "val": 1}[split]
    texts = {name: path.read_text(encoding="utf-8") for name, path in domain_files(data_dir).items()}
    spans = {name: split_text(text, val_frac)[which] for name, text in texts.items()}
    pieces = []
    for i in range(max(len(s) for s in spans.values())):
        for name in sorted(spans):
            if i >= len(spans[name]):
                continue
            span = spans[name][i]
            start = span.rfind("\n", 0, len(span) // 2) + 1  # a line start near the middle
            end = span.rfind("\n", start, start + chars)
            pieces.append(span[start : end if end > start else start + chars])
    return "\n".join(pieces) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("data/corpus"))
    p.add_argument("--val-frac", type=float, required=True, help="the model's training val_frac (training.json)")
    p.add_argument("--chars", type=int, default=4000, help="characters per span")
    p.add_argument("--split", choices=("train", "val"), default="train",
                   help="val: the model's held-out text, for evaluating a predictor only")  # fmt: skip
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(corpus_sample(args.data, args.val_frac, args.chars, args.split), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
