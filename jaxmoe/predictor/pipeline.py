"""Trace set -> trained predictor, and trace set + predictor -> recall and cache figures.

The scripts are thin wrappers over these two functions.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np

from jaxmoe.config import MoEConfig
from jaxmoe.predictor.baselines import (
    expert_frequency,
    frequency_scores,
    gate_ahead_scores,
    mlp_scores,
    prev_token_scores,
    router_kernels,
)
from jaxmoe.predictor.fingerprint import layer_pairs, model_summary, router_hash
from jaxmoe.predictor.metrics import per_row_recall, precision_at, recall_at
from jaxmoe.predictor.mlp import param_count
from jaxmoe.predictor.simulate import (
    EVICTIONS,
    capacity_for,
    decode_requests,
    simulate_belady,
    simulate_prefetch,
    simulate_schedule,
    simulate_variant,
)
from jaxmoe.predictor.store import build_module, check_summary, load_predictor, save_predictor
from jaxmoe.predictor.traces import TraceError, TraceSet
from jaxmoe.predictor.train import PairData, TrainConfig, fit, split_ranges

FIELDS = ("inputs", "ids", "probs")


def train_on_traces(
    cfg: MoEConfig,
    traces: str | Path,
    out: str | Path,
    archs: tuple[str, ...] = ("embed", "heads"),
    tc: TrainConfig = TrainConfig(),
    val_frac: float = 0.1,
    test_frac: float = 0.2,
    progress: Callable[[str, int, dict], None] | None = None,
) -> dict:
    """Train one predictor per arch, keep the best on validation recall@top_k; returns its metadata."""
    ts = TraceSet(traces)
    summary = model_summary(cfg)
    if ts.model["model_hash"] != summary["model_hash"]:
        raise TraceError(
            f"{traces}: traces are of model_hash={ts.model['model_hash']}, the model is {summary['model_hash']}"
        )
    split = split_ranges(ts.token_count, ts.manifest["window"], val_frac, test_frac)
    train_arrays = ts.load(*split["train"], fields=FIELDS)
    train, val = PairData.from_traces(train_arrays), PairData.from_traces(ts.load(*split["val"], fields=FIELDS))
    projection = ts.projection()
    base = {
        "model": summary,
        "pairs": [list(p) for p in layer_pairs(cfg)],
        "width": tc.width,
        "input_dim": ts.manifest["input_dim"],
        "projection": ts.manifest["projection"],
        "prefetch_count": cfg.top_k,
        "train": {k: v for k, v in dataclasses.asdict(tc).items() if k != "arch"},
        "traces": {"fingerprint": ts.fingerprint, "path": str(Path(traces).resolve()),
                   "token_count": ts.token_count, "split": split, "text": ts.manifest["text"]},  # fmt: skip
        "router_hash": ts.manifest.get("router_hash"),  # the weights the traces (and so this predictor) came from
        "frequency": expert_frequency(train_arrays["ids"], cfg.num_experts).tolist(),
    }
    candidates, modules = {}, {}
    for arch in archs:
        module = build_module({**base, "arch": arch}, projection, seed=tc.seed)
        cb = None if progress is None else (lambda step, entry, arch=arch: progress(arch, step, entry))
        module, result = fit(module, train, val, dataclasses.replace(tc, arch=arch), cb)
        result["params"] = param_count(module)
        candidates[arch], modules[arch] = result, module
    best = max(archs, key=lambda a: candidates[a]["val_recall"])
    meta = {
        **base,
        "arch": best,
        "recall": {"val": candidates[best]["val_recall"]},
        "param_count": candidates[best]["params"],
        "candidates": {a: {k: v for k, v in r.items()} for a, r in candidates.items()},
    }
    save_predictor(out, modules[best], meta)
    return meta


def evaluate_on_traces(
    traces: str | Path,
    predictor: str | Path,
    budget_frac: float,
    model=None,
    prefetch: int | None = None,
    max_tokens: int | None = None,
) -> dict:
    """Recall of every predictor and cache loads of every policy on the held-out traces.

    If the traces are the ones the predictor was trained on, only their test split is
    used; other traces (e.g. of other text) are used whole. `model` (a LoadedModel)
    enables the gate_ahead baseline.
    """
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
    inputs, ids, probs = (arrays[k][start - first :] for k in FIELDS)
    m = pred.meta["model"]
    k, e, moe = m["top_k"], m["num_experts"], m["moe_layers"]
    count = prefetch or pred.prefetch_count
    true_next = ids[:, 1:].astype(np.int64)

    scores = {
        "mlp": mlp_scores(pred.module, inputs),
        "gate_ahead": None,
        "prev_token": prev_token_scores(probs, before),
        "frequency": frequency_scores(np.asarray(pred.meta["frequency"]), len(ids)),
    }
    notes = {}
    if model is None:
        notes["gate_ahead"] = "no --model given"
    elif ts.manifest["projection"] is not None:
        notes["gate_ahead"] = "traces hold projected router inputs; the router needs the full hidden state"
    else:
        scores["gate_ahead"] = gate_ahead_scores(inputs, router_kernels(model.model, model.config))

    recall = {n: None if s is None else recall_at(s, true_next) for n, s in scores.items()}
    precision = {n: None if s is None else precision_at(s, true_next, count) for n, s in scores.items()}
    recall_p = {n: None if s is None else recall_at(s, true_next, count) for n, s in scores.items()}

    capacity = capacity_for(budget_frac, len(moe), e)
    requests = decode_requests(ids, moe)
    eb = m["expert_bytes"]
    policies = {name: simulate_schedule(requests, capacity, name, expert_bytes=eb) for name in ("ondemand", "lru", "lfu")}
    policies["predictor"] = simulate_prefetch(ids, scores["mlp"], moe, capacity, count, expert_bytes=eb)
    if scores["gate_ahead"] is not None:
        ga = scores["gate_ahead"]
        ga = np.exp(ga - ga.max(-1, keepdims=True))
        ga /= ga.sum(-1, keepdims=True)
        policies["gate_ahead_prefetch"] = simulate_prefetch(ids, ga, moe, capacity, count, expert_bytes=eb)
    policies["belady"] = simulate_belady(requests, capacity, eb)
    variants = {f"mlp_{ev}": simulate_variant(ids, scores["mlp"], moe, capacity, count, eb, evict=ev) for ev in EVICTIONS}

    return {
        "recall": recall,
        "precision_at_prefetch": precision,
        "recall_at_prefetch": recall_p,
        "mlp_recall_per_layer": dict(zip([f"{a}->{b}" for a, b in pred.meta["pairs"]], per_row_recall(scores["mlp"], true_next))),
        "prefetch_count": count,
        "top_k": k,
        "policies": {n: r.to_dict() for n, r in policies.items()},
        "policy_variants": {n: r.to_dict() for n, r in variants.items()},  # offline rules, not the runtime's
        "capacity_experts": capacity,
        "total_experts": len(moe) * e,
        "budget_frac": budget_frac,
        "tokens": int(len(ids)),
        "token_range": [int(start), int(stop)],
        "split": "test" if held_out else "all",  # test: the held-out split of the predictor's own traces
        "predictor_arch": pred.meta["arch"],
        "notes": notes,
    }
