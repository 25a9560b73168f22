"""Routing and the routed-expert FFN as pure functions over weights passed in.

Shapes:
  N tokens (flattened batch x time), D hidden, E experts (or cache slots),
  K experts per token, I expert width.
  U distinct experts computed in one call (static).
Expert weights are never owned by the model: the resident engine passes the full
[E, ...] stacks, an offloaded engine passes its cache slots with ids remapped.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxmoe.config import MoEConfig
from jaxmoe.model.matmul import einsum


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class ClampedSwiGLU:
    """gpt-oss's expert activation (static: a pytree node with no leaves)."""

    alpha: float
    limit: float


class ExpertWeights(NamedTuple):
    """One layer's routed experts; gate and up are fused so one matmul reads both. Experts
    with biases (gpt-oss) carry them and their activation along, so every path that moves
    or computes experts (caches, packed formats) keeps them without knowing the family."""

    w_gate_up: jax.Array  # [E, D, 2I]: columns [:I] gate, [I:] up
    w_down: jax.Array  # [E, I, D]
    b_gate_up: jax.Array | None = None  # [E, 2I]
    b_down: jax.Array | None = None  # [E, D]
    act: ClampedSwiGLU | None = None  # None: silu(gate) * up

    def arrays(self) -> tuple[jax.Array, ...]:
        """The weight arrays, biases included when present."""
        return tuple(a for a in (self.w_gate_up, self.w_down, self.b_gate_up, self.b_down) if a is not None)

    def rows(self, index) -> "ExpertWeights":
        """The experts `index` (any numpy/jax index into the leading axis)."""
        pick = lambda a: None if a is None else a[index]  # noqa: E731
        return ExpertWeights(pick(self.w_gate_up), pick(self.w_down), pick(self.b_gate_up), pick(self.b_down), self.act)


def expert_activation(cfg: MoEConfig) -> ClampedSwiGLU | None:
    return ClampedSwiGLU(cfg.swiglu_alpha, cfg.swiglu_limit) if cfg.expert_act == "clamped_swiglu" else None


@jax.tree_util.register_pytree_node_class
class PackedExperts:
    """Experts held in a storage form (a cache pool or a quantized stack): `parts`, each
    [S, ...], and `unpack` (static): (parts, index [P] or None) -> the ExpertWeights of the
    compute dtype of rows `index` (or of every row). Only the rows computed are unpacked,
    inside the computation that uses them: a whole pool or layer is never converted."""

    def __init__(self, parts: tuple, unpack):
        self.parts, self.unpack = tuple(parts), unpack

    @property
    def rows(self) -> int:
        return self.parts[0].shape[0]

    def take(self, index: jax.Array | None) -> ExpertWeights:
        """The unpacked weights of rows `index` [U], or of every row (None)."""
        return self.unpack(self.parts, index)

    def tree_flatten(self):
        return self.parts, self.unpack

    @classmethod
    def tree_unflatten(cls, unpack, parts):
        return cls(parts, unpack)


def _rows(w) -> int:
    return w.rows if isinstance(w, PackedExperts) else w.w_down.shape[0]


def _take(w, index: jax.Array | None) -> ExpertWeights:
    if isinstance(w, PackedExperts):
        return w.take(index)
    return w if index is None else w.rows(index)


class Routing(NamedTuple):
    logits: jax.Array  # [N, E] router logits in the activation dtype
    ids: jax.Array  # [N, K] int32 expert ids, descending probability
    weights: jax.Array  # [N, K] fp32 (Mixtral) or activation dtype
    inputs: jax.Array | None = None  # [N, D] the router's input (what a next-layer predictor sees)


