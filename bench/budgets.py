"""Expert budgets for the benchmark: `--budgets` parsing, and the budget that keeps a
whole offloaded run (dense weights, KV cache, expert cache, workspace) within a
device-memory target.

Pure arithmetic over the Hugging Face shape (no arrays, no device): the workers
report the sizes the engine actually used, and the report checks them against these.
"""

from __future__ import annotations

import dataclasses

GIB = 2**30
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def expert_bytes(shape: dict, dtype: str) -> int:
    """One routed expert: gate, up and down projections (what one transfer moves)."""
    return 3 * shape["hidden_size"] * shape["intermediate_size"] * ITEMSIZE[dtype]


def num_experts(shape: dict) -> int:
    """Routed experts in the whole model (every OLMoE layer is a MoE layer)."""
    return shape["num_hidden_layers"] * shape["num_experts"]


def kv_bytes(shape: dict, dtype: str, batch: int, prompt_tokens: int, new_tokens: int) -> int:
    """The engine's static KV cache: keys and values for every layer, over the cache bucket."""
    from jaxmoe.engine.buckets import cache_bucket, prompt_bucket

    length = cache_bucket(prompt_bucket(prompt_tokens), new_tokens)
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    return 2 * shape["num_hidden_layers"] * batch * length * shape["num_key_value_heads"] * head_dim * ITEMSIZE[dtype]


def dense_bytes(shape: dict, dtype: str) -> int:
    """Every parameter that is not a routed expert (embeddings, attention, norms, routers, head),
    counted on torch's meta device: nothing is allocated."""
    import torch

    from bench.peers import hf_transformers as hf

    cfg = hf.olmoe_config(shape, dtype)
    with torch.device("meta"):
        model = hf.transformers.AutoModelForCausalLM.from_config(cfg)
    params = sum(p.numel() for n, p in model.named_parameters() if ".experts." not in n)
    return params * ITEMSIZE[dtype]


def workspace_bytes(shape: dict, dtype: str, batch: int, prompt_tokens: int, slack: int = GIB // 4) -> tuple[int, str]:
    """Device memory a prefill pass of the offloaded engine needs beyond weights, KV and cache:
    its expert program gathers U = min(E, tokens x top-k) cache slots ([U, D, 2I] + [U, I, D],
    a copy) and computes [U, N, 2I] and [U, N, D] activations; plus `slack` for the rest."""
    from jaxmoe.engine.buckets import prompt_bucket

    n = batch * prompt_bucket(prompt_tokens)
    u = min(shape["num_experts"], n * shape["num_experts_per_tok"])
    gather = u * expert_bytes(shape, dtype)
    acts = u * n * (2 * shape["intermediate_size"] + shape["hidden_size"]) * ITEMSIZE[dtype]
    text = (f"prefill expert pass: gather of {u} experts {gather / 1e9:.3f} GB + activations {acts / 1e9:.3f} GB"
            f" + slack {slack / 1e9:.3f} GB")  # fmt: skip
    return gather + acts + slack, text


@dataclasses.dataclass(frozen=True)
class Budget:
    spec: str  # as given: "0.25", "3.8GB", "4GiB", "auto"
    bytes: int
    experts: int  # whole experts that fit
    note: str  # how it was derived, for the report


def fit_within(shape: dict, dtype: str, batch: int, prompt_tokens: int, new_tokens: int,
               device_bytes: int, workspace: int | None) -> tuple[int, list[str]]:  # fmt: skip
    """(expert budget bytes, the arithmetic as lines) so that dense + KV + experts + workspace
    <= device_bytes; the budget is rounded down to whole experts. `workspace` None: estimated."""
    dense, one = dense_bytes(shape, dtype), expert_bytes(shape, dtype)
    kv = kv_bytes(shape, dtype, batch, prompt_tokens, new_tokens)
    if workspace is None:
        workspace, why = workspace_bytes(shape, dtype, batch, prompt_tokens)
    else:
        why = "given with --workspace-gib"
    left = device_bytes - dense - kv - workspace
    n = max(0, left // one)
    gb = lambda b: f"{b / 1e9:.3f} GB"  # noqa: E731
    lines = [
        f"device target {gb(device_bytes)} ({device_bytes / GIB:g} GiB)",
        f"- dense weights {gb(dense)} (every parameter but the routed experts, {dtype})",
        f"- KV cache {gb(kv)} (batch {batch}, cache bucket for {prompt_tokens} + {new_tokens} tokens)",
        f"- workspace {gb(workspace)} ({why})",
        f"= {gb(left)} for the expert cache -> {n} whole experts of {one / 1e6:.2f} MB = {gb(n * one)}"
        f" ({n / num_experts(shape):.1%} of {num_experts(shape)} experts)",
    ]
    return n * one, lines


def parse(specs: str, shape: dict, dtype: str, fit_args: dict) -> tuple[list[Budget], list[str]]:
    """`--budgets` as a comma list of: a fraction of all experts (0 < f <= 1), `NGB` (N x 10^9
    bytes, as generate.py's --expert-budget-gb), `NGiB`, or `auto` (fit_within the device target).
    Returns the budgets and, when `auto` was used, its arithmetic."""
    one, total = expert_bytes(shape, dtype), num_experts(shape)
    out, arithmetic = [], []
    for spec in filter(None, (s.strip() for s in specs.split(","))):
        low = spec.lower()
        if low == "auto":
            size, arithmetic = fit_within(shape, dtype, **fit_args)
            note = f"auto: {fit_args['device_bytes'] / GIB:g} GiB total"
        elif low.endswith("gib"):
            size, note = int(float(low[:-3]) * GIB), f"{spec}"
        elif low.endswith("gb"):
            size, note = int(float(low[:-2]) * 1e9), f"{spec}"
        else:
            frac = float(spec)
            if not 0 < frac <= 1:
                raise ValueError(f"budget {spec!r}: a bare number is a fraction of all experts, in (0, 1]")
            size, note = round(frac * total) * one, f"{frac:g} of experts"
        out.append(Budget(spec, size, min(size // one, total), note))
    return out, arithmetic

