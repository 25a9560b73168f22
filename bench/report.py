"""Turn the benchmark's worker results into the report (JSON rows) and its markdown tables.

The offload rows are judged against issue 4's bound, per decode step:
  bound_ms = decode loads per step x expert bytes / measured pinned H2D bandwidth
             + the resident row's time per step (tpot_ms)
with the bandwidth of one layer's decode demand copied in one `device_put` call,
measured at the start of the same run (bench/bandwidth.py).
"""

from __future__ import annotations

import datetime
import sys

SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
PEER = {"jaxmoe": "resident", "hf": "hf-transformers", "hf-accelerate": "hf-accelerate"}
# Whose tokens each row is compared with: the same model in another engine.
REFERENCE = {"jaxmoe": "hf", "hf": "jaxmoe", "hf-accelerate": "hf", "offload": "jaxmoe"}


def leading_agreement(a: list[list[int]], b: list[list[int]]) -> int:
    """Tokens, from the first, on which two greedy runs agree (minimum over the batch)."""
    counts = []
    for x, y in zip(a, b):
        n = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        counts.append(n)
    return min(counts)


def _ratio(a, b):
    return a / b if a and b else None


def offload_fields(r: dict, resident: dict, bandwidth: dict | None) -> dict:
    """Cache counters per token, and the bound the row is measured against."""
    steps, tokens = r["decode_steps"], sum(len(t) for t in r["token_ids"])
    loads = r["decode_loads"] / steps if steps else None
    decode_total = r["decode_hits"] + r["decode_loads"]
    gbps = bandwidth and bandwidth["batched_GBps"]
    transfer = loads * r["expert_bytes"] / (gbps * 1e9) * 1e3 if gbps and loads is not None else None
    bound = transfer + resident["tpot_ms"] if transfer is not None and resident.get("tpot_ms") else None
    return {
        "expert_hits": r["expert_hits"], "expert_misses": r["expert_misses"], "h2d_bytes": r["h2d_bytes"],
        "h2d_bytes_per_token": r["h2d_bytes"] / tokens, "cache_slots": r["cache_slots"],
        "decode_hit_rate": r["decode_hits"] / decode_total if decode_total else None,
        "decode_loads": r["decode_loads"], "decode_steps": steps, "decode_loads_per_step": loads,
        "prefill_loads": r["prefill_loads"], "prefill_passes": r["prefill_passes"], "evictions": r["evictions"],
        "stall_ms": r["stall_ms"], "prefill_stall_ms": r["prefill_stall_ms"],
        "decode_stall_ms_per_step": r["decode_stall_ms"] / steps if steps else None,
        "prefetch_issued": r["prefetch_issued"], "prefetch_used": r["prefetch_used"],
        "expert_bytes": r["expert_bytes"], "dense_bytes": r["dense_bytes"], "kv_bytes": r["kv_bytes"],
        "bound_bandwidth_GBps": gbps, "transfer_ms_per_step": transfer,
        "resident_tpot_ms": resident.get("tpot_ms"), "bound_ms_per_token": bound,
        "tpot_over_bound": _ratio(r.get("tpot_ms"), bound),
    }  # fmt: skip


