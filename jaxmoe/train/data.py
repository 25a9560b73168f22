"""Corpus -> train/validation token streams, the BPE tokenizer, and deterministic batches.

A domain is one text file (documents separated by `<|endoftext|>` lines). Its
held-out split is taken before the tokenizer is trained, so the tokenizer never
sees validation text: the file is cut into `pieces` equal spans and the last
`val_frac` of each span is held out, which spreads validation over every book
and section instead of taking only the domain's last document.

Batches are a pure function of (seed, sample index): resuming at a sample index
reproduces the exact batch an uninterrupted run would have drawn next.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jaxmoe.tokenizer import END_OF_TEXT


def domain_files(data_dir: Path) -> dict[str, Path]:
    files = {p.stem: p for p in sorted(Path(data_dir).glob("*.txt"))}
    if not files:
        raise FileNotFoundError(f"{data_dir}: no *.txt domain files (run scripts/fetch_corpus.sh)")
    return files


def _line_start(text: str, pos: int) -> int:
    """The start of the line holding `pos`, so cuts never split a word."""
    return text.rfind("\n", 0, pos) + 1 if pos < len(text) else len(text)


def split_text(text: str, val_frac: float = 0.02, pieces: int = 20) -> tuple[list[str], list[str]]:
    """(train chunks, validation chunks): the last `val_frac` of each of `pieces` equal spans."""
    cuts = [_line_start(text, len(text) * i // pieces) for i in range(pieces + 1)]
    train, val = [], []
    for a, b in zip(cuts, cuts[1:]):
        mid = max(a, _line_start(text, b - int((b - a) * val_frac)))
        train.append(text[a:mid])
        val.append(text[mid:b])
    return train, val


def train_tokenizer(chunks, vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenisation); END_OF_TEXT is id 0."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(chunks, trainer)
    return tok


def encode(tok: Tokenizer, chunks: list[str]) -> np.ndarray:
    """Token ids of the chunks (separators become END_OF_TEXT), each chunk ending in END_OF_TEXT."""
    eot = tok.token_to_id(END_OF_TEXT)
    ids = []
    for enc in tok.encode_batch(chunks):
        ids.extend(enc.ids)
        ids.append(eot)
    return np.asarray(ids, np.uint16 if tok.get_vocab_size() <= 65536 else np.int32)


def tokenize_corpus(data_dir: Path, tok: Tokenizer, cache_dir: Path | None, val_frac: float) -> dict:
    """{domain: (train ids, val ids)}, cached per (tokenizer, file contents, split)."""
    out = {}
    tok_hash = hashlib.sha256(tok.to_str().encode()).hexdigest()[:12]
    for name, path in domain_files(data_dir).items():
        text = path.read_text(encoding="utf-8")
        key = hashlib.sha256(f"{tok_hash}:{val_frac}:".encode() + text.encode()).hexdigest()[:16]
        cached = cache_dir / f"{name}-{key}.npz" if cache_dir else None
        if cached and cached.is_file():
            with np.load(cached) as z:
                out[name] = (z["train"], z["val"])
            continue
        train, val = split_text(text, val_frac)
        out[name] = (encode(tok, train), encode(tok, val))
        if cached:
            cached.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cached, train=out[name][0], val=out[name][1])
    return out


def training_stream(tokens: dict[str, tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The training split of every domain, concatenated in name order: what Batches cuts windows from."""
    return np.concatenate([tokens[d][0] for d in sorted(tokens)])


class Batches:
    """Windows of `seq_len + 1` tokens over the concatenated training streams, shuffled per epoch.

    Sample i is window perm_e[i mod W] of epoch e = i // W, where perm_e comes from
    (seed, e) alone: no iterator state to save beyond the sample index.
    """

    def __init__(self, stream: np.ndarray, seq_len: int, batch_size: int, seed: int):
        self.stream, self.seq_len, self.batch_size, self.seed = stream, seq_len, batch_size, seed
        self.num_windows = (len(stream) - 1) // seq_len
        if self.num_windows < batch_size:
            raise ValueError(f"{len(stream)} training tokens make fewer than {batch_size} windows of {seq_len}")
        self._perm_epoch, self._perm = -1, None

    def _window(self, sample: int) -> int:
        epoch, i = divmod(sample, self.num_windows)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._perm_epoch = epoch
        return int(self._perm[i])

    def seen(self, num_samples: int) -> np.ndarray:
        """[num_samples, T+1]: every window the first `num_samples` samples drew, in order."""
        return np.concatenate([self.batch(i) for i in range(0, num_samples, self.batch_size)])[:num_samples]

    def batch(self, first_sample: int) -> np.ndarray:
        """[B, T+1] int32: samples first_sample .. first_sample + B - 1."""
        starts = [self._window(first_sample + b) * self.seq_len for b in range(self.batch_size)]
        return np.stack([self.stream[s : s + self.seq_len + 1] for s in starts]).astype(np.int32)


def strided_windows(ids: np.ndarray, seq_len: int, stride: int) -> np.ndarray:
    """[W, T+1] windows starting every `stride` tokens (for scoring each window's last `stride` targets)."""
    starts = range(0, len(ids) - seq_len - 1 + 1, stride)
    return np.stack([ids[s : s + seq_len + 1] for s in starts]).astype(np.int32)


def val_windows(ids: np.ndarray, seq_len: int, max_windows: int) -> np.ndarray:
    """[W, T+1] non-overlapping windows spread evenly over a validation stream."""
    total = (len(ids) - 1) // seq_len
    picks = np.linspace(0, total - 1, min(total, max_windows)).astype(int)
    return np.stack([ids[p * seq_len : p * seq_len + seq_len + 1] for p in picks]).astype(np.int32)
