"""Worker processes for the science runners (sweep, compare, studies) that stop when their parent stops.

`run_jobs` calls a function on many argument tuples in `parallel` spawned worker processes, each worker
taking one job after another (so torch is imported once per worker, not once per run). Stopping the parent
stops the workers, the way a batch scheduler (SIGTERM) or Ctrl-C (SIGINT) expects:

- The parent relays the signal. It forwards it once to every worker, starts nothing new, waits while each
  worker's trainer checkpoints and returns, then raises `Stopped`; running the command again resumes.
  Workers sit in their own process group, so a signal sent to the parent's group (Ctrl-C in a terminal,
  `kill -TERM -PGID`) reaches them once, through the parent: the trainer reads a second signal as "stop
  now, without a checkpoint". (A scheduler that signals every process by pid sends two; the trainer takes
  a repeat within 2 s of the first as the same request.)
- A worker dies with its parent, however the parent ends (SIGKILL included, which no handler can relay).
  On Linux the kernel sends the worker SIGTERM when the parent exits (prctl PR_SET_PDEATHSIG): no polling
  and no delay. Elsewhere a thread checks the parent's pid once a second. Either way the worker then
  checkpoints and exits like a signalled one.
- A worker sent SIGINT/SIGTERM itself finishes its job as interrupted (the trainer checkpoints) and exits
  instead of taking the next one; outside a training loop the signal ends it at once. A second signal,
  which makes the trainer stop at once (KeyboardInterrupt), ends the worker with 128 + SIGINT: the job is
  reported as interrupted (resumable from its last checkpoint), not as failed.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from looped.errors import TrainingError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_PENDING = object()  # a busy worker has not answered yet


class Stopped(TrainingError):
    """The runner was sent SIGINT or SIGTERM: its workers checkpointed and exited; run it again to resume."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name}: the runs in progress saved a checkpoint; run again to resume")


class WorkerExit(RuntimeError):
    """A worker process ended before it answered its job (signalled, killed or crashed)."""

    def __init__(self, exitcode: int | None) -> None:
        self.exitcode = exitcode
        super().__init__(f"the worker process ended with exit code {exitcode} before its job finished")

    @property
    def interrupted(self) -> bool:
        """Whether the worker was stopped by SIGINT/SIGTERM (the run resumes from its last checkpoint)."""
        codes = {-s for s in STOP_SIGNALS} | {128 + s for s in STOP_SIGNALS}
        return self.exitcode in codes


# ---------------------------------------------------------------------------------------------- the parent


@dataclass
class _Worker:
    process: BaseProcess
    conn: Connection
    job: int | None = None  # the index of the call it is running


class _Relay:
    """The parent's SIGINT/SIGTERM handler while jobs run: note the signal and forward it to every worker."""

    def __init__(self, workers: list[_Worker]) -> None:
        self.workers = workers
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Relay:
        for sig in STOP_SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread: signals are not ours to handle
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum
        for w in self.workers:
            if w.process.exitcode is None:  # not yet reaped, so the pid is still this worker's
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.process.pid, signum)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def run_jobs(
    fn: Callable[..., Any], calls: Sequence[tuple], parallel: int
) -> Iterator[tuple[int, Any | BaseException]]:
    """Call `fn(*calls[i])` for every i in up to `parallel` spawned worker processes.

    Args:
        fn: a module-level function (workers import it by name).
        calls: the argument tuples, started in order.
        parallel: how many workers run at once.

    Yields:
        (i, what fn returned) as each job finishes, or (i, the exception) for a job that raised, or
        (i, WorkerExit) for one whose worker ended first.

    Raises:
        Stopped: after SIGINT/SIGTERM, once every worker has exited (the jobs they were running are yielded
            first, as whatever they returned when interrupted).
    """
    if parallel < 1:
        raise ValueError(f"parallel must be ≥ 1, got {parallel}")
    ctx = multiprocessing.get_context("spawn")
    todo = deque(enumerate(calls))
    workers: list[_Worker] = []
    with _Relay(workers) as relay:
        try:
            while True:
                _hand_out(ctx, fn, todo, workers, parallel, relay)
                busy = [w for w in workers if w.job is not None]
                if not busy:
                    break
                wait([w.conn for w in busy] + [w.process.sentinel for w in busy])
                for w in busy:
                    answer = _answer(w)
                    if answer is not _PENDING:
                        job, w.job = w.job, None
                        yield job, answer
        finally:
            _shut_down(workers)
        if relay.signum is not None:
            raise Stopped(relay.signum)


