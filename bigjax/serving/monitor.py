"""Prometheus metrics of a server, under vLLM's names wherever vLLM has one (so its dashboards
and alerts work unchanged) and `bigjax:` where it has none. One registry per server: nothing
global, two servers in one process do not mix their counts."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# vLLM's buckets (seconds), so percentiles compare across servers
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip


class _Engine(Collector):
    """Gauges read from the engine at scrape time (never stale)."""

    def __init__(self, model: str, counts: Callable[[], dict[str, int]]):
        self.model, self.counts = model, counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        c = self.counts()
        for name, doc, value in (
            ("vllm:num_requests_running", "Sequences in decode slots.", c["running"]),
            ("vllm:num_requests_waiting", "Sequences waiting for a slot.", c["waiting"]),
            ("vllm:kv_cache_usage_perc", "Share of decode slots in use (1 = full).",
             c["running"] / max(c["slots"], 1)),
            ("bigjax:decode_slots_in_use", "Decode slots holding a sequence.", c["running"]),
            ("bigjax:decode_slots", "Decode slots (the engine's batch).", c["slots"]),
        ):  # fmt: skip
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric([self.model], value)
            yield g


class Monitor:
    def __init__(self, model: str, counts: Callable[[], dict[str, int]]):
        self.registry = CollectorRegistry()
        self.model = model
        r, labels = self.registry, ["model_name"]
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prompt tokens prefilled.", labels, registry=r
        ).labels(model)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Tokens generated.", labels, registry=r
        ).labels(model)
        self._success = Counter(
            "vllm:request_success", "Requests finished, by reason.",
            [*labels, "finished_reason"], registry=r,
        )  # fmt: skip
        self.rejected = Counter(
            "bigjax:requests_rejected", "Requests answered 429 (queue full).", labels, registry=r
        ).labels(model)
        self.timed_out = Counter(
            "bigjax:requests_timed_out",
            "Requests not sent whole within --request-timeout (connection closed, or 408).",
            labels, registry=r,
        ).labels(model)  # fmt: skip
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Time to first token.", labels,
            buckets=TTFT_BUCKETS, registry=r,
        ).labels(model)  # fmt: skip
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds", "Time between a sequence's tokens.", labels,
            buckets=ITL_BUCKETS, registry=r,
        ).labels(model)  # fmt: skip
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds", "Request latency, arrival to last token.",
            labels, buckets=E2E_BUCKETS, registry=r,
        ).labels(model)  # fmt: skip
        r.register(_Engine(model, counts))

    def finished(self, reason: str) -> None:
        self._success.labels(self.model, reason).inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)
