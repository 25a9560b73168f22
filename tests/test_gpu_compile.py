"""The deviceless GPU compile report (scripts/gpu_compile.py): runs only where the CUDA plugin
is installed (Python 3.12, scripts/setup_aot_env.sh); skipped elsewhere. There, without the
main suite's conftest (it needs torch): `.venv-aot/bin/python -m pytest --noconftest tests/test_gpu_compile.py`."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # no GPU here: the CUDA plugin only compiles
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # (set before jax starts)

import pytest  # noqa: E402

from bench import gpu_aot  # noqa: E402

pytestmark = pytest.mark.skipif(gpu_aot.available() is not None, reason=str(gpu_aot.available()))


def test_the_offloaded_decode_never_reads_the_host_on_an_h100():
    from bench.gpu_compile import report

    out = report("olmoe-small", "h100", batch=1, budget_frac=0.25, policy="lru", serve=True)
    # The server's offloaded rows run the same step with each row's experts and head its own.
    for name in ("offloaded_decode", "serve_decode"):
        offloaded = out["programs"][name]
        # Misses are fetched inside the program: every conditional stays in the CUDA graph.
        assert offloaded["host_reads"] == 0 and offloaded["d2h_transfers"] == 0, name
        assert offloaded["conditionals_outside_command_buffers"] == 0 and offloaded["conditionals"] > 0, name
        assert offloaded["host_slices"] > 0, name  # the fetch reads pinned host memory: memory kinds survived
        assert offloaded["expert_weight_copy_bytes"] == 0, name  # no copy of the pool
    assert out["programs"]["resident_decode"]["host_slices"] == 0


def test_the_decode_steps_read_their_weights_in_place(tmp_path):
    """Experts read where they lie, dense weights in a few arguments: in two layers of
    OLMoE-1B-7B's shape (12.6 MB experts), XLA's own allocations in either decode step stay
    below one expert's bytes, where the gather of the step's 4 experts took 4 of them; and
    the step takes the packed dense weights as a handful of arguments, not one per array."""
    import json

    from bench.gpu_compile import report
    from bench.shapes import SHAPES
    from jaxmoe.config import load_hf_config
    from jaxmoe.quant import DENSE

    fields = SHAPES["olmoe-1b-7b"] | {"num_hidden_layers": 2, "num_experts": 16, "num_experts_per_tok": 4,
                                      "vocab_size": 8192, "torch_dtype": "bfloat16"}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(fields))
    cfg = load_hf_config(tmp_path)
    out = report(str(tmp_path), "h100", batch=1, budget_frac=0.25, policy="lru")
    expert = DENSE.nbytes(cfg)
    assert expert > 12e6
    for name in ("resident_decode", "offloaded_decode"):
        counts = out["programs"][name]
        assert counts["temp_bytes"] < expert, (name, counts["temp_bytes"])
        assert counts["host_reads"] == 0
    # resident: at most 6 arguments of dense weights (a buffer per dtype and width, the
    # embedding, the head), per layer 2 (its two expert stacks), the KV cache's 2 (keys and
    # values, every layer's stacked: model/kv.py), and tokens, positions, step, key; the
    # layers' 2 x 9 dense arrays are no arguments of their own
    assert out["programs"]["resident_decode"]["arguments"] <= 6 + 2 * cfg.num_layers + 2 + 4
    # 8 rows: every dense product is a GEMM, which copies a slice of the pack before reading
    # it. Each layer's weights are viewed after its input, so the copies of one layer's
    # attention projections (4 x 8.4 MB) are made when it runs, not every layer's at once.
    attention = 4 * cfg.hidden_size * cfg.num_heads * cfg.head_dim * 2  # OLMoE: as many kv heads as heads
    eight = report(str(tmp_path), "h100", batch=8, budget_frac=1.0, policy="lru")["programs"]["resident_decode"]
    assert eight["temp_bytes"] < 1.5 * attention, (eight["temp_bytes"], attention)