def _hand_out(
    ctx, fn: Callable[..., Any], todo: deque, workers: list[_Worker], parallel: int, relay: _Relay
) -> None:
    """Give every idle worker its next job, starting workers up to `parallel` while jobs remain; nothing
    once the relay has caught a signal (checked before each step: the signal may come in between)."""
    for w in [w for w in workers if w.job is None and not w.process.is_alive()]:
        workers.remove(w)  # it left after its last job (it was signalled)
    while todo and len(workers) < parallel and relay.signum is None:
        workers.append(_start(ctx, fn))
    for w in workers:
        if w.job is None and todo and relay.signum is None:
            w.job, args = todo.popleft()
            with contextlib.suppress(OSError):  # it just died: its sentinel reports the job as WorkerExit
                w.conn.send((w.job, args))


def _start(ctx, fn: Callable[..., Any]) -> _Worker:
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_serve, args=(child, os.getpid(), fn))
    process.start()
    child.close()
    return _Worker(process, parent)


def _answer(w: _Worker) -> Any:
    """The busy worker's answer if it has one (a result, its exception, or WorkerExit); _PENDING while it works."""
    try:
        if w.conn.poll():
            _, value, leaving = w.conn.recv()
            if leaving:  # signalled during the job: it exits now rather than take another
                w.process.join()
            return value
    except Exception:  # EOF, a broken pipe or half a message: the worker died, maybe mid-answer
        pass
    if w.process.is_alive():
        return _PENDING
    w.process.join()
    return WorkerExit(w.process.exitcode)


def _shut_down(workers: list[_Worker]) -> None:
    """Let every worker go: idle ones are told to exit, busy ones (the caller gave up on them) are sent
    SIGTERM so their runs checkpoint; then wait for all of them."""
    for w in workers:
        if w.job is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.process.pid, signal.SIGTERM)
        with contextlib.suppress(OSError):
            w.conn.send(None)
    for w in workers:
        w.process.join()
        w.conn.close()
    workers.clear()


# ---------------------------------------------------------------------------------------------- a worker


def _serve(conn: Connection, parent: int, fn: Callable[..., Any]) -> None:
    """A worker's life: answer (index, args) jobs with (index, result or exception, leaving) until told
    to stop (None, or the parent gone), or until a job during which it was sent SIGINT/SIGTERM."""
    os.setpgrp()  # signals to the parent's group reach this worker only through the parent (see above)
    for sig in STOP_SIGNALS:  # outside a training loop (which installs its own handler) a signal ends it
        signal.signal(sig, _exit_on_signal)
    signalled = _signal_log()
    _die_with(parent)
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        index, args = job
        try:
            value = fn(*args)
        except KeyboardInterrupt:  # a second signal stopped the trainer at once: interrupted, not failed
            raise SystemExit(128 + signal.SIGINT) from None
        except Exception as e:  # the job failed; the worker carries on
            value = _picklable(e)
        leaving = signalled()
        conn.send((index, value, leaving))
        if leaving:
            return


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _signal_log() -> Callable[[], bool]:
    """A check for "was this process sent SIGINT/SIGTERM since the last check". The trainer replaces the
    Python handler while it trains, but every handled signal's number is also written to the wakeup fd,
    which nothing else here sets: reading that pipe sees the signals whichever handler took them."""
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write, warn_on_full_buffer=False)

    def signalled() -> bool:
        try:
            return any(b in STOP_SIGNALS for b in os.read(read, 1024))
        except BlockingIOError:
            return False

    return signalled


def _die_with(parent: int) -> None:
    """Be sent SIGTERM when the parent process ends (see the module docstring)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            _watch(parent)
    else:
        _watch(parent)
    if os.getppid() != parent:  # it ended before we asked to be told
        os.kill(os.getpid(), signal.SIGTERM)


def _watch(parent: int) -> None:
    def poll() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=poll, name="looped-parent-watch", daemon=True).start()


def _picklable(e: Exception) -> Exception:
    """`e` if it can travel to the parent, else a RuntimeError with its type and message."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")
