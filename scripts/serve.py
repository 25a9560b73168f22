"""Serve a jaxmoe checkpoint behind an OpenAI-compatible HTTP API, with continuous batching.

  python scripts/serve.py                                   # the shipped model, resident
  python scripts/serve.py --expert-budget-frac 0.5 --api-key SECRET

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streamed with
"stream": true), GET /health (never needs the key), GET /metrics (Prometheus). Binds to
127.0.0.1 unless --host says otherwise. SIGTERM stops accepting, lets running requests
finish for --shutdown-grace-s seconds, cancels the rest and exits 0. See README "Serving".
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from pathlib import Path

# This checkout's jaxmoe, before any installed one (a venv's editable install may point at another checkout).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# The same engine choice and flag checks as generate.py.
from generate import add_skip_below, build_engine, check_engine_flags, default_model  # noqa: E402

from jaxmoe.runtime.buckets import DEFAULT_PREFILL_CHUNK  # noqa: E402
from jaxmoe.runtime.programs import enable_compilation_cache  # noqa: E402
from jaxmoe.offload.policies import POLICY_NAMES  # noqa: E402
from jaxmoe.serve.scheduling import RULES  # noqa: E402

DEFAULT_MAX_BATCH = 8


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="jaxmoe checkpoint directory (default: the shipped model)")
    p.add_argument("--model-id", help="the name clients send as 'model' (default: the directory's name)")
    p.add_argument("--expert-budget-gb", type=float, help="offload experts: device expert cache of this many 10^9 B")
    p.add_argument("--expert-budget-frac", type=float, help="the same as a fraction of all expert bytes, e.g. 0.5")
    p.add_argument("--policy", choices=sorted(POLICY_NAMES), help="expert cache policy (with a budget), as generate.py")
    p.add_argument("--predictor", help="predictor directory, or 'gate-ahead'")
    add_skip_below(p)  # every response then carries "approximate": true
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                   help="tokens per prefill chunk (a power of two); a long prompt advances one chunk per decode "
                   "step, so smaller chunks disturb running requests less")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int,
                   help=f"rows decoding together (buckets: powers of two up to it; default {DEFAULT_MAX_BATCH}, or "
                   "with offloaded experts the largest batch up to that whose experts the budget holds)")  # fmt: skip
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a row before 429")
    p.add_argument("--api-key", default=os.environ.get("JAXMOE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health (or $JAXMOE_API_KEY)")
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0, help="default time-to-first-token objective")
    p.add_argument("--slo-tpot-ms", type=float, default=200.0, help="default time-per-output-token objective")
    p.add_argument("--batched-decode", action="store_true",
                   help="resident: decode every row in one batched step (more parallel on a GPU) instead of each "
                   "row as the one-row step (the default: tokens exactly those of the prompt alone)")
    p.add_argument("--schedule", choices=RULES, default="edf",
                   help="the order queued requests take free rows in: edf (earliest TTFT deadline), fcfs, or task "
                   "(task-aware: those that can still meet their TTFT first, by deadline, judged by their prefill "
                   "chunks times the measured time of a turn that runs one; then the late ones, oldest first)")  # fmt: skip
    p.add_argument("--static-batching", action="store_true",
                   help="admit a new batch only when the last one finished (the benchmark's baseline)")
    p.add_argument("--shutdown-grace-s", type=float, default=10.0, help="on SIGTERM, how long running requests get")
    p.add_argument("--compilation-cache", metavar="DIR", help="keep compiled programs here ('off' disables)")
    args = p.parse_args(argv)
    check_engine_flags(p, args)
    for flag in ("max_batch", "max_queue", "port"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    # generate.build_engine reads these
    args.prefill, args.no_prefill_overlap = "routed", False
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import uvicorn

    from jaxmoe.offload.cache import BudgetError
    from jaxmoe.offload.host_store import HostMemoryError
    from jaxmoe.serve.launch import app_with_lifespan, make_state

    enable_compilation_cache(args.compilation_cache)
    path = args.model or default_model()
    try:
        engine, _, generation_config, tokenizer_path = build_engine(path, args)
        max_batch = args.max_batch or default_max_batch(engine)
        state = make_state(engine, generation_config, tokenizer_path, path, max_batch=max_batch,
                           max_queue=args.max_queue, api_key=args.api_key, slo_ttft_ms=args.slo_ttft_ms,
                           slo_tpot_ms=args.slo_tpot_ms, static=args.static_batching, model_id=args.model_id,
                           exact_rows=not args.batched_decode, schedule=args.schedule)  # fmt: skip
    except BudgetError as e:  # an explicit --max-batch: the cache is sized for every row's experts at once
        print(f"error: {e}; a smaller --max-batch needs fewer experts per layer at once", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, HostMemoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    app = app_with_lifespan(state, grace_s=1.0)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=args.shutdown_grace_s)  # fmt: skip
    print(f"serving {state.model_id} ({type(engine).__name__}) on http://{args.host}:{args.port}/v1", file=sys.stderr)
    GracefulServer(config).run()
    return 0


def default_max_batch(engine) -> int:
    """DEFAULT_MAX_BATCH, or with offloaded experts the largest batch up to it that the budget
    holds (said in one line when that is fewer)."""
    from jaxmoe.engine.offloaded import OffloadedEngine

    if not isinstance(engine, OffloadedEngine):  # resident: no expert budget
        return DEFAULT_MAX_BATCH
    batch = engine.largest_batch(DEFAULT_MAX_BATCH)
    if batch < DEFAULT_MAX_BATCH:
        print(f"serving at most {batch} rows at once: the largest batch whose experts the expert budget holds "
              f"(--max-batch sets it)", file=sys.stderr)  # fmt: skip
    return batch


class GracefulServer:
    """uvicorn's Server, stopped by SIGTERM/SIGINT through our own handlers: uvicorn closes
    the listener, waits up to the grace for open requests, cancels the rest (their rows are
    freed), runs the lifespan's shutdown and returns, and the process exits 0. (uvicorn's
    own handlers re-raise the signal after shutting down, so the process would die of it.)"""

    def __new__(cls, config):
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                def stop(*_):
                    self.force_exit = self.should_exit  # a second signal: stop waiting
                    self.should_exit = True

                previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
                try:
                    yield
                finally:
                    for s, handler in previous.items():
                        signal.signal(s, handler)

        return Server(config)


if __name__ == "__main__":
    sys.exit(main())
