"""Expert formats side by side on real text: host-to-device bytes per decode token, hit rate
and decode speed of checkpoints that differ only in how their experts are stored.

    python -m bench.formats --model checkpoints/jaxmoe-tiny --model DIR_INT8 --model DIR_INT4 \
        --text data/corpus/brown.txt --text FILE ... [--budgets 0.25,0.5] [--policies lru,predictor]
        [--prompts 4] [--prompt-tokens 64] [--new-tokens 64] [--json]

Budgets are fractions of the FIRST model's expert bytes, so every format gets the same device
bytes (`same_bytes`), and also fractions of each model's own expert bytes (`same_fraction`,
where a quantized model's bytes per token should fall with its expert size). Prompts are
`--prompts` windows of `--prompt-tokens` tokens from the end of each text (the part of a
corpus file its held-out split comes from), greedy, batch 1, one engine per (model, budget,
policy) reused across prompts. Counts are exact; times are this machine's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxmoe.checkpoint.expert_format import read_format  # noqa: E402
from jaxmoe.config import load_hf_config  # noqa: E402
from jaxmoe.engine.offloaded import OffloadedEngine  # noqa: E402
from jaxmoe.offload.host_store import total_expert_bytes  # noqa: E402
from jaxmoe.tokenizer import load_tokenizer  # noqa: E402


def text_prompts(tokenizer, path: Path, count: int, length: int) -> list[list[int]]:
    ids = tokenizer.encode(path.read_text(encoding="utf-8", errors="replace")).ids
    tail = ids[-count * length :]
    if len(tail) < count * length:
        raise SystemExit(f"{path}: {len(ids)} tokens, fewer than --prompts x --prompt-tokens")
    return [tail[i * length : (i + 1) * length] for i in range(count)]


def run_one(model: str, budget: int, policy: str, prompts: list[list[int]], new: int) -> dict:
    predictor = Path(model, "predictor") if policy == "predictor" else None
    engine = OffloadedEngine.from_checkpoint(model, budget, policy, predictor=predictor)
    engine.generate([prompts[0]], max_new_tokens=new)  # compile and warm
    h2d = hits = misses = tokens = 0
    seconds = 0.0
    for prompt in prompts:
        r = engine.generate([prompt], max_new_tokens=new)
        m = r.metrics
        seconds += m["tpot_ms"] * (len(r.token_ids[0]) - 1) / 1e3 if m["tpot_ms"] else 0.0
        h2d += m["h2d_bytes"] - m["prefill_h2d_bytes"]
        hits, misses = hits + m["expert_hits"], misses + m["expert_misses"]
        tokens += len(r.token_ids[0]) - 1
    return {"decode_h2d_bytes_per_token": h2d / tokens, "hit_rate": hits / (hits + misses),
            "decode_tokens_per_s": tokens / seconds if seconds else None, "cache_slots": engine.cache.num_slots,
            "expert_bytes": engine.store.expert_bytes}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="checkpoint directory (the first is the baseline)")
    p.add_argument("--text", action="append", required=True, type=Path)
    p.add_argument("--budgets", default="0.25,0.5")
    p.add_argument("--policies", default="lru,predictor")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    fractions = [float(f) for f in args.budgets.split(",")]
    tokenizer = load_tokenizer(Path(args.model[0], "tokenizer.json"))
    prompts = [q for t in args.text for q in text_prompts(tokenizer, t, args.prompts, args.prompt_tokens)]
    sizes = {m: total_expert_bytes(load_hf_config(m), read_format(m)) for m in args.model}
    rows = []
    for frac in fractions:
        for policy in args.policies.split(","):
            for model in args.model:
                for basis, budget in (("same_bytes", frac * sizes[args.model[0]]), ("same_fraction", frac * sizes[model])):
                    if basis == "same_fraction" and model == args.model[0]:
                        continue  # the baseline's two budgets are one
                    r = run_one(model, int(budget), policy, prompts, args.new_tokens)
                    row = {"model": model, "format": read_format(model).name, "policy": policy, "fraction": frac,
                           "basis": basis, "budget_bytes": int(budget), **r}  # fmt: skip
                    rows.append(row)
                    print(f"{row['format']:10s} {policy:9s} {frac:.2f} {basis:13s} slots {r['cache_slots']:4d} "
                          f"hit {r['hit_rate']:.3f} {r['decode_h2d_bytes_per_token'] / 1e6:.3f} MB/token "
                          f"{r['decode_tokens_per_s'] or 0:.1f} tok/s", file=sys.stderr)  # fmt: skip
    out = {"texts": [str(t) for t in args.text], "prompts": len(prompts), "prompt_tokens": args.prompt_tokens,
           "new_tokens": args.new_tokens, "rows": rows}  # fmt: skip
    print(json.dumps(out) if args.json else json.dumps({k: v for k, v in out.items() if k != "rows"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
