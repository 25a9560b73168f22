"""Peak resident-memory growth of a piece of code, measured in a fresh interpreter.

The baseline is the resident set after the imports and after JAX's backend is up
(what any loader pays before it reads a byte); the peak is the high-water mark once
the code has run. A transient above the baseline during the imports can only make
the growth look larger, never smaller.

The high-water mark is VmHWM, not getrusage's ru_maxrss: Linux carries the parent's
peak into a child's ru_maxrss across fork and exec, so a child of a pytest process
that has just written a few hundred MB would report the parent's peak.

Arrays under glibc's sliding mmap threshold (up to 32 MiB) come from the heap, where
freed holes stay resident, so a test model needs expert stacks above it (as a
full-size model's are) for the growth to show what the code holds rather than the
heap's fragmentation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_SCRIPT = """
import json

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

import jax, numpy as np
{setup}
jax.block_until_ready(jax.device_put(np.zeros(8)))  # the backend is up
base = status("VmRSS")
{work}
peak = status("VmHWM")
device = (jax.devices()[0].memory_stats() or {{}}).get("peak_bytes_in_use")  # None on CPU
print("RSS " + json.dumps({{"growth": peak - base, "device_peak": device}}))
"""


def measure(work: str, setup: str = "", platform: str | None = "cpu", timeout: int = 300) -> dict:
    """{"growth": bytes the high-water resident set rose above the baseline while `work` ran
    after `setup`, "device_peak": the device allocator's peak (None on CPU)}. `platform`
    None lets JAX pick its default backend (a GPU where there is one)."""
    script = _SCRIPT.format(setup=textwrap.dedent(setup), work=textwrap.dedent(work))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("JAX_PLATFORMS", None)
    if platform:
        env["JAX_PLATFORMS"] = platform
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RSS "))
    return json.loads(line[4:])


def peak_growth(work: str, setup: str = "") -> int:
    """Bytes the resident set rose by, running on CPU (see `measure`)."""
    return measure(work, setup)["growth"]
