"""The decode predictor, offline half: routing traces, an Optax-trained MLP that
predicts the next MoE layer's experts, baselines and a cache simulator.

Runtime use (one compiled program for every layer):
    pred = load_predictor("checkpoints/NAME/predictor", cfg)    # refuses another model's predictor
    logits = pred.module(h, jnp.int32(layer))                   # h [N, D] router input of `layer` -> [N, E]
    # logits score the experts of the next MoE layer after `layer` (zeros where there is none)
"""

from jaxmoe.predictor.fingerprint import expert_bytes, layer_pairs, model_hash, model_summary, router_hash
from jaxmoe.predictor.mlp import ExpertPredictor
from jaxmoe.predictor.simulate import DecodeTrace, SimResult, simulate_belady, simulate_decode, simulate_schedule
from jaxmoe.predictor.store import LoadedPredictor, PredictorMismatch, load_predictor, save_predictor
from jaxmoe.predictor.traces import TraceError, TraceSet, TraceWriter
from jaxmoe.predictor.train import TrainConfig

__all__ = [
    "DecodeTrace",
    "ExpertPredictor",
    "LoadedPredictor",
    "PredictorMismatch",
    "SimResult",
    "TraceError",
    "TraceSet",
    "TraceWriter",
    "TrainConfig",
    "expert_bytes",
    "layer_pairs",
    "load_predictor",
    "model_hash",
    "model_summary",
    "router_hash",
    "save_predictor",
    "simulate_belady",
    "simulate_decode",
    "simulate_schedule",
]
