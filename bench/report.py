"""Turn the benchmark's worker results into the report (JSON rows) and its markdown tables.

Each offload row is judged against a bound per decode step (bench/stats.py):
  transfer = decode loads per step x expert bytes / pinned H2D bandwidth
  compute  = the resident jaxmoe row's time per step at the same model, dtype, batch, prompt
  bound    = max(compute, transfer)  (copies hidden behind compute), serial = their sum
with the bandwidth of one layer's decode demand copied in one `device_put` call, measured
at the start of the same run (bench/bandwidth.py). TTFT has the same kind of bound: the
prefill's expert bytes over that bandwidth against the resident prefill.
"""

from __future__ import annotations

import datetime
import sys

from bench import stats
from bench.budgets import num_experts
from bench.common import fmt, table

SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
PEER = {"jaxmoe": "resident", "hf": "hf-transformers", "hf-accelerate": "hf-accelerate"}
GIB = 2**30
# The offloaded engine's prefill metrics, copied into rows as they are.
PREFILL_METRICS = ("prefill_mode", "prefill_overlap", "prefill_transfer_ms", "prefill_chunks",
                   "prefill_max_streamed_layers")  # fmt: skip


def leading_agreement(a: list[list[int]], b: list[list[int]]) -> int:
    """Tokens, from the first, on which two greedy runs agree (minimum over the batch)."""
    counts = []
    for x, y in zip(a, b):
        counts.append(next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y))))
    return min(counts)


class Lookup:
    """Results by (worker, model, dtype, batch, prompt): the resident reference, the peers, bandwidth."""

    def __init__(self, results: dict):
        self.by = {}
        for job, r in results.items():
            if job.policy is None:
                self.by.setdefault((job.worker, job.decoded_as, job.dtype, job.batch, job.prompt_tokens), r)
        # The link carries bytes: one measurement serves every set of weights of a layout.
        self.bandwidth = {(j.model.layout, j.dtype): r.get("bandwidth") or {} for j, r in results.items()
                          if j.worker == "bandwidth"}  # fmt: skip

    def at(self, worker: str, job) -> dict:
        # transformers runs weights of its own, whatever embedding scale jaxmoe's random weights have
        model = job.model.layout if worker in ("hf", "hf-accelerate") else job.decoded_as
        return self.by.get((worker, model, job.dtype, job.batch, job.prompt_tokens)) or {}

    def gbps(self, job, demand: int) -> dict | None:
        """The bandwidth measured for this decode demand (or the nearest measured one)."""
        measured = self.bandwidth.get((job.model.layout, job.dtype)) or {}
        if not measured:
            return None
        return measured[min(measured, key=lambda n: abs(int(n) - demand))]


