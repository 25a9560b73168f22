"""Trainable parameters, the optimizer, and the jitted train and eval steps.

Shapes: B batch, T tokens per window, V vocab, L layers.
The trainable params are {"dense": the NNX module's pure dict, "experts": {layer:
{"w_gate_up", "w_down"}}} with string keys throughout, as the training checkpoints
(Orbax) store them; `split_params` turns them into what `jaxmoe.checkpoint.save_params`
takes. Params are fp32 masters; the forward pass casts them to the config's dtype, so
a bf16 config trains with fp32 optimizer math.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxmoe.checkpoint.params_file import int_keys, str_keys  # Orbax's string keys
from jaxmoe.config import MoEConfig
from jaxmoe.model import ExpertWeights, MoEDecoder, abstract_model, dense_dict, init_experts, init_kv_cache
from jaxmoe.train.losses import load_balancing_loss, next_token_ce, router_z_loss
from jaxmoe.train.moe import moe_ffn_blocked


@dataclasses.dataclass(frozen=True)
class OptConfig:
    peak_lr: float = 3e-3
    warmup_steps: int = 100
    total_steps: int = 1000
    end_lr_frac: float = 0.1
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    lb_coef: float = 0.01  # OLMoE's load-balancing coefficient
    z_coef: float = 0.001  # ST-MoE's router z-loss coefficient


def init_params(cfg: MoEConfig, seed: int) -> dict:
    """Fresh fp32 master params (std 0.02 normals, unit norms) from `seed`."""
    model = MoEDecoder(cfg.replace(dtype="float32"), nnx.Rngs(seed))
    experts = init_experts(cfg.replace(dtype="float32"), jax.random.key(seed + 1))
    return {
        "dense": str_keys(dense_dict(model)),
        "experts": {str(i): w._asdict() for i, w in enumerate(experts) if w is not None},
    }


def split_params(cfg: MoEConfig, params: dict) -> tuple[dict, tuple[ExpertWeights | None, ...]]:
    """(dense pure dict with int layer keys, per-layer ExpertWeights) in the config's dtype."""
    cast = jax.tree.map(lambda a: a.astype(cfg.dtype), params)
    experts = tuple(
        ExpertWeights(**cast["experts"][str(i)]) if cfg.moe_layers[i] else None for i in range(cfg.num_layers)
    )
    return int_keys(cast["dense"]), experts


def make_optimizer(opt: OptConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, opt.peak_lr, opt.warmup_steps, max(opt.total_steps, opt.warmup_steps + 1), opt.peak_lr * opt.end_lr_frac
    )
    no_decay_1d = lambda p: jax.tree.map(lambda a: a.ndim >= 2, p)  # norms are not decayed
    return optax.chain(
        optax.clip_by_global_norm(opt.clip_norm),
        optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=opt.weight_decay, mask=no_decay_1d),
    )


class Forward:
    """Params + tokens -> (logits, routings), with the module rebuilt inside jit."""

    def __init__(self, cfg: MoEConfig, moe_fn: Callable = moe_ffn_blocked):
        self.cfg, self.moe_fn = cfg, moe_fn
        self.graphdef, self.abstract_state = nnx.split(abstract_model(cfg))

    def __call__(self, params: dict, tokens: jax.Array):
        dense, experts = split_params(self.cfg, params)
        state = jax.tree.map(lambda s: s, self.abstract_state)  # fresh copy to fill
        nnx.replace_by_pure_dict(state, dense)
        model = nnx.merge(self.graphdef, state)
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        hidden, _, routings = model(tokens, positions, init_kv_cache(self.cfg, b, t), experts, self.moe_fn)
        return model.logits(hidden), [r for r in routings if r is not None]


def make_train_step(cfg: MoEConfig, opt: OptConfig, moe_fn: Callable = moe_ffn_blocked):
    forward, tx = Forward(cfg, moe_fn), make_optimizer(opt)

    def loss_fn(params, window):  # window [B, T+1]
        logits, routings = forward(params, window[:, :-1])
        ce = next_token_ce(logits, window[:, 1:])
        lb = jnp.mean(jnp.stack([load_balancing_loss(r, cfg.num_experts) for r in routings]))
        z = jnp.mean(jnp.stack([router_z_loss(r) for r in routings]))
        return ce + opt.lb_coef * lb + opt.z_coef * z, {"ce": ce, "lb": lb, "z": z}

    @jax.jit
    def train_step(params, opt_state, window):
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, window)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grad_norm": optax.global_norm(grads), **parts}

    return tx, train_step


def make_eval_step(cfg: MoEConfig, moe_fn: Callable = moe_ffn_blocked):
    """windows [B, T+1] -> (summed next-token NLL in nats, per-layer expert assignment counts [L, E])."""
    forward = Forward(cfg, moe_fn)

    @jax.jit
    def eval_step(params, window):
        logits, routings = forward(params, window[:, :-1])
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, window[:, 1:])
        counts = jnp.stack([jnp.sum(jax.nn.one_hot(r.ids, cfg.num_experts), axis=(0, 1)) for r in routings])
        return jnp.sum(nll), counts

    return eval_step
