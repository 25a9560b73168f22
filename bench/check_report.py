"""The GPU check's record (bench/gpu_check.py) as markdown: one section per step, the
figures the GPU issue asks for, and the targets they are read against. Pure formatting."""

from __future__ import annotations

from bench import report as bench_report
from bench.common import fmt, table

GIB = 2**30


def _ms(x) -> str:
    return fmt(x, ".2f")


def _environment(r: dict) -> list[str]:
    v = r.get("package_versions", {})
    return [
        f"Backend {r.get('backend')}, devices {r.get('devices')}, kind {r.get('device_kind')}; "
        f"nvidia-smi: {r.get('nvidia_smi') or '-'}.",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        f"Memory kinds {r.get('memory_kinds')} (default {r.get('default_memory_kind')}); memory_stats() keys: "
        f"{r.get('memory_stats_keys')}; bytes_limit {r.get('bytes_limit')}.",
        f"Environment: {r.get('env') or '{}'}.",
    ]


def _pytest(r: dict) -> list[str]:
    counts = ", ".join(f"{k} {r[k]}" for k in ("tests", "failures", "errors", "skipped") if k in r)
    lines = [f"Exit status {r.get('returncode')}; {counts or 'no junit report'}."]
    lines += [f"- FAILED {name}: {msg}" for name, msg in zip(r.get("failed", []), r.get("messages", [""] * 99))]
    if r.get("returncode") not in (0, None):
        lines += ["", "```", r.get("output_tail", "")[-1500:], "```"]
    return lines


def _bandwidth(r: dict) -> list[str]:
    lines = []
    for n, b in (r.get("bandwidth") or {}).items():
        lines.append(f"One expert ({b['expert_bytes'] / 1e6:.2f} MB): {b['one_expert_ms']:.3f} ms = "
                     f"{b['one_expert_GBps']:.2f} GB/s; {n} experts (one layer's decode demand) in one call: "
                     f"{b['batched_ms']:.3f} ms = {b['batched_GBps']:.2f} GB/s; source memory "
                     f"{b['source_memory_kind']}.")  # fmt: skip
    return lines


def _exactness(r: dict) -> list[str]:
    s = r.get("summary", {})
    lines = [f"{s.get('equal')} of {s.get('cases')} cases token-equal ({s.get('planned')} planned).", ""]
    rows = []
    for c in r.get("cases", []):
        same = "yes" if c.get("equal") else f"**NO** ({c.get('agree')}/{c.get('compared')})"
        budget = f"{c['budget']} ({c.get('experts', '?')}/{c.get('of', '?')})"
        rows.append([c["model"], bench_report.SHORT.get(c["dtype"], c["dtype"]), c["policy"], budget, str(c["batch"]),
                     same if not c.get("error") else f"**error**: {c['error']}", fmt(c.get("hit_rate"), ".2f")])  # fmt: skip
    return lines + table(["model", "dtype", "policy", "budget (experts)", "batch", "tokens equal", "hit rate"], rows)


def _targets(rows: list[dict]) -> list[str]:
    """The GPU issue's decode targets, read off the rows (reported, not tuned)."""
    by = {}
    for r in rows:
        by.setdefault(r["policy"], []).append(r)
    accel = next((r for r in by.get("hf-accelerate", []) if r.get("decode_tokens_per_s")), None)
    resident = next((r for r in by.get("resident", []) if r.get("decode_tokens_per_s")), None)
    lines = []
    first = [r for r in rows if r["engine"] == "offload" and r.get("device_budget_bytes") == int(5 * GIB)]
    for r in first:
        if r.get("decode_tokens_per_s") is None:
            continue
        speed = r["decode_tokens_per_s"] / accel["decode_tokens_per_s"] if accel else None
        peak = r["peak_device_bytes"] / GIB if r.get("peak_device_bytes") else None
        lines.append(f"- offloaded {r['policy']} at 5 GiB, {r.get('routing', 'random weights')} routing (decode hit "
                     f"rate {fmt(r.get('decode_hit_rate'), '.2f')}): {r['decode_tokens_per_s']:.1f} tok/s = "
                     f"{fmt(speed, '.1f')}x accelerate (target >= 30x); TPOT / bound {fmt(r.get('tpot_over_bound'), '.2f')}"
                     f" (target <= 1.25); peak {fmt(peak, '.2f')} GiB (target <= 5)")  # fmt: skip
    if accel:
        lines.append(f"- accelerate at 5 GiB: {accel['decode_tokens_per_s']:.2f} tok/s, peak "
                     f"{fmt(accel['peak_device_bytes'] and accel['peak_device_bytes'] / GIB, '.2f')} GiB (target <= 5)")  # fmt: skip
    if resident:
        lines.append(f"- resident: {resident['decode_tokens_per_s']:.0f} tok/s (target >= 500 on an H100)")
    return lines


