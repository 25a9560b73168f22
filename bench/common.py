"""What the benchmark's and the GPU check's modules share: the log line, a job's prompts,
model and versions, the prefill modes a job may name, and markdown cells and tables.
Imports nothing heavy, so every bench module can import it."""

from __future__ import annotations

import sys

from bench.shapes import ModelSpec

# OffloadedEngine(prefill=..., prefill_overlap=...): "stream-serial" loads a layer, then computes it.
PREFILL_MODES = {"stream": {"prefill": "stream"}, "stream-serial": {"prefill": "stream", "prefill_overlap": False},
                 "routed": {"prefill": "routed"}, "injit": {"prefill": "injit"}}  # fmt: skip


def log(*parts) -> None:
    print("[bench]", *parts, file=sys.stderr, flush=True)


def prompts(spec: dict, vocab: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(spec["seed"])
    return rng.integers(0, vocab, (spec["batch"], spec["prompt_tokens"])).tolist()


def model_spec(spec: dict) -> ModelSpec:
    return ModelSpec(**spec["model"])


def jax_versions() -> dict:
    import jax

    return {"jax": jax.__version__, "flax": __import__("flax").__version__, "backend": jax.default_backend()}


def check_jax_backend(gpu: bool) -> None:
    import jax

    if gpu and jax.default_backend() != "gpu":
        raise SystemExit(f"--gpu: jax backend is {jax.default_backend()!r}, not gpu")


# -- markdown ----------------------------------------------------------------------
def fmt(x, spec: str) -> str:
    """`x` formatted by `spec`; "-" for None."""
    return "-" if x is None else format(x, spec)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return out + ["| " + " | ".join(cells) + " |" for cells in rows]
