"""Run a model over text in fixed windows and record its routing, chunk by chunk.

Each window of `window` tokens is an independent forward from position 0 (a
fresh KV cache), which computes exactly what decoding those tokens one at a time
would: the router input a predictor sees at run time.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmoe.checkpoint import load
from jaxmoe.model import init_kv_cache
from jaxmoe.predictor.fingerprint import model_summary, router_hash
from jaxmoe.predictor.traces import VERSION, TraceWriter, ids_dtype, random_projection
from jaxmoe.tokenizer import load_tokenizer


def text_tokens(tokenizer, path: Path, max_tokens: int | None, piece_chars: int = 1 << 20) -> np.ndarray:
    """Token ids of a text file, encoded in line-aligned pieces; stops once `max_tokens` are reached."""
    text = Path(path).read_text(encoding="utf-8")
    ids: list[int] = []
    pos = 0
    while pos < len(text) and (max_tokens is None or len(ids) < max_tokens):
        end = len(text) if pos + piece_chars >= len(text) else text.rfind("\n", pos, pos + piece_chars) + 1
        end = end if end > pos else min(len(text), pos + piece_chars)
        ids.extend(tokenizer.encode(text[pos:end]).ids)
        pos = end
    out = np.asarray(ids, np.int32)
    return out if max_tokens is None else out[:max_tokens]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _trace_step(graphdef, cfg, state, experts, tokens, proj):
    """Module-level and keyed on (graphdef, cfg), so every model of one structure shares a compile."""
    model = nnx.merge(graphdef, state)
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    _, _, routings = model(tokens, positions, init_kv_cache(cfg, b, t), experts)
    moe = [routings[l] for l in cfg.moe_layer_ids]
    h = jnp.stack([r.inputs.astype(jnp.float32) for r in moe], axis=1)  # [N, Lm, D]
    if proj is not None:
        h = h @ proj  # [N, Lm, P]
    ids = jnp.stack([r.ids for r in moe], axis=1)  # [N, Lm, K]
    probs = jnp.stack([jax.nn.softmax(r.logits.astype(jnp.float32), -1) for r in moe], axis=1)  # [N, Lm, E]
    return h.astype(jnp.float16), ids, probs.astype(jnp.float16)


def make_trace_fn(loaded, projection: np.ndarray | None) -> Callable:
    """tokens [B, T] -> (inputs [B*T, Lm, P] f16, ids [B*T, Lm, K], probs [B*T, Lm, E] f16)."""
    graphdef, state = nnx.split(loaded.model)
    proj = None if projection is None else jnp.asarray(projection)
    return lambda tokens: _trace_step(
        graphdef, loaded.config, state, loaded.experts, jnp.asarray(tokens, jnp.int32), proj
    )


def collect_traces(
    model_dir: Path,
    text: Path,
    out: Path,
    max_tokens: int | None = None,
    window: int = 256,
    batch: int = 8,
    chunk_windows: int = 16,
    proj_dim: int | None = None,
    proj_seed: int = 0,
    progress: Callable[[int], None] | None = None,
    total: Callable[[int], None] | None = None,
) -> dict:
    """Write (or resume) a trace set; returns its manifest."""
    loaded = load(model_dir)
    cfg = loaded.config
    if loaded.tokenizer_path is None:
        raise ValueError(f"{model_dir}: no tokenizer.json to encode {text} with")
    window = min(window, cfg.max_position_embeddings)
    tokenizer = load_tokenizer(loaded.tokenizer_path)
    ids = text_tokens(tokenizer, text, max_tokens)
    num_windows = len(ids) // window
    if num_windows == 0:
        raise ValueError(f"{text}: {len(ids)} tokens do not fill one window of {window}")
    windows = ids[: num_windows * window].reshape(num_windows, window)
    projection = None
    if proj_dim:
        if not 0 < proj_dim < cfg.hidden_size:
            raise ValueError(f"--proj-dim {proj_dim} must be in 1..hidden_size-1 ({cfg.hidden_size})")
        projection = random_projection(cfg.hidden_size, proj_dim, proj_seed)
    settings = {
        "version": VERSION,
        "model": model_summary(cfg),
        "model_path": str(Path(model_dir).resolve()),
        "router_hash": router_hash(loaded.model, cfg),
        "text": {"path": str(Path(text).resolve()), "sha256": hashlib.sha256(Path(text).read_bytes()).hexdigest()},
        "tokenizer_sha256": hashlib.sha256(Path(loaded.tokenizer_path).read_bytes()).hexdigest()[:16],
        "max_tokens": max_tokens,
        "window": window,
        "chunk_windows": chunk_windows,
        "input_dim": proj_dim or cfg.hidden_size,
        "projection": None if projection is None else {"dim": proj_dim, "seed": proj_seed, "file": "projection.npy"},
        "probs": "full",  # probs hold the softmax over all E experts, not only the top-k
        "dtypes": {"inputs": "float16", "ids": np.dtype(ids_dtype(cfg.num_experts)).name, "probs": "float16"},
    }
    writer = TraceWriter(out, settings, projection)
    num_chunks = -(-num_windows // chunk_windows)
    if total:
        total(num_windows * window)
    trace = make_trace_fn(loaded, projection)
    for c in range(num_chunks):
        rows = windows[c * chunk_windows : (c + 1) * chunk_windows]
        if writer.done(c):
            if progress:
                progress(rows.size)
            continue
        parts = []
        for b in range(0, len(rows), batch):
            tok = rows[b : b + batch]
            pad = batch - len(tok)  # a static batch: one compiled program
            padded = np.concatenate([tok, np.repeat(tok[-1:], pad, 0)]) if pad else tok
            h, top, probs = jax.device_get(trace(padded))
            n = tok.size
            parts.append((h[:n], top[:n].astype(ids_dtype(cfg.num_experts)), probs[:n]))
            if progress:
                progress(n)
        writer.write_chunk(
            c,
            c * chunk_windows * window,
            {
                "tokens": rows.reshape(-1).astype(np.int32),
                "positions": np.tile(np.arange(window, dtype=np.int32), len(rows)),
                "inputs": np.concatenate([p[0] for p in parts]),
                "ids": np.concatenate([p[1] for p in parts]),
                "probs": np.concatenate([p[2] for p in parts]),
            },
        )
    return writer.finish(num_chunks)
