"""The FastAPI application of `looped serve`: routes for OpenAI-compatible completions and chat (streamed as
server-sent events or whole; see `handler`), models, health, Prometheus metrics and the playground page.

Every error is answered in OpenAI's error shape and counted; nothing a client sends can stop the server.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from looped.config import ServeConfig
from looped.infer.engine import Engine
from looped.serve.auth import Keyring
from looped.serve.handler import Handler
from looped.serve.metrics import CONTENT_TYPE, Metrics
from looped.serve.protocol import APIError
from looped.serve.scheduler import Scheduler


def create_app(engine: Engine, cfg: ServeConfig, model_name: str | None = None) -> FastAPI:
    """The ASGI app serving `engine`; its scheduler thread starts and stops with the app (lifespan).

    Raises:
        ValueError: the checkpoint has no tokenizer, or a tier asks for loops the model cannot run.
        ConfigError: a key in `cfg.keys` still has the example's placeholder digest.
    """
    if engine.tokenizer is None:
        raise ValueError("looped serve needs a checkpoint with a tokenizer.json")
    check_tiers(cfg, engine.infer.max_request_loops)
    name = model_name or cfg.model_name or _default_name(engine.checkpoint)
    metrics = Metrics()
    scheduler = Scheduler(engine, cfg.max_batch, cfg.queue_size, metrics)
    handler = Handler(engine, cfg, name, Keyring(cfg), scheduler, metrics)
    card = _model_card(engine, cfg, name)
    page = _playground(engine, cfg, name)

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="looped", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler, app.state.metrics, app.state.model_name = scheduler, metrics, name

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handler(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handler(request, "chat")

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            handler.keyring.identify(request.headers.get("authorization"))
        except APIError as e:
            return handler.error(e, "/v1/models")
        metrics.request("/v1/models", 200)
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        alive = scheduler.thread.is_alive()
        return JSONResponse(
            {"status": "ok" if alive else "engine stopped", **scheduler.load},
            status_code=200 if alive else 503,
        )

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/")
    async def playground():
        return HTMLResponse(page)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        return handler.error(APIError(f"internal error: {type(exc).__name__}", 500), request.url.path)

    return app


def check_tiers(cfg: ServeConfig, max_request_loops: int) -> None:
    """A tier the model cannot run is a start-up error, not a 400 on every request that names it."""
    for tier, spec in cfg.tiers.items():
        for field in ("loops", "min_loops"):
            value = spec.get(field)
            if isinstance(value, int) and not 1 <= value <= max_request_loops:
                raise ValueError(
                    f"serve.tiers.{tier}.{field} = {value} is outside [1, infer.max_request_loops = {max_request_loops}]"
                )
        loops, least = spec.get("loops"), spec.get("min_loops")
        if isinstance(loops, int) and isinstance(least, int) and least > loops:
            raise ValueError(f"serve.tiers.{tier}: min_loops = {least} is more than its loops = {loops}")


def _model_card(engine: Engine, cfg: ServeConfig, name: str) -> dict:
    """The model's entry in GET /v1/models: OpenAI's fields, then its loops, tiers, context and size."""
    m = engine.model
    return {
        "id": name,
        "object": "model",
        "created": int(_created(engine)),
        "owned_by": "looped",
        "loops": m.cfg.loops,
        "max_request_loops": engine.infer.max_request_loops,
        "tiers": cfg.tiers,
        "context": m.cfg.max_seq_len,
        "parameters": sum(p.numel() for p in m.parameters()),
    }


def _playground(engine: Engine, cfg: ServeConfig, name: str) -> str:
    page = resources.files("looped.serve").joinpath("playground.html").read_text()
    return (
        page.replace("__MODEL__", name)
        .replace("__MAX_LOOPS__", str(engine.infer.max_request_loops))
        .replace("__LOOPS__", str(engine.model.cfg.loops))
        .replace("__TIERS__", ",".join(cfg.tiers))
    )


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
    device: str | None = None,
    dtype: str | None = None,
) -> None:
    """Load a checkpoint (safetensors only) with its config changed by `files` and `overrides`, and serve it
    until interrupted.

    Args:
        checkpoint: The checkpoint directory.
        files: serve (or other) TOML files applied over the checkpoint's config, in order.
        overrides: `section.key=value` settings applied last.
        host: The address to listen on; None: serve.host.
        port: The port; None: serve.port.
        device: Where the model runs; None: infer.device of the resolved config.
        dtype: The model's dtype; None: infer.dtype of the resolved config.

    Raises:
        ConfigError: the config is invalid, or a key still has the example's placeholder digest.
    """
    import uvicorn

    from looped.checkpoint import load_config_dir
    from looped.config import load_config

    checkpoint = Path(checkpoint)
    load_config_dir(checkpoint)  # a clear error when it is not a checkpoint directory
    cfg = load_config([checkpoint / "config.toml", *files], overrides)
    Keyring(cfg.serve)  # a key left with the example's placeholder digest stops here, before the model loads
    # The engine is built from the merged [infer] (its kv_cache, device, dtype), not the checkpoint's alone
    engine = Engine.from_checkpoint(checkpoint, device=device, dtype=dtype, infer=cfg.infer)
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
