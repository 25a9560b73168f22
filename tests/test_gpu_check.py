"""scripts/gpu_check.py on the CPU: the dry run passes every step (so the GPU run cannot fail on
something a CPU shows), and a step over its cap is recorded while the next one still runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
STEPS = ["environment", "pytest", "bandwidth", "exactness", "decode", "phases", "prefill", "injit_probe"]


def check(out: Path, *args: str) -> tuple[int, dict, str]:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    return proc.returncode, json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


@pytest.mark.e2e
def test_the_dry_run_decodes_every_row(tmp_path):
    """The step the device decode changes, in the default run (the whole dry run is --slow: about 4
    minutes on 2 cores; a GPU session dry-runs its prepared command first anyway)."""
    rows = "resident,lru@0.5,predictor@0.5,hit-path:resident,hit-path:lru@0.5"
    rc, record, md = check(tmp_path, "--no-peers", "--steps", "environment,decode", "--decode-rows", rows)
    assert {s["name"]: s["status"] for s in record["steps"]} == {"environment": "passed", "decode": "passed"}, md
    assert rc == 0
    decode = next(s for s in record["steps"] if s["name"] == "decode")["result"]
    by_routing = {}
    for r in decode["rows"]:
        by_routing.setdefault(r["routing"], {})[r["policy"]] = r
    assert {k: set(v) for k, v in by_routing.items()} == {
        "random weights, embeddings x40": {"resident", "lru", "predictor"}, "random weights": {"resident", "lru"}}
    for r in decode["rows"]:  # each offloaded row against the resident row of its own weights and decoding
        assert r["engine"] != "offload" or r["greedy_agree"] == r["greedy_compared"] == 8, r
        assert r["temperature"] == (1.0 if r["routing"] == "random weights, embeddings x40" else 0.0), r
    # The scaled embeddings are the point: plain random weights route every token alike.
    routed, plain = by_routing["random weights, embeddings x40"]["lru"], by_routing["random weights"]["lru"]
    assert routed["decode_hit_rate"] < plain["decode_hit_rate"] - 0.3, (routed["decode_hit_rate"], plain["decode_hit_rate"])
    assert "## Decode" in md and "olmoe-small/bf16/embed-x40" in md


@pytest.mark.e2e
@pytest.mark.slow
def test_the_dry_run_passes_every_step(tmp_path):
    rc, record, md = check(tmp_path, "--no-peers")
    assert [s["name"] for s in record["steps"]] == STEPS
    assert {s["name"]: s["status"] for s in record["steps"]} == {name: "passed" for name in STEPS}, md
    assert rc == 0
    exact = next(s for s in record["steps"] if s["name"] == "exactness")["result"]
    assert exact["summary"]["equal"] == exact["summary"]["cases"] == 5  # one per model, every option twice
    decode = next(s for s in record["steps"] if s["name"] == "decode")["result"]
    assert {r["policy"] for r in decode["rows"]} == {"resident", "lru", "predictor"}
    assert {r["routing"] for r in decode["rows"]} == {"random weights, embeddings x40", "random weights"}
    for title in ("## Exactness", "## Decode", "## Where an offloaded decode step's time goes", "## Prefill modes"):
        assert title in md


@pytest.mark.e2e
def test_a_step_over_its_cap_is_recorded_and_the_next_runs(tmp_path):
    rc, record, md = check(tmp_path, "--steps", "environment,phases,injit_probe", "--cap", "phases=2")
    status = {s["name"]: s["status"] for s in record["steps"]}
    assert status == {"environment": "passed", "phases": "timeout", "injit_probe": "passed"}
    assert rc == 1 and "| phases | timeout |" in md
    probe = next(s for s in record["steps"] if s["name"] == "injit_probe")["result"]
    assert probe["variants"] and "answer" in probe


@pytest.mark.e2e
def test_the_gpu_tests_collect_without_the_serve_extra(tmp_path):
    """The GPU image has no fastapi, uvicorn or openai: its `pytest -m gpu` (the check's
    pytest step) must still collect, with the server's tests skipped."""
    for module in ("fastapi", "uvicorn", "openai"):
        (tmp_path / module).mkdir()
        (tmp_path / module / "__init__.py").write_text(f"raise ModuleNotFoundError('no module named {module}')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "--collect-only", "-q", "-rs", "-p",
                           "no:cacheprovider", str(ROOT / "tests")], capture_output=True, text=True, timeout=300, env=env,
                          cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "error" not in proc.stdout.lower().split("collected")[-1]
    skipped = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED") and "serve extra" in line]
    assert {line.split()[2].split(":")[0] for line in skipped} == {"tests/test_serve.py", "tests/test_serve_parts.py"}


@pytest.mark.e2e
@pytest.mark.slow
def test_the_quantized_step_dry_run(tmp_path):
    """The int4 rows (not in the default check): resident and offloaded int4 agree."""
    rc, record, md = check(tmp_path, "--steps", "quantized")
    step = record["steps"][0]
    assert step["name"] == "quantized" and step["status"] == "passed", md
    rows = step["result"]["rows"]
    assert {r["policy"] for r in rows} == {"resident", "lru"} and all("int4" in r["model"] for r in rows)
    assert rc == 0 and "## int4 experts" in md


