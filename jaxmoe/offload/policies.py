"""Every eviction policy by name: the host policies of policy.py and the reuse-distance ones
of reuse.py, which build on them."""

from __future__ import annotations

from jaxmoe.offload.policy import LFRU, LFU, LRU, EvictionPolicy, OnDemand, PolicyShape, PredictorAware
from jaxmoe.offload.reuse import ExpertMapsPolicy, ReuseAware

POLICIES = {p.name: p for p in (OnDemand, LRU, LFU, LFRU, PredictorAware, ReuseAware, ExpertMapsPolicy)}
POLICY_NAMES = tuple(POLICIES)


def policy_class(name: str) -> type:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICY_NAMES)}")
    return POLICIES[name]


def make_policy(name: str, shape: PolicyShape | None = None, **options) -> EvictionPolicy:
    """A fresh policy by name; `shape` is required by the policies that reason about the
    model's layer order (lfru, reuse, maps); `options` go to the policy's constructor."""
    cls = policy_class(name)
    if cls in (OnDemand, LRU, LFU):
        return cls()
    if shape is None and cls.needs_shape:
        raise ValueError(f"policy {name!r} needs the model's MoE layers, experts and top_k (a PolicyShape)")
    return cls(shape, **options)
