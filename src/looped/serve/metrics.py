"""Server metrics for GET /metrics: counters, gauges and histograms kept by `prometheus_client`, one registry
per app so that two apps in one process (tests, benchmarks) count apart."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# The classic text format (0.0.4), which every Prometheus version reads; `generate_latest` writes it.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """The server's metrics in a registry of their own; `render()` writes them for GET /metrics.

    The metric objects are thread-safe: the engine thread calls `step`, the web handlers the rest.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "looped_requests_total",
            "Requests answered, by endpoint and HTTP status.",
            ["endpoint", "status"],
            registry=r,
        )
        self.tokens = Counter("looped_generated_tokens_total", "Tokens generated.", registry=r)
        self.prompt_tokens = Counter("looped_prompt_tokens_total", "Prompt tokens read.", registry=r)
        self.loops = Counter(
            "looped_loops_total", "Core-block loops run over all generated tokens.", registry=r
        )
        self.flops = Counter("looped_flops_total", "Forward FLOPs spent on generated tokens.", registry=r)
        self.queued = Gauge("looped_queued_requests", "Requests waiting for a batch slot.", registry=r)
        self.running = Gauge("looped_running_requests", "Requests in the running batch.", registry=r)
        self.latency = Histogram(
            "looped_request_seconds",
            "Time from arrival to the last token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "looped_time_to_first_token_seconds",
            "Time from arrival to the first token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch = Histogram(
            "looped_batch_size",
            "Requests decoded together per engine step.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )

    def request(self, endpoint: str, status: int) -> None:
        """Count a request answered on `endpoint` with HTTP `status`."""
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def finished(
        self, prompt_tokens: int, loops: list[int], flops: float, seconds: float, ttft: float | None
    ) -> None:
        """Count one finished generation: its prompt, the loops of each token, its FLOPs and times."""
        self.prompt_tokens.inc(prompt_tokens)
        self.tokens.inc(len(loops))
        self.loops.inc(sum(loops))
        self.flops.inc(flops)
        self.latency.observe(seconds)
        if ttft is not None:
            self.ttft.observe(ttft)

    def step(self, batch: int, queued: int, running: int) -> None:
        """Record one engine step: how many requests it decoded, and how many wait and run after it."""
        if batch:
            self.batch.observe(batch)
        self.queued.set(queued)
        self.running.set(running)

    def render(self) -> str:
        """The metrics in the Prometheus text format."""
        return generate_latest(self.registry).decode()
