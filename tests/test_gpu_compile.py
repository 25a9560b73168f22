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

    out = report("olmoe-small", "h100", batch=1, budget_frac=0.25, policy="lru")
    offloaded = out["programs"]["offloaded_decode"]
    # Misses are fetched inside the program: every conditional stays in the CUDA graph.
    assert offloaded["host_reads"] == 0 and offloaded["d2h_transfers"] == 0
    assert offloaded["conditionals_outside_command_buffers"] == 0 and offloaded["conditionals"] > 0
    assert offloaded["host_slices"] > 0  # the fetch reads pinned host memory: memory kinds survived
    assert offloaded["expert_weight_copy_bytes"] == 0  # no copy of the pool
    assert out["programs"]["resident_decode"]["host_slices"] == 0
