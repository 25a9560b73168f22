"""Benchmark the server: continuous against static batching under closed-loop and Poisson
load, and a long prompt arriving while requests decode.

  python scripts/bench_serve.py --expert-budget-frac 0.5 --max-batch 16
  python scripts/bench_serve.py --url http://127.0.0.1:8000   # drive a running server (one mode)

For each mode (continuous, static: scripts/serve.py --static-batching) a server is started
on a free localhost port (the same flags otherwise), warmed up, then driven with:
  - closed loop at each --concurrency C: C clients, each sending its next request when the
    last one finished (C = 1 is one request at a time, the baseline the speed-up is against);
  - Poisson arrivals at each --rates R (requests/s), if given;
  - --long-prompt: 8 requests decoding when a --long-tokens prompt arrives; the 8 rows'
    token gaps around its arrival (their time per token, p50 and p99);
  - --schedules edf,fcfs,task: for each admission rule (serve.py --schedule) a continuous server
    driven by a mixed workload (MIXED: short chat, long generation, long prompt, each with its
    own TTFT and TPOT objectives), Poisson arrivals at --mixed-rate, the same requests for every
    rule; SLO attainment per class.
Every request streams (TTFT: to the first token; TPOT: mean gap after it) with temperature 0;
with --check the greedy tokens of every request are compared with the offline engine's for
that prompt alone. Prints one JSON object (also --out FILE) and plots throughput and TTFT
against load (--plot FILE).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "Once upon a time", "The little dog ran to the", "She said hello and", "And the king said unto",
    "In the beginning", "The children went down to the river", "He took the bread and", "Then the people",
    "A man had two sons", "The city was built", "And it came to pass", "The old woman looked at",
    "When the morning came", "They walked for many days", "The wind blew over the", "My father told me",
]  # fmt: skip


LONG_DECODE = 192  # tokens each of the 8 rows decodes in the long-prompt scenario (outlasting its prefill)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="drive this running server instead of starting one per mode")
    p.add_argument("--model", type=Path, default=ROOT / "checkpoints" / "jaxmoe-tiny")
    p.add_argument("--expert-budget-frac", type=float, help="offload experts at this fraction of their bytes")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--batched-decode", action="store_true", help="serve.py --batched-decode (resident)")
    p.add_argument("--prefill-chunk", type=int, default=64)
    p.add_argument("--modes", default="continuous,static")
    p.add_argument("--concurrency", default="1,4,16", help="closed-loop client counts")
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--rates", default="", help="Poisson arrival rates (requests/s), e.g. 2,8")
    p.add_argument("--poisson-requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--long-prompt", action="store_true", help="run the long-prompt interference scenario")
    p.add_argument("--long-tokens", type=int, default=1000)
    p.add_argument("--schedules", default="", help="admission rules to compare on the mixed workload, e.g. edf,fcfs,task")
    p.add_argument("--mixed-rate", type=float, default=6.0, help="the mixed workload's arrivals (requests/s)")
    p.add_argument("--mixed-requests", type=int, default=64)
    p.add_argument("--mixed-doc-tokens", type=int, default=512, help="prompt tokens of the mixed workload's 'doc' class")
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=200.0)
    p.add_argument("--check", action="store_true", help="compare every greedy output with the offline engine's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="also write the JSON here")
    p.add_argument("--plot", type=Path, help="throughput and TTFT against load, as a PNG")
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The mixed workload's classes: (name, share of the requests, prompt, max_tokens, TTFT ms, TPOT ms).
# "doc" prompts are the first --mixed-doc-tokens tokens of the long-prompt text.
MIXED = (("chat", 0.5, "short", 16, 1500.0, 400.0), ("generate", 0.3, "short", 96, 4000.0, 400.0),
         ("doc", 0.2, "long", 8, 5000.0, 400.0))  # fmt: skip


def start_server(args, static: bool, schedule: str = "edf") -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, str(ROOT / "scripts" / "serve.py"), "--model", str(args.model), "--port", str(port),
           "--max-batch", str(args.max_batch), "--max-queue", "1024", "--prefill-chunk", str(args.prefill_chunk),
           "--slo-ttft-ms", str(args.slo_ttft_ms), "--slo-tpot-ms", str(args.slo_tpot_ms), "--schedule", schedule]  # fmt: skip
    if args.expert_budget_frac:
        cmd += ["--expert-budget-frac", str(args.expert_budget_frac)]
    if static:
        cmd.append("--static-batching")
    if args.batched_decode:
        cmd.append("--batched-decode")
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 300
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not come up")


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt, max_tokens: int,
                      times: list | None = None, slo: dict | None = None) -> dict:  # fmt: skip
    """A streamed greedy request: its tokens, arrival, first-token and per-token times
    (`times` fills while it runs); `slo`: its objectives and class ({"ttft_ms", "tpot_ms", "class"})."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    if slo:
        body["slo"] = slo
    start, ids, error = time.perf_counter(), [], None
    times = [] if times is None else times
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                error = f"{r.status_code}: {(await r.aread()).decode()[:200]}"
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    new = json.loads(line[6:])["choices"][0].get("token_ids") or []
                    times.extend([time.perf_counter()] * len(new))
                    ids += new
    except httpx.HTTPError as e:
        error = f"{type(e).__name__}: {e}"
    return {"prompt": prompt, "max_tokens": max_tokens, "start": start, "times": times, "ids": ids, "error": error,
            "slo": slo}  # fmt: skip


