"""Fit the next-layer predictor on traces with Optax; early stopping on validation recall.

Samples are (token, layer pair): the router input of MoE layer j predicts the
experts of MoE layer j+1 of the same token. A step draws `batch_tokens` tokens and
uses all R pairs of each. The default loss is the cross-entropy against the next
layer's full router distribution (distillation); "multihot" is a binary
cross-entropy against its top-k set.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxmoe.predictor.mlp import ExpertPredictor

LOSSES = ("soft", "multihot")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    arch: str = "embed"
    width: int = 128
    batch_tokens: int = 256
    steps: int = 8000  # the schedule's length; early stopping may end sooner
    warmup_steps: int = 200
    lr: float = 2e-3
    weight_decay: float = 1e-4
    clip_norm: float = 1.0
    eval_every: int = 250
    patience: int = 4  # evaluations without a better validation recall before stopping
    loss: str = "soft"
    seed: int = 0


class PairData(NamedTuple):
    """Router inputs of MoE layers 0..Lm-2 and what MoE layers 1..Lm-1 then chose."""

    x: np.ndarray  # [n, R, P] float16
    probs: np.ndarray  # [n, R, E] float16, the next layer's router distribution
    ids: np.ndarray  # [n, R, K] the next layer's top-k

    @classmethod
    def from_traces(cls, arrays: dict) -> "PairData":
        return cls(arrays["inputs"][:, :-1], arrays["probs"][:, 1:], arrays["ids"][:, 1:].astype(np.int32))

    def __len__(self) -> int:
        return self.x.shape[0]


def split_ranges(n: int, window: int, val_frac: float, test_frac: float) -> dict[str, list[int]]:
    """Contiguous token ranges (train, val, test), cut at window boundaries so no window is shared."""
    windows = n // window
    test_w = max(1, round(windows * test_frac)) if test_frac > 0 else 0
    val_w = max(1, round(windows * val_frac))
    train_w = windows - val_w - test_w
    if train_w < 1:
        raise ValueError(f"{windows} windows of {window} tokens cannot be split into train/val/test")
    a, b = train_w * window, (train_w + val_w) * window
    return {"train": [0, a], "val": [a, b], "test": [b, b + test_w * window]}


def _loss(logits, probs, ids, kind: str):
    """logits [R, B, E]; probs [R, B, E]; ids [R, B, K]."""
    if kind == "soft":
        target = probs.astype(jnp.float32)
        target = target / jnp.sum(target, -1, keepdims=True)
        return -jnp.mean(jnp.sum(target * jax.nn.log_softmax(logits), -1))
    target = jnp.sum(jax.nn.one_hot(ids, logits.shape[-1]), -2)
    return jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(logits, target), -1))


def _hits(logits, ids):
    """Total number of true experts among the top-K logits; logits [R, B, E], ids [R, B, K]."""
    _, top = jax.lax.top_k(logits, ids.shape[-1])
    return jnp.sum(jnp.any(top[..., :, None] == ids[..., None, :], -1))


def fit(
    module: ExpertPredictor,
    train: PairData,
    val: PairData,
    tc: TrainConfig,
    progress: Callable[[int, dict], None] | None = None,
) -> tuple[ExpertPredictor, dict]:
    """Train in place from `module`'s initial weights; returns the best-validation module and history."""
    if tc.loss not in LOSSES:
        raise ValueError(f"loss={tc.loss!r}; choose one of {LOSSES}")
    projected = module.projection is not None  # traces hold projected inputs exactly when the predictor projects
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    schedule = optax.warmup_cosine_decay_schedule(0.0, tc.lr, tc.warmup_steps, max(tc.steps, tc.warmup_steps + 1),
                                                  end_value=tc.lr * 0.02)  # fmt: skip
    tx = optax.chain(optax.clip_by_global_norm(tc.clip_norm), optax.adamw(schedule, weight_decay=tc.weight_decay))
    opt_state = tx.init(params)
    x, probs, ids = (jnp.asarray(a) for a in train)
    swap = lambda a: jnp.swapaxes(a, 0, 1)  # noqa: E731  [B, R, ...] -> [R, B, ...]

    def loss_fn(params, idx):
        logits = nnx.merge(graphdef, params, rest).rows(swap(x[idx]), projected)
        return _loss(logits, swap(probs[idx]), swap(ids[idx]), tc.loss)

    @jax.jit
    def predictor_train_step(params, opt_state, idx):  # the name is the program's name in a profile
        loss, grads = jax.value_and_grad(loss_fn)(params, idx)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def val_hits(params, xb, ib):
        return _hits(nnx.merge(graphdef, params, rest).rows(swap(xb), projected), swap(ib))

    def val_recall(params) -> float:
        hits, bs = 0, 1024
        for s in range(0, len(val), bs):
            xb, ib = val.x[s : s + bs], val.ids[s : s + bs]
            if len(xb) < bs:  # pad to one static shape; padded rows are dropped from the count by masking ids
                pad = bs - len(xb)
                xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], xb.dtype)])
                ib = np.concatenate([ib, np.full((pad,) + ib.shape[1:], -1, ib.dtype)])
            hits += int(val_hits(params, xb, ib))
        return hits / (val.ids.size)

    rng = np.random.default_rng(tc.seed)
    order, pos = rng.permutation(len(train)), 0
    best = (-1.0, params, 0)
    history, since_best, losses, t0 = [], 0, [], time.perf_counter()
    for i in range(1, tc.steps + 1):
        if pos + tc.batch_tokens > len(order):
            order, pos = rng.permutation(len(train)), 0
        idx = order[pos : pos + tc.batch_tokens]
        pos += tc.batch_tokens
        params, opt_state, loss = predictor_train_step(params, opt_state, jnp.asarray(idx))
        losses.append(loss)
        if i % tc.eval_every == 0 or i == tc.steps:
            recall = val_recall(params)
            entry = {"step": i, "loss": float(np.mean(jax.device_get(losses))), "val_recall": recall}
            history.append(entry)
            losses = []
            if recall > best[0]:
                best, since_best = (recall, params, i), 0
            else:
                since_best += 1
            if progress:
                progress(i, entry)
            if since_best >= tc.patience:
                break
        elif progress and i % 50 == 0:
            progress(i, {"step": i, "loss": float(loss)})
    nnx.update(module, best[1])
    return module, {
        "val_recall": best[0],
        "best_step": best[2],
        "steps_run": i,
        "seconds": time.perf_counter() - t0,
        "history": history,
    }