def offload_fields(r: dict, resident: dict, bw: dict | None, demand: int) -> dict:
    """Cache counters per token, achieved bandwidth, and the bounds the row is measured against."""
    steps, tokens = r["decode_steps"], sum(len(t) for t in r["token_ids"])
    loads = r["decode_loads"] / steps if steps else None
    decode_total = r["decode_hits"] + r["decode_loads"]
    gbps = bw and bw["batched_GBps"]
    transfer = stats.transfer_ms(loads * r["expert_bytes"] if loads is not None else None, gbps)
    decode_bytes = r["decode_loads"] * r["expert_bytes"]
    achieved = stats.achieved_gbps(decode_bytes, steps * r["tpot_ms"] / 1e3 if r.get("tpot_ms") else None)
    prefill_bytes = r.get("prefill_h2d_bytes", r["prefill_loads"] * r["expert_bytes"])
    decode_bound = stats.bound(resident.get("tpot_ms"), transfer)
    ttft_bound = stats.bound(resident.get("ttft_ms"), stats.transfer_ms(prefill_bytes, gbps))
    return {
        "expert_hits": r["expert_hits"], "expert_misses": r["expert_misses"], "h2d_bytes": r["h2d_bytes"],
        "h2d_bytes_per_token": r["h2d_bytes"] / tokens, "cache_slots": r["cache_slots"],
        "decode_hit_rate": r["decode_hits"] / decode_total if decode_total else None,
        "decode_loads": r["decode_loads"], "decode_steps": steps, "decode_loads_per_step": loads,
        "decode_h2d_bytes_per_step": decode_bytes / steps if steps else None,
        "prefill_loads": r["prefill_loads"], "prefill_passes": r["prefill_passes"], "evictions": r["evictions"],
        "prefill_h2d_bytes": prefill_bytes, "stall_ms": r["stall_ms"], "prefill_stall_ms": r["prefill_stall_ms"],
        "decode_stall_ms_per_step": r["decode_stall_ms"] / steps if steps else None,
        "prefetch_issued": r["prefetch_issued"], "prefetch_used": r["prefetch_used"],
        "expert_bytes": r["expert_bytes"], "dense_bytes": r["dense_bytes"], "kv_bytes": r["kv_bytes"],
        "measured_h2d_GBps": gbps, "measured_h2d_demand_experts": demand, "achieved_decode_h2d_GBps": achieved,
        "h2d_link_fraction": stats.ratio(achieved, gbps), "transfer_ms_per_step": transfer,
        "resident_tpot_ms": resident.get("tpot_ms"), "bound_ms_per_token": decode_bound["bound_ms"],
        "bound_by": decode_bound["bound_by"], "serial_bound_ms_per_token": decode_bound["serial_bound_ms"],
        "tpot_over_bound": stats.ratio(r.get("tpot_ms"), decode_bound["bound_ms"]),
        "ttft_bound_ms": ttft_bound["bound_ms"], "ttft_bound_by": ttft_bound["bound_by"],
        "ttft_over_bound": stats.ratio(r.get("ttft_ms"), ttft_bound["bound_ms"]),
        "ttft_transfer_floor_ms": stats.transfer_ms(prefill_bytes, gbps),
        "achieved_prefill_h2d_GBps": stats.achieved_gbps(prefill_bytes, (r.get("prefill_transfer_ms") or 0) / 1e3),
        **{k: r.get(k) for k in PREFILL_METRICS if k in r},
    }  # fmt: skip


def base_row(job, r: dict) -> dict:
    settings = r.get("settings", {})
    return {
        "model": f"{job.model.name}/{SHORT.get(job.dtype, job.dtype)}" + job.model.label.removeprefix(job.model.name)
        + (f", sampled T={job.temperature:g}" if job.temperature else ""),
        "routing": job.model.routing, "temperature": job.temperature,
        "policy": job.policy or PEER[job.worker], "expert_budget_bytes": r.get("expert_bytes"),
        "batch": job.batch, "prompt_tokens": job.prompt_tokens, "ttft_ms": r.get("ttft_ms"),
        "decode_tokens_per_s": r.get("decode_tokens_per_s"), "peak_device_bytes": r.get("peak_device_bytes"),
        # jaxmoe resident: every expert always on the device; transformers: no expert cache at all.
        "hit_rate": 1.0 if job.worker == "jaxmoe" else None, "h2d_bytes_per_token": 0,
        "engine": job.worker, "source": job.model.source, "dtype": job.dtype,
        "new_tokens": settings.get("new_tokens"), "repeats": settings.get("repeats"), "tpot_ms": r.get("tpot_ms"),
        **{k: r.get(k) for k in ("tpot_p50_ms", "tpot_p99_ms", "tpot_max_ms", "latency_samples")},
        "compile_ms": r.get("compile_ms"), "peak_device_measured": r.get("peak_device_measured"),
        "peak_host_rss_bytes": r.get("peak_host_rss_bytes"), "worker_s": r.get("worker_s"),
        "decode_tokens_per_s_runs": r.get("decode_tokens_per_s_runs"), "tpot_ms_runs": r.get("tpot_ms_runs"),
        "loadavg_at_start": r.get("loadavg_at_start"), "error": r.get("error"),
        "host_syncs_per_token": r.get("host_syncs_per_token"), "resumes_per_token": r.get("resumes_per_token"),
        "device_peak_after_build": r.get("device_peak_after_build"),
        "device_bytes_after_build": r.get("device_bytes_after_build"),
        "skipped": r.get("skipped"), "not_run": r.get("not_run"), "device_budget_bytes": job.device_budget_bytes,
        "prefill": job.prefill,
    }  # fmt: skip