def ms_percentile(seconds: list[float], q: float) -> float | None:
    return float(1e3 * np.percentile(seconds, q)) if seconds else None


def summarize(results: list[dict], wall_s: float, slo_ttft_s: float, slo_tpot_s: float) -> dict:
    ok = [r for r in results if not r["error"] and r["times"]]
    ttft = [r["times"][0] - r["start"] for r in ok]
    per_request = [(r["times"][-1] - r["times"][0]) / (len(r["times"]) - 1) if len(r["times"]) > 1 else None
                   for r in ok]  # fmt: skip
    met = sum(t <= slo_ttft_s and (p is None or p <= slo_tpot_s) for t, p in zip(ttft, per_request))
    tpot = [p for p in per_request if p is not None]
    tokens = sum(len(r["ids"]) for r in ok)
    pct = ms_percentile
    return {
        "requests": len(results), "errors": len(results) - len(ok), "tokens": tokens, "wall_s": wall_s,
        "tokens_per_s": tokens / wall_s, "requests_per_s": len(ok) / wall_s,
        "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99), "tpot_ms_p50": pct(tpot, 50),
        "tpot_ms_p99": pct(tpot, 99), "slo_attainment": met / len(results) if results else None,
        "error_samples": [r["error"] for r in results if r["error"]][:3],
    }  # fmt: skip


async def closed_loop(url, model, clients: int, per_client: int, max_tokens: int, seed: int) -> tuple[list, float]:
    rng = random.Random(seed)
    order = [[rng.choice(PROMPTS) for _ in range(per_client)] for _ in range(clients)]
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as client:

        async def worker(prompts):
            return [await one_request(client, url, model, p, max_tokens) for p in prompts]

        start = time.perf_counter()
        done = await asyncio.gather(*(worker(p) for p in order))
    return [r for rs in done for r in rs], time.perf_counter() - start


async def poisson(url, model, rate: float, count: int, max_tokens: int, seed: int) -> tuple[list, float]:
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=count + 4)) as client:
        start, tasks = time.perf_counter(), []
        for _ in range(count):
            tasks.append(asyncio.create_task(one_request(client, url, model, rng.choice(PROMPTS), max_tokens)))
            await asyncio.sleep(rng.expovariate(rate))
        done = await asyncio.gather(*tasks)
    return list(done), time.perf_counter() - start


def mixed_requests(args, text_ids: list[int]) -> list[tuple[float, object, int, dict]]:
    """The mixed workload, the same for every rule: (delay before it, prompt, max_tokens, slo)."""
    rng = random.Random(args.seed)
    classes, shares = MIXED, [c[1] for c in MIXED]
    out = []
    for _ in range(args.mixed_requests):
        name, _, kind, max_tokens, ttft, tpot = rng.choices(classes, shares)[0]
        prompt = rng.choice(PROMPTS) if kind == "short" else text_ids[: args.mixed_doc_tokens]
        out.append((rng.expovariate(args.mixed_rate), prompt, max_tokens, {"ttft_ms": ttft, "tpot_ms": tpot, "class": name}))
    return out


async def mixed(url, model, requests: list) -> tuple[list, float]:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=len(requests) + 4)) as client:
        start, tasks = time.perf_counter(), []
        for delay, prompt, max_tokens, slo in requests:
            tasks.append(asyncio.create_task(one_request(client, url, model, prompt, max_tokens, slo=slo)))
            await asyncio.sleep(delay)
        done = await asyncio.gather(*tasks)
    return list(done), time.perf_counter() - start


def warm_up(args, url: str, model: str, requests: list) -> None:
    """Every program the measured run needs, compiled before it (unmeasured): each class's
    prompt and length alone, then every row bucket; a compile inside the run would stall it."""
    from jaxmoe.serve.batch_kv import row_buckets

    firsts = {slo["class"]: (0.0, prompt, max_tokens, slo) for _, prompt, max_tokens, slo in requests}
    for one in firsts.values():
        asyncio.run(mixed(url, model, [one]))
    for c in row_buckets(args.max_batch):
        asyncio.run(closed_loop(url, model, c, 1, args.max_tokens, args.seed))
    asyncio.run(mixed(url, model, [(0.0, *r[1:]) for r in requests[: args.max_batch]]))


