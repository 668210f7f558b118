"""torchrun with 2 gloo processes (DDP and FSDP2) gives the losses of 1 process with the same global batch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from helpers import losses, train_config, write_corpus

from looped.config import to_toml
from looped.data.prepare import prepare
from looped.train.trainer import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    prepare(write_corpus(root / "text"), root / "tokens", tokenizer="bytes", val_fraction=0.2, progress=False)
    return root / "tokens"


def torchrun(config_file, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "looped", "train", "--config", str(config_file)]
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the workers too, not only the launcher
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish in 300 s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(data, tmp_path, parallel):
    sections = dict(train={"steps": 6, "global_batch": 4, "micro_batch": 2, "checkpoint_every": 3})
    if parallel == "fsdp":  # Muon (the default) needs whole matrices; FSDP2 shards them
        sections["optim"] = {"optimizer": "adamw"}
    single = train(train_config(data, tmp_path / "single", **sections))
    cfg = train_config(data, tmp_path / "dist", **sections, **{"eval": {"every": 3, "loops": [1, 2]}})
    cfg.train.parallel = parallel
    cfg.train.threads = 1
    file = tmp_path / "dist.toml"
    file.write_text(to_toml(cfg))
    proc = torchrun(file, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = losses(tmp_path / "single"), losses(tmp_path / "dist")
    assert sorted(two) == list(range(1, 7))
    for step in one:
        assert abs(one[step] - two[step]) < 1e-5, (parallel, step, one[step], two[step])
    assert "world 2" in proc.stdout + proc.stderr
    assert (tmp_path / "dist" / "final" / "model.safetensors").is_file()
    assert "done: 6 steps" in proc.stdout
    assert single.steps == 6
