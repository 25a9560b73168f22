"""Trace set + predictor -> recall of every predictor and the cache figures of every policy.

Predictors (next MoE layer's experts, from what is known at the current one): the
trained MLP, gate_ahead, prev_token, frequency, and the expert maps (from the token and
the layers so far, learning online as the replay goes, as the engine does). Policies:
every runtime policy replayed through the code the engine runs it with (the decode step's
own cache code for the policies the device runs, offload/device_sim.py; the host's decode
driver for maps, simulate_decode), amortised variants (eMoE), and Belady's MIN. Every policy gets the same cache slots at
one budget, as in the engine (a prefetch lands in a slot, jaxmoe/offload/cache.py).
Each policy's counts come with a
modelled decode time per token (jaxmoe/offload/costs.py: a model, not a measurement).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from jaxmoe.offload.costs import CostModel
from jaxmoe.offload.device_cache import DEVICE_POLICIES, DevicePolicy
from jaxmoe.offload.device_sim import simulate_device
from jaxmoe.offload.driver import Amortize
from jaxmoe.offload.expert_maps import ExpertMaps
from jaxmoe.offload.policy import PolicyShape
from jaxmoe.offload.policies import make_policy
from jaxmoe.predictor.baselines import (
    frequency_scores,
    gate_ahead_scores,
    maps_scores,
    mlp_scores,
    prev_token_scores,
    router_kernels,
    semantic_vectors,
)
from jaxmoe.predictor.fingerprint import router_hash
from jaxmoe.predictor.metrics import per_row_recall, precision_at, recall_at
from jaxmoe.predictor.simulate import (
    DecodeTrace,
    SimResult,
    capacity_for,
    decode_requests,
    simulate_belady,
    simulate_decode,
)
from jaxmoe.predictor.store import check_summary, load_predictor
from jaxmoe.predictor.traces import TraceError, TraceSet

FIELDS = ("tokens", "inputs", "ids", "probs")
PROMPT_TOKENS = 16  # a window's first tokens stand for its prompt (its semantic vector)

# name -> (policy, scores it prefetches from, amortisation); the runtime's policies first.
POLICY_RUNS = {
    "ondemand": ("ondemand", None, None),
    "lru": ("lru", None, None),
    "lfu": ("lfu", None, None),
    "lfru": ("lfru", None, None),
    "predictor": ("predictor", "mlp", None),
    "gate_ahead_prefetch": ("predictor", "gate_ahead", None),
    "reuse_demand": ("reuse", None, None),
    "reuse": ("reuse", "mlp", None),
    "reuse_gate_ahead": ("reuse", "gate_ahead", None),
    "maps": ("maps", "mlp", None),
    "maps_only": ("maps", None, None),
    "maps_no_boundary": ("maps", "mlp", None),  # the ablation: no copies at token boundaries
    "predictor@every2": ("predictor", "mlp", Amortize(every=2)),
    "predictor@every4": ("predictor", "mlp", Amortize(every=4)),
    "maps@every4": ("maps", "mlp", Amortize(every=4)),
    "maps@below0.5": ("maps", "mlp", Amortize(below=0.5)),
}


def _simulate_on_device(trace: DecodeTrace, requests, moe, num_layers: int, e: int, slots: int, policy, room: int,
                        picks: int, amortize: Amortize, expert_bytes: int) -> SimResult:  # fmt: skip
    """A policy the device runs, replayed through the decode step's own cache code (device_sim)."""
    device = DevicePolicy.of(policy, moe, prefetch=room, picks=picks, every=amortize.every, below=amortize.below,
                             window=amortize.window)  # fmt: skip
    c = simulate_device(trace.ids, moe, num_layers, e, slots, device, probs=trace.scores if picks else None,
                        reuse=policy.device_arrays(num_layers))  # fmt: skip
    tokens = trace.ids.shape[1]
    return SimResult(policy.name, slots, requests=len(requests), needed=sum(len(r[2]) for r in requests),
                     demand_misses=c["expert_misses"], prefetch_loads=c["prefetch_issued"],
                     prefetch_used=c["prefetch_used"], expert_bytes=expert_bytes, hits=c["expert_hits"],
                     tokens=tokens, runs=tokens, scorer_calls=c["predictor_calls"],
                     skipped_predictions=c["predictor_skipped_tokens"])  # fmt: skip


