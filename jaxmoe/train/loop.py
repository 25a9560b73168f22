"""The training loop: steps, periodic validation per domain, checkpoints, time budget.

Everything the loop decides from (step, sample, seed), so stopping anywhere and
resuming from the last checkpoint replays the same batches and the same updates.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from jaxmoe.train.ckpt import TrainCheckpoints
from jaxmoe.train.data import Batches, training_stream, val_windows
from jaxmoe.train.run import RunConfig
from jaxmoe.train.step import init_params, make_eval_step, make_train_step


def evaluate(eval_step, params, windows: dict[str, np.ndarray], batch_size: int) -> tuple[dict, np.ndarray]:
    """({domain: {"loss", "ppl", "tokens"}}, expert assignment counts [L, E] summed over domains)."""
    out, counts = {}, 0
    for name, wins in windows.items():
        nll = 0.0
        for i in range(0, len(wins), batch_size):
            s, c = eval_step(params, wins[i : i + batch_size])
            nll, counts = nll + float(s), counts + np.asarray(c)
        tokens = wins.shape[0] * (wins.shape[1] - 1)
        out[name] = {"loss": nll / tokens, "ppl": math.exp(nll / tokens), "tokens": tokens}
    return out, counts


def _log(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """Drop records past the restored step: they belong to work the checkpoint does not hold."""
    if path.is_file():
        keep = [l for l in path.read_text().splitlines() if json.loads(l)["step"] <= step]
        path.write_text("".join(l + "\n" for l in keep))


class _StopRequests:
    """SIGTERM/SIGINT end the loop after the current step, which is then checkpointed.

    A job started in the background (`cmd &`) ignores SIGINT, so SIGTERM is what
    `kill PID` and schedulers send; both are handled the same way.
    """

    def __init__(self):
        self.requested = False
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        for s, handler in self._old.items():
            signal.signal(s, handler)


def train_loop(
    run: RunConfig,
    run_dir: Path,
    eos_id: int,
    tokens: dict[str, tuple[np.ndarray, np.ndarray]],
    eval_every: int = 100,
    eval_windows: int = 8,
    ckpt_every: int = 100,
    max_minutes: float | None = None,
    until_step: int | None = None,
    progress: bool = True,
) -> tuple[dict, dict]:
    """Train until run.steps, `until_step`, or the cumulative time budget; returns (params, meta)."""
    cfg = run.model_config(eos_id)
    tx, train_step = make_train_step(cfg, run.opt_config())
    eval_step = make_eval_step(cfg)
    params = init_params(cfg, run.seed)
    opt_state = tx.init(params)
    ckpts, log = TrainCheckpoints(run_dir / "ckpt"), run_dir / "log.jsonl"
    meta = {"step": 0, "sample": 0, "seed": run.seed, "tokens": 0, "train_seconds": 0.0}
    if ckpts.latest_step() is not None:
        params, opt_state, meta = ckpts.restore(params, opt_state)
        print(f"resuming {run_dir} at step {meta['step']}", file=sys.stderr)
    _truncate_log(log, meta["step"])

    batches = Batches(training_stream(tokens), run.seq_len, run.batch_size, run.seed)
    val = {d: val_windows(tokens[d][1], run.seq_len, eval_windows) for d in sorted(tokens)}
    stop = min(run.steps, until_step or run.steps)
    budget = max_minutes * 60 if max_minutes else math.inf
    saved = meta["step"]
    stop_requests = _StopRequests()
    bar = tqdm(total=run.steps, initial=meta["step"], desc="train", unit="step", file=sys.stderr, disable=not progress)
    try:
        while meta["step"] < stop and meta["train_seconds"] < budget and not stop_requests.requested:
            t0 = time.perf_counter()
            params, opt_state, m = train_step(params, opt_state, batches.batch(meta["sample"]))
            m = {k: float(v) for k, v in jax.device_get(m).items()}  # the sync the progress bar needs anyway
            step_s = time.perf_counter() - t0
            meta = {**meta, "step": meta["step"] + 1, "sample": meta["sample"] + run.batch_size,
                    "tokens": meta["tokens"] + run.batch_size * run.seq_len}  # fmt: skip
            _log(log, {"step": meta["step"], **m, "tokens": meta["tokens"], "seconds": meta["train_seconds"] + step_s})
            bar.update(1)
            bar.set_postfix(loss=f"{m['ce']:.3f}", tok_s=f"{run.batch_size * run.seq_len / step_s:.0f}")
            if meta["step"] % eval_every == 0 or meta["step"] == run.steps:
                results, _ = evaluate(eval_step, params, val, run.batch_size)
                _log(log, {"step": meta["step"], "val": results})
                line = ", ".join(f"{d} ppl {r['ppl']:.1f}" for d, r in results.items())
                bar.write(f"step {meta['step']}: {line}", file=sys.stderr)  # stdout is for --json
            # The budget is wall time: steps, validation and checkpointing all count.
            meta["train_seconds"] += time.perf_counter() - t0
            if meta["step"] % ckpt_every == 0:
                ckpts.save(params, opt_state, meta)
                saved = meta["step"]
    finally:
        stop_requests.restore()
        bar.close()
        if meta["step"] != saved:
            ckpts.save(params, opt_state, meta)
        ckpts.close()
    return params, meta