def make_report(args, jobs: list, results: dict, arithmetic: dict) -> dict:
    rows, ratios, problems = [], {}, []
    bandwidth = next((results[j].get("bandwidth") for j in jobs if j.worker == "bandwidth"), None) or {}
    by = {(j.worker, j.dtype, j.policy, j.budget): results[j] for j in jobs}
    for job in jobs:
        if job.worker == "bandwidth":
            if "error" in results[job] or "not_run" in results[job]:
                problems.append(f"bandwidth not measured: {results[job].get('error') or results[job]['not_run']}")
            continue
        r, model = results[job], f"{args.shape}/{SHORT.get(job.dtype, job.dtype)}"
        ref_name = REFERENCE[job.worker]
        ref = by.get((ref_name, job.dtype, None, None)) or {}
        if job.worker == "hf-accelerate" and "token_ids" not in ref:
            ref_name, ref = "jaxmoe", by.get(("jaxmoe", job.dtype, None, None)) or {}
        agree = compared = None
        if "token_ids" in r and "token_ids" in ref:
            agree = leading_agreement(r["token_ids"], ref["token_ids"])
            compared = min(min(len(x), len(y)) for x, y in zip(r["token_ids"], ref["token_ids"]))
        row = {
            "model": model, "policy": job.policy or PEER[job.worker], "expert_budget_bytes": r.get("expert_bytes"),
            "batch": args.batch, "prompt_tokens": args.prompt_tokens, "ttft_ms": r.get("ttft_ms"),
            "decode_tokens_per_s": r.get("decode_tokens_per_s"), "peak_device_bytes": r.get("peak_device_bytes"),
            # jaxmoe resident: every expert always on the device; transformers: no expert cache at all.
            "hit_rate": 1.0 if job.worker == "jaxmoe" else None, "h2d_bytes_per_token": 0,
            "engine": job.worker, "dtype": job.dtype, "new_tokens": r.get("settings", {}).get("new_tokens"),
            "repeats": r.get("settings", {}).get("repeats"), "tpot_ms": r.get("tpot_ms"),
            "compile_ms": r.get("compile_ms"), "peak_device_measured": r.get("peak_device_measured"),
            "peak_host_rss_bytes": r.get("peak_host_rss_bytes"), "greedy_agree": agree, "greedy_compared": compared,
            "greedy_reference": ref_name,
            "decode_tokens_per_s_runs": r.get("decode_tokens_per_s_runs"), "tpot_ms_runs": r.get("tpot_ms_runs"),
            "loadavg_at_start": r.get("loadavg_at_start"), "error": r.get("error"),
            "skipped": r.get("skipped"), "not_run": r.get("not_run"),
        }  # fmt: skip
        if job.worker == "hf-accelerate":
            row["expert_budget_bytes"] = None  # no expert cache: whole layers on the GPU, up to max_memory
            row |= {"device_budget_bytes": args.device_budget_bytes, "placement": r.get("placement")}
            if row["placement"]:
                row["placement"] = {k: v for k, v in row["placement"].items() if k != "device_map"}
                # Every CPU-placed weight crosses per forward: per generated token at batch 1.
                row["h2d_bytes_per_token"] = row["placement"]["offloaded_bytes_per_forward"] / args.batch
            else:
                row["h2d_bytes_per_token"] = None
        if job.worker == "offload":
            row |= {"budget_spec": job.budget.spec, "budget_note": job.budget.note,
                    "budget_experts": job.budget.experts, "expert_budget_bytes": job.budget.bytes}  # fmt: skip
        if job.worker == "offload" and "token_ids" in r:
            resident = by.get(("jaxmoe", job.dtype, None, None)) or {}
            row |= offload_fields(r, resident, bandwidth.get(job.dtype))
            row |= {"hit_rate": r["hit_rate"], "expert_budget_bytes": r["expert_budget_bytes"]}
            row["all_experts_fit"] = r["cache_slots"] == job.budget.experts  # preloaded: nothing moves
            accel = by.get(("hf-accelerate", job.dtype, None, None)) or {}
            row["speedup_vs_accelerate"] = _ratio(r.get("decode_tokens_per_s"), accel.get("decode_tokens_per_s"))
            if agree is None:
                problems.append(f"{model} {job.policy} {job.budget.spec}: no resident tokens to compare with")
            elif agree < compared:
                problems.append(f"MISMATCH: {model} {job.policy} budget {job.budget.spec}: offloaded tokens differ "
                                f"from resident after {agree} tokens (offloading must never change tokens)")  # fmt: skip
        peak = row["peak_device_bytes"] if row["peak_device_measured"] else None
        over = peak is not None and peak > args.device_budget_bytes
        if over and (job.worker == "hf-accelerate" or (job.budget and job.budget.spec == "auto")):
            target = args.device_budget_bytes / 2**30
            problems.append(f"{model} {row['policy']}: peak device memory {peak / 2**30:.2f} GiB > {target:g} GiB")
        if job.worker == "jaxmoe":
            hf = by.get(("hf", job.dtype, None, None)) or {}
            ratio = _ratio(r.get("decode_tokens_per_s"), hf.get("decode_tokens_per_s"))
            row["speedup_vs_hf"] = ratio
            if ratio:
                ratios[model] = ratio
        if row["error"]:
            problems.append(f"{model} {row['policy']}: failed: {row['error']}")
        rows.append(row)
    loads = [r["loadavg_at_start"] for r in rows if r["loadavg_at_start"] is not None]
    left = [f"{r['model']} {r['policy']}" for r in rows if r["not_run"]]
    if left:
        problems.append(f"{len(left)} rows not run yet (--stop-after): {', '.join(left)}; rerun with --resume")
    device = next((r["device"] for r in results.values() if "device" in r), "unknown (no worker ran)")
    versions = {k: v for r in results.values() for k, v in r.get("versions", {}).items()}
    statuses = [2 * any(p.startswith("MISMATCH") for p in problems), any(r["error"] for r in rows),
                3 * any(r["not_run"] for r in rows)]  # fmt: skip
    cmd = "python scripts/bench.py " + " ".join(sys.argv[1:])
    return {
        "device": device, "rows": rows, "ratios": ratios, "date": datetime.date.today().isoformat(),
        "command": cmd.strip(), "versions": versions, "loadavg_at_start": args.loadavg,
        "loadavg_workers": [min(loads), max(loads)] if loads else None,
        "cpu_threads": args.cpu_threads or None, "bandwidth": bandwidth,
        "budget_arithmetic": {d: lines for d, lines in arithmetic.items() if lines},
        "device_budget_bytes": args.device_budget_bytes, "problems": problems, "shape": args.shape,
        "new_tokens": args.new_tokens, "repeats": args.repeats, "accelerate_new_tokens": args.accelerate_new_tokens,
        "accelerate_repeats": args.accelerate_repeats,
        "status": next((s for s in statuses if s), 0),
    }  # fmt: skip


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _peak(r: dict) -> str:
    return _fmt(r["peak_device_bytes"] and r["peak_device_bytes"] / 1e9, ".3f") + (
        "" if r["peak_device_measured"] else " (est.)"
    )