def _decode(r: dict) -> list[str]:
    if "rows" not in r:
        return []
    return [*_targets(r["rows"]), "", bench_report.markdown(r).rstrip()]


def _quantized(r: dict) -> list[str]:
    if "rows" not in r:
        return []
    base = r.get("resident_bf16_tokens_per_s")
    lines = [f"Resident bf16 decode (the decode step): {fmt(base, '.1f')} tok/s; target: OLMoE-1B-7B int4 within "
             "5 GiB >= 0.5x that, Mixtral-8x7B int4 at 24 GiB >= 25 tok/s.", ""]
    for row in r["rows"]:
        tok = row.get("decode_tokens_per_s")
        if row.get("policy") == "lru" and tok and base:
            lines.append(f"- {row['model']} lru: {tok:.1f} tok/s = {tok / base:.2f}x resident bf16")
    return [*lines, "", bench_report.markdown(r).rstrip()]


def _phases(r: dict) -> list[str]:
    nat, syn = r.get("natural"), r.get("synced")
    if not nat:
        return []
    lines = [f"Offloaded decode, {r['steps']} steps, policy lru at budget {r.get('budget_spec')}: step "
             f"{_ms(nat['step_ms'])} ms as run ({nat['loads_per_step']:.1f} loads, {nat['hits_per_step']:.1f} hits "
             f"per step), {_ms(syn and syn['step_ms'])} ms with a block after every program and copy; host reads "
             f"per token {fmt(nat.get('host_syncs_per_token'), '.2f')}, resumes per token "
             f"{fmt(nat.get('resumes_per_token'), '.2f')}.", ""]  # fmt: skip
    names = sorted(set(nat["phases"]) | set((syn or {}).get("phases", {})))
    rows = []
    for name in names:
        a, b = nat["phases"].get(name, {}), (syn or {}).get("phases", {}).get(name, {})
        rows.append([name, _ms(a.get("ms")), fmt(a.get("calls"), ".1f"), _ms(b.get("ms")), fmt(b.get("calls"), ".1f")])
    host = sum(v["ms"] for v in nat["phases"].values())
    rows.append(["(step wall, not in a phase)", _ms(nat["step_ms"] - host), "", "", ""])
    return lines + table(["phase", "ms/step as run", "calls/step", "ms/step synced", "calls/step"], rows)


def _dispatch_probe(r: dict) -> list[str]:
    rows = []
    for name, v in r.get("variants", {}).items():
        nat, syn = v.get("natural") or {}, v.get("synced") or {}
        dispatch, compute = nat.get("phases", {}).get("dispatch", {}), syn.get("phases", {}).get("compute", {})
        per_call = dispatch.get("ms") / dispatch["calls"] if dispatch.get("calls") else None
        per_run = compute.get("ms") / compute["calls"] if compute.get("calls") else None
        rows.append([f"{name} ({r['xla_flags'][name] or 'no flag'})", _ms(nat.get("step_ms")), _ms(per_call),
                     _ms(nat.get("phases", {}).get("host_read", {}).get("ms")), _ms(per_run),
                     _ms(v.get("resident_step_ms")), v.get("error", "")])  # fmt: skip
    head = ["XLA command buffers", "offloaded step ms as run", "dispatch ms per call", "host reads ms per step",
            "device ms per run (synced)", "resident step ms", "error"]  # fmt: skip
    cost = (r.get("call_cost") or {}).get("rows", [])
    lines = ["A compiled program that adds one to its first argument: "
             + "; ".join(f"{x['arguments']} arguments ({x.get('donated', x['arguments'] // 2)} donated): call "
                         f"{_ms(x['call_ms'])} ms, with completion {_ms(x['call_and_done_ms'])} ms"
                         for x in cost) + ".", ""] if cost else []  # fmt: skip
    return lines + table(head, rows)


