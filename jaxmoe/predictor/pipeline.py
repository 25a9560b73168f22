"""Trace set -> trained predictor, trace set -> expert maps (trace set + predictor ->
recall and cache figures: evaluate.py). The scripts are thin wrappers over these, and
share their command-line set-up from here.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from jaxmoe.config import MoEConfig
from jaxmoe.offload.expert_maps import ExpertMaps, MapsConfig
from jaxmoe.predictor.baselines import expert_frequency, semantic_vectors
from jaxmoe.predictor.evaluate import PROMPT_TOKENS
from jaxmoe.predictor.fingerprint import layer_pairs, model_summary
from jaxmoe.predictor.mlp import param_count
from jaxmoe.predictor.store import build_module, save_predictor
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


def maps_token_range(ts: TraceSet, split: str, val_frac: float = 0.1, test_frac: float = 0.2) -> tuple[int, int]:
    """The tokens [start, stop) build_maps_on_traces reads for `split`."""
    if split == "all":
        return 0, ts.token_count
    if split == "train":
        return tuple(split_ranges(ts.token_count, ts.manifest["window"], val_frac, test_frac)["train"])
    raise ValueError(f"split={split!r}; choose 'train' or 'all'")


def build_maps_on_traces(traces: str | Path, out: str | Path | None = None, model=None, split: str = "train",
                         val_frac: float = 0.1, test_frac: float = 0.2, config: MapsConfig = MapsConfig(),
                         progress: Callable[[int], None] | None = None) -> ExpertMaps:  # fmt: skip
    """Expert maps from a trace set's `split` ("train": the split train_on_traces trains the
    predictor on, with the same fractions; "all"): every token's routing (token and
    trajectory maps) and, with `model` (a LoadedModel, for the semantic vectors), every
    window as one request. Saved to `out` if given."""
    ts = TraceSet(traces)
    start, stop = maps_token_range(ts, split, val_frac, test_frac)
    arrays = ts.load(start, stop, fields=("tokens", "ids"))
    tokens, ids = arrays["tokens"], arrays["ids"].astype(np.int64)
    m = ts.model
    maps = ExpertMaps(len(m["moe_layers"]), m["num_experts"], m["top_k"], config, model=m)
    window = ts.manifest["window"]
    embedding = None if model is None else model.model.embed_tokens.embedding[...]
    for w in range(0, len(ids), window):
        for t in range(w, min(w + window, len(ids))):
            maps.add_token(int(tokens[t]), [list(row) for row in ids[t]])
        if embedding is not None:
            usage = np.zeros((maps.lm, maps.e))
            for j in range(maps.lm):
                np.add.at(usage[j], ids[w : w + window, j].ravel(), 1.0)
            vector = semantic_vectors(embedding, tokens, [w], PROMPT_TOKENS)[0]
            maps.add_request(vector, usage / len(ids[w : w + window]))
        if progress:
            progress(min(window, len(ids) - w))
    if out is not None:
        maps.save(out)
    return maps


# -- the trace scripts' set-up (collect_traces, train_predictor, build_expert_maps, eval_predictor)
# A refused input is a ValueError here (ConfigError, CheckpointError, TraceError, PredictorMismatch,
# MapsMismatch all are) or a missing file.
INPUT_ERRORS = (ValueError, FileNotFoundError)


def script_parser(doc: str) -> argparse.ArgumentParser:
    """A trace script's parser: its docstring as the help, --json and --quiet."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def progress_bar(args: argparse.Namespace, **kw):
    """A tqdm bar on stderr (stdout is --json's), none with --quiet."""
    from tqdm import tqdm

    return tqdm(file=sys.stderr, disable=args.quiet, **kw)


def refuse(e: Exception) -> int:
    """A refused input (INPUT_ERRORS): its message on stderr, exit status 2."""
    print(f"error: {e}", file=sys.stderr)
    return 2
