"""The decode steps that compute every layer from experts already on the device.

`forward_step`: the resident engine's step (and the resident server rows'): embedding,
every layer straight through, the final norm, the head and sampling in one program, with
nothing under a conditional.

`decode_step`: the host-planned offloaded step (the maps policy, through
engine/offloaded_decode.py). Each MoE layer finds its experts through a table:
`table[l, e]` is the row of `experts[l]` that holds expert e of layer l, or -1 when it is
not on the device. A layer that needs an expert outside the pool cannot be computed here:
the program keeps the hidden state entering it, skips it and every layer after it, and
says which layer it was (`first_miss`). The host loads what that layer needs and runs the
same program again from there (`start`), with that hidden state (`x_start`). Recomputing a
layer's attention writes the same keys and values again, so resuming is exact. Layers are
skipped with `lax.cond`, so a resume costs only the layers it runs, and every start runs
the same compiled program (the same numbers whatever the start).

All of them compute a layer with the same calls on the same shapes (attention, routing,
`moe_fn` over the expert rows, the residual), so the engines compute the same numbers.

Shapes: B batch, T tokens (1 when decoding), N = B x T, D hidden, L layers, E experts,
K experts per token, P predicted experts per row, S rows of a pool.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from jaxmoe.model import (ExpertWeights, LayerCache, LayerSlot, MoEDecoder, layer_slot, moe_ffn, num_unique_experts,
                          with_slot)
from jaxmoe.model.decoder import head_logits
from jaxmoe.engine.sampling import SamplingParams, sample


def head_token(model: MoEDecoder, x: jax.Array, root: jax.Array, step: jax.Array, sampling: SamplingParams,
               sampler: Callable | None = None) -> jax.Array:  # fmt: skip
    """tokens [B] from the last position of the hidden states x [B, T, D] (before the final norm).
    `sampler`: (model, h [B, D], each row's final-norm hidden state) -> tokens [B], in place of
    the head and `sample(..., sampling)` (the server: each row its own parameters and key)."""
    h = model.norm(x)[:, -1]  # [B, D]
    if sampler:
        return sampler(model, h)
    return sample(head_logits(model.embed_tokens, model.lm_head, h), jax.random.fold_in(root, step), sampling)


def forward_step(
    model: MoEDecoder,
    tokens: jax.Array,  # [B, T] int32
    positions: jax.Array,  # [B, T] int32
    kv: Sequence[LayerCache],  # the cache's stacks (model/kv.py)
    experts: Sequence[ExpertWeights | None],  # per layer: its whole stack (expert e is row e)
    root: jax.Array,  # PRNG key
    step: jax.Array,  # [] int32: the token step (sampling key)
    *,
    sampling: SamplingParams,
    moe_fn: Callable = moe_ffn,
    sampler: Callable | None = None,
    merge: Callable | None = None,
) -> tuple[jax.Array, tuple[LayerCache, ...]]:
    """(tokens [B], the cache): every layer straight through, then `head_token`. `merge`:
    (after) -> the model with its weights viewed after `after` (executor.Piece.merge), called
    for each layer with its input."""
    x = model.embed_tokens(tokens)
    cfg = model.cfg
    for layer, layer_experts in enumerate(experts):
        module = (merge(x) if merge else model).layers[layer]
        x, slot, _ = module(x, positions, layer_slot(kv, cfg, layer), layer_experts, moe_fn)
        kv = with_slot(kv, cfg, layer, slot)
    return head_token(model, x, root, step, sampling, sampler), tuple(kv)


class StepOut(NamedTuple):
    token: jax.Array  # [B] int32, sampled from the last position; meaningful when first_miss == L
    kv: tuple[LayerCache, ...]
    first_miss: jax.Array  # [] int32: the first layer at or after `start` missing an expert; L if none
    x_miss: jax.Array  # [B, T, D]: the hidden state entering that layer (the next run's x_start)
    ids: jax.Array  # [L, N, K] int32: each layer's routing in this run (zeros for layers not run)
    picks: jax.Array  # [L, N, P] int32: the scorer's picks for the next MoE layer, made at the layer that
    # missed (zeros elsewhere; P = 0: no scorer)
    probs: jax.Array  # [L, N, P] fp32: their probabilities


def decode_step(
    model: MoEDecoder,
    tokens: jax.Array,  # [B, T] int32
    positions: jax.Array,  # [B, T] int32
    valid: jax.Array,  # [B] bool: rows whose experts count (padding and finished rows load nothing)
    kv: Sequence[LayerCache],  # the cache's stacks (model/kv.py)
    experts: Sequence[ExpertWeights | None],  # per layer: the rows `table` points into
    table: jax.Array | None,  # [L, E] int32, or None: expert e is row e of its layer's stack
    start: jax.Array,  # [] int32: the first layer to run
    x_start: jax.Array,  # [B, T, D]: the hidden state entering `start` (ignored when start is 0)
    root: jax.Array,  # PRNG key
    step: jax.Array,  # [] int32: the token step (sampling key)
    scorer_leaves: tuple = (),
    *,
    sampling: SamplingParams,
    scorer=None,
    picks: int = 0,
    moe_fn: Callable = moe_ffn,
    sampler: Callable | None = None,
    merge: Callable | None = None,
) -> StepOut:
    """`sampler`: as `head_token` takes it. `merge`: (after) -> the model merged anew with its
    weights viewed after `after` (executor.Piece.merge), called inside each conditional branch
    with the layer's input for the weights that branch reads (a packed model's weights are
    slices of its buffers, and a slice taken outside a conditional is copied into it on every
    run)."""
    cfg = model.cfg
    inside = merge or (lambda after: model)  # noqa: E731
    num_layers = cfg.num_layers
    b, t = tokens.shape
    n, k = b * t, cfg.top_k
    unique = num_unique_experts(cfg.num_experts, n, k)
    rows_valid = jnp.repeat(valid, t)  # [N]
    x = jnp.where(start == 0, model.embed_tokens(tokens), x_start)
    missed = jnp.asarray(False)
    first_miss, x_miss = jnp.int32(num_layers), x
    zeros_ids = jnp.zeros((n, k), jnp.int32)
    zeros_picks, zeros_probs = jnp.zeros((n, picks), jnp.int32), jnp.zeros((n, picks), jnp.float32)
    ids_all, picks_all, probs_all = [], [], []
    for layer, module in enumerate(model.layers):
        active = (layer >= start) & ~missed
        slot = layer_slot(kv, cfg, layer)  # the conditional takes and gives back its kind's whole stack

        def skip(x, stack):
            return x, stack, jnp.asarray(False), zeros_ids, zeros_picks, zeros_probs

        if not module.is_moe:

            def run(x, stack, layer=layer, index=slot.index):
                x, out, _ = inside(x).layers[layer](x, positions, LayerSlot(stack, index), None, moe_fn)
                return x, out.stack, jnp.asarray(False), zeros_ids, zeros_picks, zeros_probs

        else:

            def run(x, stack, layer=layer, index=slot.index):
                module = inside(x).layers[layer]
                x_att, out, h, routing = module.attend_and_route(x, positions, LayerSlot(stack, index))
                rows = routing.ids if table is None else table[layer][routing.ids]  # [N, K]
                miss = jnp.any((rows < 0) & rows_valid[:, None])
                y = moe_fn(h, jnp.maximum(rows, 0), routing.weights, experts[layer], unique)
                # A missing expert leaves the layer undone: keep its input for the resume.
                x_out = jnp.where(miss, x, module.finish_moe(x_att, h, y))
                if not picks:
                    return x_out, out.stack, miss, routing.ids, zeros_picks, zeros_probs

                def predict(h, layer=layer):
                    logits = scorer.score(scorer_leaves, h, jnp.int32(layer)).astype(jnp.float32)
                    probs, best = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), picks)
                    return best.astype(jnp.int32), probs

                # The host acts on predictions only where a layer missed (it loads then), so
                # only that layer predicts.
                best, probs = jax.lax.cond(miss, predict, lambda h: (zeros_picks, zeros_probs), h)
                return x_out, out.stack, miss, routing.ids, best, probs

        x_in = x
        x, stack, miss, ids, best, probs = jax.lax.cond(active, run, skip, x, slot.stack)
        kv = with_slot(kv, cfg, layer, slot._replace(stack=stack))
        new_miss = active & miss
        first_miss = jnp.where(new_miss, layer, first_miss)
        x_miss = jnp.where(new_miss, x_in, x_miss)
        missed = missed | new_miss
        ids_all.append(ids)
        picks_all.append(best)
        probs_all.append(probs)

    head = lambda x: head_token(inside(x), x, root, step, sampling, sampler)  # noqa: E731
    token = jax.lax.cond(missed, lambda x: jnp.zeros((b,), jnp.int32), head, x)
    return StepOut(token, tuple(kv), first_miss, x_miss, jnp.stack(ids_all), jnp.stack(picks_all),
                   jnp.stack(probs_all))  # fmt: skip