def per_class(results: list[dict], wall_s: float) -> dict:
    """SLO attainment (and the misses) per class, with each class's own objectives."""
    out = {}
    for name in sorted({r["slo"]["class"] for r in results}):
        mine = [r for r in results if r["slo"]["class"] == name]
        slo = mine[0]["slo"]
        out[name] = summarize(mine, wall_s, slo["ttft_ms"] / 1e3, slo["tpot_ms"] / 1e3)
        out[name]["slo_misses"] = round(len(mine) * (1 - (out[name]["slo_attainment"] or 0)))
    misses = sum(c["slo_misses"] for c in out.values())
    return {"classes": out, "slo_misses": misses, "slo_miss_rate": misses / len(results)}


async def long_prompt(url, model, long_ids: list[int], decode_tokens: int) -> dict:
    """8 rows decoding; a long prompt arrives once each has a few tokens. Reports the 8 rows'
    token gaps over their whole run (p50, p99) and the largest while the long prompt was prefilled."""
    async with httpx.AsyncClient(timeout=600) as client:
        progress = [[] for _ in range(8)]
        decoders = [asyncio.create_task(one_request(client, url, model, PROMPTS[i], decode_tokens, progress[i]))
                    for i in range(8)]  # fmt: skip
        while min(len(t) for t in progress) < 4:
            await asyncio.sleep(0.005)
        arrive = time.perf_counter()
        long = await one_request(client, url, model, long_ids, 1)
        rows = await asyncio.gather(*decoders)
    first = long["times"][0] if long["times"] else arrive
    during, outside = [], []
    for r in rows:
        for t0, t1 in zip(r["times"], r["times"][1:]):
            (during if arrive <= t1 <= first + 1e-3 else outside).append(t1 - t0)
    gaps, pct = during + outside, ms_percentile
    return {
        "long_prompt_tokens": len(long_ids), "long_ttft_ms": 1e3 * (first - arrive) if long["times"] else None,
        "errors": sum(bool(r["error"]) for r in rows + [long]), "decode_rows": len(rows),
        "tpot_ms_p50": pct(gaps, 50), "tpot_ms_p99": pct(gaps, 99), "p99_over_p50": pct(gaps, 99) / pct(gaps, 50),
        # The median can itself be raised when the prefill covers most of the rows' run: against
        # the gaps without a prefill chunk in them too.
        "tpot_ms_p50_without_prefill": pct(outside, 50), "gaps_without_prefill": len(outside),
        "p99_over_p50_without_prefill": pct(gaps, 99) / pct(outside, 50) if outside else None,
        "gap_ms_p50_during_prefill": pct(during, 50), "gap_ms_max_during_prefill": pct(during, 100),
        "gaps_during_prefill": len(during),
        "rows": [{"ids": r["ids"], "prompt": r["prompt"]} for r in rows] + [{"ids": long["ids"], "prompt": long_ids}],
    }  # fmt: skip


def check_greedy(args, requests: list[dict]) -> dict:
    """Every request's tokens against the offline resident engine's for that prompt alone."""
    from jaxmoe.checkpoint import load
    from jaxmoe.engine import ResidentEngine
    from jaxmoe.tokenizer import eos_ids, load_tokenizer

    loaded = load(args.model)
    engine = ResidentEngine(loaded.config, loaded.model, loaded.experts, prefill_chunk=args.prefill_chunk,
                            own_model=True)  # fmt: skip
    tokenizer = load_tokenizer(loaded.tokenizer_path)
    eos, want, mismatches = eos_ids(loaded.generation_config), {}, []
    for r in requests:
        key = (json.dumps(r["prompt"]), r["max_tokens"])
        if key not in want:
            ids = r["prompt"] if isinstance(r["prompt"], list) else tokenizer.encode(r["prompt"]).ids
            want[key] = engine.generate([ids], r["max_tokens"], eos_ids=eos).token_ids[0]
        if r["ids"] != want[key]:
            mismatches.append({"prompt": r["prompt"] if isinstance(r["prompt"], str) else f"{len(r['prompt'])} ids",
                               "got": r["ids"], "want": want[key]})  # fmt: skip
    return {"checked": len(requests), "distinct": len(want), "mismatches": len(mismatches), "examples": mismatches[:3]}


