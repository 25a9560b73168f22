"""Expert budgets for the benchmark: `--budgets` parsing, and the budget that keeps a
whole offloaded run (dense weights, KV cache, expert cache, workspace) within a
device-memory target.

Pure arithmetic over the jaxmoe config (shapes only, via `jax.eval_shape`: nothing is
allocated): the workers report the sizes the engine actually used, and the report
checks them against these.
"""

from __future__ import annotations

import dataclasses

GIB = 2**30
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def expert_bytes(cfg, fmt=None) -> int:
    """One routed expert as `fmt` holds it (default dense): what one transfer moves."""
    from jaxmoe.quant import DENSE

    return (fmt or DENSE).nbytes(cfg)


def num_experts(cfg) -> int:
    """Routed experts in the whole model."""
    return cfg.num_experts * len(cfg.moe_layer_ids)


def kv_bytes(cfg, batch: int, prompt_tokens: int, new_tokens: int) -> int:
    """The engine's static KV cache over the cache bucket, from its abstract shapes (keys and
    values, or MLA's latents): nothing is allocated."""
    import jax

    from jaxmoe.runtime.buckets import cache_bucket, prompt_bucket
    from jaxmoe.runtime.metrics import tree_bytes
    from jaxmoe.model import init_kv_cache

    length = cache_bucket(prompt_bucket(prompt_tokens), new_tokens)
    return tree_bytes(jax.eval_shape(lambda: init_kv_cache(cfg, batch, length)))


def dense_bytes(cfg) -> int:
    """Every parameter that is not a routed expert (embeddings, attention, norms, routers, head),
    from the module's abstract shapes: nothing is allocated."""
    from flax import nnx

    from jaxmoe.runtime.metrics import tree_bytes
    from jaxmoe.model.params import abstract_model

    return tree_bytes(nnx.state(abstract_model(cfg)))


def weight_bytes(cfg, fmt=None) -> int:
    return dense_bytes(cfg) + num_experts(cfg) * expert_bytes(cfg, fmt)


def workspace_bytes(cfg, batch: int, prompt_tokens: int, new_tokens: int = 1, fmt=None) -> tuple[int, str]:
    """Device memory the offloaded engine declares beyond weights, KV and cache
    (jaxmoe.offload.workspace), and how it adds up."""
    from jaxmoe.offload.workspace import workspace_bytes as declared

    quantized = fmt is not None and fmt.kind != "dense"
    parts = declared(cfg, batch, prompt_tokens, new_tokens, expert_bytes(cfg, fmt),
                     unpacked_bytes=expert_bytes(cfg) if quantized else 0)  # fmt: skip
    text = (f"the engine's declared workspace: max(streamed {parts['streamed'] / 1e9:.3f} GB, gathered "
            f"{parts['gathered'] / 1e9:.3f} GB) + activations {parts['activations'] / 1e9:.3f} GB + slack "
            f"{parts['slack'] / 1e9:.3f} GB")  # fmt: skip
    return parts["total"], text


@dataclasses.dataclass(frozen=True)
class Budget:
    spec: str  # as given: "0.25", "3.8GB", "4GiB", "auto"
    bytes: int
    experts: int  # whole experts that fit
    note: str  # how it was derived, for the report
    device_bytes: int | None = None  # `auto`: the total device budget it was fitted to


def fit_within(cfg, batch: int, prompt_tokens: int, new_tokens: int,
               device_bytes: int, workspace: int | None, fmt=None) -> tuple[int, list[str]]:  # fmt: skip
    """(expert budget bytes, the arithmetic as lines) so that dense + KV + experts + workspace
    <= device_bytes; the budget is rounded down to whole experts (held in `fmt`).
    `workspace` None: the engine's declared one."""
    dense, one = dense_bytes(cfg), expert_bytes(cfg, fmt)
    kv = kv_bytes(cfg, batch, prompt_tokens, new_tokens)
    if workspace is None:
        workspace, why = workspace_bytes(cfg, batch, prompt_tokens, new_tokens, fmt)
    else:
        why = "given with --workspace-gib"
    left = device_bytes - dense - kv - workspace
    n = max(0, left // one)
    gb = lambda b: f"{b / 1e9:.3f} GB"  # noqa: E731
    lines = [
        f"device target {gb(device_bytes)} ({device_bytes / GIB:g} GiB)",
        f"- dense weights {gb(dense)} (every parameter but the routed experts, {cfg.dtype})",
        f"- KV cache {gb(kv)} (batch {batch}, cache bucket for {prompt_tokens} + {new_tokens} tokens)",
        f"- workspace {gb(workspace)} ({why})",
        f"= {gb(left)} for the expert cache -> {n} whole experts of {one / 1e6:.2f} MB = {gb(n * one)}"
        f" ({n / num_experts(cfg):.1%} of {num_experts(cfg)} experts)",
    ]
    return n * one, lines


def parse(specs: str, cfg, fit_args: dict, device_budgets: list[int], fmt=None) -> tuple[list[Budget], list[str]]:
    """`--budgets` as a comma list of: a fraction of all experts (0 < f <= 1), `NGB` (N x 10^9
    bytes, as generate.py's --expert-budget-gb), `NGiB`, or `auto`: for each total device budget
    in `device_budgets` (bytes), the expert budget that fits it (fit_within).
    Returns the budgets and the arithmetic of the `auto` ones. Fractions are of the experts
    as `fmt` holds them (a quarter of an int4 model's expert bytes is a quarter of its experts)."""
    one, total = expert_bytes(cfg, fmt), num_experts(cfg)
    out, arithmetic = [], []
    for spec in filter(None, (s.strip() for s in specs.split(","))):
        low = spec.lower()
        if low == "auto":
            for device in device_budgets:
                size, lines = fit_within(cfg, **fit_args, device_bytes=device, fmt=fmt)
                arithmetic += lines
                note = f"auto: {device / GIB:g} GiB total"
                out.append(Budget(f"auto@{device / GIB:g}GiB", size, min(size // one, total), note, device))
            continue
        if low.endswith("gib"):
            size, note = int(float(low[:-3]) * GIB), f"{spec}"
        elif low.endswith("gb"):
            size, note = int(float(low[:-2]) * 1e9), f"{spec}"
        else:
            frac = float(spec)
            if not 0 < frac <= 1:
                raise ValueError(f"budget {spec!r}: a bare number is a fraction of all experts, in (0, 1]")
            size, note = round(frac * total) * one, f"{frac:g} of experts"
            if frac == 1:  # every expert preloaded: the expert program's gather comes on top
                gather = min(cfg.num_experts, fit_args["batch"] * cfg.top_k)
                size, note = (total + gather) * one, f"every expert + a gather of {gather}"
        out.append(Budget(spec, size, min(size // one, total), note))
    return out, arithmetic
