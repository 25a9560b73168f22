"""A profile's trace as a few numbers: for each process of a perfetto trace written by
`jax.profiler` (`create_perfetto_trace=True`), how long its events span, how much of that
span some event covers (a device that is busy for 30% of a decode's span waits for its
host), and which events (grouped by the XLA module that launched them, where the trace
names one) take the time. Plain Python over the trace's JSON: runs where the trace is read,
not where it was taken.
"""

from __future__ import annotations

import collections
import gzip
import json
from pathlib import Path


def load_events(path: str | Path) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def covered_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def _ranked(counter: dict, top: int) -> list[list]:
    rows = sorted(counter.items(), key=lambda kv: -kv[1][1])[:top]
    return [[name, count, round(us / 1e3, 4)] for name, (count, us) in rows]


def summarize(path: str | Path, top: int = 20) -> dict:
    """{"processes": [{name, events, span_ms, busy_ms, by_module, top}]}: `by_module` and
    `top` are [name, count, total ms] rows, largest total first; `by_module` groups by the
    event's `hlo_module` argument (events without one are left out of it)."""
    events = load_events(path)
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    spans: dict[int, list] = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            spans[e["pid"]].append(e)
    out = []
    for pid, evs in sorted(spans.items(), key=lambda kv: str(names.get(kv[0], kv[0]))):
        by_name: dict = collections.defaultdict(lambda: [0, 0.0])
        by_module: dict = collections.defaultdict(lambda: [0, 0.0])
        for e in evs:
            by_name[e["name"]][0] += 1
            by_name[e["name"]][1] += float(e["dur"])
            module = (e.get("args") or {}).get("hlo_module")
            if module:
                by_module[module][0] += 1
                by_module[module][1] += float(e["dur"])
        intervals = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in evs]
        out.append({
            "name": str(names.get(pid, pid)),
            "events": len(evs),
            "span_ms": round((max(b for _, b in intervals) - min(a for a, _ in intervals)) / 1e3, 4),
            "busy_ms": round(covered_us(intervals) / 1e3, 4),
            "by_module": _ranked(by_module, top),
            "top": _ranked(by_name, top),
        })  # fmt: skip
    return {"processes": out}
