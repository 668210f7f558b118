"""A real `looped train` process sent SIGTERM or SIGINT checkpoints at the next step boundary, exits cleanly,
and `--resume` continues from that checkpoint."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import losses, train_config, write_corpus

from looped.config import to_toml
from looped.data.prepare import prepare
from looped.train import state as ckpt

PROMPT_S = 30  # from the signal to the exit: one step, one checkpoint and teardown (seconds on a busy CPU)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    prepare(write_corpus(root / "text"), root / "tokens", tokenizer="bytes", val_fraction=0.2, progress=False)
    return root / "tokens"


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "looped", "train", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"looped train did not exit within {timeout} s:\n{out[-2000:]}\n{err[-2000:]}")


def wait_for_steps(proc: subprocess.Popen, run_dir: Path, steps: int, timeout: float = 180) -> None:
    """Until metrics.jsonl holds `steps` training records: the loop (and its signal handlers) is running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"looped train exited early ({proc.returncode}):\n{out[-2000:]}\n{err[-2000:]}")
        file = run_dir / "metrics.jsonl"
        if file.is_file() and len(file.read_text().splitlines()) >= steps:
            return
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"no {steps} training steps logged within {timeout} s")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_checkpoints_stops_and_resume_continues(data, tmp_path, sig):
    run_dir = tmp_path / "run"
    # Far more steps than the test waits for, and no periodic checkpoint after step 0: a checkpoint past
    # step 0 can only come from the signal.
    cfg = train_config(data, run_dir, train={"steps": 100_000, "checkpoint_every": 100_000})
    (tmp_path / "run.toml").write_text(to_toml(cfg))
    proc = start(["--config", str(tmp_path / "run.toml")], tmp_path)
    wait_for_steps(proc, run_dir, 3)
    sent = time.monotonic()
    proc.send_signal(sig)
    out, err = finish(proc, timeout=120)
    waited = time.monotonic() - sent
    assert proc.returncode == 0, err[-3000:]  # not killed by the signal: it stopped the run itself
    assert waited < PROMPT_S, waited
    stopped = re.search(r"stopped at step (\d+) \(checkpoint saved; continue with --resume\)", out)
    assert stopped, out[-2000:]
    step = int(stopped.group(1))
    assert step >= 3
    assert f"stopped: {step} steps" in out  # the CLI's summary of the interrupted run
    newest = ckpt.checkpoints(run_dir)[0]
    assert newest.name == f"step_{step:07d}" and ckpt.verify(newest) is None
    assert json.loads((newest / "trainer.json").read_text())["step"] == step
    assert sorted(losses(run_dir)) == list(range(1, step + 1))  # logged up to the step it stopped at
    assert not (run_dir / "final").exists()

    total = step + 3
    args = ["--config", str(tmp_path / "run.toml"), "--resume", "--set", f"train.steps={total}"]
    proc = start(args, tmp_path)
    out, err = finish(proc, timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert f"resumed from {newest} at step {step}" in out, out[-2000:]
    assert f"done: {total} steps" in out
    assert sorted(losses(run_dir)) == list(range(1, total + 1))  # each step once: none lost, none repeated
    assert (run_dir / "final" / "model.safetensors").is_file()
