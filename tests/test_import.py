"""Importing jaxmoe starts no JAX backend: the pinned host pool's size
(XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB) is read when the GPU backend starts, so a backend
started at import would fix the pool before a large model could ask for more."""

import subprocess
import sys

import pytest

PROBE = """
import importlib, pkgutil
import jaxmoe
for info in pkgutil.walk_packages(jaxmoe.__path__, "jaxmoe."):
    importlib.import_module(info.name)
from jax._src import xla_bridge
started = getattr(xla_bridge, "backends_are_initialized", lambda: bool(xla_bridge._backends))()
print("started" if started else "not started")
"""


@pytest.mark.e2e
def test_importing_every_module_starts_no_backend():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "not started"