def _absent(r: dict) -> str | None:
    if r["error"]:
        return f"failed: {r['error']}"
    if r["skipped"]:
        return f"skipped: {r['skipped']}"
    if r["not_run"]:
        return f"not run: {r['not_run']}"
    return None


def _agree(r: dict) -> str:
    if r["greedy_agree"] is None:
        return "-"
    text = f"{r['greedy_agree']}/{r['greedy_compared']}"
    return text if r["engine"] != "offload" or r["greedy_agree"] == r["greedy_compared"] else f"**MISMATCH {text}**"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return out + ["| " + " | ".join(cells) + " |" for cells in rows]


def _rate(x) -> str:
    return "-" if x is None else format(x, ".2f" if x < 10 else ".1f" if x < 100 else ".0f")


def _peer_cells(r: dict) -> list[str]:
    runs = r["decode_tokens_per_s_runs"]
    name = r["policy"]
    if r["engine"] == "hf-accelerate" and r.get("placement"):
        p = r["placement"]
        name += (f" ({p['layers_on_device']}/{p['layers']} layers on GPU at max_memory "
                 f"{r['device_budget_bytes'] / 2**30:g} GiB; {r['h2d_bytes_per_token'] / 1e9:.2f} GB copied per token)")
    return [
        r["model"], name, str(r["batch"]), str(r["prompt_tokens"]), str(r["new_tokens"]), _fmt(r["ttft_ms"], ".1f"),
        f"{_rate(r['decode_tokens_per_s'])} [{_rate(min(runs))}-{_rate(max(runs))}]", _fmt(r["tpot_ms"], ".2f"),
        _peak(r), _fmt(r["compile_ms"] and r["compile_ms"] / 1e3, ".1f"), f"{_agree(r)} ({r['greedy_reference']})",
        _fmt(r.get("speedup_vs_hf"), ".2f"), _fmt(r["loadavg_at_start"], ".1f"),
    ]  # fmt: skip


