"""Server metrics in the Prometheus text format (exposition format 0.0.4), kept in memory."""

from __future__ import annotations

import bisect
import threading

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.n += 1


class Metrics:
    """Counters, gauges and histograms of the server; `render()` writes them for GET /metrics."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}  # (endpoint, status) → count
        self.tokens = 0
        self.prompt_tokens = 0
        self.loops = 0  # core-block runs over all generated tokens
        self.flops = 0.0
        self.latency = Histogram(LATENCY_BUCKETS)
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.batch = Histogram((1, 2, 4, 8, 16, 32, 64))
        self.queued = 0
        self.running = 0

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def finished(
        self, prompt_tokens: int, loops: list[int], flops: float, seconds: float, ttft: float | None
    ):
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.tokens += len(loops)
            self.loops += sum(loops)
            self.flops += flops
            self.latency.observe(seconds)
            if ttft is not None:
                self.ttft.observe(ttft)

    def step(self, batch: int, queued: int, running: int) -> None:
        with self._lock:
            if batch:
                self.batch.observe(batch)
            self.queued, self.running = queued, running

    def render(self) -> str:
        with self._lock:
            lines = [
                "# HELP looped_requests_total Requests answered, by endpoint and HTTP status.",
                "# TYPE looped_requests_total counter",
            ]
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'looped_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
            for name, kind, text, value in (
                ("looped_generated_tokens_total", "counter", "Tokens generated.", self.tokens),
                ("looped_prompt_tokens_total", "counter", "Prompt tokens read.", self.prompt_tokens),
                (
                    "looped_loops_total",
                    "counter",
                    "Core-block loops run over all generated tokens.",
                    self.loops,
                ),
                ("looped_flops_total", "counter", "Forward FLOPs spent on generated tokens.", self.flops),
                ("looped_queued_requests", "gauge", "Requests waiting for a batch slot.", self.queued),
                ("looped_running_requests", "gauge", "Requests in the running batch.", self.running),
            ):
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value:g}"]
            for name, text, h in (
                ("looped_request_seconds", "Time from arrival to the last token.", self.latency),
                ("looped_time_to_first_token_seconds", "Time from arrival to the first token.", self.ttft),
                ("looped_batch_size", "Requests decoded together per engine step.", self.batch),
            ):
                lines += [f"# HELP {name} {text}", f"# TYPE {name} histogram"]
                total = 0
                for bound, count in zip((*h.buckets, float("inf")), h.counts, strict=True):
                    total += count
                    le = "+Inf" if bound == float("inf") else f"{bound:g}"
                    lines.append(f'{name}_bucket{{le="{le}"}} {total}')
                lines += [f"{name}_sum {h.sum:g}", f"{name}_count {h.n}"]
        return "\n".join(lines) + "\n"
