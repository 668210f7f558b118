"""Continuous batching for the server: one thread owns the Engine; requests queue up, join the running batch
between decode steps (up to serve.max_batch at once, whatever loop counts or exit criteria they asked for),
and their tokens go back to the asyncio side as events.

The Engine is not thread-safe, so only this thread touches it; the web handlers talk to it through a
locked inbox and get events through `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from looped.infer.engine import Compute, Engine, Request
from looped.infer.sampling import SamplingParams
from looped.serve.metrics import Metrics
from looped.serve.protocol import APIError


@dataclass(eq=False)
class Item:
    """One prompt of one HTTP request, on its way through the engine."""

    prompt: list[int]
    sampling: SamplingParams
    compute: Compute
    deliver: Callable[[tuple], None]  # called from the engine thread with ("token", text, loops) etc.
    arrived: float = field(default_factory=time.perf_counter)
    admitted: float | None = None
    req: Request | None = None
    sent_loops: int = 0
    cancelled: bool = False


class QueueFull(Exception):
    pass


class Scheduler:
    """The engine thread. `submit` queues items (QueueFull past serve.queue_size); `cancel` stops them."""

    def __init__(
        self, engine: Engine, max_batch: int, queue_size: int, metrics: Metrics | None = None
    ) -> None:
        self.engine = engine
        self.max_batch, self.queue_size = max_batch, queue_size
        self.metrics = metrics or Metrics()
        self.pending: list[Item] = []
        self.cancels: list[Item] = []
        self.live: dict[int, Item] = {}  # engine request id → item
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = False
        self.steps = 0
        self.thread = threading.Thread(target=self._run, name="looped-engine", daemon=True)

    def start(self) -> Scheduler:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=10)

    # ------------------------------------------------------------------ called from the web handlers
    def submit(self, items: list[Item]) -> None:
        with self.lock:
            if len(self.pending) + len(items) > self.queue_size:
                raise QueueFull
            self.pending += items
        self.wake.set()

    def cancel(self, items: list[Item]) -> None:
        with self.lock:
            for item in items:
                item.cancelled = True
                self.cancels.append(item)
        self.wake.set()

    @property
    def load(self) -> dict[str, int]:
        return {"queued": len(self.pending), "running": len(self.live)}

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        while not self.stopping:
            self._admit()
            if not self.engine.busy:
                self.wake.wait(timeout=0.5)
                self.wake.clear()
                continue
            try:
                touched = self.engine.step()
            except Exception as e:  # a failed step fails its requests, not the server
                self._fail_all(APIError(f"generation failed: {type(e).__name__}: {e}", 500))
                continue
            self.steps += 1
            finished = [self.live.pop(req.id) for req in touched if req.finished and req.id in self.live]
            # the load after the step, recorded before any client hears of its end
            self.metrics.step(len(touched), len(self.pending), len(self.live))
            for item in finished:
                self._flush(item)
                if item.req.finish_reason != "cancelled":
                    item.deliver(("done", self.engine.result(item.req)))

    def _admit(self) -> None:
        with self.lock:
            cancels, self.cancels = self.cancels, []
            room = self.max_batch - len(self.live)
            admit, self.pending = self.pending[: max(0, room)], self.pending[max(0, room) :]
        for item in cancels:
            if item.req is not None:
                self.engine.cancel(item.req)
                self.live.pop(item.req.id, None)
        for item in admit:
            if item.cancelled:
                continue
            item.admitted = time.perf_counter()
            try:
                item.req = self.engine.submit(item.prompt, item.sampling, item.compute, self._on_token(item))
            except Exception as e:  # checked before queueing, so only a change of state gets here
                item.deliver(("error", APIError(str(e), 400 if isinstance(e, ValueError) else 500)))
                continue
            if item.req.finished:  # max_tokens = 0
                item.deliver(("done", self.engine.result(item.req)))
            else:
                self.live[item.req.id] = item

    def _on_token(self, item: Item) -> Callable[[Request, str], None]:
        def on_token(req: Request, text: str) -> None:
            loops = req.loops_used[item.sent_loops :]
            item.sent_loops = len(req.loops_used)
            item.deliver(("token", text, loops))

        return on_token

    def _flush(self, item: Item) -> None:
        """Loops of tokens whose text was held back (a stop string, end of text) still reach the client."""
        req = item.req
        if req is not None and item.sent_loops < len(req.loops_used):
            item.deliver(("token", "", req.loops_used[item.sent_loops :]))
            item.sent_loops = len(req.loops_used)

    def _fail_all(self, error: APIError) -> None:
        for item in list(self.live.values()):
            if item.req is not None:
                self.engine.cancel(item.req, reason="error")
            item.deliver(("error", error))
        self.live.clear()
        self.engine.running.clear()
        self.engine.waiting.clear()
        self.engine.cache.reset()


def deliverer(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int) -> Callable[[tuple], Any]:
    """A thread-safe callback that puts (index, event) on an asyncio queue."""

    def deliver(event: tuple) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (index, event))

    return deliver