def route(cfg: MoEConfig, logits: jax.Array, correction_bias: jax.Array | None = None) -> Routing:
    """Scores over all experts in fp32 (softmax, or DeepSeek-V3's sigmoid), top-k, optional
    renormalisation and scaling. The experts are chosen on the scores plus `correction_bias`
    [E] (V3's load-balancing bias), among the best `router_topk_groups` groups when the
    experts are grouped; their weights are the unbiased scores. gpt-oss's "topk_softmax":
    top-k of the logits and a softmax over those k in the logits' dtype, as transformers
    computes it."""
    if cfg.router_scoring == "topk_softmax":
        top_logits, ids = jax.lax.top_k(logits, cfg.top_k)
        return Routing(logits, ids.astype(jnp.int32), jax.nn.softmax(top_logits, axis=-1))
    logits32 = logits.astype(jnp.float32)
    probs = jax.nn.sigmoid(logits32) if cfg.router_scoring == "sigmoid" else jax.nn.softmax(logits32, axis=-1)
    if correction_bias is None and cfg.router_groups == 1:
        top_w, ids = jax.lax.top_k(probs, cfg.top_k)
    else:
        choice = probs if correction_bias is None else probs + correction_bias.astype(jnp.float32)
        if cfg.router_groups > 1:
            choice = _keep_best_groups(cfg, choice)
        ids = jax.lax.top_k(choice, cfg.top_k)[1]
        top_w = jnp.take_along_axis(probs, ids, axis=-1)
    if cfg.norm_topk_prob:
        # DeepSeek-V3 adds 1e-20 to the sum: below an fp32 ulp of any sum of k scores, so omitted.
        top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
    if cfg.routed_scaling_factor != 1.0:
        top_w = top_w * cfg.routed_scaling_factor
    if not cfg.router_weights_fp32:
        top_w = top_w.astype(logits.dtype)
    return Routing(logits, ids.astype(jnp.int32), top_w)


def drop_experts(cfg: MoEConfig, weights: jax.Array, dropped: jax.Array) -> jax.Array:
    """Routing weights [N, K] with the (row, k) `dropped` [N, K] (not computed: the approximate
    decode's skipped experts) at exactly zero. Where the family's weights are normalised over
    the chosen experts (`norm_topk_prob`, or gpt-oss's softmax over the top-k), the kept
    weights are renormalised as `route` would had the dropped experts not been chosen:
    p_i / sum_kept p_j x the scaling factor, which from the weights route returned is
    w_i x sum_all w / sum_kept w. Where they are not (OLMoE, Qwen-MoE, DeepSeek-V2), a weight
    is the expert's probability over every expert, whatever else was chosen, so the kept
    weights are left as they are. A row keeps at least one expert (device_cache.skippable),
    so the sum is never zero."""
    w32 = weights.astype(jnp.float32)
    kept = jnp.where(dropped, 0.0, w32)
    if cfg.norm_topk_prob or cfg.router_scoring == "topk_softmax":
        total, rest = jnp.sum(w32, -1, keepdims=True), jnp.sum(kept, -1, keepdims=True)
        kept = kept * (total / jnp.where(rest > 0, rest, 1.0))
    return kept.astype(weights.dtype)


def _keep_best_groups(cfg: MoEConfig, choice: jax.Array) -> jax.Array:
    """choice [N, E] with the experts outside each token's best groups at -inf. A group scores
    its best expert ("max") or its two best summed ("top2_sum")."""
    n, e = choice.shape
    grouped = choice.reshape(n, cfg.router_groups, e // cfg.router_groups)  # [N, G, E/G]
    if cfg.router_group_score == "max":
        group_scores = jnp.max(grouped, axis=-1)
    else:
        group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)
    best = jax.lax.top_k(group_scores, cfg.router_topk_groups)[1]  # [N, topk_groups]
    keep = jnp.any(best[:, :, None] == jnp.arange(cfg.router_groups), axis=1)  # [N, G]
    return jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(n, e)


@jax.named_scope("combine")
def combine(y: jax.Array, weights: jax.Array, dtype) -> jax.Array:
    """Weighted sum over the K chosen experts: [N, K, D] x [N, K] -> [N, D].

    The product takes the weights' dtype (fp32 for Mixtral) as transformers does;
    the sum over K is in fp32 in a fixed k order, independent of expert placement.
    """
    return jnp.sum((y * weights[..., None]).astype(jnp.float32), axis=1).astype(dtype)


