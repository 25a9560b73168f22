import os
import sys

import pytest

# Tests run on CPU JAX unless a GPU test asks for more; helper modules live beside the tests.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))
# research/ (offline variants, not the package) lives beside jaxmoe in the checkout.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _has_gpu() -> bool:
    try:
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def pytest_report_header(config):
    import platform

    import jax
    import jaxlib

    return f"jaxmoe tests: Python {platform.python_version()}, jax {jax.__version__}, jaxlib {jaxlib.__version__}"


def pytest_configure(config):
    # The README's test command installs the test extra: there a missing torch is a broken
    # install, not a reason to skip every parity test (scripts/test.sh sets this).
    if os.environ.get("JAXMOE_REQUIRE_TORCH") == "1":
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as e:
            raise pytest.UsageError(f"the test extra is incomplete ({e}): rerun scripts/test.sh") from None


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow")


def pytest_collection_modifyitems(config, items):
    # Slow cases repeat what a fast representative in the default run already covers
    # (another family, budget or batch); --slow (or JAXMOE_SLOW_TESTS=1) runs them too.
    if not (config.getoption("--slow") or os.environ.get("JAXMOE_SLOW_TESTS") == "1"):
        skip_slow = pytest.mark.skip(reason="slow: run with --slow")
        for item in items:
            if item.get_closest_marker("slow"):
                item.add_marker(skip_slow)
    if any(item.get_closest_marker("gpu") for item in items) and not _has_gpu():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """(family, variant, layout) -> (transformers model, saved directory), each built once."""
    from hf_models import fuse_experts, tiny_hf_model  # torch and transformers: only where a test asks

    models, dirs = {}, {}

    def get(family: str, variant: str = "base", layout: str = "single"):
        if (family, variant) not in models:
            models[family, variant] = tiny_hf_model(family, variant)
        model = models[family, variant]
        if (family, variant, layout) not in dirs:
            path = tmp_path_factory.mktemp(f"{family}-{variant}-{layout}")
            if layout == "sharded":
                model.save_pretrained(path, max_shard_size="20KB")
                assert (path / "model.safetensors.index.json").is_file()
            else:
                model.save_pretrained(path)
            if layout == "fused":
                fuse_experts(path)
            dirs[family, variant, layout] = path
        return model, dirs[family, variant, layout]

    return get