def _prefill(r: dict, record: dict) -> list[str]:
    rows = r.get("rows", [])
    bw = next(iter(((_step(record, "bandwidth") or {}).get("bandwidth") or {}).values()), None)
    gbps = bw and bw["batched_GBps"]
    resident = {x["prompt_tokens"]: x.get("ttft_ms") for x in rows if x["engine"] == "resident"}
    out, serial = [], {}
    for x in rows:
        if x["engine"] == "offload" and x.get("mode") == "stream-serial":
            serial[x["prompt_tokens"]] = x.get("ttft_ms")
    cells = []
    for x in rows:
        n = x["prompt_tokens"]
        floor = transfer = None
        if x["engine"] == "offload" and x.get("prefill_h2d_bytes") is not None and gbps:
            transfer = x["prefill_h2d_bytes"] / (gbps * 1e9) * 1e3
            floor = max(resident.get(n) or 0, transfer)
        name = "resident" if x["engine"] == "resident" else x["mode"]
        speed = serial.get(n) / x["ttft_ms"] if x.get("mode") == "stream" and serial.get(n) and x.get("ttft_ms") else None
        cells.append([str(n), name, x.get("error") or fmt(x.get("ttft_ms"), ".1f"), fmt(transfer, ".1f"),
                      fmt(floor, ".1f"), fmt(floor and x.get("ttft_ms") and x["ttft_ms"] / floor, ".2f"),
                      fmt(x.get("prefill_overlap"), ".2f"), fmt(x.get("prefill_stall_ms"), ".1f"),
                      fmt(speed, ".2f"), str(x.get("tokens_equal_resident", "-"))])  # fmt: skip
    decode = (_step(record, "decode") or {}).get("rows", [])
    for a in (row for row in decode if row["engine"] == "hf-accelerate"):
        for n, ttft in (a.get("ttft_ms_at") or {}).items():
            cells.append([n, "hf-accelerate (5 GiB)", fmt(ttft, ".1f"), "-", "-", "-", "-", "-", "-", "-"])
    out.append(f"Expert budget {r.get('budget_bytes', 0) / 1e9:.2f} GB; floor = max(resident TTFT, prefill H2D "
               f"bytes / {fmt(gbps, '.1f')} GB/s); targets: stream TTFT / floor <= 1.15 at the longest prompt, "
               "stream >= 1.5x faster than stream-serial.")  # fmt: skip
    header = ["prompt", "mode", "TTFT ms", "transfer ms", "floor ms", "TTFT / floor", "overlap", "stall ms",
              "vs serial", "tokens = resident"]  # fmt: skip
    return out + [""] + table(header, cells)


def _probe(r: dict) -> list[str]:
    a = r.get("answer") or {}
    lines = [f"Answer: selective {a.get('selective')}, asynchronous {a.get('asynchronous')} "
             f"(fetch {_ms(a.get('fetch_ms'))} ms for {r.get('picks')} slices of {r.get('slice_bytes', 0) / 1e6:.1f} MB; "
             f"one whole-stack copy {_ms(a.get('whole_stack_copy_ms'))} ms; {r.get('picks')} slices by device_put "
             f"{_ms(a.get('k_slices_copy_ms'))} ms; hidden behind independent work {_ms(a.get('hidden_ms'))} ms).",
             f"Resident {_ms(r.get('resident_ms'))} ms, resident + heavy {_ms(r.get('resident_heavy_ms'))} ms.", ""]  # fmt: skip
    rows = [[tag, v.get("error") or _ms(v.get("ms")), str(v.get("copy_starts", "-")),
             " ".join(v.get("moved_shapes", [])) or "-", fmt(v.get("max_abs_diff"), ".3g")]
            for tag, v in (r.get("variants") or {}).items()]  # fmt: skip
    return lines + table(["variant", "ms", "copy-starts", "shapes moved from host", "max |diff|"], rows)


