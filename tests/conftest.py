import importlib.util
import os
import sys
from pathlib import Path

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


def pytest_sessionstart(session):
    # Which Python and jax this run tests (two environments run the suite), shown even with -q.
    import platform

    import jax
    import jaxlib

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"jaxmoe tests: Python {platform.python_version()}, jax {jax.__version__}, "
                            f"jaxlib {jaxlib.__version__}")  # fmt: skip


def pytest_configure(config):
    # Many tests build engines over the same tiny shapes, each compiling the same programs, and
    # compiling is most of the suite's time (a warm run of test_generation and test_moe took
    # a quarter of a cold one on 2 cores): JAX's persistent compilation cache turns the
    # repeats into loads, within a run and from one run to the next. Its entries are keyed
    # by the program and the jax version, so a changed program compiles anew. A test that
    # checks the cache itself runs a process with its own directory.
    # The scripts and bench workers the e2e tests start use it too (unless a test gives one its
    # own), rather than the user's ~/.cache/jaxmoe.
    # JAXMOE_TEST_COMPILE_CACHE: DIR instead of the checkout's .cache/xla-tests; 0 (or off):
    # no cache. No size cap: JAX's capped cache expects an access-time file beside every
    # entry, and the entries the e2e tests' scripts write have none (every later write then
    # failed with a warning). `-m "not e2e"` writes about 40 MB; delete the directory at will.
    from jaxmoe.runtime.programs import CACHE_ENV, enable_compilation_cache

    where = enable_compilation_cache(os.environ.get("JAXMOE_TEST_COMPILE_CACHE",
                                                    Path(__file__).parents[1] / ".cache" / "xla-tests"))  # fmt: skip
    if where is not None:
        os.environ.setdefault(CACHE_ENV, str(where))  # the scripts (generate.py, serve.py, ...)
        os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(where))  # bench workers
    # The README's test command installs the test extra: there a missing torch is a broken
    # install, not a reason to skip every parity test (scripts/test.sh sets this).
    if os.environ.get("JAXMOE_REQUIRE_TORCH") == "1" and _TEST_EXTRA:
        raise pytest.UsageError(f"the test extra is incomplete (no {', '.join(_TEST_EXTRA)}): rerun scripts/test.sh")


# The test extra's modules that are not installed (looked up, not imported: importing
# transformers costs seconds, and only the tests that build Hugging Face models need it).
_TEST_EXTRA = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    # Without the test extra (scripts/test_gpu_jax.sh), a module that imports torch or
    # transformers is skipped with the reason, not a collection error; with it (scripts/test.sh
    # requires it) nothing changes.
    outcome = yield
    report = outcome.get_result()
    if report.failed and _TEST_EXTRA and isinstance(collector, pytest.Module):
        text = str(report.longrepr)
        missing = [m for m in _TEST_EXTRA if f"No module named '{m}'" in text]
        if missing:
            report.outcome = "skipped"
            report.longrepr = (str(collector.path), 0, f"needs {missing[0]} (the test extra)")


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