def softmax(x: np.ndarray) -> np.ndarray:
    x = np.exp(x - x.max(-1, keepdims=True))
    return x / x.sum(-1, keepdims=True)


def evaluate_on_traces(
    traces: str | Path,
    predictor: str | Path,
    budget_frac: float,
    model=None,
    prefetch: int | None = None,
    max_tokens: int | None = None,
    maps: ExpertMaps | str | Path | None = None,
    costs: CostModel = CostModel(),
    policies: tuple[str, ...] | None = None,
    progress=None,
) -> dict:
    """Recall of every predictor and cache loads and modelled time of every policy.

    If the traces are the ones the predictor was trained on, only their test split is
    used; other traces (e.g. of other text) are used whole. `model` (a LoadedModel)
    enables gate_ahead and the request maps' semantic vectors. `maps`: expert maps to
    start from (a file from scripts/build_expert_maps.py; None: empty, learnt online).
    `policies`: a subset of POLICY_RUNS (default all); `progress(name)` before each.
    """
    for name in policies or ():
        if name not in POLICY_RUNS:
            raise ValueError(f"unknown policy run {name!r}; choose from {sorted(POLICY_RUNS)}")
    ts = TraceSet(traces)
    pred = load_predictor(predictor, None)
    check_summary(pred.meta["model"], ts.model, str(predictor), what=f"the traces at {traces}")
    recorded = ts.manifest.get("router_hash")  # absent from traces collected before it was recorded
    if model is not None and recorded is not None and router_hash(model.model, model.config) != recorded:
        raise TraceError(
            f"{traces}: router_hash={recorded} is not the given model's "
            f"({router_hash(model.model, model.config)}): the traces come from other weights"
        )
    held_out = ts.fingerprint == pred.meta["traces"]["fingerprint"]
    start, stop = pred.meta["traces"]["split"]["test"] if held_out else (0, ts.token_count)
    if max_tokens:
        stop = min(stop, start + max_tokens)
    first = max(0, start - 1)  # the token before the range, for prev_token
    arrays = ts.load(first, stop, fields=FIELDS)
    before = arrays["probs"][0] if first < start else None
    tokens, inputs, ids, probs = (arrays[k][start - first :] for k in FIELDS)
    ids = ids.astype(np.int64)
    m = pred.meta["model"]
    k, e, moe = m["top_k"], m["num_experts"], m["moe_layers"]
    count = prefetch or pred.prefetch_count
    true_next = ids[:, 1:]
    if maps is not None and not isinstance(maps, ExpertMaps):
        maps = ExpertMaps.load(maps, m)
    maps = maps if maps is not None else ExpertMaps(len(moe), e, k)

    scores = {
        "mlp": mlp_scores(pred.module, inputs),
        "gate_ahead": None,
        "prev_token": prev_token_scores(probs, before),
        "frequency": frequency_scores(np.asarray(pred.meta["frequency"]), len(ids)),
        "maps": maps_scores(copy.deepcopy(maps), ids, tokens),
    }
    notes = {"maps": "expert maps predict from the token and its layers so far, learning online"}
    if model is None:
        notes["gate_ahead"] = "no --model given"
    elif ts.manifest["projection"] is not None:
        notes["gate_ahead"] = "traces hold projected router inputs; the router needs the full hidden state"
    else:
        scores["gate_ahead"] = softmax(gate_ahead_scores(inputs, router_kernels(model.model, model.config)))
    recall = {n: None if s is None else recall_at(s, true_next) for n, s in scores.items()}
    precision = {n: None if s is None else precision_at(s, true_next, count) for n, s in scores.items()}
    recall_p = {n: None if s is None else recall_at(s, true_next, count) for n, s in scores.items()}
    maps_two = maps_scores(copy.deepcopy(maps), ids, tokens, ahead=2)

    window = ts.manifest["window"]
    starts = tuple(range(0, len(ids), window))  # every window is one request
    vectors = None
    if model is not None:
        vectors = semantic_vectors(model.model.embed_tokens.embedding[...], tokens, starts, PROMPT_TOKENS)
    else:
        notes["request_maps"] = "no --model given: no semantic vectors, so no request maps"

    capacity = capacity_for(budget_frac, len(moe), e)
    requests = decode_requests(ids, moe)
    eb = m["expert_bytes"]
    shape = PolicyShape(tuple(moe), e, k)
    results, times, replays = {}, {}, {}
    for name in policies or tuple(POLICY_RUNS):
        policy_name, source, amortize = POLICY_RUNS[name]
        if source is not None and scores[source] is None:
            continue
        if progress:
            progress(name)
        options = {"maps": copy.deepcopy(maps), "boundary": name != "maps_no_boundary"} if policy_name == "maps" else {}
        policy = make_policy(policy_name, shape, **options)
        # As the engine: prefetch lanes only where something predicts.
        room = count if policy.prefetches(source is not None) else 0
        if source not in replays:  # one per score source, shared by the policies that prefetch from it
            replays[source] = DecodeTrace.single(ids, None if source is None else scores[source], tokens,
                                                 requests=starts, vectors=vectors)  # fmt: skip
        trace = replays[source]
        if policy_name in DEVICE_POLICIES:
            r = _simulate_on_device(trace, requests, moe, m["num_layers"], e, capacity, policy, room,
                                    k if source else 0, amortize or Amortize(), eb)  # fmt: skip
        else:
            r = simulate_decode(trace, moe, m["num_layers"], capacity, policy, prefetch_max=room,
                                picks=k if source else 0, costs=costs, amortize=amortize or Amortize(),
                                expert_bytes=eb, num_experts=e)  # fmt: skip
        r.policy = name
        results[name] = r
        times[name] = r.time(costs, m["num_layers"])
    belady = simulate_belady(requests, capacity, eb)
    out = {n: r.to_dict() for n, r in results.items()}
    out["belady"] = belady.to_dict()
    times["belady"] = belady.time(costs, m["num_layers"])
    lru = results.get("lru")
    for n, r in [*results.items(), ("belady", belady)]:
        out[n]["time"] = times[n]
        out[n]["slots"] = r.capacity
        if lru is not None:
            out[n]["demand_vs_lru"] = r.demand_misses / max(1, lru.demand_misses)
            out[n]["total_vs_lru"] = r.total_loads / max(1, lru.total_loads)
            out[n]["time_vs_lru"] = times[n]["ms_per_token"] / times["lru"]["ms_per_token"]
        out[n]["total_vs_belady"] = r.total_loads / max(1, belady.total_loads)

    return {
        "recall": recall,
        "precision_at_prefetch": precision,
        "recall_at_prefetch": recall_p,
        "maps_recall_two_ahead": recall_at(maps_two, ids[:, 2:]) if len(moe) > 2 else None,
        "mlp_recall_per_layer": dict(zip([f"{a}->{b}" for a, b in pred.meta["pairs"]], per_row_recall(scores["mlp"], true_next))),
        "prefetch_count": count,
        "top_k": k,
        "policies": out,
        "time_model": {**costs.to_dict(), "layers": m["num_layers"],
                       "note": "modelled, not measured: these traces' counts with the cost model's per-layer "
                               "compute and expert size (an OLMoE-1B-7B expert unless set)"},  # fmt: skip
        "capacity_experts": capacity,
        "total_experts": len(moe) * e,
        "budget_frac": budget_frac,
        "tokens": int(len(ids)),
        "token_range": [int(start), int(stop)],
        "split": "test" if held_out else "all",  # test: the held-out split of the predictor's own traces
        "predictor_arch": pred.meta["arch"],
        "notes": notes,
    }
