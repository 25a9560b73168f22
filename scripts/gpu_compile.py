"""The engine's decode programs compiled for an H100/H200 without a GPU: kernels, command
buffers, host reads per execution (bench/gpu_compile.py).

usage: python scripts/gpu_compile.py [--model DIR|SHAPE] [--target h100|h200] [--batch N]
           [--expert-budget-frac F] [--policy lru|...] [--keep DIR] [--serve] [--json]
Needs the CUDA plugin's Python (3.12 with jax-cuda13-plugin 0.11.2): scripts/setup_aot_env.sh
makes one (.venv-aot), and this script re-runs itself there when started elsewhere.
"""

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # no GPU here: the CUDA plugin only compiles
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    from jaxmoe.offload.device_cache import DEVICE_POLICIES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="olmoe-1b-7b", help="a checkpoint directory or a bench/shapes.py name")
    p.add_argument("--target", default="h100", choices=("h100", "h200"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--expert-budget-frac", type=float, default=0.25)
    p.add_argument("--policy", default="lru", choices=DEVICE_POLICIES)
    p.add_argument("--keep", default=None, help="a directory for the optimized HLO and thunk sequences")
    p.add_argument("--serve", action="store_true", help="also the server's offloaded rows step (serve_decode)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    from bench import gpu_aot

    why = gpu_aot.available()
    if why:
        aot = ROOT / ".venv-aot" / "bin" / "python"
        if aot.exists() and Path(sys.executable).resolve() != aot.resolve():
            os.execv(str(aot), [str(aot), __file__, *(argv or sys.argv[1:])])
        print(f"gpu_compile: {why}; run scripts/setup_aot_env.sh first", file=sys.stderr)
        return 2
    from bench.gpu_compile import report

    out = report(a.model, a.target, a.batch, a.expert_budget_frac, a.policy, keep=a.keep, serve=a.serve)
    if a.json:
        print(json.dumps(out))
        return 0
    print(f"{out['model']} for {out['target']} (jax {out['jax']}), batch {out['batch']}, {out['policy']} at "
          f"{out['budget_frac']:.0%} of the expert bytes ({out['pool_slots']} slots)")
    keys = list(next(iter(out["programs"].values())))
    print("program".ljust(18) + "".join(k.ljust(14)[:14] + " " for k in keys))
    for name, counts in out["programs"].items():
        print(name.ljust(18) + "".join(str(counts[k]).ljust(14) + " " for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