def _diagnosis(r: dict) -> list[str]:
    lines = [f"First token (of {r.get('new_tokens')}) where each run leaves the resident engine's tokens: "
             + ", ".join(f"{k} {v}" for k, v in (r.get("agree_with_resident") or {}).items()) + ".", ""]  # fmt: skip
    rows = [[name, str(p["bitwise_equal"]), fmt(p["max_abs_diff"], ".3g")] for name, p in (r.get("parts") or {}).items()]
    return lines + table(["expert computation vs the resident one", "bitwise equal", "max |diff|"], rows)


def _decode_profile(r: dict) -> list[str]:
    """Per trace and process: span and busy time per token, then the largest modules or events."""
    lines = []
    for name, t in (r.get("traces") or {}).items():
        n = t.get("tokens") or 1
        lines += [f"**{name}**: {n} decode tokens under the profiler, {_ms(t.get('tpot_ms_under_profiler'))} ms per "
                  f"token; host reads per token {fmt(t.get('host_syncs_per_token'), '.2f')}, resumes per token "
                  f"{fmt(t.get('resumes_per_token'), '.2f')}; trace `profile/{t.get('file')}`.", ""]  # fmt: skip
        rows = []
        for p in t.get("processes", []):
            biggest = p["by_module"] or p["top"]
            rows.append([p["name"], str(p["events"] // n), _ms(p["span_ms"] / n), _ms(p["busy_ms"] / n),
                         "; ".join(f"{row[0]} {_ms(row[2] / n)} ms ({row[1] // n})" for row in biggest[:5])])  # fmt: skip
        lines += table(["process", "events per token", "span ms per token", "busy ms per token",
                         "largest (ms per token, events per token)"], rows) + [""]  # fmt: skip
    return lines


SECTIONS = {"environment": _environment, "pytest": _pytest, "bandwidth": _bandwidth, "exactness": _exactness,
            "decode": _decode, "phases": _phases, "injit_probe": _probe, "dispatch_probe": _dispatch_probe,
            "exact_diagnosis": _diagnosis, "quantized": _quantized, "decode_profile": _decode_profile}  # fmt: skip


def _step(record: dict, name: str) -> dict | None:
    return next((s.get("result") for s in record["steps"] if s["name"] == name), None)


def markdown(record: dict) -> str:
    code = record.get("code") or {}
    lines = [
        f"# GPU check{' (dry run, CPU)' if record['dry_run'] else ''}", "",
        f"Device: {record.get('device') or '-'}. Date: {record['date']}. Command: `{record['command']}`. "
        f"Code: commit {code.get('commit')}" + (f" plus uncommitted {', '.join(code['uncommitted'])}"
                                                 if code.get("uncommitted") else "") + ".",
        f"Started {record['started']}, last written {record.get('finished')}; deadline {record['deadline_s']:g} s.", "",
        *table(["step", "status", "seconds", "cap s", "error"],
                [[s["name"], s["status"], fmt(s.get("seconds"), ".1f"), fmt(s.get("cap_s"), ".0f"),
                  (s.get("error") or "")[:160].replace("|", "/").replace("\n", " ")] for s in record["steps"]]),
    ]  # fmt: skip
    for s in record["steps"]:
        r = s.get("result")
        if not r:
            continue
        body = _prefill(r, record) if s["name"] == "prefill" else SECTIONS.get(s["name"], lambda r: [])(r)
        lines += ["", f"## {s['title']} ({s['status']})", "", *body]
    return "\n".join(lines) + "\n"
