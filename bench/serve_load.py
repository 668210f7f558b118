"""Load test of `looped serve`: start the server on 127.0.0.1 in its own process, run a bounded load (many
concurrent clients, mixed tiers and loop counts, streaming and not), and report throughput, latency and time
to first token percentiles and errors. The same load is then served one request at a time
(serve.max_batch = 1), to measure what batching across requests of different depths buys.

    python bench/serve_load.py runs/demo/final [--clients 64] [--requests 2] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name, cpu_seconds, log  # noqa: E402

PROMPTS = ["KING HENRY.", "ROMEO.", "Now is the winter", "O, what a", "First Citizen.", "Good my lord,"]
SHAPES = [
    {"compute": "fast"},
    {"compute": "balanced"},
    {"compute": "best"},
    {"loops": 2},
    {"loops": 4},
    {"loops": 8},
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    checkpoint: str, max_batch: int, queue: int, settings: tuple[str, ...] = ()
) -> tuple[subprocess.Popen, str]:
    """`looped serve` on a free port in its own process (`settings`: more `--set` values), once it answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "looped", "serve", checkpoint, "--port", str(port)]
    cmd += ["--set", f"serve.max_batch={max_batch}", "--set", f"serve.queue_size={queue}"]
    cmd += ["--set", "serve.request_timeout_s=3600"]
    for setting in settings:
        cmd += ["--set", setting]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url, 120)
    return proc, url


def wait_ready(proc: subprocess.Popen, url: str, seconds: float) -> None:
    """Poll /health until the server answers; exit with its stderr if it dies, or after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{proc.stderr.read()[-4000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"the server did not start within {seconds:.0f} s")


async def one(client: httpx.AsyncClient, url: str, model: str, body: dict) -> dict:
    body = {"model": model, **body}
    start = time.perf_counter()
    first = None
    try:
        if body.get("stream"):
            tokens = 0
            async with client.stream("POST", url + "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    return {"error": f"{r.status_code}: {(await r.aread()).decode()[:200]}"}
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    msg = json.loads(line[6:])
                    if "error" in msg:
                        return {"error": msg["error"]["message"]}
                    n = len(msg["looped"].get("loops", []))
                    if n and first is None:
                        first = time.perf_counter()
                    tokens += n
        else:
            r = await client.post(url + "/v1/completions", json=body)
            if r.status_code != 200:
                return {"error": f"{r.status_code}: {r.text[:200]}"}
            data = r.json()
            tokens = data["usage"]["completion_tokens"]
            first = (
                start + data["looped"]["timings"]["ttft_ms"] / 1000
                if data["looped"]["timings"]["ttft_ms"]
                else None
            )
    except httpx.HTTPError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    end = time.perf_counter()
    return {"latency": end - start, "ttft": None if first is None else first - start, "tokens": tokens}


async def load(
    url: str,
    model: str,
    clients: int,
    requests: int,
    max_tokens: int,
    seed: int,
    shapes: list[dict] = SHAPES,
    send=None,
) -> dict:
    """`clients` concurrent clients sending `requests` each; `shapes` are the per-request compute fields to
    mix in, `send(client, url, model, body)` sends one request (default `one`, which reads looped's fields)."""
    send = send or one
    rng = random.Random(seed)
    plan = [
        [
            {
                "prompt": rng.choice(PROMPTS),
                "max_tokens": max_tokens,
                "temperature": 0.8,
                "seed": rng.randrange(1 << 30),
                "stream": rng.random() < 0.5,
                **rng.choice(shapes),
            }
            for _ in range(requests)
        ]
        for _ in range(clients)
    ]
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as client:

        async def run_client(bodies: list[dict]) -> list[dict]:
            return [await send(client, url, model, b) for b in bodies]

        start = time.perf_counter()
        results = await asyncio.gather(*(run_client(p) for p in plan))
        seconds = time.perf_counter() - start
    flat = [r for rs in results for r in rs]
    ok = [r for r in flat if "error" not in r]
    lat = sorted(r["latency"] for r in ok)
    ttft = sorted(r["ttft"] for r in ok if r["ttft"] is not None)

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    return {
        "requests": len(flat),
        "errors": len(flat) - len(ok),
        "error_examples": [r["error"] for r in flat if "error" in r][:3],
        "seconds": seconds,
        "tokens": sum(r["tokens"] for r in ok),
        "tokens_per_s": sum(r["tokens"] for r in ok) / seconds,
        "requests_per_s": len(ok) / seconds,
        "latency_p50": pct(lat, 0.5),
        "latency_p99": pct(lat, 0.99),
        "ttft_p50": pct(ttft, 0.5),
        "ttft_p99": pct(ttft, 0.99),
        "latency_mean": statistics.mean(lat) if lat else float("nan"),
    }


def batch_size_metrics(text: str) -> dict[str, float]:
    """The count and sum of the server's batch-size histogram, read with prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("looped_batch_size_count", "looped_batch_size_sum"):
                out[sample.name] = sample.value
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", default="runs/demo/final")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-sequential", action="store_true", help="only the batched server")
    args = p.parse_args()
    if not Path(args.checkpoint, "model.safetensors").is_file():
        raise SystemExit(f"{args.checkpoint}: no checkpoint there (make demo trains runs/demo/final)")
    model = Path(args.checkpoint).resolve()
    model = model.parent.name if model.name == "final" else model.name
    rows = {}
    settings = [("batched (max_batch 64)", 64)] + (
        [] if args.skip_sequential else [("one at a time (max_batch 1)", 1)]
    )
    for label, max_batch in settings:
        proc, url = start_server(args.checkpoint, max_batch, queue=args.clients * args.requests + 8)
        try:
            log(f"{label}: {args.clients} clients × {args.requests} requests, {args.max_tokens} tokens each")
            busy0, own0 = cpu_seconds()
            rows[label] = asyncio.run(
                load(url, model, args.clients, args.requests, args.max_tokens, args.seed)
            )
            busy1, own1 = cpu_seconds()
            rows[label]["machine_cpu_s"] = busy1 - busy0
            rows[label]["metrics_batch"] = batch_size_metrics(httpx.get(url + "/metrics").text)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(
        f"# serve load · {time.strftime('%Y-%m-%d')} · {cpu_name()} · {os.cpu_count()} cores · {args.checkpoint}"
    )
    print(
        f"# {args.clients} concurrent clients × {args.requests} requests, {args.max_tokens} tokens, "
        "mixed tiers (fast/balanced/best) and loops (2/4/8), half streamed"
    )
    print(
        f"{'server':<28} {'requests':>8} {'errors':>6} {'tokens/s':>9} {'req/s':>6} {'p50 s':>7} {'p99 s':>7} "
        f"{'TTFT p50':>9} {'TTFT p99':>9}"
    )
    for label, r in rows.items():
        print(
            f"{label:<28} {r['requests']:>8} {r['errors']:>6} {r['tokens_per_s']:>9.1f} {r['requests_per_s']:>6.2f} "
            f"{r['latency_p50']:>7.2f} {r['latency_p99']:>7.2f} {r['ttft_p50']:>9.2f} {r['ttft_p99']:>9.2f}"
        )
        for e in r["error_examples"]:
            print(f"  error: {e}")
    if len(rows) == 2:
        a, b = rows.values()
        print(f"batching gain: {a['tokens_per_s'] / b['tokens_per_s']:.2f}× tokens/s")


if __name__ == "__main__":
    main()
