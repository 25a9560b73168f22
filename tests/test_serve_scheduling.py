"""The server's admission orders (serve/scheduling.py), on requests with known costs."""

import pytest

from jaxmoe.serve.request import SLO, Request
from jaxmoe.serve.rows.sampling import RequestSampling
from jaxmoe.serve.scheduling import Costs, check_rule, order
from jaxmoe.serve.text import TextTracker

CHUNK = 16


def request(name: str, chunks: int, ttft_s: float, arrival: float = 0.0) -> Request:
    return Request([0] * (chunks * CHUNK), 1, RequestSampling(), SLO(ttft_s, 1.0, name), TextTracker(None),
                   lambda event: None, arrival=arrival)  # fmt: skip


def names(queue: list[Request]) -> list[str]:
    return [r.slo.name for r in queue]


def on_time(queue: list[Request], costs: Costs) -> set[str]:
    """Prefilled one after another from time 0, each chunk a turn: those whose first token
    comes by their deadline."""
    at, out = 0.0, set()
    for r in queue:
        at += costs.prefill_s(r)
        if at <= r.deadline:
            out.add(r.slo.name)
    return out


def test_task_order_puts_a_request_that_cannot_make_it_after_those_that_can():
    # A turn takes 1 s. "late" (8 chunks) is due at 6 s: it cannot make it, and first by
    # deadline it would make the two short ones behind it late too.
    costs = Costs(CHUNK, turn_s=1.0)
    queue = [request("late", 8, 6.0), request("b", 1, 7.0), request("c", 1, 8.0)]
    edf, task = order("edf", queue, 0.0, costs), order("task", queue, 0.0, costs)
    assert names(edf) == ["late", "b", "c"] and on_time(edf, costs) == set()
    assert names(task) == ["b", "c", "late"] and on_time(task, costs) == {"b", "c"}


def test_task_order_is_the_deadline_order_while_every_request_can_make_it():
    costs = Costs(CHUNK, turn_s=0.1)
    queue = [request("a", 2, 5.0), request("b", 1, 1.0), request("c", 4, 3.0)]
    assert names(order("task", queue, 0.0, costs)) == names(order("edf", queue, 0.0, costs)) == ["b", "c", "a"]
    assert names(order("fcfs", queue, 0.0, costs)) == ["a", "b", "c"]


def test_late_requests_follow_oldest_first_so_none_is_starved():
    costs = Costs(CHUNK, turn_s=1.0)
    queue = [request("x", 4, 0.5, arrival=2.0), request("y", 4, 0.5, arrival=1.0), request("z", 1, 4.0, arrival=3.0)]
    assert names(order("task", queue, 3.0, costs)) == ["z", "y", "x"]


def test_a_begun_prefill_is_judged_by_the_chunks_it_has_left():
    costs = Costs(CHUNK, turn_s=1.0)
    doc, chat = request("doc", 8, 3.0), request("chat", 1, 5.0)
    assert names(order("task", [doc, chat], 0.0, costs)) == ["chat", "doc"]  # 8 chunks: too late
    assert names(order("task", [doc, chat], 0.0, costs, {doc.number: 2})) == ["doc", "chat"]


def test_the_turn_time_is_learned():
    costs = Costs(CHUNK)
    assert costs.prefill_s(request("a", 4, 1.0)) == 0.0  # nothing measured: every request can make it
    costs.turn_ran(0.5)
    assert costs.turn_s == 0.5
    costs.turn_ran(1.5)
    assert costs.turn_s == pytest.approx(0.8 * 0.5 + 0.2 * 1.5)
    assert costs.prefill_s(request("a", 4, 1.0)) == pytest.approx(4 * 0.7)
    # a prompt is split as its bucket is: 20 tokens pad to 32, two chunks of 16
    short = Request([0] * 20, 1, RequestSampling(), SLO(1.0, 1.0), TextTracker(None), lambda event: None)
    assert costs.prefill_s(short) == pytest.approx(2 * 0.7)


def test_an_unknown_rule_is_refused_by_name():
    with pytest.raises(ValueError, match="schedule 'sjf': expected one of edf, fcfs, task"):
        check_rule("sjf")


def test_the_mixed_workload_is_the_same_for_every_rule_and_counts_misses_per_class():
    import importlib.util
    from pathlib import Path

    pytest.importorskip("httpx", reason="scripts/bench_serve.py needs the serve extra")
    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_serve.py"
    spec = importlib.util.spec_from_file_location("bench_serve", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    args = bench.parse_args(["--schedules", "edf,task", "--mixed-requests", "40", "--mixed-doc-tokens", "50"])
    text = list(range(100))
    first, again = bench.mixed_requests(args, text), bench.mixed_requests(args, text)
    assert first == again and len(first) == 40
    by_class = {slo["class"]: (prompt, max_tokens, slo) for _, prompt, max_tokens, slo in first}
    assert set(by_class) == {"chat", "generate", "doc"}
    assert by_class["doc"][0] == text[:50] and by_class["generate"][1] == 96
    assert by_class["chat"][2] == {"ttft_ms": 1500.0, "tpot_ms": 400.0, "class": "chat"}

    def result(name, ttft_s, gap_s):  # a streamed request of 3 tokens, as one_request returns it
        slo = by_class[name][2]
        return {"error": None, "start": 0.0, "times": [ttft_s, ttft_s + gap_s, ttft_s + 2 * gap_s], "ids": [1, 2, 3],
                "slo": slo, "max_tokens": 3, "prompt": [0]}  # fmt: skip

    out = bench.per_class([result("chat", 1.0, 0.1), result("chat", 2.0, 0.1), result("doc", 4.0, 0.5),
                           result("generate", 1.0, 0.1)], wall_s=10.0)  # fmt: skip
    # chat: one late first token; doc: on time but 500 ms a token (TPOT 400 ms)
    assert {c: v["slo_misses"] for c, v in out["classes"].items()} == {"chat": 1, "doc": 1, "generate": 0}
    assert out["slo_misses"] == 2 and out["slo_miss_rate"] == 0.5