def moe_ffn(x: jax.Array, ids: jax.Array, weights: jax.Array, w: ExpertWeights, num_unique: int) -> jax.Array:
    """The routed-expert output: x [N, D], ids [N, K] into w's leading axis, weights [N, K] -> [N, D]."""
    return combine(expert_rows(x, ids, w, num_unique), weights, x.dtype)


# Up to this many tokens in a call (a one-row decode step), each (token, k) pair computes its
# expert on its token alone, reading the expert's weights where they lie (`expert_pairs`); more
# tokens compute each distinct expert once over all of them, as a gathered batched matmul. One:
# at 8 rows (64 pairs) XLA transposed each pair's pool expert into an fp32 copy before reducing
# (1.07 GB a layer in the deviceless H100 compile of OLMoE-1B-7B), worse than the gather.
PAIR_TOKENS = 1


@jax.named_scope("experts")
def expert_rows(x: jax.Array, ids: jax.Array, w: "ExpertWeights | PackedExperts", num_unique: int) -> jax.Array:
    """Each chosen expert's output for its token, [N, K, D], uncombined.

    At most PAIR_TOKENS tokens: `expert_pairs`. More: each distinct chosen expert is
    computed once over all N tokens, then each (token, k) row is picked.
    `num_unique` is the static number of distinct experts computed, normally
    min(num_experts, N * K). When it equals E every expert is used in place;
    otherwise the distinct ids are gathered first (a copy of U experts). The value
    of a (token, k) row depends only on the token and the expert's weights, not
    on where the expert sits in `w`, which is what lets a cache reorder experts.
    """
    if x.shape[0] <= PAIR_TOKENS:
        return expert_pairs(x, ids, w)
    if num_unique == _rows(w):
        unique, chosen = jnp.arange(num_unique, dtype=ids.dtype), _take(w, None)
    else:
        # Padding repeats the largest id so `unique` stays sorted for searchsorted.
        unique = jnp.unique(ids, size=num_unique, fill_value=jnp.max(ids))
        chosen = _take(w, unique)  # [U, D, 2I], [U, I, D]
    y_u = expert_outputs(x, chosen.w_gate_up, chosen.w_down, chosen.b_gate_up, chosen.b_down, chosen.act)
    # [N, K] position of each chosen expert in `unique`. By comparisons, not the default
    # binary search: that is a while loop, and XLA on a GPU reads a loop's predicate back
    # to the host at every iteration (4 round trips per layer per decode step).
    pos = jnp.searchsorted(unique, ids, method="compare_all")
    return y_u[pos, jnp.arange(ids.shape[0])[:, None]]  # [N, K, D]


def expert_pairs(x: jax.Array, ids: jax.Array, w: "ExpertWeights | PackedExperts") -> jax.Array:
    """[N, K, D]: each (token, k) pair's expert on its token, P = N x K pairs.

    A decode step's contraction is a matrix-vector product per pair, which XLA computes
    as a reduction (`pair_product`); the index into the stack or pool (and a packed format's
    unpacking) fuses into that reduction, so each expert's bytes are read once, in place: no
    gathered copy, no workspace beside the pool, and no distinct-expert bookkeeping
    (sort, scatter, search). An expert two rows share is read twice, which at decode
    batch sizes costs less than the copy did. A pair's value depends only on its token
    and its expert's weights, so a cache may hold the expert in any slot."""
    n, k = ids.shape
    chosen = _take(w, ids.reshape(-1))  # [P, D, 2I], [P, I, D]
    xp = jnp.repeat(x, k, axis=0)  # [P, D]
    width = chosen.w_down.shape[1]
    gate_up = pair_product(xp, chosen.w_gate_up)
    if chosen.b_gate_up is not None:
        gate_up = gate_up + chosen.b_gate_up
    # The activation is materialised ([P, I]): fused into the next reduction it would be
    # recomputed for every output column, and XLA then writes the whole elementwise product
    # out instead (seen in the deviceless H100 compile of a 4096-wide expert).
    act = jax.lax.optimization_barrier(activate(gate_up, width, chosen.act))
    out = pair_product(act, chosen.w_down)
    if chosen.b_down is not None:
        out = out + chosen.b_down
    return out.reshape(n, k, -1)


