"""The engine thread: queue bound, cancellation freeing rows, and a failing step failing only its requests."""

from __future__ import annotations

import queue
import time

import pytest

from looped.infer.engine import Compute
from looped.serve.scheduler import Item, QueueFull, Scheduler


def item(engine, events: queue.Queue, index: int, tokens: int = 30, loops: int = 2) -> Item:
    return Item(
        engine.encode("The king"),
        engine.sampling(max_new_tokens=tokens, temperature=0),
        Compute(loops=loops),
        lambda e: events.put((index, e)),
    )


def wait_for(events: queue.Queue, kind: str, timeout: float = 60) -> tuple:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        index, event = events.get(timeout=timeout)
        if event[0] == kind:
            return index, event
    raise AssertionError(f"no {kind} event")


def test_cancel_frees_the_row_and_others_finish(engine):
    events: queue.Queue = queue.Queue()
    s = Scheduler(engine, max_batch=4, queue_size=2).start()
    try:
        with pytest.raises(QueueFull):
            s.submit([item(engine, events, i) for i in range(3)])
        a, b = item(engine, events, 0, tokens=200), item(engine, events, 1, tokens=5)
        s.submit([a, b])
        wait_for(events, "token")
        s.cancel([a])  # as when a streaming client goes away
        index, (_, gen) = wait_for(events, "done")
        assert index == 1 and len(gen.token_ids) == 5
        deadline = time.monotonic() + 10
        while s.load["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert s.load == {"queued": 0, "running": 0} and not engine.busy
        assert len(a.req.generated) < 200 and a.req.finish_reason == "cancelled"
    finally:
        s.stop()


def test_a_failing_step_fails_its_requests_not_the_thread(engine, monkeypatch):
    events: queue.Queue = queue.Queue()
    s = Scheduler(engine, max_batch=4, queue_size=8).start()
    try:
        real = engine.step
        monkeypatch.setattr(engine, "step", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
        s.submit([item(engine, events, 0)])
        _, (_, error) = wait_for(events, "error")
        assert error.status == 500 and "boom" in error.message
        monkeypatch.setattr(engine, "step", real)
        s.submit([item(engine, events, 1, tokens=3)])
        index, (_, gen) = wait_for(events, "done")
        assert index == 1 and len(gen.token_ids) == 3 and s.thread.is_alive()
    finally:
        s.stop()
