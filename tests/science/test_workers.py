"""Worker processes stop with their parent: a signalled `looped sweep` leaves no worker behind, each run
saved a checkpoint, and the sweep resumes from them; a worker signalled itself stops; failures are reported."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from looped.science.workers import WorkerExit, run_jobs

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads processes from /proc")


def _job(kind: str, x: int, mark: str = "") -> int:
    """A worker function for run_jobs (module level, so spawned workers import it by name)."""
    if kind == "fail":
        raise ValueError(f"bad {x}")
    if kind == "die":
        os._exit(3)
    if kind == "interrupt":  # what the trainer raises on a second signal: stop now, without a checkpoint
        raise KeyboardInterrupt
    if kind == "sleep":  # say which process runs the job, then sleep x seconds
        Path(mark, str(os.getpid())).touch()
        time.sleep(x)
    return x * x


def test_run_jobs_yields_results_failures_and_dead_workers():
    calls = [("ok", 2), ("fail", 1), ("die", 0), ("ok", 5), ("ok", 6)]
    outcomes = dict(run_jobs(_job, calls, parallel=2))
    assert sorted(outcomes) == [0, 1, 2, 3, 4]  # a failed job or a dead worker does not stop the others
    assert outcomes[0] == 4 and outcomes[3] == 25 and outcomes[4] == 36
    assert isinstance(outcomes[1], ValueError) and str(outcomes[1]) == "bad 1"
    assert isinstance(outcomes[2], WorkerExit) and outcomes[2].exitcode == 3 and not outcomes[2].interrupted


def test_a_job_stopped_at_once_is_reported_as_interrupted_not_failed():
    """A KeyboardInterrupt in a job (the trainer's answer to a second signal) ends the worker as interrupted
    (exit 128 + SIGINT), so the run is reported as one to resume; the other jobs go on in new workers."""
    outcomes = dict(run_jobs(_job, [("interrupt", 0), ("ok", 3), ("ok", 4)], parallel=1))
    assert outcomes[1] == 9 and outcomes[2] == 16
    assert isinstance(outcomes[0], WorkerExit), outcomes[0]
    assert outcomes[0].exitcode == 128 + signal.SIGINT and outcomes[0].interrupted


def test_workers_die_with_a_killed_parent(tmp_path):
    """SIGKILL leaves the parent no chance to relay anything: the workers must notice on their own."""
    marks = tmp_path / "marks"
    marks.mkdir()
    script = (
        "from test_workers import _job\nfrom looped.science.workers import run_jobs\n"
        f"list(run_jobs(_job, [('sleep', 120, {str(marks)!r})] * 2, parallel=2))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    parent = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        start = time.monotonic()
        while len(list(marks.iterdir())) < 2:
            assert parent.poll() is None and time.monotonic() - start < 60, (
                "the workers never started their jobs"
            )
            time.sleep(0.05)
        workers = {int(p.name) for p in marks.iterdir()}
        assert workers == _children(parent.pid)
        parent.kill()
        parent.wait()
        start = time.monotonic()
        while any(_alive(pid) for pid in workers):
            assert time.monotonic() - start < 5, f"workers {workers} outlived their killed parent by 5 s"
            time.sleep(0.05)
    finally:
        parent.kill()
        for pid in _children(parent.pid) | {int(p.name) for p in marks.iterdir()}:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------- a real sweep

GRID = """
[sweep]
base = ["debug"]
set = ["data.path={data}", "data.seq_len=32", "model.vocab_size=256", "model.width=32", "train.global_batch=4",
       "train.steps={steps}", "train.checkpoint_every=100000", "train.log_every={log_every}", "eval.every=0",
       "optim.warmup_steps=1"]
out = "{out}"
eval_loops = [1]
eval_windows = 2
parallel = 2

[grid]
"loops.mean_loops" = [1.0, 2.0, 3.0]
"""


def _state(pid: int) -> str | None:
    """The process's state letter from /proc (None when it is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    return _state(pid) not in (None, "Z")  # a zombie has exited; only its exit status is left


def _children(pid: int, workers_only: bool = True) -> set[int]:
    """Live child processes of `pid`: its spawned workers, or with `workers_only` False every child (the
    multiprocessing resource tracker too)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                command = (entry / "cmdline").read_bytes()
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid and _alive(int(entry.name)) and (b"spawn_main" in command or not workers_only):
                out.add(int(entry.name))
    return out


def _wait(condition, seconds: float, what: str, log: Path) -> float:
    """Wait until `condition()` holds; returns the seconds it took, fails after `seconds` with the log."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > seconds:
            pytest.fail(f"{what} not within {seconds} s; sweep output:\n{log.read_text()}")
        time.sleep(0.05)
    return time.monotonic() - start


def _training(run: Path) -> bool:
    """The run is inside its training loop: it has logged a step."""
    metrics = run / "metrics.jsonl"
    return metrics.is_file() and metrics.stat().st_size > 0


def _saved_step(run: Path) -> int:
    """The newest checkpoint's step (0 is the one written before the first step)."""
    steps = [int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*")]
    return max(steps, default=-1)


def test_sigterm_stops_sweep_workers_which_checkpoint_and_the_sweep_resumes(data, tmp_path):
    out = tmp_path / "sweep"
    grid = tmp_path / "grid.toml"
    # Far more steps than the test waits for; a record every step shows when a run is in its training loop.
    grid.write_text(GRID.format(data=data, out=out, steps=10**6, log_every=1))
    runs = [out / f"mean_loops{mu}_seed0" for mu in ("1.0", "2.0", "3.0")]
    log = tmp_path / "sweep.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        parent = subprocess.Popen(
            [sys.executable, "-m", "looped", "sweep", str(grid)], stdout=f, stderr=subprocess.STDOUT, env=env
        )
    first: set[int] = set()
    second: set[int] = set()
    try:
        # Two workers train the first two runs.
        _wait(lambda: _training(runs[0]) and _training(runs[1]), 180, "two runs training", log)
        first = _children(parent.pid)
        assert len(first) == 2, first

        # A worker sent SIGTERM itself checkpoints and exits instead of taking the third run ...
        signalled = min(first)
        os.kill(signalled, signal.SIGTERM)
        _wait(lambda: not _alive(signalled), 10, f"the signalled worker {signalled} exiting", log)
        assert max(_saved_step(runs[0]), _saved_step(runs[1])) > 0  # its run saved a checkpoint at the stop
        _wait(lambda: "interrupted; run again to resume it" in log.read_text(), 5, "the sweep's notice", log)
        # ... which a fresh worker takes, while the other worker trains on.
        _wait(lambda: _training(runs[2]), 180, "the third run training in a fresh worker", log)
        second = _children(parent.pid)
        assert len(second) == 2 and signalled not in second and (first - {signalled}) <= second

        # SIGTERM to the parent (as a batch scheduler sends): every worker checkpoints and exits with it.
        everyone = _children(parent.pid, workers_only=False)
        assert second <= everyone
        os.kill(parent.pid, signal.SIGTERM)
        _wait(lambda: not any(_alive(pid) for pid in second), 10, f"workers {second} exiting", log)
        assert parent.wait(timeout=10) != 0
        _wait(lambda: not any(_alive(pid) for pid in everyone), 5, f"children {everyone} exiting", log)
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid in _children(parent.pid, workers_only=False) | first | second:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert "stopped by SIGTERM" in log.read_text()
    stopped = {run.name: _saved_step(run) for run in runs}
    assert all(step > 0 for step in stopped.values()), stopped  # every run saved where it stopped
    assert not (out / "results.jsonl").exists()

    # Run again with a few steps past where the earliest run stopped: each resumes from its checkpoint and
    # finishes (a run already past them at once), its tokens counted from the start.
    steps = min(stopped.values()) + 3
    grid.write_text(GRID.format(data=data, out=out, steps=steps, log_every=100))
    again = subprocess.run(
        [sys.executable, "-m", "looped", "sweep", str(grid)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    for run in runs:
        resumed = f"resumed from {run / 'checkpoints' / f'step_{stopped[run.name]:07d}'} at step {stopped[run.name]}"
        assert resumed in again.stdout, again.stdout
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["run"] for r in records} == {run.name for run in runs}
    assert all(r["tokens"] == max(steps, stopped[r["run"]]) * 4 * 32 for r in records)
