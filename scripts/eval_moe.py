"""Evaluate a checkpoint: perplexity on any text file, or on the held-out split of each corpus domain.

  python scripts/eval_moe.py --model DIR --text FILE [--seq-len N] [--json]
  python scripts/eval_moe.py --model checkpoints/jaxmoe-tiny [--data data/corpus] [--json]

With --text: the file is tokenized with the model's tokenizer and scored in strided
windows (every scored token has at least seq_len/2 tokens of context; seq_len from the
checkpoint's training.json, else 256). JSON: {"model", "text", "tokens", "model_ppl",
"expert_format"}. Compare a quantized checkpoint with its source on the same file.

Without --text:
Reports per domain the model's perplexity (strided windows: every scored token
has at least seq_len/2 tokens of context) next to two add-k smoothed bigrams: one
trained on exactly the training windows the model saw (the same tokens), one on
the whole training split (more tokens than the model saw); k is chosen on the
validation text itself, which favours the baselines. Per MoE layer it reports the routing entropy and the least-loaded expert's
share of tokens relative to a uniform share. The split is the one the model was
trained with (training.json in the checkpoint).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

try:
    import jaxmoe  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from jaxmoe.checkpoint import load
from jaxmoe.tokenizer import load_tokenizer
from jaxmoe.train.data import Batches, strided_windows, tokenize_corpus, training_stream
from jaxmoe.train.evaluate import bigram_nll, bigram_table, model_nll, routing_summary

ROOT = Path(__file__).resolve().parents[1]
K_GRID = (1.0, 0.3, 0.1, 0.03, 0.01, 0.003)


def evaluate(model_dir: Path, data_dir: Path, cache: Path | None) -> dict:
    loaded = load(model_dir)
    training = json.loads((model_dir / "training.json").read_text())
    run = training["run"]
    tokens = tokenize_corpus(data_dir, load_tokenizer(loaded.tokenizer_path), cache, run["val_frac"])
    vocab, stream = loaded.config.vocab_size, training_stream(tokens)
    seen = Batches(stream, run["seq_len"], run["batch_size"], run["seed"]).seen(training["sample"])
    tables = {"seen": bigram_table(seen, vocab), "split": bigram_table(stream[None], vocab)}
    domains, counts, entropy, routed = {}, 0, 0, 0
    for name in sorted(tokens):
        scored = run["seq_len"] // 2
        windows = strided_windows(tokens[name][1], run["seq_len"], scored)
        n = windows.shape[0] * scored
        nll, c, h = model_nll(loaded, windows, scored)
        counts, entropy, routed = counts + c, entropy + h, routed + windows.shape[0] * run["seq_len"]
        domains[name] = {"tokens": n, "model_ppl": math.exp(nll / n)}
        for which, table in tables.items():
            bigram = {k: bigram_nll(table, windows, scored, vocab, k) / n for k in K_GRID}
            best_k = min(bigram, key=bigram.get)
            domains[name] |= {f"bigram_{which}_ppl": math.exp(bigram[best_k]), f"bigram_{which}_k": best_k}
    layers = routing_summary(counts, entropy, routed)
    return {
        "model": str(model_dir),
        "trained_tokens": int(seen.shape[0] * run["seq_len"]),
        "split_tokens": int(len(stream)),
        "domains": domains,
        "routing": {"layers": layers, "min_share_of_uniform": min(l["min_share_of_uniform"] for l in layers)},
    }


def evaluate_text(model_dir: Path, text_file: Path, seq_len: int | None) -> dict:
    """Perplexity of the model on `text_file`, in strided windows of `seq_len` tokens."""
    loaded = load(model_dir)
    if loaded.tokenizer_path is None:
        raise ValueError(f"{model_dir}: no tokenizer.json to read {text_file} with")
    if seq_len is None:
        training = model_dir / "training.json"
        seq_len = json.loads(training.read_text())["run"]["seq_len"] if training.is_file() else 256
    text = text_file.read_text(encoding="utf-8", errors="replace")
    ids = np.asarray(load_tokenizer(loaded.tokenizer_path).encode(text).ids, np.int32)
    scored = seq_len // 2
    if len(ids) < seq_len + 1:
        raise ValueError(f"{text_file}: {len(ids)} tokens, fewer than one window of {seq_len + 1} (--seq-len)")
    windows = strided_windows(ids, seq_len, scored)
    nll, _, _ = model_nll(loaded, windows, scored)
    n = windows.shape[0] * scored
    return {"model": str(model_dir), "text": str(text_file), "tokens": int(n), "model_ppl": math.exp(nll / n),
            "expert_format": loaded.expert_format.name, "seq_len": seq_len}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "checkpoints" / "jaxmoe-tiny")
    p.add_argument("--text", type=Path, help="score this text file instead of the corpus split")
    p.add_argument("--seq-len", type=int, help="--text: window length (default: the model's training length)")
    p.add_argument("--data", type=Path, default=ROOT / "data" / "corpus")
    p.add_argument("--token-cache", type=lambda s: Path(s) if s else None, default=ROOT / "data" / "tokens")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = p.parse_args(argv)
    if args.text is not None:
        if not args.text.is_file():
            p.error(f"--text {args.text}: no such file")
        try:
            report = evaluate_text(args.model, args.text, args.seq_len)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(json.dumps(report) if args.json else
              f"{report['text']}: {report['tokens']} tokens scored, perplexity {report['model_ppl']:.2f} "
              f"({report['expert_format']} experts)")  # fmt: skip
        return 0
    report = evaluate(args.model, args.data, args.token_cache)
    if args.json:
        print(json.dumps(report))
        return 0
    for name, d in report["domains"].items():
        print(f"{name:12s} {d['tokens']:6d} tokens: model ppl {d['model_ppl']:7.1f}   bigram ppl "
              f"{d['bigram_seen_ppl']:7.1f} (seen tokens, k={d['bigram_seen_k']}), "
              f"{d['bigram_split_ppl']:7.1f} (whole split, k={d['bigram_split_k']})")  # fmt: skip
    for i, l in enumerate(report["routing"]["layers"]):
        print(f"layer {i}: load entropy {l['load_entropy_bits']:.3f}/{l['max_entropy_bits']:.0f} bits, "
              f"expert share min {l['min_share_of_uniform']:.2f} max {l['max_share_of_uniform']:.2f} x uniform, "
              f"router entropy {l['mean_router_entropy_bits']:.2f} bits/token")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
