"""export_hf is the inverse of conversion: transformers loads what it writes and computes
the same tokens as jaxmoe, and converting the export back gives identical parameters."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from hf_models import FAMILIES
from safetensors import safe_open

import jaxmoe
from jaxmoe.checkpoint import CheckpointError, convert_hf, restore_params
from jaxmoe.checkpoint.export import export_hf
from jaxmoe.engine import ResidentEngine, SamplingParams

REPO = Path(__file__).resolve().parents[1]
PROMPT = [3, 14, 15, 9, 26, 5]


def _keys(path: Path) -> set[str]:
    with safe_open(str(path / "model.safetensors"), "np") as f:
        return set(f.keys())


def jaxmoe_greedy(path: Path, prompt: list[int], n: int) -> list[int]:
    loaded = jaxmoe.load(path)
    result = ResidentEngine(loaded.config, loaded.model, loaded.experts).generate([prompt], n, SamplingParams(0.0))
    return result.token_ids[0]


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             min_new_tokens=n, pad_token_id=0)  # fmt: skip
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_export_round_trips_through_conversion(hf_checkpoint, tmp_path, family):
    """HF -> jaxmoe -> export: the same tensor names as save_pretrained, and converting
    the export again gives bit-identical parameters."""
    _, src = hf_checkpoint(family, "base", "single")
    convert_hf(src, tmp_path / "a", progress=False)
    export_hf(tmp_path / "a", tmp_path / "hf")
    assert _keys(tmp_path / "hf") == _keys(src)
    convert_hf(tmp_path / "hf", tmp_path / "b", progress=False)
    cfg = jaxmoe.load_hf_config(tmp_path / "a")
    a, b = restore_params(tmp_path / "a"), restore_params(tmp_path / "b")
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.e2e
@pytest.mark.parametrize("family", ["olmoe", pytest.param("mixtral", marks=pytest.mark.slow)])
def test_exported_directory_generates_like_jaxmoe_in_transformers(hf_checkpoint, tmp_path, family):
    _, src = hf_checkpoint(family, "base", "single")
    convert_hf(src, tmp_path / "ckpt", progress=False)
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "export_hf.py"), str(tmp_path / "ckpt"),
                           str(tmp_path / "hf"), "--json"], capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tensors"] == len(_keys(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [f"{type(hf_checkpoint(family)[0]).__name__}"]
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ours = jaxmoe_greedy(tmp_path / "ckpt", PROMPT, 24)
    assert len(set(ours)) > 3  # a varied sequence, so equality means something
    assert hf_greedy(model, PROMPT, 24) == ours


@pytest.mark.e2e
@pytest.mark.slow
def test_trained_checkpoint_exports_to_transformers(tmp_path):
    """A checkpoint the training script ships (tied embeddings, our tokenizer) loads in
    transformers with its tokenizer, and gives jaxmoe's logits and greedy tokens."""
    from test_train import TINY, _train_script  # the tiny run settings of the training tests

    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    words = "one two three four five six seven eight nine ten".split()
    rng = np.random.default_rng(0)
    text = "\n".join(" ".join(rng.choice(words, 10)) for _ in range(3000))
    (corpus_dir / "numbers.txt").write_text(text)
    ship = tmp_path / "ship"
    argv = ["--data", str(corpus_dir), "--out", str(tmp_path / "run"), "--steps", "3", "--ship", str(ship),
            "--ship-dtype", "float32", *TINY, "--vocab-size", "280"]  # fmt: skip (ten words allow ~297 tokens)
    assert _train_script().main(argv) == 0
    export_hf(ship, tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer.eos_token_id == 0 and model.config.tie_word_embeddings
    prompt = tokenizer("three four five")["input_ids"]
    loaded = jaxmoe.load(ship)
    hidden, _, _ = loaded.model(
        np.asarray([prompt]), np.arange(len(prompt))[None], jaxmoe.model.init_kv_cache(loaded.config, 1, 16),
        loaded.experts,
    )
    with torch.no_grad():
        theirs = model(torch.tensor([prompt])).logits.numpy()
    np.testing.assert_allclose(np.asarray(loaded.model.logits(hidden)), theirs, atol=1e-4, rtol=1e-4)
    assert hf_greedy(model, prompt, 12) == jaxmoe_greedy(ship, prompt, 12)


def test_failed_export_leaves_nothing(hf_checkpoint, tmp_path):
    _, src = hf_checkpoint("olmoe", "base", "single")
    convert_hf(src, tmp_path / "ckpt", progress=False)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not empty"):
        export_hf(tmp_path / "ckpt", tmp_path / "taken")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**config, "hidden_size": 32}))
    with pytest.raises(CheckpointError):
        export_hf(tmp_path / "ckpt", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "taken"]
