"""Resumable training checkpoints: params, optimizer state and the run's position.

An Orbax CheckpointManager under RUN_DIR/ckpt keeps the last few steps. Each holds
  state: {"params", "opt_state"}   (the arrays)
  meta:  {"step", "sample", "seed", "tokens", "train_seconds"} (JSON)
Data order and any randomness are functions of (seed, sample), so the meta is the
whole position of the run. Orbax writes each step into a temporary directory and
renames it when complete, so an interruption mid-save leaves the previous step.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


class TrainCheckpoints:
    def __init__(self, directory: Path, keep: int = 2):
        self.manager = ocp.CheckpointManager(
            Path(directory).resolve(), options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, params, opt_state, meta: dict) -> None:
        self.manager.save(
            meta["step"],
            args=ocp.args.Composite(
                state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
                meta=ocp.args.JsonSave(meta),
            ),
        )

    def restore(self, params_like, opt_state_like) -> tuple:
        """(params, opt_state, meta) of the latest step; the *_like trees give structure and dtypes."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params_like, "opt_state": opt_state_like})
        out = self.manager.restore(
            self.latest_step(),
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
        )
        return out["state"]["params"], out["state"]["opt_state"], dict(out["meta"])

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