def reference(job, look: Lookup) -> tuple[str | None, dict]:
    """Whose tokens this row must reproduce: offloaded -> resident; resident <-> transformers
    when they run the same weights; accelerate -> transformers."""
    same = job.model.same_weights_as_peers
    name = {"offload": "jaxmoe", "jaxmoe": "hf" if same else None, "hf": "jaxmoe" if same else None,
            "hf-accelerate": "hf"}.get(job.worker)  # fmt: skip
    return name, (look.at(name, job) if name else {})


def make_row(job, r: dict, look: Lookup, problems: list[str]) -> dict:
    row = base_row(job, r)
    ref_name, ref = reference(job, look)
    row["greedy_reference"] = ref_name
    row["greedy_agree"] = row["greedy_compared"] = None
    if "token_ids" in r and "token_ids" in ref:
        row["greedy_agree"] = leading_agreement(r["token_ids"], ref["token_ids"])
        row["greedy_compared"] = min(min(len(x), len(y)) for x, y in zip(r["token_ids"], ref["token_ids"]))
    where = f"{row['model']} b{job.batch} p{job.prompt_tokens} {row['policy']}"
    if job.worker == "hf-accelerate":
        row["expert_budget_bytes"] = None  # no expert cache: whole layers on the GPU, up to max_memory
        p = r.get("placement")
        row["placement"] = p and {k: v for k, v in p.items() if k != "device_map"}
        # Every CPU-placed weight crosses per forward, i.e. per decode step.
        row["h2d_bytes_per_token"] = p["offloaded_bytes_per_forward"] / job.batch if p else None
        row["ttft_ms_at"] = r.get("ttft_ms_at")  # TTFT at other prompt lengths, when asked
    if job.worker == "offload":
        b = job.budget
        row |= {"budget_spec": b.spec, "budget_note": b.note, "budget_experts": b.experts,
                "expert_budget_bytes": b.bytes, "device_budget_bytes": b.device_bytes,
                "predictor": r.get("settings", {}).get("predictor")}  # fmt: skip
        if "token_ids" in r:
            demand = min(job.model.config(job.dtype).num_experts, job.batch * job.model.config(job.dtype).top_k)
            row |= offload_fields(r, look.at("jaxmoe", job), look.gbps(job, demand), demand)
            row |= {"hit_rate": r["hit_rate"], "expert_budget_bytes": r["expert_budget_bytes"]}
            # preloaded: nothing moves (a pool of every expert of the model)
            row["all_experts_fit"] = r["cache_slots"] == num_experts(job.model.config(job.dtype))
            # accelerate moves whole layers whatever the routing: the row of the same shape
            accel = [v for (w, m, d, bb, pp), v in look.by.items() if w == "hf-accelerate" and (m, d, bb, pp) ==
                     (job.model.layout, job.dtype, job.batch, job.prompt_tokens)]  # fmt: skip
            rate = next((a.get("decode_tokens_per_s") for a in accel if a.get("decode_tokens_per_s")), None)
            row["speedup_vs_accelerate"] = stats.ratio(r.get("decode_tokens_per_s"), rate)
            if row["greedy_agree"] is not None and row["greedy_agree"] < row["greedy_compared"]:
                problems.append(f"MISMATCH: {where} budget {b.spec}: offloaded tokens differ from resident after "
                                f"{row['greedy_agree']} of {row['greedy_compared']} (offloading must never change "
                                "tokens)")  # fmt: skip
    if job.worker == "jaxmoe":
        row["speedup_vs_hf"] = stats.ratio(r.get("decode_tokens_per_s"), look.at("hf", job).get("decode_tokens_per_s"))
    limit = row["device_budget_bytes"]
    peak = row["peak_device_bytes"] if row["peak_device_measured"] else None
    if limit and peak is not None and peak > limit:
        problems.append(f"{where}: peak device memory {peak / GIB:.2f} GiB > its {limit / GIB:g} GiB budget")
    if row["error"]:
        problems.append(f"{where}: failed: {row['error']}")
    return row


