"""The FastAPI application of `looped serve`: OpenAI-compatible completions and chat (streamed as server-sent
events or whole), models, health, Prometheus metrics and the playground page.

Every error is answered in OpenAI's error shape and counted; nothing a client sends can stop the server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse

from looped.config import ServeConfig
from looped.infer.engine import Engine
from looped.serve.auth import Keyring
from looped.serve.metrics import Metrics
from looped.serve.protocol import (
    APIError,
    Ask,
    chunk,
    decode_body,
    looped_info,
    new_id,
    parse_request,
    response,
    sse,
    usage,
)
from looped.serve.scheduler import Item, QueueFull, Scheduler, deliverer


def create_app(engine: Engine, cfg: ServeConfig, model_name: str | None = None):
    """The ASGI app serving `engine`; its scheduler thread starts and stops with the app (lifespan)."""
    if engine.tokenizer is None:
        raise ValueError("looped serve needs a checkpoint with a tokenizer.json")
    name = model_name or cfg.model_name or _default_name(engine.checkpoint)
    for tier, spec in cfg.tiers.items():  # a tier the model cannot run is a start-up error, not a 400 later
        loops = spec.get("loops")
        if isinstance(loops, int) and not 1 <= loops <= engine.infer.max_loops:
            raise ValueError(
                f"serve.tiers.{tier}.loops = {loops} is outside [1, infer.max_loops = "
                f"{engine.infer.max_loops}]"
            )
    metrics = Metrics()
    keyring = Keyring(cfg)
    scheduler = Scheduler(engine, cfg.max_batch, cfg.queue_size, metrics)
    defaults = engine.sampling()

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="looped", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler, app.state.metrics, app.state.model_name = scheduler, metrics, name

    def error(e: APIError, endpoint: str) -> JSONResponse:
        metrics.request(endpoint, e.status)
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cfg.max_body_bytes:
            raise APIError(f"the request body is over {cfg.max_body_bytes} bytes", 413)
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > cfg.max_body_bytes:
                raise APIError(f"the request body is over {cfg.max_body_bytes} bytes", 413)
        return bytes(body)

    async def generate(request: Request, kind: str):
        endpoint = "/v1/completions" if kind == "completion" else "/v1/chat/completions"
        arrived = time.perf_counter()
        try:
            key = keyring.identify(request.headers.get("authorization"))
            ask = parse_request(kind, decode_body(await read_body(request)), cfg, name, defaults)
            keyring.admit(key, ask)
            compute = dataclasses.replace(ask.compute, max_loops=keyring.cap(key, engine.infer.max_loops))
            prompts = []
            for i, prompt in enumerate(ask.prompts):
                try:
                    ids, _, _ = engine.prepare(prompt, ask.sampling, compute)
                except ValueError as e:
                    where = f"prompt {i}: " if len(ask.prompts) > 1 else ""
                    raise APIError(where + str(e)) from None
                prompts.append(ids)
            keyring.count(key)
            loop, queue = asyncio.get_running_loop(), asyncio.Queue()
            items = [
                Item(ids, ask.sampling, compute, deliverer(loop, queue, i), arrived=arrived)
                for i, ids in enumerate(prompts)
            ]
            try:
                scheduler.submit(items)
            except QueueFull:
                raise APIError(
                    f"the server is busy: {cfg.queue_size} requests are waiting; retry later",
                    429,
                    code="queue_full",
                ) from None
        except APIError as e:
            return error(e, endpoint)
        rid = new_id(kind)
        deadline = arrived + cfg.request_timeout_s
        if ask.stream:
            metrics.request(endpoint, 200)
            return StreamingResponse(
                stream(ask, rid, items, queue, deadline, arrived),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        gens: list = [None] * len(items)
        first = None
        try:
            while any(g is None for g in gens):
                index, event = await _next(queue, deadline)
                if event[0] == "token":
                    first = first or time.perf_counter()
                elif event[0] == "done":
                    gens[index] = event[1]
                else:
                    scheduler.cancel(items)
                    return error(event[1], endpoint)
        except TimeoutError:
            scheduler.cancel(items)
            return error(
                APIError(
                    f"the request did not finish within serve.request_timeout_s = "
                    f"{cfg.request_timeout_s:g} s",
                    504,
                    code="timeout",
                ),
                endpoint,
            )
        except asyncio.CancelledError:  # the client went away
            scheduler.cancel(items)
            raise
        timings = _timings(items, arrived, first)
        _count(ask, gens, arrived, first)
        metrics.request(endpoint, 200)
        return JSONResponse(response(ask, rid, gens, timings))

    async def stream(
        ask: Ask, rid: str, items: list[Item], queue: asyncio.Queue, deadline: float, arrived: float
    ):
        done: list = [None] * len(items)
        first = None
        try:
            if ask.kind == "chat":
                yield sse(chunk(ask, rid, 0, "", [], role=True))
            while any(g is None for g in done):
                try:
                    index, event = await _next(queue, deadline)
                except TimeoutError:
                    yield sse(
                        APIError(
                            f"the request did not finish within serve.request_timeout_s = "
                            f"{cfg.request_timeout_s:g} s",
                            504,
                            code="timeout",
                        ).body()
                    )
                    scheduler.cancel(items)
                    return
                if event[0] == "token":
                    first = first or time.perf_counter()
                    yield sse(chunk(ask, rid, index, event[1], event[2]))
                elif event[0] == "done":
                    done[index] = gen = event[1]
                    last = chunk(ask, rid, index, None if ask.kind == "chat" else "", [], gen.finish_reason)
                    if all(g is not None for g in done):
                        last["usage"] = usage(done)
                        last["looped"] |= looped_info(
                            done, ask.loops_per_token, ask.tier, _timings(items, arrived, first)
                        )
                    yield sse(last)
                else:
                    yield sse(event[1].body())
                    scheduler.cancel(items)
                    return
            _count(ask, done, arrived, first)
            yield sse("[DONE]")
        finally:  # a client that goes away mid-stream stops its generation
            if any(g is None for g in done):
                scheduler.cancel(items)

    def _count(ask: Ask, gens: list, arrived: float, first: float | None) -> None:
        for g in gens:
            metrics.finished(
                g.prompt_tokens,
                g.loops,
                g.flops_per_token * len(g.token_ids),
                time.perf_counter() - arrived,
                None if first is None else first - arrived,
            )

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, "chat")

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            keyring.identify(request.headers.get("authorization"))
        except APIError as e:
            return error(e, "/v1/models")
        metrics.request("/v1/models", 200)
        m = engine.model
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": int(_created(engine)),
                    "owned_by": "looped",
                    "loops": m.cfg.loops,
                    "max_loops": engine.infer.max_loops,
                    "tiers": cfg.tiers,
                    "context": m.cfg.max_seq_len,
                    "parameters": sum(p.numel() for p in m.parameters()),
                }
            ],
        }

    @app.get("/health")
    async def health():
        alive = scheduler.thread.is_alive()
        return JSONResponse(
            {"status": "ok" if alive else "engine stopped", **scheduler.load},
            status_code=200 if alive else 503,
        )

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    page = resources.files("looped.serve").joinpath("playground.html").read_text()

    @app.get("/")
    async def playground():
        return HTMLResponse(
            page.replace("__MODEL__", name)
            .replace("__MAX_LOOPS__", str(engine.infer.max_loops))
            .replace("__LOOPS__", str(engine.model.cfg.loops))
            .replace("__TIERS__", ",".join(cfg.tiers))
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        return error(APIError(f"internal error: {type(exc).__name__}", 500), request.url.path)

    return app


async def _next(queue: asyncio.Queue, deadline: float):
    remaining = deadline - time.perf_counter()
    if remaining <= 0:
        raise TimeoutError
    return await asyncio.wait_for(queue.get(), timeout=remaining)


def _timings(items: list[Item], arrived: float, first: float | None) -> dict:
    now = time.perf_counter()
    admitted = [i.admitted for i in items if i.admitted is not None]
    reqs = [i.req for i in items if i.req is not None]
    return {
        "queue_ms": (max(admitted) - arrived) * 1000 if admitted else 0.0,
        "prefill_ms": max((r.prefill_ms for r in reqs), default=0.0),
        "decode_ms": max((r.decode_ms for r in reqs), default=0.0),
        "ttft_ms": (first - arrived) * 1000 if first is not None else None,
        "total_ms": (now - arrived) * 1000,
    }


def _default_name(checkpoint: Path | None) -> str:
    """The checkpoint directory's name, or its run's for a run's `final` directory (runs/demo/final → demo)."""
    if checkpoint is None:
        return "looped"
    checkpoint = Path(checkpoint).resolve()
    return checkpoint.parent.name if checkpoint.name == "final" else checkpoint.name


