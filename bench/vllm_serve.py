"""`looped serve` against vLLM with the looped plugin: the same checkpoint, the same load, the same machine.

The load is bench/serve_load.py's: many concurrent clients (64 by default), each sending a few completion
requests (prompts from Shakespeare, 32 tokens, temperature 0.8 with a seed, half of them streamed). vLLM
runs one loop count per deployment, so both servers run the checkpoint's default loops and the requests
carry no per-request compute fields. Tokens/s counts completion tokens of successful requests over the
wall time of the whole load; latency is per request; TTFT from the streamed requests.

    .venv/bin/python bench/vllm_serve.py [CHECKPOINT] [--clients 64] [--requests 2]

Without a checkpoint it builds one: the demo preset's shape (width 192, head_dim 64, 1/2/1 layers, 4 loops)
with random weights and the Shakespeare tokenizer. vLLM runs from .venv-vllm (make test builds it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name, cpu_seconds, log  # noqa: E402
from serve_load import free_port, load, start_server, wait_ready  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def demo_shaped_checkpoint(folder: Path) -> Path:
    """A random model of the demo preset's shape with the Shakespeare BPE tokenizer."""
    import looped
    from looped.config import load_config
    from looped.data.tokenizer import Tokenizer

    data = folder / "data"
    subprocess.run(
        [sys.executable, "-m", "looped", "data", "prepare", "shakespeare", str(data)],
        check=True,
        capture_output=True,
    )
    cfg = load_config(["demo"], [])
    tok = Tokenizer.load(data)
    cfg.model.vocab_size = tok.vocab_size
    model = looped.LoopedLM(cfg.model).eval()
    ckpt = looped.save(model, folder / "ckpt", cfg)
    tok.save(ckpt)
    return ckpt


def start_vllm(hf: Path, loops: int, context: int) -> tuple[subprocess.Popen, str]:
    python = ROOT / ".venv-vllm" / "bin" / "python"
    if not python.is_file():
        raise SystemExit(f"no vLLM environment at {python}: run make test (it builds .venv-vllm)")
    port = free_port()
    cmd = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(hf),
        "--port",
        str(port),
        "--served-model-name",
        "model",
        "--dtype",
        "float32",
        "--max-model-len",
        str(context),
        "--hf-overrides",
        json.dumps({"num_loops": loops, "kv_cache": "per-loop"}),
    ]
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "2"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url, 600)
    return proc, url


async def one(client: httpx.AsyncClient, url: str, model: str, body: dict) -> dict:
    """One completion in plain OpenAI terms (both servers speak them): tokens, latency, time to first token."""
    body = {"model": model, **body}
    if body.get("stream"):  # the last chunk then carries the usage (both servers honour it)
        body["stream_options"] = {"include_usage": True}
    start, first, tokens = time.perf_counter(), None, 0
    try:
        if body.get("stream"):
            async with client.stream("POST", url + "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    return {"error": f"{r.status_code}: {(await r.aread()).decode()[:200]}"}
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    msg = json.loads(line[6:])
                    if "error" in msg:
                        return {"error": str(msg["error"])[:200]}
                    if msg.get("choices") and msg["choices"][0].get("text"):
                        first = first or time.perf_counter()
                    if msg.get("usage"):
                        tokens = msg["usage"]["completion_tokens"]
        else:
            r = await client.post(url + "/v1/completions", json=body)
            if r.status_code != 200:
                return {"error": f"{r.status_code}: {r.text[:200]}"}
            tokens = r.json()["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {
        "latency": time.perf_counter() - start,
        "ttft": None if first is None else first - start,
        "tokens": tokens,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    import looped
    from looped.interop.hf import export_hf

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.checkpoint) if args.checkpoint else demo_shaped_checkpoint(Path(tmp))
        model = looped.load(ckpt)
        loops, context = model.cfg.loops, model.cfg.max_seq_len
        hf = export_hf(ckpt, Path(tmp) / "hf", num_loops=loops)
        rows = {}
        for name, start in (
            (
                "looped serve",
                lambda: start_server(str(ckpt), 64, 4 * args.clients, ("infer.kv_cache=per-loop",)),
            ),
            ("vllm (looped plugin)", lambda: start_vllm(hf, loops, context)),
        ):
            log(f"{name}: starting")
            proc, url = start()
            try:
                log(f"{name}: {args.clients} clients × {args.requests} requests, {args.max_tokens} tokens")
                busy0, own0 = cpu_seconds()
                served = "model" if "vllm" in name else model_name(url)
                rows[name] = asyncio.run(
                    load(url, served, args.clients, args.requests, args.max_tokens, args.seed, [{}], one)
                )
                busy1, own1 = cpu_seconds()
                rows[name]["machine_cpu_s"] = busy1 - busy0
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    print(
        f"# looped serve vs vLLM · {time.strftime('%Y-%m-%d')} · {cpu_name()} · {os.cpu_count()} cores · "
        f"{args.checkpoint or 'random demo-shaped model'} · {loops} loops, per-loop KV cache"
    )
    print(
        f"# {args.clients} concurrent clients × {args.requests} requests, {args.max_tokens} tokens, half streamed"
    )
    print(
        f"{'server':<22} {'requests':>8} {'errors':>6} {'tokens/s':>9} {'p50 s':>7} {'p99 s':>7} "
        f"{'TTFT p50':>9} {'TTFT p99':>9}"
    )
    for name, r in rows.items():
        print(
            f"{name:<22} {r['requests']:>8} {r['errors']:>6} {r['tokens_per_s']:>9.1f} {r['latency_p50']:>7.2f} "
            f"{r['latency_p99']:>7.2f} {r['ttft_p50']:>9.2f} {r['ttft_p99']:>9.2f}"
        )
        for e in r["error_examples"]:
            print(f"#   {name} error: {e}")


def model_name(url: str) -> str:
    return httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]


if __name__ == "__main__":
    main()
