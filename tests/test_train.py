"""Training on a tiny synthetic corpus: the MoE training kernel equals the reference,
the script's loss falls, and an interrupted run resumes into the same run."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe.model import ExpertWeights, Routing, moe_ffn_reference
from jaxmoe.train import data
from jaxmoe.train.losses import load_balancing_loss, router_z_loss
from jaxmoe.train.moe import moe_ffn_blocked
from jaxmoe.train.run import RunConfig, open_run

REPO = Path(__file__).resolve().parents[1]
TINY = ["--vocab-size", "300", "--hidden-size", "32", "--num-layers", "2", "--num-heads", "2",
        "--num-experts", "4", "--expert-width", "16", "--seq-len", "32", "--batch-size", "4",
        "--warmup-steps", "2", "--token-cache", "", "--quiet", "--json"]  # fmt: skip


def _train_script():
    spec = importlib.util.spec_from_file_location("train_moe", REPO / "scripts" / "train_moe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Two small 'domains' of random sentences over a 20-word vocabulary."""
    path = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = "the cat sat on a mat and dog ran to big red house with small green tree in park".split()
    for name in ("alpha", "beta"):
        docs = ["\n".join(" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(30)) for _ in range(40)]
        (path / f"{name}.txt").write_text("\n<|endoftext|>\n".join(docs))
    return path


def _log(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if "ce" in r]


@pytest.mark.parametrize("n,e,k", [(1, 4, 2), (5, 16, 2), (300, 16, 4)])  # N*K below, near and far above E
def test_training_moe_equals_reference_with_gradients(n, e, k):
    keys = jax.random.split(jax.random.key(n + e + k), 4)
    x = jax.random.normal(keys[0], (n, 16))
    w = ExpertWeights(0.3 * jax.random.normal(keys[1], (e, 16, 16)), 0.3 * jax.random.normal(keys[2], (e, 8, 16)))
    weights, ids = jax.lax.top_k(jax.nn.softmax(jax.random.normal(keys[3], (n, e))), k)
    ids = ids.astype(jnp.int32)
    np.testing.assert_allclose(moe_ffn_blocked(x, ids, weights, w), moe_ffn_reference(x, ids, weights, w), atol=1e-5)
    # Training differentiates through it: the gradients must match the reference's too.
    grad = lambda fn: jax.grad(lambda x, w, g: jnp.sum(fn(x, ids, g, w) ** 2), argnums=(0, 1, 2))(x, w, weights)
    for got, want in zip(jax.tree.leaves(grad(moe_ffn_blocked)), jax.tree.leaves(grad(moe_ffn_reference))):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_router_losses_reward_balance():
    uniform = Routing(jnp.zeros((8, 4)), jnp.array([[0, 1], [2, 3]] * 4, jnp.int32), None)
    assert float(load_balancing_loss(uniform, 4)) == pytest.approx(1.0)
    collapsed = Routing(jnp.tile(jnp.array([5.0, 5.0, 0, 0]), (8, 1)), jnp.array([[0, 1]] * 8, jnp.int32), None)
    assert float(load_balancing_loss(collapsed, 4)) > 1.9
    assert float(router_z_loss(uniform)) == pytest.approx(np.log(4) ** 2, rel=1e-6)


def test_split_keeps_every_line_and_holds_out_about_two_percent():
    text = "".join(f"line {i} of the text\n" for i in range(5000))
    train, val = data.split_text(text, val_frac=0.02, pieces=20)
    assert "".join(t + v for t, v in zip(train, val)) == text
    assert all(v.startswith("line ") for v in val) and len(val) == 20
    assert 0.015 < sum(map(len, val)) / len(text) < 0.025


def test_batches_are_a_function_of_seed_and_sample():
    stream = np.arange(1000, dtype=np.uint16)
    a, b = data.Batches(stream, 16, 4, seed=3), data.Batches(stream, 16, 4, seed=3)
    np.testing.assert_array_equal(a.batch(200), b.batch(200))  # no hidden iterator state
    first_epoch = np.concatenate([a.batch(i)[:, 0] for i in range(0, 60, 4)])
    assert len(set(first_epoch.tolist())) == 60  # an epoch visits each window once
    assert (a.batch(0)[:, 1:] == a.batch(0)[:, :-1] + 1).all()  # windows are contiguous text


@pytest.mark.e2e
def test_train_script_loss_falls_and_ships_a_loadable_checkpoint(corpus, tmp_path):
    ship = tmp_path / "ship"
    rc = _train_script().main(["--data", str(corpus), "--out", str(tmp_path / "run"), "--steps", "30",
                               "--ship", str(ship), "--ship-dtype", "float32", *TINY])  # fmt: skip
    assert rc == 0
    ce = [r["ce"] for r in _log(tmp_path / "run")]
    assert len(ce) == 30 and np.mean(ce[-5:]) < ce[0] - 1.0, ce
    import jaxmoe

    loaded = jaxmoe.load(ship)
    assert loaded.config.family == "olmoe" and loaded.generation_config["eos_token_id"] == 0
    assert json.loads((ship / "training.json").read_text())["step"] == 30


@pytest.mark.e2e
def test_resume_continues_the_same_run(corpus, tmp_path):
    train = _train_script()
    common = ["--data", str(corpus), "--steps", "8", "--ckpt-every", "3", *TINY]
    assert train.main(["--out", str(tmp_path / "whole"), *common]) == 0
    ship = ["--ship", str(tmp_path / "ship")]
    assert train.main(["--out", str(tmp_path / "parts"), "--until-step", "5", *ship, *common]) == 0
    # Steps 4-5 ran after the last periodic checkpoint (3): the stop must have saved them.
    assert [r["step"] for r in _log(tmp_path / "parts")] == [1, 2, 3, 4, 5]
    assert not (tmp_path / "ship").exists()  # an unfinished run is resumed, not shipped
    assert train.main(["--out", str(tmp_path / "parts"), *ship, *common]) == 0
    assert json.loads((tmp_path / "ship" / "training.json").read_text())["step"] == 8
    whole, parts = _log(tmp_path / "whole"), _log(tmp_path / "parts")
    assert [r["step"] for r in parts] == list(range(1, 9))
    for key in ("loss", "ce", "lb", "z", "grad_norm", "tokens"):
        assert [r[key] for r in parts] == [r[key] for r in whole], key


def test_resume_refuses_other_settings(tmp_path):
    open_run(tmp_path, RunConfig(steps=10))
    with pytest.raises(ValueError, match="steps: 10 -> 20"):
        open_run(tmp_path, RunConfig(steps=20))


def test_bigram_baseline_matches_direct_counting():
    from jaxmoe.train.evaluate import bigram_nll, bigram_table

    rng = np.random.default_rng(0)
    train, val = rng.integers(0, 6, 500), rng.integers(0, 6, 41)
    windows = data.strided_windows(val, 8, 4)  # [W, 9]; each window scores its last 4 targets
    assert (windows[1:, :5] == windows[:-1, 4:]).all()  # consecutive windows overlap by half
    pairs, context = {}, np.bincount(train[:-1], minlength=6)
    for a, b in zip(train[:-1], train[1:]):
        pairs[a, b] = pairs.get((a, b), 0) + 1
    want = -sum(np.log((pairs.get((w[i - 1], w[i]), 0) + 0.5) / (context[w[i - 1]] + 0.5 * 6))
                for w in windows for i in range(5, 9))  # fmt: skip
    assert bigram_nll(bigram_table(train[None], 6), windows, 4, 6, 0.5) == pytest.approx(want, rel=1e-9)
