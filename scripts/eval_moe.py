"""Evaluate a checkpoint: perplexity on any text file, or on the held-out split of each corpus domain.

  python scripts/eval_moe.py --model DIR --text FILE [--seq-len N] [--json]
  python scripts/eval_moe.py --model DIR --text FILE --expert-budget-frac F [--policy P] [--skip-below W] [--json]
  python scripts/eval_moe.py --model checkpoints/jaxmoe-tiny [--data data/corpus] [--json]

With --text: the file is tokenized with the model's tokenizer and scored in strided
windows (every scored token has at least seq_len/2 tokens of context; seq_len from the
checkpoint's training.json, else 256). JSON: {"model", "text", "tokens", "model_ppl",
"expert_format"}. Compare a quantized checkpoint with its source on the same file.

With --expert-budget-frac F the scored tokens go through the offloaded engine's decode
instead (jaxmoe/engine/forced.py): each window's context is prefilled, then every scored
position is one run of the device decode step with the text's token fed in (teacher
forcing), the expert cache of F x the expert bytes warm from window to window, batch 1.
--skip-below W (approximate decode) skips there what generate.py --skip-below skips, so
perplexity depends on the budget and policy. JSON adds "offloaded": {"policy",
"expert_budget_frac", "expert_budget_bytes", "skip_below", "approximate",
"decode_h2d_bytes_per_token", "decode_tokens_per_s", "skipped_experts_per_token", ...}.

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

# This checkout's jaxmoe, before any installed one (a venv's editable install may point at another checkout).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from jaxmoe.checkpoint import load
from jaxmoe.offload.device_cache import DEVICE_POLICIES
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


def evaluate_text(model_dir: Path, text_file: Path, seq_len: int | None, offload: dict | None = None,
                  max_windows: int | None = None) -> dict:  # fmt: skip
    """Perplexity of the model on `text_file`, in strided windows of `seq_len` tokens (the
    first `max_windows`); through the offloaded decode with `offload` ({"frac", "policy",
    "skip_below"})."""
    loaded = load(model_dir, experts=offload is None)
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
    windows = strided_windows(ids, seq_len, scored)[:max_windows]
    n = windows.shape[0] * scored
    report = {"model": str(model_dir), "text": str(text_file), "tokens": int(n), "expert_format":
              loaded.expert_format.name, "seq_len": seq_len, "windows": int(windows.shape[0])}  # fmt: skip
    if offload is None:
        nll, _, _ = model_nll(loaded, windows, scored)
        return report | {"model_ppl": math.exp(nll / n)}
    del loaded
    return report | offloaded_ppl(model_dir, windows, scored, **offload)


def offloaded_ppl(model_dir: Path, windows: np.ndarray, scored: int, frac: float, policy: str,
                  skip_below: float) -> dict:  # fmt: skip
    """Perplexity through the offloaded engine's teacher-forced decode (jaxmoe/engine/forced.py)."""
    from jaxmoe.checkpoint import open_checkpoint
    from jaxmoe.engine.forced import forced_nll
    from jaxmoe.engine.offloaded import OffloadedEngine
    from jaxmoe.offload.host_store import total_expert_bytes

    ckpt = open_checkpoint(model_dir)
    budget = round(frac * total_expert_bytes(ckpt.config, ckpt.expert_format))
    engine = OffloadedEngine.from_checkpoint(ckpt, budget, policy, prefill="routed", skip_below=skip_below)
    r = forced_nll(engine, windows, scored)
    n = r["tokens"]
    return {"model_ppl": math.exp(r["nll"] / n), "offloaded": {
        "path": "teacher-forced device decode (engine/forced.py), batch 1", "policy": policy,
        "expert_budget_frac": frac, "expert_budget_bytes": budget, "cache_slots": engine.cache.num_slots,
        "skip_below": skip_below, "approximate": skip_below > 0,
        "decode_h2d_bytes_per_token": r["decode_h2d_bytes"] / n, "decode_misses_per_token": r["decode_misses"] / n,
        "skipped_experts_per_token": r["skipped_experts"] / n,
        "decode_tokens_per_s": n / r["decode_seconds"] if r["decode_seconds"] > 0 else None,
        "prefill_h2d_bytes": r["prefill_h2d_bytes"]}}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "checkpoints" / "jaxmoe-tiny")
    p.add_argument("--text", type=Path, help="score this text file instead of the corpus split")
    p.add_argument("--seq-len", type=int, help="--text: window length (default: the model's training length)")
    p.add_argument("--max-windows", type=int, help="--text: score only the first N windows")
    p.add_argument("--expert-budget-frac", type=float,
                   help="--text: score through the offloaded decode with an expert cache of this fraction of the "
                   "expert bytes (teacher forced, batch 1)")  # fmt: skip
    p.add_argument("--policy", default="lru", choices=[n for n in DEVICE_POLICIES if n != "predictor"],  # no scorer here
                   help="--expert-budget-frac: the cache's eviction policy (default lru)")
    p.add_argument("--skip-below", type=float, default=0.0, metavar="W",
                   help="--expert-budget-frac: approximate decode, a missed expert whose routing weight is below W "
                   "is not loaded or computed (as generate.py --skip-below)")  # fmt: skip
    p.add_argument("--data", type=Path, default=ROOT / "data" / "corpus")
    p.add_argument("--token-cache", type=lambda s: Path(s) if s else None, default=ROOT / "data" / "tokens")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = p.parse_args(argv)
    offload = None
    if args.expert_budget_frac is not None:
        if args.text is None:
            p.error("--expert-budget-frac needs --text")
        if not 0 < args.expert_budget_frac <= 1:
            p.error(f"--expert-budget-frac must be in (0, 1], got {args.expert_budget_frac}")
        offload = {"frac": args.expert_budget_frac, "policy": args.policy, "skip_below": args.skip_below}
    elif args.skip_below:
        p.error("--skip-below needs --expert-budget-frac: only missed experts are skipped")
    if args.text is not None:
        if not args.text.is_file():
            p.error(f"--text {args.text}: no such file")
        try:
            report = evaluate_text(args.model, args.text, args.seq_len, offload, args.max_windows)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        o = report.get("offloaded")
        where = "" if o is None else (
            f", offloaded {o['policy']} at {o['expert_budget_frac']:g} of the expert bytes: "
            f"{o['decode_h2d_bytes_per_token'] / 1e6:.3f} MB/token, {o['decode_tokens_per_s']:.1f} tok/s"
            + (f", APPROXIMATE (skip below {o['skip_below']:g}: {o['skipped_experts_per_token']:.2f} skipped/token)"
               if o["approximate"] else ""))  # fmt: skip
        print(json.dumps(report) if args.json else
              f"{report['text']}: {report['tokens']} tokens scored, perplexity {report['model_ppl']:.3f} "
              f"({report['expert_format']} experts{where})")  # fmt: skip
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
