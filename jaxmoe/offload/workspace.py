"""The device memory an offloaded generate uses beyond the dense weights, the KV cache and
the expert cache's budget: what a user must leave free, and what the GPU tests hold the
engine to.

  streamed   a streamed prefill holds up to two whole layers of experts outside the cache
             (the layer computing and the next one's copies, or one layer's copies and
             its stack; prefill_plan.py), and a quantized layer's unpacked weights
  gathered   an expert program computing U of a pool's experts gathers them first: U experts
             and, for a quantized format, their unpacked weights (a routed prefill or decode;
             a streamed prefill gathers nothing, so the larger of the two counts)
  activations the largest chunk's: hidden states of the whole prompt (x, its update, the
             residual), attention scores over the cache [B, H, C, S] in fp32, and every
             computed expert's intermediates [U, N, 2I + I + D] over the chunk's N tokens;
             logits [B, V] in fp32
  slack      XLA's own scratch (fusion temporaries, sort buffers of the routing)
Shapes only: nothing is allocated.
"""

from __future__ import annotations

from jaxmoe.config import MoEConfig
from jaxmoe.runtime.buckets import DEFAULT_PREFILL_CHUNK, cache_bucket, chunk_starts, prompt_bucket

SLACK_BYTES = 64 * 2**20
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def workspace_bytes(cfg: MoEConfig, batch: int, prompt_tokens: int, max_new_tokens: int, expert_bytes: int,
                    chunk: int = DEFAULT_PREFILL_CHUNK, unpacked_bytes: int = 0) -> dict[str, int]:  # fmt: skip
    """{"streamed", "gathered", "activations", "slack", "total"} in bytes, for a generate of
    `batch` prompts of up to `prompt_tokens` tokens. `unpacked_bytes`: one expert's weights in
    the compute dtype when `expert_bytes` is a quantized expert (0 for dense: nothing to unpack)."""
    size = ITEMSIZE[cfg.dtype]
    p_len = prompt_bucket(prompt_tokens)
    c, _ = chunk_starts(p_len, chunk)
    s = cache_bucket(p_len, max_new_tokens)
    n = batch * c
    e, d, i = cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size
    u = min(e, n * cfg.top_k)
    parts = {
        # Two layers; a quantized layer is unpacked whole while it computes, as the resident one is.
        "streamed": 2 * e * expert_bytes + e * unpacked_bytes,
        "gathered": u * (expert_bytes + unpacked_bytes),
        "activations": 3 * batch * p_len * d * size + batch * cfg.num_heads * c * s * 4
        + e * n * (3 * i + d) * size + 2 * batch * cfg.vocab_size * 4,
        "slack": SLACK_BYTES,
    }
    total = max(parts["streamed"], parts["gathered"]) + parts["activations"] + parts["slack"]
    return parts | {"total": total}
