"""The offloaded engine against the cache simulator on a real model and text it never saw.

Generates with the engine (CPU or whatever JAX runs on) for each policy, then replays the
routing it computed (and the scorer's picks where a layer missed) through simulate_decode,
from a fresh policy with the engine's cache geometry, and prints both sides' counts and
the engine's decode speed: the simulator's own model of where each run stops, what it
loads, prefetches and evicts, against the engine's. tests/test_simulate.py also checks
it with routing computed apart, on a small fp32 model. A check script, not the package.

  PYTHONPATH=. python research/engine_replay.py --model checkpoints/jaxmoe-tiny \
      --text data/predictor/val_sample.txt --budget-frac 0.5 --batch 2 --prompt-tokens 32 \
      --new-tokens 64 --policies lru,lfru,predictor,reuse,maps
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the checkout

from jaxmoe.checkpoint import load  # noqa: E402
from jaxmoe.engine.offloaded import OffloadedEngine  # noqa: E402
from jaxmoe.engine.inputs import pad_prompts  # noqa: E402
from jaxmoe.offload.host_store import total_expert_bytes  # noqa: E402
from jaxmoe.offload.policy import PolicyShape  # noqa: E402
from jaxmoe.offload.policies import make_policy, policy_class  # noqa: E402
from jaxmoe.predictor.collect import text_tokens  # noqa: E402
from jaxmoe.predictor.simulate import DecodeTrace, simulate_decode  # noqa: E402
from jaxmoe.tokenizer import load_tokenizer  # noqa: E402

COUNTS = (("demand_misses", "expert_misses"), ("hits", "expert_hits"), ("prefetch_loads", "prefetch_issued"),
          ("prefetch_used", "prefetch_used"), ("scorer_calls", "predictor_calls"), ("boundary_copies", "boundary_copies"))  # fmt: skip


def recorder(engine, batch: int, steps: int):
    """Wrap the engine's driver to keep what each run reported: every (step, MoE layer)'s
    routing ids [B, K] (each is reported once: by the run that computed it or stopped at
    it), and the scorer's picks and probabilities made where a layer missed. On a bf16 model
    a full-sequence forward rounds differently from the decode step and can route a
    near-tie otherwise, so the replay takes the routing the engine computed."""
    cfg = engine.config
    engine.ensure_cache(batch)
    lm, moe = len(cfg.moe_layer_ids), list(cfg.moe_layer_ids)
    ids = np.zeros((batch, steps, lm, cfg.top_k), np.int64)
    scores = np.zeros((batch, steps, lm, cfg.num_experts), np.float32)
    plan = engine.driver.plan

    def recording(step, start, first_miss, run_ids, picks, probs, valid, planned):
        for j, layer in enumerate(moe):
            if start <= layer <= first_miss and layer != planned:
                ids[:, step - 1, j] = run_ids[layer]
        if first_miss < cfg.num_layers and picks.shape[-1]:
            j = moe.index(first_miss)
            for b in range(batch):
                scores[b, step - 1, j, picks[first_miss][b]] = probs[first_miss][b]
        return plan(step, start, first_miss, run_ids, picks, probs, valid, planned)

    engine.driver.plan = recording
    return ids, scores


def check(args, loaded, prompts, policy: str) -> dict:
    """One generate (its compile time is taken out of its decode speed by the engine) and its replay."""
    cfg = loaded.config
    scored = policy_class(policy).scorer != "none"
    predictor = str(Path(args.model) / "predictor") if scored else None
    budget = round(args.budget_frac * total_expert_bytes(cfg))
    engine = OffloadedEngine.from_checkpoint(args.model, budget, policy, predictor=predictor, prefill="routed")
    # The maps as shipped (the engine's copy learns as it runs), and the request's semantic vector.
    maps = copy.deepcopy(engine.maps)
    lengths, padded, _ = pad_prompts(cfg, prompts, args.new_tokens)  # as generate pads them
    vector = engine._semantic_vector(padded, lengths) if maps is not None else None
    steps = args.new_tokens - 1
    ids, scores = recorder(engine, len(prompts), steps)
    result = engine.generate(prompts, args.new_tokens)
    tokens = np.array([out[:steps] for out in result.token_ids])  # decode step s is fed the s-th generated token
    # The routed prefill loads, per MoE layer, the experts the prompts use (the schedule's first plans).
    prefill = [set() for _ in cfg.moe_layer_ids]
    for plan in engine.plan:
        if plan.step == 0 and plan.kind == "demand":
            prefill[cfg.moe_layer_ids.index(plan.layer)].update(plan.experts)
    trace = DecodeTrace(ids, scores if scored else None, tokens, prefill=tuple(tuple(sorted(p)) for p in prefill),
                        vectors=None if vector is None else vector[None])  # fmt: skip
    sched = engine.cache.schedule
    shape = PolicyShape(tuple(cfg.moe_layer_ids), cfg.num_experts, cfg.top_k)
    sim = simulate_decode(trace, cfg.moe_layer_ids, cfg.num_layers, sched.num_slots,
                          make_policy(policy, shape, **({"maps": maps} if maps is not None else {})),
                          staging=sched.staging, prefetch_max=sched.prefetch_staging, picks=cfg.top_k if scored else 0,
                          cost_expert_bytes=engine.store.expert_bytes, num_experts=cfg.num_experts)  # fmt: skip
    m = result.metrics
    return {"policy": policy, "slots": sched.num_slots, "tokens": sim.tokens,
            "engine": {b: m[b] for _, b in COUNTS} | {"resumes_per_token": m["resumes_per_token"],
                                                       "tpot_ms": m["tpot_ms"]},
            "simulation": {a: getattr(sim, a) for a, _ in COUNTS} | {"resumes_per_token": sim.resumes / sim.tokens},
            "equal": all(m[b] == getattr(sim, a) for a, b in COUNTS)}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--text", required=True, help="text the model never saw; prompts are its first tokens")
    p.add_argument("--budget-frac", type=float, required=True)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--policies", default="lru,lfru,predictor,reuse,maps")
    args = p.parse_args(argv)
    loaded = load(args.model, experts=False)  # its config and tokenizer; the engine reads the experts itself
    ids = text_tokens(load_tokenizer(loaded.tokenizer_path), args.text, args.batch * args.prompt_tokens)
    prompts = [ids[i * args.prompt_tokens : (i + 1) * args.prompt_tokens].tolist() for i in range(args.batch)]
    for policy in args.policies.split(","):
        print(json.dumps(check(args, loaded, prompts, policy)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