def _offload_cells(r: dict) -> list[str]:
    budget = (f"{r['budget_note']}: {r['budget_experts']} x {r['expert_bytes'] / 1e6:.2f} MB"
              f" = {r['expert_budget_bytes'] / 1e9:.3f} GB")  # fmt: skip
    policy = "any (all experts fit: preloaded, no transfers)" if r["all_experts_fit"] else r["policy"]
    stall = f"{r['prefill_stall_ms']:.1f}, {_fmt(r['decode_stall_ms_per_step'], '.3f')}"
    best = min(t for t in r["tpot_ms_runs"] if t is not None) if r.get("tpot_ms_runs") else None
    return [
        r["model"], policy, budget, str(r["cache_slots"]),
        f"{_fmt(r['hit_rate'], '.3f')} ({_fmt(r['decode_hit_rate'], '.3f')})", f"{r['h2d_bytes_per_token'] / 1e6:.2f}",
        _fmt(r["decode_loads_per_step"], ".2f"), stall, _fmt(r["ttft_ms"], ".1f"),
        f"{_fmt(r['tpot_ms'], '.2f')} [{_fmt(best, '.2f')}]", _rate(r["decode_tokens_per_s"]),
        _fmt(r["bound_ms_per_token"], ".2f"), _fmt(r["tpot_over_bound"], ".2f"), _peak(r), _agree(r),
        _fmt(r["speedup_vs_accelerate"], ".1f"), _fmt(r["loadavg_at_start"], ".1f"),
    ]  # fmt: skip


PEER_HEADER = ["model", "engine", "batch", "prompt", "new", "TTFT ms", "decode tok/s [range]", "TPOT ms",
               "peak device GB", "compile s", "greedy agree (with)", "jaxmoe / HF", "load"]  # fmt: skip
OFFLOAD_HEADER = ["model", "policy", "expert budget", "slots", "hit rate (decode)", "H2D MB/token",
                  "decode loads/step", "stall ms: prefill, decode/step", "TTFT ms", "TPOT ms [best]", "decode tok/s",
                  "bound ms", "TPOT / bound", "peak device GB", "tokens = resident", "/ accelerate", "load"]  # fmt: skip


def _load_range(report: dict) -> str:
    span = report["loadavg_workers"]
    return f", at the workers' starts {span[0]:.2f}-{span[1]:.2f}" if span else ""


def markdown(report: dict) -> str:
    v, rows = report["versions"], report["rows"]
    lines = [
        f"Device: {report['device']}. Date: {report['date']}. Command: `{report['command']}`.",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in sorted(v.items())) + ".",
        f"Medians of {report['repeats']} timed runs after a warm-up ({report['accelerate_repeats']} of "
        f"{report['accelerate_new_tokens']} new tokens for hf-accelerate; decode: median [min-max]); "
        f"threads per worker: {report['cpu_threads'] or 'library default'}; "
        f"1-min load average at the start: {report['loadavg_at_start']:.2f}{_load_range(report)}.",
    ]
    for dtype, b in report["bandwidth"].items():
        lines.append(
            f"Pinned host -> device `jax.device_put` ({dtype}, measured at the start of the run): one expert "
            f"({b['expert_bytes'] / 1e6:.3f} MB) {b['one_expert_ms']:.3f} ms = {b['one_expert_GBps']:.2f} GB/s; "
            f"{b['batched_experts']} experts in one call {b['batched_ms']:.3f} ms = {b['batched_GBps']:.2f} GB/s "
            "(the bound uses this one)."
        )
    for dtype, arithmetic in report["budget_arithmetic"].items():
        lines += ["", f"Expert budget `auto` ({dtype}):", *(f"    {line}" for line in arithmetic)]

    def cells(r: dict, full) -> list[str]:
        why = _absent(r) or (None if r["engine"] != "offload" or "cache_slots" in r else "no result")
        name = f"{r['policy']} (budget {r['budget_spec']})" if r["engine"] == "offload" else r["policy"]
        return [r["model"], name, why] if why else full(r)

    peers = [cells(r, _peer_cells) for r in rows if r["engine"] != "offload"]
    offload = [cells(r, _offload_cells) for r in rows if r["engine"] == "offload"]
    lines += ["", *_table(PEER_HEADER, peers)] if peers else []
    lines += ["", *_table(OFFLOAD_HEADER, offload)] if offload else []
    if report["problems"]:
        lines += ["", *(f"**{p}**" for p in report["problems"])]
    return "\n".join(lines) + "\n"