def _created(engine: Engine) -> float:
    path = engine.checkpoint
    return Path(path, "model.safetensors").stat().st_mtime if path else time.time()


def serve(
    checkpoint: str | Path,
    files: list[str],
    overrides: list[str],
    host: str | None = None,
    port: int | None = None,
) -> None:
    """Load a checkpoint (safetensors only) with its config changed by `files` and `overrides`, and serve it
    until interrupted."""
    import uvicorn

    from looped.checkpoint import load_config_dir
    from looped.config import load_config

    checkpoint = Path(checkpoint)
    load_config_dir(checkpoint)  # a clear error when it is not a checkpoint directory
    cfg = load_config([checkpoint / "config.toml", *files], overrides)
    engine = Engine.from_checkpoint(checkpoint)
    engine.infer = cfg.infer
    app = create_app(engine, cfg.serve)
    host = host or cfg.serve.host
    port = port if port is not None else cfg.serve.port
    keys = f"{len(cfg.serve.keys)} API keys" if cfg.serve.keys else "no API keys (open)"
    print(
        f"looped serve: model '{app.state.model_name}' on http://{host}:{port}: OpenAI API at /v1, playground at /, "
        f"metrics at /metrics; tiers {', '.join(cfg.serve.tiers)}; {keys}",
        flush=True,
    )
    uvicorn.run(app, host=host, port=port, log_level="info")


def run_in_thread(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0):
    """Start uvicorn serving `app` in a daemon thread (port 0: any free port); returns (server, url). Stop it
    with `server.should_exit = True`. For tests and benchmarks."""
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="looped-uvicorn", daemon=True)
    thread.start()
    start = time.monotonic()
    while not server.started:
        if not thread.is_alive() or time.monotonic() - start > timeout:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    server.thread = thread
    return server, f"http://{host}:{bound}"
