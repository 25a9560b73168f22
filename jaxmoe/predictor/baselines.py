"""Scores for the next MoE layer's experts from each predictor, on trace arrays.

Every function returns scores [n, R, E]: row j scores MoE layer j+1's experts
for the token, from what is known when MoE layer j runs. Higher is more likely.
  gate_ahead  layer j+1's own router weight applied to layer j's router input
              (AdapMoE / Pre-gated MoE; needs the model and unprojected inputs)
  prev_token  the previous token's router distribution at layer j+1
  frequency   how often each expert of layer j+1 was chosen in the training traces
  mlp         the trained predictor
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmoe.config import MoEConfig


def router_kernels(model, cfg: MoEConfig) -> np.ndarray:
    """[Lm, D, E] fp32 router weights of the MoE layers, from a loaded MoEDecoder."""
    return np.stack([np.asarray(model.layers[l].mlp.gate.kernel[...], np.float32) for l in cfg.moe_layer_ids])


def gate_ahead_scores(inputs: np.ndarray, kernels: np.ndarray) -> np.ndarray:
    """inputs [n, Lm, D] (unprojected), kernels [Lm, D, E] -> [n, R, E]: h_j @ W_{j+1}."""
    h = inputs[:, :-1].astype(np.float32)
    return np.einsum("nrd,rde->nre", h, kernels[1:])


def prev_token_scores(probs: np.ndarray, before: np.ndarray | None = None) -> np.ndarray:
    """probs [n, Lm, E]; `before` [Lm, E] is the token preceding the range (zeros if none)."""
    first = np.zeros_like(probs[:1]) if before is None else before[None]
    prev = np.concatenate([first, probs[:-1]]).astype(np.float32)
    return prev[:, 1:]


def expert_frequency(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """ids [n, Lm, K] -> counts [Lm, E] of how often each expert was chosen."""
    n, lm, k = ids.shape
    counts = np.zeros((lm, num_experts), np.int64)
    for j in range(lm):
        counts[j] = np.bincount(ids[:, j].reshape(-1).astype(np.int64), minlength=num_experts)
    return counts


def frequency_scores(counts: np.ndarray, n: int) -> np.ndarray:
    """counts [Lm, E] -> [n, R, E] (the same ranking for every token)."""
    return np.broadcast_to(counts[1:].astype(np.float32), (n,) + counts[1:].shape)


def mlp_scores(module, inputs: np.ndarray, batch: int = 2048) -> np.ndarray:
    """inputs [n, Lm, P] -> next-layer probabilities [n, R, E] from a trained ExpertPredictor."""
    graphdef, state = nnx.split(module)
    projected = module.projection is not None  # trace inputs are projected exactly when the predictor projects

    @jax.jit
    def predictor_scores(state, x):  # x [B, R, P]; the name is the program's name in a profile
        logits = nnx.merge(graphdef, state).rows(jnp.swapaxes(x, 0, 1), projected)
        return jax.nn.softmax(jnp.swapaxes(logits, 0, 1), -1)

    x = inputs[:, :-1]
    out = []
    for s in range(0, len(x), batch):
        xb = x[s : s + batch]
        pad = batch - len(xb)
        if pad:
            xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], xb.dtype)])
        out.append(np.asarray(predictor_scores(state, xb))[: batch - pad])
    return np.concatenate(out)


def maps_scores(maps, ids: np.ndarray, tokens: np.ndarray | None, ahead: int = 1) -> np.ndarray:
    """Expert maps (jaxmoe/offload/expert_maps.py) as a predictor: [n, Lm - ahead, E], row j
    scoring MoE layer j+ahead from the token and its layers 0..j, as the decode driver asks
    them where layer j missed. The maps learn each token after predicting it (online, as in
    the engine; the caller's maps are changed)."""
    n, lm, _ = ids.shape
    out = np.zeros((n, lm - ahead, maps.e), np.float32)
    for t in range(n):
        token = None if tokens is None else int(tokens[t])
        prefix: dict[int, list[int]] = {}
        for j in range(lm - ahead):
            prefix[j] = [int(e) for e in ids[t, j]]
            out[t, j] = maps.predict(token, prefix, [j + ahead])[0]
        maps.add_token(token, [list(map(int, ids[t, j])) for j in range(lm)])
    return out


def semantic_vectors(embedding, tokens: np.ndarray, starts, prompt: int) -> np.ndarray:
    """[len(starts), D]: for each request starting at `starts`, the mean input embedding of
    its first `prompt` tokens (its semantic vector for the expert maps). `embedding` [V, D]
    as the model holds it: only the rows used are gathered and converted to fp32."""
    return np.stack([np.asarray(embedding[tokens[s : s + prompt]], np.float32).mean(0) for s in starts])
