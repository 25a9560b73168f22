"""Prediction quality: how many of the experts a layer will use are among the top scores.

scores [..., E] (any ranking: logits, probabilities, counts), true ids [..., K].
recall@c    = |top-c(scores) & true| / K     (recall@top_k is c = K)
precision@c = |top-c(scores) & true| / c     (c: how many experts are prefetched)
Ties in `scores` go to the lower expert id.
"""

from __future__ import annotations

import numpy as np


def top_ids(scores: np.ndarray, count: int) -> np.ndarray:
    """[..., count] ids of the highest scores, best first."""
    return np.argsort(-np.asarray(scores, np.float32), axis=-1, kind="stable")[..., :count]


def overlap(scores: np.ndarray, true_ids: np.ndarray, count: int) -> np.ndarray:
    """[...] number of true experts among the top `count` scores."""
    top = top_ids(scores, count)
    return (top[..., :, None] == np.asarray(true_ids)[..., None, :]).any(-1).sum(-1)


def recall_at(scores: np.ndarray, true_ids: np.ndarray, count: int | None = None) -> float:
    k = true_ids.shape[-1]
    return float(overlap(scores, true_ids, count or k).mean() / k)


def precision_at(scores: np.ndarray, true_ids: np.ndarray, count: int) -> float:
    return float(overlap(scores, true_ids, count).mean() / count)


def per_row_recall(scores: np.ndarray, true_ids: np.ndarray) -> list[float]:
    """recall@K for each row r of scores [n, R, E] / true ids [n, R, K]."""
    k = true_ids.shape[-1]
    return [float(x) / k for x in overlap(scores, true_ids, k).mean(0)]
