"""What /metrics exposes (prometheus-client, one registry per server): requests by final
status, TTFT and time-per-token histograms, queue depth, running rows, the expert cache's
hit rate, host-to-device bytes and (approximate decode) skipped experts, and SLO attainment per request class."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("jaxmoe_requests", "Requests by final status", ["status"], registry=r)
        self.ttft = Histogram("jaxmoe_time_to_first_token_seconds", "Arrival to first token", buckets=LATENCY_BUCKETS,
                              registry=r)  # fmt: skip
        self.tpot = Histogram("jaxmoe_time_per_output_token_seconds", "Gap between a request's tokens",
                              buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.tokens = Counter("jaxmoe_generated_tokens", "Tokens generated", registry=r)
        self.queue_depth = Gauge("jaxmoe_queue_depth", "Requests waiting for a row", registry=r)
        self.running = Gauge("jaxmoe_running_batch", "Rows generating now", registry=r)
        self.hit_rate = Gauge("jaxmoe_expert_hit_rate", "Expert cache hits / lookups since start (offloaded)",
                              registry=r)  # fmt: skip
        self.h2d = Gauge("jaxmoe_host_to_device_bytes", "Expert bytes copied host to device since start", registry=r)
        self.skipped = Gauge("jaxmoe_skipped_experts", "Routed (row, expert) pairs the approximate decode "
                             "(--skip-below) did not compute since start", registry=r)  # fmt: skip
        self.slo_requests = Counter("jaxmoe_slo_requests", "Finished requests per SLO class", ["slo_class"], registry=r)
        self.slo_met = Counter("jaxmoe_slo_met", "Finished requests that met TTFT and TPOT objectives",
                               ["slo_class"], registry=r)  # fmt: skip
        self.slo_attainment = Gauge("jaxmoe_slo_attainment", "Fraction of finished requests meeting their SLO",
                                    ["slo_class"], registry=r)  # fmt: skip
        self._slo_counts: dict[str, list[int]] = {}

    def rejected(self, status: int) -> None:
        self.requests.labels(status=str(status)).inc()

    def finished(self, request, reason: str | None) -> None:
        """From the batcher: a request left (reason None: cancelled by its client)."""
        self.requests.labels(status="cancelled" if reason is None else "ok").inc()
        if request.ttft is not None:
            self.ttft.observe(request.ttft)
        for gap in request.token_gaps:
            self.tpot.observe(gap)
        self.tokens.inc(len(request.tokens))
        if reason is None:
            return
        name, met_slo = request.slo.name, request.met_slo()
        met, total = self._slo_counts.setdefault(name, [0, 0])
        met += met_slo
        self._slo_counts[name] = [met, total + 1]
        self.slo_requests.labels(slo_class=name).inc()
        if met_slo:
            self.slo_met.labels(slo_class=name).inc()
        self.slo_attainment.labels(slo_class=name).set(met / (total + 1))

    def batch_state(self, queue_depth: int, running: int, counters: dict) -> None:
        self.queue_depth.set(queue_depth)
        self.running.set(running)
        lookups = counters["expert_hits"] + counters["expert_misses"]
        if lookups:
            self.hit_rate.set(counters["expert_hits"] / lookups)
        self.h2d.set(counters["h2d_bytes"])
        self.skipped.set(counters["skipped_experts"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
