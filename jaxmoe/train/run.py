"""A training run's settings and its directory.

RUN_DIR/run.json      the settings; a resumed run must be started with the same ones
RUN_DIR/tokenizer.json trained on the training split at the run's first start
RUN_DIR/ckpt/         resumable checkpoints (ckpt.py)
RUN_DIR/log.jsonl     one line per step and per validation
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from jaxmoe.config import MoEConfig, from_hf_dict
from jaxmoe.tokenizer import END_OF_TEXT, load_tokenizer
from jaxmoe.train import data
from jaxmoe.train.model_config import olmoe_hf_config
from jaxmoe.train.step import OptConfig


@dataclasses.dataclass(frozen=True)
class RunConfig:
    vocab_size: int = 8192
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 4
    num_experts: int = 16
    top_k: int = 2
    expert_width: int = 128
    seq_len: int = 256
    batch_size: int = 8
    steps: int = 1000
    warmup_steps: int = 100
    peak_lr: float = 3e-3
    weight_decay: float = 0.1
    lb_coef: float = 0.01
    z_coef: float = 0.001
    val_frac: float = 0.02
    seed: int = 0
    dtype: str = "float32"  # compute dtype while training

    def hf_config(self, eos_token_id: int, dtype: str | None = None) -> dict:
        return olmoe_hf_config(
            self.vocab_size, self.hidden_size, self.num_layers, self.num_heads, self.num_experts, self.top_k,
            self.expert_width, max(1024, self.seq_len), eos_token_id, dtype or self.dtype, self.lb_coef,
        )  # fmt: skip

    def model_config(self, eos_token_id: int = 0) -> MoEConfig:
        return from_hf_dict(self.hf_config(eos_token_id))

    def opt_config(self) -> OptConfig:
        return OptConfig(
            peak_lr=self.peak_lr, warmup_steps=self.warmup_steps, total_steps=self.steps,
            weight_decay=self.weight_decay, lb_coef=self.lb_coef, z_coef=self.z_coef,
        )  # fmt: skip


def open_run(run_dir: Path, run: RunConfig) -> None:
    """Create the run directory, or check that an existing one was started with the same settings."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "run.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        diff = {k: (saved.get(k), v) for k, v in dataclasses.asdict(run).items() if saved.get(k) != v}
        if diff:
            changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"{path}: this run was started with other settings ({changes}); use a new --out")
    else:
        path.write_text(json.dumps(dataclasses.asdict(run), indent=2) + "\n")


def prepare_tokens(run_dir: Path, data_dir: Path, run: RunConfig, cache_dir: Path | None):
    """(tokenizer path, {domain: (train ids, val ids)}); trains the tokenizer on first use."""
    tok_path = run_dir / "tokenizer.json"
    if not tok_path.is_file():
        chunks = []
        for path in data.domain_files(data_dir).values():
            chunks += data.split_text(path.read_text(encoding="utf-8"), run.val_frac)[0]
        tok = data.train_tokenizer(chunks, run.vocab_size)
        if tok.get_vocab_size() != run.vocab_size:
            raise ValueError(f"the training text only supports {tok.get_vocab_size()} BPE tokens, not {run.vocab_size}")
        tmp = tok_path.with_suffix(".tmp")
        tok.save(str(tmp))
        tmp.rename(tok_path)
    tok = load_tokenizer(tok_path)
    return tok_path, tok.token_to_id(END_OF_TEXT), data.tokenize_corpus(data_dir, tok, cache_dir, run.val_frac)