def code_version(root) -> dict:
    """The commit the run measured, and the library files that differed from it (uncommitted work)."""
    import subprocess

    def git(*a):
        return subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True).stdout.rstrip()

    dirty = [line[3:] for line in git("status", "--porcelain", "--", "jaxmoe", "bench", "scripts").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD") or None, "uncommitted": dirty}


def add_batch_gains(rows: list[dict]) -> None:
    """`throughput_vs_batch1`: decode tok/s over the same configuration's at batch 1 (same model,
    policy, budget spec, prefill mode and prompt), how much batching pays."""
    def config(r):
        return r["model"], r["policy"], r.get("budget_spec"), r["prefill"], r["prompt_tokens"], r["device_budget_bytes"]

    single = {config(r): r["decode_tokens_per_s"] for r in rows if r["batch"] == 1 and r["decode_tokens_per_s"]}
    for r in rows:
        r["throughput_vs_batch1"] = stats.ratio(r["decode_tokens_per_s"], single.get(config(r)))


def make_report(args, jobs: list, results: dict, arithmetic: list[str]) -> dict:
    look, problems = Lookup(results), []
    for job in jobs:
        r = results[job]
        if job.worker == "bandwidth" and ("error" in r or "not_run" in r):
            problems.append(f"{job.model.label}: bandwidth not measured: {r.get('error') or r['not_run']}")
    rows = [make_row(j, results[j], look, problems) for j in jobs if j.worker != "bandwidth"]
    add_batch_gains(rows)
    loads = [r["loadavg_at_start"] for r in rows if r["loadavg_at_start"] is not None]
    left = [f"{r['model']} {r['policy']}" for r in rows if r["not_run"]]
    if left:
        problems.append(f"{len(left)} rows not run yet (--stop-after): {', '.join(left)}; rerun with --resume")
    device = next((r["device"] for r in results.values() if "device" in r), "unknown (no worker ran)")
    versions = {k: v for r in results.values() for k, v in r.get("versions", {}).items()}
    statuses = [2 * any(p.startswith("MISMATCH") for p in problems), any(r["error"] for r in rows),
                3 * any(r["not_run"] for r in rows)]  # fmt: skip
    bandwidth = {f"{m}/{SHORT.get(d, d)}": v for (m, d), v in look.bandwidth.items()}
    return {
        "device": device, "rows": rows, "date": datetime.date.today().isoformat(),
        "command": ("python scripts/bench.py " + " ".join(sys.argv[1:])).strip(), "versions": versions,
        "loadavg_at_start": args.loadavg, "loadavg_workers": [min(loads), max(loads)] if loads else None,
        "cpu_threads": args.cpu_threads or None, "bandwidth": bandwidth, "budget_arithmetic": arithmetic,
        "problems": problems, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "accelerate_new_tokens": args.accelerate_new_tokens, "accelerate_repeats": args.accelerate_repeats,
        "code": code_version(args.script.parents[1]), "wall_s": None, "status": next((s for s in statuses if s), 0),
    }  # fmt: skip


# -- markdown ----------------------------------------------------------------------
def _rate(x) -> str:
    return "-" if x is None else format(x, ".2f" if x < 10 else ".1f" if x < 100 else ".0f")


def _peak(r: dict) -> str:
    est = "" if r["peak_device_measured"] else " (est.)"
    return fmt(r["peak_device_bytes"] and r["peak_device_bytes"] / 1e9, ".3f") + est


def _absent(r: dict) -> str | None:
    for key, word in (("error", "failed"), ("skipped", "skipped"), ("not_run", "not run")):
        if r[key]:
            return f"{word}: {r[key]}"
    return None


def _agree(r: dict) -> str:
    if r["greedy_agree"] is None:
        return "-"
    text = f"{r['greedy_agree']}/{r['greedy_compared']} ({r['greedy_reference']})"
    same = r["greedy_agree"] == r["greedy_compared"]
    return text if r["engine"] != "offload" or same else f"**MISMATCH {text}**"


def _latency(r: dict) -> str:
    return f"{fmt(r['tpot_ms'], '.2f')} ({fmt(r['tpot_p50_ms'], '.2f')} / {fmt(r['tpot_p99_ms'], '.2f')})"


def _peer_cells(r: dict) -> list[str]:
    runs = r["decode_tokens_per_s_runs"] or [None]
    name = r["policy"]
    if r["engine"] == "hf-accelerate" and r.get("placement"):
        p = r["placement"]
        name += (f" ({p['layers_on_device']}/{p['layers']} layers on GPU at max_memory "
                 f"{r['device_budget_bytes'] / GIB:g} GiB; {r['h2d_bytes_per_token'] / 1e9:.2f} GB copied per token)")
    rng = f"[{_rate(min(runs))}-{_rate(max(runs))}]" if None not in runs else ""
    return [
        r["model"], name, str(r["batch"]), str(r["prompt_tokens"]), str(r["new_tokens"]), fmt(r["ttft_ms"], ".1f"),
        f"{_rate(r['decode_tokens_per_s'])} {rng}", _latency(r), _peak(r),
        fmt(r["compile_ms"] and r["compile_ms"] / 1e3, ".1f"), _agree(r),
        fmt(r.get("speedup_vs_hf"), ".2f"), fmt(r["loadavg_at_start"], ".1f"),
    ]  # fmt: skip


def predictor_label(spec: str) -> str:
    """"gate-ahead", or "trained MLP of <checkpoint>" for a predictor directory."""
    from pathlib import Path

    return spec if spec == "gate-ahead" else f"trained MLP of {Path(spec).parent.name}"


def _policy_name(r: dict) -> str:
    if r.get("all_experts_fit"):
        return "any (all experts fit: preloaded, no transfers)"
    name = r["policy"] + (f" ({predictor_label(r['predictor'])})" if r.get("predictor") else "")
    return name + (f", prefill {r['prefill']}" if r["prefill"] else "")


def _offload_cells(r: dict) -> list[str]:
    budget = (f"{r['budget_note']}: {r['budget_experts']} x {r['expert_bytes'] / 1e6:.2f} MB"
              f" = {r['expert_budget_bytes'] / 1e9:.3f} GB")  # fmt: skip
    stall = f"{r['prefill_stall_ms']:.1f}, {fmt(r['decode_stall_ms_per_step'], '.3f')}"
    link = f"{fmt(r['achieved_decode_h2d_GBps'], '.2f')} ({fmt(r['h2d_link_fraction'], '.0%')})"
    bound = f"{fmt(r['bound_ms_per_token'], '.2f')} ({(r['bound_by'] or '-').split(' ')[0]})"
    return [
        r["model"], _policy_name(r), str(r["batch"]), str(r["prompt_tokens"]), budget, str(r["cache_slots"]),
        f"{fmt(r['hit_rate'], '.3f')} ({fmt(r['decode_hit_rate'], '.3f')})", f"{r['h2d_bytes_per_token'] / 1e6:.2f}",
        fmt(r["decode_loads_per_step"], ".2f"),
        f"{fmt(r.get('host_syncs_per_token'), '.2f')} / {fmt(r.get('resumes_per_token'), '.2f')}", stall, link,
        fmt(r["ttft_ms"], ".1f"),
        fmt(r["ttft_over_bound"], ".2f"), _latency(r), _rate(r["decode_tokens_per_s"]), bound,
        fmt(r["tpot_over_bound"], ".2f"), _peak(r), _agree(r), fmt(r["speedup_vs_accelerate"], ".1f"),
        fmt(r["loadavg_at_start"], ".1f"),
    ]  # fmt: skip


def _prefill_cells(r: dict) -> list[str]:
    return [
        r["model"], _policy_name(r), str(r["batch"]), str(r["prompt_tokens"]), r.get("prefill_mode") or "-",
        fmt(r["ttft_ms"], ".1f"), fmt(r["ttft_transfer_floor_ms"], ".1f"), fmt(r["ttft_bound_ms"], ".1f"),
        (r["ttft_bound_by"] or "-").split(" ")[0], fmt(r["ttft_over_bound"], ".2f"),
        f"{r['prefill_h2d_bytes'] / 1e6:.1f}", fmt(r.get("prefill_transfer_ms"), ".1f"),
        fmt(r["prefill_stall_ms"], ".1f"), fmt(r.get("prefill_overlap"), ".2f"),
        str(r.get("prefill_max_streamed_layers", "-")),
    ]  # fmt: skip


PREFILL_HEADER = ["model", "policy", "batch", "prompt", "prefill mode (run)", "TTFT ms", "transfer floor ms",
                  "bound ms", "bound by", "TTFT / bound", "prefill H2D MB", "transfer ms", "stall ms", "overlap",
                  "streamed layers (max)"]  # fmt: skip
PEER_HEADER = ["model", "engine", "batch", "prompt", "new", "TTFT ms", "decode tok/s [range]",
               "TPOT ms (p50 / p99)", "peak device GB", "compile s", "greedy agree (with)", "jaxmoe / HF",
               "load"]  # fmt: skip
OFFLOAD_HEADER = ["model", "policy", "batch", "prompt", "expert budget", "slots", "hit rate (decode)",
                  "H2D MB/token", "decode loads/step", "host reads / resumes per token", "stall ms: prefill, decode/step",
                  "decode H2D GB/s (of measured)", "TTFT ms", "TTFT / bound", "TPOT ms (p50 / p99)", "decode tok/s",
                  "bound ms (by)", "TPOT / bound", "peak device GB", "tokens = resident", "/ accelerate",
                  "load"]  # fmt: skip


def _bandwidth_lines(report: dict) -> list[str]:
    lines = []
    for model, by_demand in report["bandwidth"].items():
        parts = [f"{n} in one call {b['batched_ms']:.3f} ms = {b['batched_GBps']:.2f} GB/s"
                 for n, b in by_demand.items()]  # fmt: skip
        one = next(iter(by_demand.values()))
        lines.append(f"Pinned host -> device `jax.device_put`, {model} experts (measured at the start of the run): "
                     f"one expert ({one['expert_bytes'] / 1e6:.3f} MB) {one['one_expert_ms']:.3f} ms = "
                     f"{one['one_expert_GBps']:.2f} GB/s; " + "; ".join(parts) + " (the bounds use these).")  # fmt: skip
    return lines


def _code(report: dict) -> str:
    code = report.get("code") or {}
    dirty = code.get("uncommitted")
    return f"commit {code.get('commit')}" + (f" plus uncommitted changes to {', '.join(dirty)}" if dirty else "")


def markdown(report: dict) -> str:
    v, rows = report["versions"], report["rows"]
    span = report["loadavg_workers"]
    loads = f", at the workers' starts {span[0]:.2f}-{span[1]:.2f}" if span else ""
    wall = f" Wall time {report['wall_s']:.0f} s." if report.get("wall_s") else ""
    lines = [
        f"Device: {report['device']}. Date: {report['date']}. Command: `{report['command']}`.{wall}",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in sorted(v.items())) + f"; code {_code(report)}.",
        f"Medians of {report['repeats']} timed runs after a warm-up ({report['accelerate_repeats']} of "
        f"{report['accelerate_new_tokens']} new tokens for hf-accelerate); TPOT p50/p99 over every decode step "
        f"of those runs; threads per worker: {report['cpu_threads'] or 'library default'}; "
        f"1-min load average at the start: {report['loadavg_at_start']:.2f}{loads}.",
        *_bandwidth_lines(report),
    ]
    if report["budget_arithmetic"]:
        lines += ["", "Expert budgets `auto`:", *(f"    {line}" for line in report["budget_arithmetic"])]

    def cells(r: dict, full) -> list[str]:
        why = _absent(r) or (None if r["engine"] != "offload" or "cache_slots" in r else "no result")
        name = f"{r['policy']} (budget {r['budget_spec']})" if r["engine"] == "offload" else r["policy"]
        return [r["model"], name, why] if why else full(r)

    peers = [cells(r, _peer_cells) for r in rows if r["engine"] != "offload"]
    offload = [cells(r, _offload_cells) for r in rows if r["engine"] == "offload"]
    lines += ["", *table(PEER_HEADER, peers)] if peers else []
    lines += ["", *table(OFFLOAD_HEADER, offload)] if offload else []
    prefill = [_prefill_cells(r) for r in rows if r["engine"] == "offload" and "cache_slots" in r]
    lines += ["", "Prefill of the offload rows (TTFT bound: max(resident TTFT, prefill H2D bytes / measured "
              "bandwidth)):", "", *table(PREFILL_HEADER, prefill)] if prefill else []
    if report["problems"]:
        lines += ["", *(f"**{p}**" for p in report["problems"])]
    return "\n".join(lines) + "\n"