def run_mode(args, url: str, long_ids: list[int]) -> tuple[dict, list[dict]]:
    from jaxmoe.serve.batch_kv import row_buckets

    model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    every: list[dict] = []
    # Warm-up: every row bucket's programs compile on first use; not measured.
    for c in row_buckets(args.max_batch):
        asyncio.run(closed_loop(url, model, c, 1, args.max_tokens, args.seed))
    out = {"closed_loop": {}, "poisson": {}}
    for c in [int(x) for x in args.concurrency.split(",") if x]:
        results, wall = asyncio.run(closed_loop(url, model, c, args.requests_per_client, args.max_tokens, args.seed))
        out["closed_loop"][str(c)] = summarize(results, wall, args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3)
        every += results
        print(f"  closed loop {c}: {out['closed_loop'][str(c)]}", file=sys.stderr)
    for rate in [float(x) for x in args.rates.split(",") if x]:
        results, wall = asyncio.run(poisson(url, model, rate, args.poisson_requests, args.max_tokens, args.seed))
        out["poisson"][str(rate)] = summarize(results, wall, args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3)
        every += results
        print(f"  poisson {rate}/s: {out['poisson'][str(rate)]}", file=sys.stderr)
    if long_ids:
        asyncio.run(long_prompt(url, model, long_ids, LONG_DECODE))  # warm-up: the programs of these shapes
        scenario = asyncio.run(long_prompt(url, model, long_ids, LONG_DECODE))
        every += [{"prompt": r["prompt"], "max_tokens": LONG_DECODE if i < 8 else 1, "ids": r["ids"]}
                  for i, r in enumerate(scenario.pop("rows"))]  # fmt: skip
        out["long_prompt"] = scenario
        print(f"  long prompt: {scenario}", file=sys.stderr)
    return out, every


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, res in report["modes"].items():
        loads = sorted(res["closed_loop"], key=int)
        a.plot([int(c) for c in loads], [res["closed_loop"][c]["tokens_per_s"] for c in loads], "o-", label=mode)
        b.plot([int(c) for c in loads], [res["closed_loop"][c]["ttft_ms_p50"] for c in loads], "o-", label=f"{mode} p50")
        b.plot([int(c) for c in loads], [res["closed_loop"][c]["ttft_ms_p99"] for c in loads], "x--", label=f"{mode} p99")
    a.set(xlabel="concurrent clients (closed loop)", ylabel="generated tokens/s", xscale="log", title="throughput")
    b.set(xlabel="concurrent clients (closed loop)", ylabel="TTFT (ms)", xscale="log", yscale="log", title="TTFT")
    for ax in (a, b):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"jaxmoe serve, {report['config']['engine']}, {report['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    args = parse_args(argv)
    long_ids: list[int] = []
    text_ids: list[int] = []
    if args.long_prompt or args.schedules:
        from jaxmoe.tokenizer import load_tokenizer

        text = " ".join(PROMPTS) + ". "
        text_ids = load_tokenizer(args.model / "tokenizer.json").encode(text * 200).ids
        long_ids = text_ids[: args.long_tokens] if args.long_prompt else []
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "command": " ".join(sys.argv),
        "config": {"engine": f"offloaded at {args.expert_budget_frac} of the expert bytes" if args.expert_budget_frac
                   else "resident", **{k: str(v) for k, v in vars(args).items()}},  # fmt: skip
        "modes": {},
    }
    everything = []
    for mode in [m for m in args.modes.split(",") if m] if not args.url else ["given"]:
        print(f"{mode} batching", file=sys.stderr)
        proc, url = (None, args.url) if args.url else start_server(args, static=mode == "static")
        try:
            report["modes"][mode], requests = run_mode(args, url, long_ids)
            report["modes"][mode]["metrics"] = {
                line.split()[0]: float(line.split()[1]) for line in httpx.get(url + "/metrics").text.splitlines()
                if line.startswith("jaxmoe_") and "_bucket" not in line and "_created" not in line
            }  # fmt: skip
            everything += requests
        finally:
            if proc:
                proc.terminate()
                proc.wait(60)
    schedules = [x for x in args.schedules.split(",") if x]
    if schedules:
        report["mixed"] = {"classes": [dict(zip(("name", "share", "prompt", "max_tokens", "ttft_ms", "tpot_ms"), c))
                                       for c in MIXED], "rate": args.mixed_rate, "rules": {}}  # fmt: skip
        requests = mixed_requests(args, text_ids)
    for rule in schedules:
        print(f"mixed workload, schedule {rule}", file=sys.stderr)
        proc, url = start_server(args, static=False, schedule=rule)
        try:
            model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
            warm_up(args, url, model, requests)
            results, wall = asyncio.run(mixed(url, model, requests))
            report["mixed"]["rules"][rule] = per_class(results, wall)
            print(f"  {rule}: {report['mixed']['rules'][rule]['slo_misses']} SLO misses", file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait(60)
    for mode, res in report["modes"].items():
        one = res["closed_loop"].get("1", {}).get("tokens_per_s")
        res["speedup_over_one_at_a_time"] = {c: r["tokens_per_s"] / one for c, r in res["closed_loop"].items()} if one else None
    if args.check:
        report["greedy_check"] = check_greedy(args, everything)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.plot:
        plot(report, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
