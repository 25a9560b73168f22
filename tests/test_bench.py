"""The benchmark harness (scripts/bench.py, bench/): the figures it computes, the matrix it
builds, the random-weight models, and one tiny matrix end to end through worker processes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import budgets as B  # noqa: E402
from bench import stats  # noqa: E402
from bench.shapes import resolve  # noqa: E402

CONTRACT = ("model", "policy", "expert_budget_bytes", "batch", "prompt_tokens", "ttft_ms", "decode_tokens_per_s",
            "peak_device_bytes", "hit_rate", "h2d_bytes_per_token")  # fmt: skip


def bench_script():
    spec = importlib.util.spec_from_file_location("bench_script", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- figures on known inputs ---------------------------------------------------------
def test_step_latencies_and_percentiles():
    assert stats.step_latencies_ms([1.0, 1.002, 1.005]) == pytest.approx([2.0, 3.0])
    summary = stats.latency_summary([[float(x) for x in range(1, 51)], [float(x) for x in range(51, 101)]])
    assert summary["tpot_p50_ms"] == pytest.approx(50.5)
    assert summary["tpot_p99_ms"] == pytest.approx(99.01)
    assert summary["tpot_max_ms"] == 100 and summary["latency_samples"] == 100
    assert stats.latency_summary([[], []])["tpot_p50_ms"] is None


def test_bound_is_max_of_compute_and_transfer():
    # 8 experts of 12.5 MB at 50 GB/s: 2 ms of copies.
    transfer = stats.transfer_ms(8 * 12.5e6, 50.0)
    assert transfer == pytest.approx(2.0)
    assert stats.bound(1.5, transfer) == {"bound_ms": 2.0, "bound_by": "transfer", "serial_bound_ms": 3.5}
    assert stats.bound(3.0, transfer)["bound_by"] == "compute"
    assert stats.bound(3.0, transfer)["bound_ms"] == 3.0
    no_compute = stats.bound(None, transfer)
    assert no_compute["bound_ms"] == 2.0 and no_compute["bound_by"].startswith("transfer")
    assert stats.achieved_gbps(2e9, 0.5) == pytest.approx(4.0)
    assert stats.achieved_gbps(0, 0.5) is None


def test_batch_gain_compares_the_same_configuration_at_batch_1():
    from bench.report import add_batch_gains

    def row(batch, rate, budget="auto@16GiB"):
        return {"model": "m", "policy": "lru", "budget_spec": budget, "prefill": None, "prompt_tokens": 128,
                "device_budget_bytes": 16, "batch": batch, "decode_tokens_per_s": rate}  # fmt: skip

    rows = [row(1, 10.0), row(4, 30.0), row(16, 80.0), row(16, 50.0, budget="0.5")]
    add_batch_gains(rows)
    assert [r["throughput_vs_batch1"] for r in rows] == [1.0, 3.0, 8.0, None]


def test_shapes_match_the_released_models():
    """Parameter counts of the full-size shapes as jaxmoe builds them (bf16: 2 bytes each)."""
    counts = {name: B.weight_bytes(resolve(name).config("bfloat16")) / 2e9 for name in
              ("olmoe-1b-7b", "qwen3-30b-a3b", "mixtral-8x7b", "deepseek-v2-lite")}  # fmt: skip
    assert counts["olmoe-1b-7b"] == pytest.approx(6.92, abs=0.01)
    assert counts["qwen3-30b-a3b"] == pytest.approx(30.53, abs=0.01)
    assert counts["mixtral-8x7b"] == pytest.approx(46.70, abs=0.01)
    assert counts["deepseek-v2-lite"] == pytest.approx(15.71, abs=0.01)


def test_auto_budget_arithmetic_olmoe_at_5_gib():
    """207 whole experts fit a 5 GiB device at batch 1: dense 0.953 GB, KV 0.034 GB, and the engine's
    declared workspace 1.766 GB (two streamed layers of 64 experts 1.611 GB, activations, slack)."""
    cfg = resolve("olmoe-1b-7b").config("bfloat16")
    size, lines = B.fit_within(cfg, 1, 128, 128, 5 * B.GIB, None)
    assert size == 207 * B.expert_bytes(cfg)
    assert "dense weights 0.953 GB" in lines[1]
    budgets, _ = B.parse("auto,0.5,2GB", cfg, {"batch": 1, "prompt_tokens": 128, "new_tokens": 128,
                                                 "workspace": None}, [5 * B.GIB, 8 * B.GIB])  # fmt: skip
    assert [b.spec for b in budgets] == ["auto@5GiB", "auto@8GiB", "0.5", "2GB"]
    assert budgets[0].experts == 207 and budgets[1].experts > 207
    assert budgets[2].experts == 512 and budgets[3].bytes == 2 * 10**9


# -- the matrix --------------------------------------------------------------------
@pytest.mark.e2e
def test_matrix_main_point_and_sweeps():
    script = bench_script()
    args = script.parse_args(["--models", "olmoe-small", "--budgets", "0.05,0.5,1", "--prompt-tokens", "128,512"])
    jobs, _ = script.matrix.model_jobs(args, args.models[0], "bfloat16")
    main = [j for j in jobs if j.worker == "offload" and j.prompt_tokens == 128]
    runnable = {(j.policy, j.budget.spec) for j in main if not j.skipped}
    # Every policy at 0.5; the all-experts budget once; every policy refused at 0.05 (3 of 64
    # experts), below the minimum working set of one layer's 4 (the same for all: a prefetch
    # takes no room of its own).
    assert {p for p, b in runnable if b == "0.5"} == {"ondemand", "lru", "lfu", "predictor"}
    assert [p for p, b in runnable if b == "1"] == ["ondemand"]
    refused = [j for j in main if j.skipped]
    assert sorted((j.policy, j.budget.spec) for j in refused) == [(p, "0.05") for p in ("lfu", "lru", "ondemand", "predictor")]
    assert all("minimum working set" in j.skipped for j in refused)
    sweep = [j for j in jobs if j.prompt_tokens == 512]
    assert {(j.worker, j.policy) for j in sweep} == {("jaxmoe", None), ("hf", None), ("hf-accelerate", None),
                                                      ("offload", "lru")}  # fmt: skip
    assert jobs[0].worker == "bandwidth"
    accelerate = [j for j in jobs if j.worker == "hf-accelerate"]
    assert all(j.skipped for j in accelerate)  # CPU: no GPU to offload to
    assert len({j.key for j in jobs}) == len(jobs)  # keys name raw result files: they must not collide


def test_an_embedding_scale_gives_jaxmoe_rows_their_own_weights_and_leaves_the_peers_alone(capsys):
    script = bench_script()
    args = script.parse_args(["--models", "olmoe-small", "--budgets", "0.5", "--embed-scale", "28"])
    model = args.models[0]
    assert (model.source, model.embed_scale, model.label) == ("random", 28.0, "olmoe-small/embed-x28")
    jobs, _ = script.matrix.model_jobs(args, model, "bfloat16")
    ours = {j.model.label for j in jobs if j.worker in ("jaxmoe", "offload")}
    peers = {j.model.label for j in jobs if j.worker in ("hf", "hf-accelerate")}
    assert ours == {"olmoe-small/embed-x28"} and peers == {"olmoe-small"}  # transformers builds its own weights
    assert script.matrix.spec(args, jobs[1])["model"]["embed_scale"] == 28.0  # what the worker rebuilds
    for argv, words in ((["--model", "checkpoints/jaxmoe-tiny", "--embed-scale", "28"], "checkpoint routes"),
                        (["--models", "olmoe-small", "--embed-scale", "0"], "positive factor")):  # fmt: skip
        with pytest.raises(SystemExit):
            script.parse_args(argv)
        err = capsys.readouterr().err
        assert "--embed-scale" in err and words in err


@pytest.mark.e2e
def test_prefill_modes_become_engine_arguments_at_every_point():
    script = bench_script()
    args = script.parse_args(["--models", "olmoe-small", "--engines", "", "--policies", "lru,lfu", "--budgets", "0.5",
                              "--prompt-tokens", "128,512", "--prefill-modes", "stream,stream-serial"])  # fmt: skip
    jobs, _ = script.matrix.model_jobs(args, args.models[0], "bfloat16")
    modes = [(j.prompt_tokens, j.policy, j.prefill) for j in jobs if j.prefill]
    assert modes == [(p, "lru", m) for p in (128, 512) for m in ("stream", "stream-serial")]
    serial = next(j for j in jobs if j.prefill == "stream-serial")
    assert script.matrix.spec(args, serial)["engine_kwargs"] == {"prefill": "stream", "prefill_overlap": False}
    assert "engine_kwargs" not in script.matrix.spec(args, next(j for j in jobs if j.worker == "offload"))


@pytest.mark.e2e
def test_resident_rows_skipped_when_weights_exceed_the_device():
    script = bench_script()
    args = script.parse_args(["--gpu", "--models", "mixtral-8x7b", "--engines", "jaxmoe,hf"])
    jobs, lines = script.matrix.model_jobs(args, args.models[0], "bfloat16")
    resident = [j for j in jobs if j.worker in ("jaxmoe", "hf")]
    assert resident and all("does not fit" in j.skipped for j in resident)
    assert [j.budget.spec for j in jobs if j.worker == "offload"] == ["auto@24GiB"] * 4
    assert any("24 GiB" in line for line in lines)


# -- random-weight models ------------------------------------------------------------
def test_random_store_holds_the_resident_weights():
    """Offloaded and resident rows of a random shape must run the same weights."""
    from bench import models

    cfg = resolve("qwen3-tiny").config("bfloat16")
    store = models.random_host_store(cfg, seed=3)
    stacks = models.random_resident(cfg, seed=3)
    assert store.layer(1).sharding.memory_kind == "pinned_host"
    for layer in cfg.moe_layer_ids:
        for e in (0, cfg.num_experts - 1):
            np.testing.assert_array_equal(store.weights(layer, e).w_down, np.asarray(stacks[layer].w_down[e]))
    other = models.random_resident(cfg, seed=4)
    assert not np.array_equal(np.asarray(other[0].w_gate_up), np.asarray(stacks[0].w_gate_up))


# -- end to end --------------------------------------------------------------------
def run_bench(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--models", "qwen3-tiny", "--engines", "jaxmoe",
           "--policies", "lru", "--budgets", "0.5", "--prompt-tokens", "16,32", "--new-tokens", "3", "--repeats", "1",
           "--out-dir", str(out), "--name", "t", "--json", *extra]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)


@pytest.fixture(scope="module")
def tiny_matrix(tmp_path_factory):
    pytest.importorskip("matplotlib")  # the plots: the test (and bench) extra
    out = tmp_path_factory.mktemp("bench")
    proc = run_bench(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(proc.stdout)


def test_tiny_matrix_writes_the_contract(tiny_matrix):
    out, report = tiny_matrix
    assert report["device"].startswith("CPU")
    assert json.loads((out / "t.json").read_text())["rows"] == report["rows"]
    rows = report["rows"]
    assert {(r["policy"], r["prompt_tokens"]) for r in rows} == {("resident", 16), ("resident", 32), ("lru", 16),
                                                                  ("lru", 32)}  # fmt: skip
    for r in rows:
        assert set(CONTRACT) <= set(r), set(CONTRACT) - set(r)
        assert r["ttft_ms"] > 0 and r["decode_tokens_per_s"] > 0 and r["tpot_p99_ms"] >= r["tpot_p50_ms"] > 0
        assert r["latency_samples"] == 2  # 3 new tokens: 2 decode steps in the one timed run
    for r in (r for r in rows if r["engine"] == "offload"):
        assert r["greedy_agree"] == r["greedy_compared"] == 3  # offloading never changes tokens
        assert 0 <= r["hit_rate"] <= 1 and r["h2d_bytes_per_token"] > 0
        assert r["bound_ms_per_token"] == max(r["resident_tpot_ms"], r["transfer_ms_per_step"])
        assert r["measured_h2d_GBps"] > 0
    assert sorted(report["plots"]) == ["t-bytes-per-token.png", "t-decode-vs-budget.png", "t-ttft-vs-prompt.png"]
    for name in report["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| lru |" in (out / "t.md").read_text()


@pytest.mark.e2e
def test_resume_reuses_saved_rows(tiny_matrix):
    out, report = tiny_matrix
    again = run_bench(out, "--resume", "--stop-after", "0")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "starting worker" not in again.stderr
    assert [r["ttft_ms"] for r in json.loads(again.stdout)["rows"]] == [r["ttft_ms"] for r in report["rows"]]