def test_the_dispatch_probe_runs_its_second_worker_with_command_buffers_off(tmp_path, monkeypatch):
    """dispatch_probe's variants differ only in the XLA_FLAGS their workers start with, and
    the check's own settings keep none of them."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import gpu_check as cli

    from bench import gpu_check, matrix

    check = gpu_check.Check(cli.parse_args(["--dry-run", "--out", str(tmp_path)]))
    check.cap, flags = 60.0, []

    def fake_spawn(args, job, spec):
        flags.append(matrix.worker_env(args, job).get("XLA_FLAGS", ""))
        return {"natural": {}, "synced": {}, "resident_step_ms": 1.0}

    monkeypatch.setattr(matrix, "spawn", fake_spawn)
    status, result = gpu_check.step_dispatch_probe(check)
    assert status == "passed" and list(result["variants"]) == ["as_is", "off", "control_flow"]
    call_cost, as_is, off, control_flow = flags  # the call-cost worker, then one per variant
    assert not [f for f in call_cost.split() + as_is.split() if f.startswith("--xla_gpu_enable_command_buffer")]
    assert "--xla_gpu_enable_command_buffer=" in off.split()
    (enabled,) = [f for f in control_flow.split() if f.startswith("--xla_gpu_enable_command_buffer=")]
    assert {"CONDITIONAL", "WHILE", "FUSION"} <= set(enabled.partition("=")[2].split(","))
    assert "--xla_gpu_enable_command_buffer" not in check.bench.worker_base_env.get("XLA_FLAGS", "")


@pytest.mark.slow
def test_a_phases_worker_killed_after_measuring_keeps_its_figures(tmp_path, monkeypatch):
    """The GPU's phases workers were once killed after measuring (at their cap, in teardown)
    and the report lost every figure: each pass is saved as it finishes."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import gpu_check as cli

    from bench import gpu_check, matrix, workers

    check = gpu_check.Check(cli.parse_args(["--dry-run", "--out", str(tmp_path)]))

    def killed_before_its_result(args, job, spec):
        workers.WORKERS[job.worker](spec)  # measures everything, writes no result
        return {"error": "worker killed after 1 s (--worker-timeout)"}

    monkeypatch.setattr(matrix, "spawn", killed_before_its_result)
    r = gpu_check.phases_worker(check, 1.0, resident=True)
    assert r["error"].startswith("worker killed")
    assert r["natural"]["step_ms"] > 0 and r["synced"]["phases"]["compute"]["calls"] > 0
    assert r["resident_step_ms"] > 0


def test_a_profile_trace_is_summarised_per_process_and_module(tmp_path):
    """bench/trace_summary over a real jax.profiler trace of three calls of one program."""
    import jax
    import jax.numpy as jnp

    from bench.trace_summary import covered_us, summarize

    assert covered_us([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17
    def probe(x):
        return jnp.sin(x) @ x + 1

    program = jax.jit(probe)  # its module: jit_probe
    x = jnp.ones((64, 64))
    program(x).block_until_ready()
    jax.profiler.start_trace(str(tmp_path), create_perfetto_trace=True)
    for _ in range(3):
        program(x).block_until_ready()
    jax.profiler.stop_trace()
    (trace,) = tmp_path.rglob("perfetto_trace.json.gz")
    (host,) = [p for p in summarize(trace)["processes"] if p["name"].startswith("/host")]
    assert 0 < host["busy_ms"] <= host["span_ms"]
    modules = {name: count for name, count, _ in host["by_module"]}
    assert modules.get("jit_probe", 0) >= 3, host["by_module"]  # at least one event per call
    assert sum(count for _, count, _ in host["top"]) <= host["events"]


@pytest.mark.e2e
@pytest.mark.slow
def test_the_decode_profile_dry_run(tmp_path):
    """The profile step (not in the default check) keeps both traces and summarises them."""
    rc, record, md = check(tmp_path, "--steps", "decode_profile")
    step = record["steps"][0]
    assert step["status"] == "passed", md
    traces = step["result"]["traces"]
    assert set(traces) == {"offloaded", "resident"}
    for name, t in traces.items():
        assert (tmp_path / "profile" / t["file"]).is_file() and t["processes"]
    # lru misses inside the step program: one run and one read per token, never a resume
    assert traces["offloaded"]["resumes_per_token"] == 0 and traces["offloaded"]["host_syncs_per_token"] == 1.0
    assert "## A profile of the decode" in md


@pytest.mark.parametrize("flag, value", [("--prefill-modes", "stream,fast"), ("--prefill-lengths", "2048,lots")])
def test_a_bad_prefill_option_is_refused_by_name(flag, value, capsys, monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import gpu_check as cli

    with pytest.raises(SystemExit):
        cli.parse_args(["--out", str(tmp_path), flag, value])
    assert flag in capsys.readouterr().err
    args = cli.parse_args(["--out", str(tmp_path), "--prefill-modes", "stream", "--prefill-lengths", "512,2048"])
    assert args.prefill_modes == ["stream"] and args.prefill_lengths == [512, 2048]
