"""End to end through the scripts: save_pretrained -> convert_hf.py -> generate.py --json
gives transformers' greedy tokens, for each family and each weight layout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [[3, 14, 15, 9, 26, 5], [27, 18, 28]]
# A fused and a sharded layout by default; the other two families (and the single layout) with --slow.
CASES = [pytest.param("mixtral", "sharded", marks=pytest.mark.slow), ("olmoe", "fused"),
         pytest.param("qwen2_moe", "single", marks=pytest.mark.slow), ("qwen3_moe", "sharded")]  # fmt: skip


def script(name: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "scripts" / name), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()  # stops after eos (id 2), as generate.py does


@pytest.mark.e2e
@pytest.mark.parametrize("family,layout", CASES)
def test_convert_then_generate_matches_transformers(hf_checkpoint, tmp_path, family, layout):
    model, src = hf_checkpoint(family, "base", layout)
    dst = tmp_path / "ckpt"
    assert script("convert_hf.py", str(src), str(dst)).returncode == 0
    args = ["--model", str(dst), "--max-new-tokens", "20", "--json"]
    for p in PROMPTS:
        args += ["--prompt-ids", " ".join(map(str, p))]
    proc = script("generate.py", *args)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # stdout is exactly one JSON object
    assert [o["token_ids"] for o in report["outputs"]] == [hf_greedy(model, p, 20) for p in PROMPTS]
    m = report["metrics"]
    assert m["ttft_ms"] > 0 and m["peak_device_bytes"] > 0 and m["policy"] == "resident"


@pytest.mark.e2e
def test_generate_reports_bad_input_without_traceback(tmp_path):
    proc = script("generate.py", "--model", str(tmp_path), "--prompt-ids", "1 2", "--json")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "config.json" in proc.stderr and "Traceback" not in proc.stderr


def _converted_wide_olmoe(hf_checkpoint, tmp_path) -> tuple[list[str], dict]:
    """(generate.py's arguments for the converted wide OLMoE and PROMPTS, its resident JSON)."""
    _, src = hf_checkpoint("olmoe", "wide")
    dst = tmp_path / "ckpt"
    assert script("convert_hf.py", str(src), str(dst)).returncode == 0
    args = ["--model", str(dst), "--max-new-tokens", "12", "--json"]
    for p in PROMPTS:
        args += ["--prompt-ids", " ".join(map(str, p))]
    resident = json.loads(script("generate.py", *args).stdout)
    return args, resident


@pytest.mark.e2e
def test_generate_offloaded_matches_resident_and_dumps_the_plan(hf_checkpoint, tmp_path):
    args, resident = _converted_wide_olmoe(hf_checkpoint, tmp_path)
    # 16 experts x 3 layers of 3 x 64 x 16 fp32 = 12288 bytes each; room for 20 of the 48.
    proc = script("generate.py", *args, "--expert-budget-gb", str(20 * 12288 / 1e9), "--policy", "lfu", "--plan")
    assert proc.returncode == 0, proc.stderr
    offloaded = json.loads(proc.stdout)
    assert [o["token_ids"] for o in offloaded["outputs"]] == [o["token_ids"] for o in resident["outputs"]]
    m = offloaded["metrics"]
    assert m["policy"] == "lfu" and m["expert_budget_bytes"] == 20 * 12288 and m["expert_misses"] > 0
    # The plan holds the prefill's passes; the decode's loads happen in the step program.
    assert sum(len(p["loads"]) for p in offloaded["plan"]) + m["decode_expert_loads"] == m["expert_misses"]
    assert m["h2d_bytes"] == m["expert_misses"] * 12288

    proc = script("generate.py", *args, "--expert-budget-gb", "1", "--policy", "lru", "--maps", str(tmp_path / "m.npz"))
    assert proc.returncode == 2 and "--maps needs --policy maps" in proc.stderr


@pytest.mark.e2e
@pytest.mark.slow
def test_generate_prefetching_policies_match_resident(hf_checkpoint, tmp_path):
    """The predictor and expert maps through the script (the engine tests cover them in process)."""
    args, resident = _converted_wide_olmoe(hf_checkpoint, tmp_path)
    # Prefetch driven by the next layer's router: same tokens again, prefetches counted.
    proc = script("generate.py", *args, "--expert-budget-gb", str(40 * 12288 / 1e9), "--predictor", "gate-ahead")
    assert proc.returncode == 0, proc.stderr
    predicted = json.loads(proc.stdout)
    assert [o["token_ids"] for o in predicted["outputs"]] == [o["token_ids"] for o in resident["outputs"]]
    assert predicted["metrics"]["policy"] == "predictor" and predicted["metrics"]["prefetch_issued"] > 0

    # Expert maps with the router ahead, predicting on every other token only: same tokens.
    proc = script("generate.py", *args, "--expert-budget-gb", str(40 * 12288 / 1e9), "--policy", "maps",
                  "--predictor", "gate-ahead", "--predict-every", "2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    mapped = json.loads(proc.stdout)
    assert [o["token_ids"] for o in mapped["outputs"]] == [o["token_ids"] for o in resident["outputs"]]
    assert mapped["metrics"]["policy"] == "maps" and mapped["metrics"]["expert_misses"] > 0


@pytest.mark.e2e
def test_generate_refuses_a_budget_below_the_working_set(hf_checkpoint, tmp_path):
    _, src = hf_checkpoint("olmoe", "wide")
    dst = tmp_path / "ckpt"
    assert script("convert_hf.py", str(src), str(dst)).returncode == 0
    proc = script("generate.py", "--model", str(dst), "--prompt-ids", "1 2", "--expert-budget-gb", "1e-6", "--json")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "minimum working set" in proc.stderr and "Traceback" not in proc.stderr
