"""The prefill transfer plan: in what order layers' experts are sent and computed.

Plain Python over small tables, like the decode schedule: built before the prefill
runs, printed with `--plan`, checked in tests without a device.

Ways to prefill (`choose_mode` picks between the first two):
  routed  like decode: read each layer's routing, then load only the routed experts.
          Every layer waits for its own transfers, but few experts move; for prompts
          whose tokens x top-k are well below the expert count.
  stream  every expert of every MoE layer moves, layer by layer, in an order fixed
          before the first layer runs, so the next layer's experts are already in
          flight while this one computes. Experts the decode cache holds are copied
          on the device instead. Long prompts route to nearly every expert anyway.
  injit   the stream order, but the next layer's copies are made inside the program
          of this layer's last chunk (`jax.device_put` to device memory within jit,
          compiled with XLA's latency hiding scheduler on GPU) instead of by the host
          beforehand: an alternative to measure against `stream`.

The stream order follows the device_put ordering rule (docs/PREFILL.md): a copy issued
after a computation is dispatched waits for that computation, so layer l+1's copies
are issued before layer l's computation is dispatched. A `release` of layer l waits
for layer l's computation and drops its streamed experts, so with lookahead 1 at
most two layers' streamed experts are ever on the device (the double buffer); with
lookahead 0 (overlap off) a layer is loaded, then computed, one at a time.

A `stack` waits for a layer's copies and puts its experts into one stack as the resident
engine holds a layer, dropping the copies: the layer then computes with the resident
engine's own call (one batched contraction over the layer's experts), because on a GPU a contraction of one
expert rounds differently from the same expert within a batch. It comes after the
previous layer's release and before any further copy is issued, so a layer is held
twice (copies and stack) only while no other layer's copies are on the device.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

STREAM, ROUTED, INJIT = "stream", "routed", "injit"
MODES = ("auto", STREAM, ROUTED, INJIT)


@dataclasses.dataclass(frozen=True)
class StreamStep:
    op: str  # "copy" (issue host -> device copies), "stack", "compute" (dispatch every chunk), "release"
    layer: int
    sent: tuple[int, ...] = ()  # copy: experts sent from pinned host memory
    cached: tuple[int, ...] = ()  # copy: experts the decode cache already holds (device copies)
    in_jit: bool = False  # copy: made by the next computation's program, not by the host

    def to_dict(self) -> dict:
        out = {"op": self.op, "layer": self.layer}
        if self.op == "copy":
            out.update(sent=list(self.sent), cached=list(self.cached), in_jit=self.in_jit)
        return out


@dataclasses.dataclass(frozen=True)
class PrefillPlan:
    mode: str
    chunk: int  # tokens per chunk
    chunks: int
    lookahead: int  # layers whose copies are issued ahead of the computation (0: overlap off)
    steps: tuple[StreamStep, ...] = ()  # stream mode only

    def streamed_layers_over_time(self) -> list[int]:
        """Layers whose streamed experts are on the device after each step."""
        live, out = set(), []
        for step in self.steps:
            if step.op == "copy":
                live.add(step.layer)
            elif step.op == "release":
                live.discard(step.layer)
            out.append(len(live))
        return out

    @property
    def max_streamed_layers(self) -> int:
        return max(self.streamed_layers_over_time(), default=0)

    @property
    def sent_experts(self) -> int:
        return sum(len(s.sent) for s in self.steps)

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "chunk": self.chunk,
            "chunks": self.chunks,
            "lookahead": self.lookahead,
            "max_streamed_layers": self.max_streamed_layers,
            "steps": [s.to_dict() for s in self.steps],
        }


def plan_stream(
    layers: Sequence[int],
    moe: Sequence[bool],
    num_experts: int,
    cached: Mapping[int, set[int]],
    chunk: int,
    chunks: int,
    lookahead: int = 1,
    in_jit: bool = False,
) -> PrefillPlan:
    """The stream order over `layers` (all of them; `moe[l]` says which have experts).
    `cached[l]`: experts of layer l the decode cache holds when the prefill starts.
    `in_jit`: the injit variant (lookahead 1; copies after the first made by programs)."""
    if lookahead not in (0, 1) or (in_jit and lookahead != 1):
        raise ValueError(f"lookahead must be 0 (overlap off) or 1 (double buffer; injit), got {lookahead}")
    order = [layer for layer in layers if moe[layer]]

    def copy(layer: int, by_program: bool = False) -> StreamStep:
        held = cached.get(layer, set())
        sent = tuple(e for e in range(num_experts) if e not in held)
        return StreamStep("copy", layer, sent, tuple(sorted(held)), by_program)

    def stack(i: int) -> list[StreamStep]:
        return [StreamStep("stack", order[i])] if i < len(order) else []

    if in_jit:  # the first layer's copies from the host; each later layer's inside the previous one's program
        steps = [copy(order[0]), *stack(0)] if order else []
        for layer in layers:
            later = [m for m in order if m > layer]
            if moe[layer] and later:
                steps.append(copy(later[0], by_program=True))
            steps.append(StreamStep("compute", layer))
            if moe[layer]:
                steps += [StreamStep("release", layer), *stack(order.index(layer) + 1)]
        return PrefillPlan(INJIT, chunk, chunks, lookahead, tuple(steps))

    def after_release(i: int) -> list[StreamStep]:
        """What follows the release of order[i] (i = -1: the start): the next layer's stack,
        and the copies of the layer after it (lookahead 1), or the next layer's copies then
        its stack (lookahead 0)."""
        if lookahead == 0:
            return ([copy(order[i + 1])] if i + 1 < len(order) else []) + stack(i + 1)
        return stack(i + 1) + ([copy(order[i + 2])] if i + 2 < len(order) else [])

    # Copies of layer order[i] follow the release of order[i - 1 - lookahead], which
    # precedes order[i]'s computation: every copy is issued before its layer computes.
    steps = [copy(order[0])] if lookahead and order else []
    steps += after_release(-1)
    for layer in layers:
        steps.append(StreamStep("compute", layer))
        if moe[layer]:
            steps += [StreamStep("release", layer), *after_release(order.index(layer))]
    return PrefillPlan(STREAM, chunk, chunks, lookahead, tuple(steps))


def expected_unique(num_experts: int, routed_slots: int) -> float:
    """Expected distinct experts among `routed_slots` uniform independent choices."""
    return num_experts * (1.0 - (1.0 - 1.0 / num_experts) ** routed_slots)


def routed_slot_crossover(num_experts: int) -> int:
    """Routed slots (batch x tokens x top-k) below which `auto` loads only routed experts.

    A routed layer waits for its own copies (one host sync, about one expert's transfer
    time on an H100 as measured for this project) but moves only the routed experts; a streamed layer
    hides behind the previous one but moves all E. Routed wins while the experts it
    skips outweigh the sync: E - expected_unique(n) > 1, i.e. n < E ln E. A cost model,
    not a measurement: scripts/bench.py --prefill-sweep measures both on a GPU.
    """
    return int(num_experts * math.log(num_experts))


def choose_mode(mode: str, num_experts: int, routed_slots: int, chunks: int, all_cached: bool) -> str:
    if mode not in MODES:
        raise ValueError(f"prefill mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "auto":
        return mode
    if all_cached:  # nothing to move: the routed path uses the cache in place
        return ROUTED
    return ROUTED if chunks == 1 and routed_slots < routed_slot_crossover(num_experts) else STREAM
