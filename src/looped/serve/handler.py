"""The request handler of the generation endpoints: admit a request (key, body, checks, queue), then collect
its whole response or stream it as server-sent events.

Every refusal is an `APIError` answered in OpenAI's shape and counted in the metrics.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from looped.config import ServeConfig
from looped.infer.engine import Compute, Engine, Generation
from looped.serve.auth import Keyring
from looped.serve.metrics import Metrics
from looped.serve.protocol import (
    APIError,
    Ask,
    check_min_loops,
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

ENDPOINTS = {"completion": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass(eq=False)
class Job:
    """An admitted request: its prompts in the scheduler as `items`, whose events come back on `events`."""

    ask: Ask
    rid: str
    items: list[Item]
    events: asyncio.Queue
    arrived: float  # time.perf_counter() when the request came in
    deadline: float
    first: float | None = None  # when the first token came
    gens: list[Generation | None] = field(default_factory=list)  # one per prompt, once finished

    @property
    def done(self) -> bool:
        return all(g is not None for g in self.gens)


class Handler:
    """Serves /v1/completions and /v1/chat/completions: `await handler(request, kind)` gives the response.

    Args:
        engine: the engine the scheduler runs; the handler only checks requests against it.
        cfg: the server's limits and tiers.
        name: the model id clients name.
        keyring: the API keys and their limits.
        scheduler: the engine thread the admitted prompts go to.
        metrics: where requests and generations are counted.
    """

    def __init__(
        self,
        engine: Engine,
        cfg: ServeConfig,
        name: str,
        keyring: Keyring,
        scheduler: Scheduler,
        metrics: Metrics,
    ) -> None:
        self.engine, self.cfg, self.name = engine, cfg, name
        self.keyring, self.scheduler, self.metrics = keyring, scheduler, metrics
        self.defaults = engine.sampling()
        self.timeout = APIError(
            f"the request did not finish within serve.request_timeout_s = {cfg.request_timeout_s:g} s",
            504,
            code="timeout",
        )

    async def __call__(self, request: Request, kind: str) -> Response:
        """Answer a request of `kind` ("completion" or "chat"): whole, streamed, or an error."""
        arrived = time.perf_counter()
        endpoint = ENDPOINTS[kind]
        try:
            job = await self.admit(request, kind, arrived)
        except APIError as e:
            return self.error(e, endpoint)
        if job.ask.stream:
            self.metrics.request(endpoint, 200)
            return StreamingResponse(
                self.stream(job), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        return await self.collect(job, endpoint)

    def error(self, e: APIError, endpoint: str) -> JSONResponse:
        """The response to a refused or failed request, counted under `endpoint`."""
        self.metrics.request(endpoint, e.status)
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    async def admit(self, request: Request, kind: str, arrived: float) -> Job:
        """Check a request in the order a client would fix it (key, body, tier, each prompt, rate) and queue
        its prompts; an `APIError` for the first problem. A refused request does not count against a rate."""
        key = self.keyring.identify(request.headers.get("authorization"))
        body = decode_body(await self._body(request))
        ask = parse_request(kind, body, self.cfg, self.name, self.defaults, self.engine.chat_format)
        self.keyring.admit(key, ask)
        compute = self.keyring.compute(key, ask, self.engine.infer.max_request_loops)
        cap = compute.loop_cap
        prompts = [self._prepare(ask, i, compute, cap) for i in range(len(ask.prompts))]
        self.keyring.count(key)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        items = [
            Item(ids, ask.sampling, compute, deliverer(loop, events, i), arrived=arrived)
            for i, ids in enumerate(prompts)
        ]
        try:
            self.scheduler.submit(items)
        except QueueFull:
            raise APIError(
                f"the server is busy: {self.cfg.queue_size} requests are waiting; retry later",
                429,
                code="queue_full",
            ) from None
        deadline = arrived + self.cfg.request_timeout_s
        return Job(ask, new_id(kind), items, events, arrived, deadline, gens=[None] * len(items))

    async def collect(self, job: Job, endpoint: str) -> JSONResponse:
        """Wait for every prompt of the job and answer with the whole response (504 past the deadline)."""
        try:
            while not job.done:
                _, event = await self._next(job)
                if event[0] == "error":
                    return self.error(event[1], endpoint)
        except TimeoutError:
            return self.error(self.timeout, endpoint)
        finally:  # a timeout, a failure, or a client that went away stops the generation
            self._stop_unfinished(job)
        self._count(job)
        self.metrics.request(endpoint, 200)
        return JSONResponse(response(job.ask, job.rid, job.gens, _timings(job)))

    async def stream(self, job: Job) -> AsyncIterator[bytes]:
        """The job's server-sent events: text and loops as they come, a last chunk per prompt (with usage and
        the `looped` summary once all are done), then [DONE]; an error event ends the stream."""
        ask = job.ask
        try:
            if ask.kind == "chat":
                yield sse(chunk(ask, job.rid, 0, "", [], role=True))
            while not job.done:
                try:
                    index, event = await self._next(job)
                except TimeoutError:
                    yield sse(self.timeout.body())
                    return
                if event[0] == "token":
                    yield sse(chunk(ask, job.rid, index, event[1], event[2]))
                elif event[0] == "done":
                    yield sse(self._last_chunk(job, index))
                else:
                    yield sse(event[1].body())
                    return
            self._count(job)
            yield sse("[DONE]")
        finally:  # a client that goes away mid-stream stops its generation
            self._stop_unfinished(job)

    # ------------------------------------------------------------------------------------------ helpers
    async def _body(self, request: Request) -> bytes:
        """The request body, read no further than serve.max_body_bytes (413 past it)."""
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(f"the request body is over {limit} bytes", 413)
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise APIError(f"the request body is over {limit} bytes", 413)
        return bytes(body)

    def _prepare(self, ask: Ask, i: int, compute: Compute, cap: int) -> list[int]:
        """Prompt `i` as token ids, checked by the engine (context, vocabulary, loops) without queueing."""
        try:
            ids, loops, *_ = self.engine.prepare(ask.prompts[i], ask.sampling, compute)
        except ValueError as e:
            where = f"prompt {i}: " if len(ask.prompts) > 1 else ""
            raise APIError(where + str(e)) from None
        check_min_loops(ask, loops, cap)
        return ids

    async def _next(self, job: Job) -> tuple[int, tuple]:
        """The job's next (prompt index, event), noted in the job; TimeoutError past its deadline."""
        remaining = job.deadline - time.perf_counter()
        if remaining <= 0:
            raise TimeoutError
        index, event = await asyncio.wait_for(job.events.get(), timeout=remaining)
        if event[0] == "token" and job.first is None:
            job.first = time.perf_counter()
        elif event[0] == "done":
            job.gens[index] = event[1]
        return index, event

    def _last_chunk(self, job: Job, index: int) -> dict:
        ask, gen = job.ask, job.gens[index]
        last = chunk(ask, job.rid, index, None if ask.kind == "chat" else "", [], gen.finish_reason)
        if job.done:
            last["usage"] = usage(job.gens)
            last["looped"] |= looped_info(job.gens, ask.loops_per_token, ask.tier, _timings(job))
        return last

    def _stop_unfinished(self, job: Job) -> None:
        if not job.done:
            self.scheduler.cancel(job.items)

    def _count(self, job: Job) -> None:
        for g in job.gens:
            self.metrics.finished(
                g.prompt_tokens,
                g.loops,
                g.flops_per_token * len(g.token_ids),
                time.perf_counter() - job.arrived,
                None if job.first is None else job.first - job.arrived,
            )


def _timings(job: Job) -> dict:
    """The `looped.timings` of a response, in ms."""
    now = time.perf_counter()
    admitted = [i.admitted for i in job.items if i.admitted is not None]
    reqs = [i.req for i in job.items if i.req is not None]
    return {
        "queue_ms": (max(admitted) - job.arrived) * 1000 if admitted else 0.0,
        "prefill_ms": max((r.prefill_ms for r in reqs), default=0.0),
        "decode_ms": max((r.decode_ms for r in reqs), default=0.0),
        "ttft_ms": (job.first - job.arrived) * 1000 if job.first is not None else None,
        "total_ms": (now - job.arrived) * 1000,
    }