# XLA on a GPU computes a product as a reduction (which can read a gathered operand in place)
# only while its matrices hold fewer than 10M elements in all; past that it calls a GEMM
# kernel, which needs the gathered experts copied out first.
REDUCTION_ELEMENTS = 10_000_000


def pair_product(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [P, Kin] times each pair's own matrix w [P, Kin, F] -> [P, F], in fp32 accumulation.
    A matrix past REDUCTION_ELEMENTS is split into C column blocks made a batch dimension,
    so each product stays a reduction (the same sums, each column over the whole Kin)."""
    p, k_in, f = w.shape
    c = column_blocks(k_in, f)
    if c == 1:
        return einsum("pk,pkf->pf", x, w)
    xc = jnp.broadcast_to(x[:, None, :], (p, c, k_in))
    return einsum("pck,pkcf->pcf", xc, w.reshape(p, k_in, c, f // c)).reshape(p, f)


def column_blocks(k_in: int, f: int) -> int:
    """The fewest blocks C dividing f with a [1, Kin] x [Kin, F / C] product under REDUCTION_ELEMENTS."""
    return next((c for c in range(1, f + 1) if f % c == 0 and k_in * (f // c + 1) < REDUCTION_ELEMENTS), f)


def expert_outputs(x: jax.Array, w_gate_up: jax.Array, w_down: jax.Array, b_gate_up=None, b_down=None,
                   act: ClampedSwiGLU | None = None) -> jax.Array:  # fmt: skip
    """SwiGLU of U experts over all N tokens: x [N, D], w [U, D, 2I] and [U, I, D] -> [U, N, D].

    Always this batched form, over the same U experts in every path: XLA rounds a plain
    [N, D] x [D, F] dot differently from one member of a batched dot, and on a GPU a batch
    of one expert differently from the same expert in a batch of U (measured on an H200),
    so a streamed layer is stacked before it computes."""
    width = w_down.shape[1]
    gate_up = einsum("nd,udf->unf", x, w_gate_up)  # [U, N, 2I]
    if b_gate_up is not None:
        gate_up = gate_up + b_gate_up[:, None, :]
    out = einsum("uni,uid->und", activate(gate_up, width, act), w_down)
    return out if b_down is None else out + b_down[:, None, :]


def activate(gate_up: jax.Array, width: int, act: ClampedSwiGLU | None) -> jax.Array:
    """[..., 2I] -> [..., I]: silu(gate) * up, or gpt-oss's clamped SwiGLU."""
    gate, up = gate_up[..., :width], gate_up[..., width:]
    if act is None:
        return jax.nn.silu(gate) * up
    gate = jnp.minimum(gate, act.limit)
    up = jnp.clip(up, -act.limit, act.limit)
    return (up + 1) * (gate * jax.nn.sigmoid(gate * act.alpha))


def num_unique_experts(num_experts: int, tokens: int, top_k: int) -> int:
    """Static bound on the distinct experts `tokens` tokens can choose."""
    return min(num_experts, tokens * top_k)


def expert_ffn(x: jax.Array, w: ExpertWeights) -> jax.Array:
    """One expert's SwiGLU on [N, D] with w's w_gate_up [D, 2I], w_down [I, D] (and biases)."""
    width = w.w_down.shape[0]
    gate_up = einsum("nd,df->nf", x, w.w_gate_up)
    if w.b_gate_up is not None:
        gate_up = gate_up + w.b_gate_up
    out = einsum("ni,id->nd", activate(gate_up, width, w.act), w.w_down)
    return out if w.b_down is None else out + w.b_down


def moe_ffn_reference(
    x: jax.Array, ids: jax.Array, weights: jax.Array, w: ExpertWeights, num_unique: int | None = None
) -> jax.Array:
    """Naive reference: every expert on every token, one expert at a time (`num_unique` unused)."""
    n, k = ids.shape
    y = jnp.zeros((n, k, x.shape[-1]), x.dtype)
    for e in range(w.w_down.shape[0]):
        out_e = expert_ffn(x, w.rows(e))  # [N, D]
        y = jnp.where((ids == e)[..., None], out_e[:, None, :], y)
    return combine(y, weights, x.dtype)
