"""`looped generate`, `looped chat` and `looped calibrate` end to end on a trained checkpoint, and their errors."""

from __future__ import annotations

import io
import json
import shutil
import tomllib
from pathlib import Path

import pytest
import torch

from looped.cli import main
from looped.config import Config, from_dict, to_toml
from looped.infer.budget import Profile
from looped.infer.engine import Engine, resolve_device, resolve_dtype
from looped.infer.session import chat


def one_line_error(capsys, argv: list[str], match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err, err
    assert "Traceback" not in err and err.count("\n") == 1, err


def test_generate_json_gives_text_tokens_loops_and_timings(trained, capsys):
    args = ["generate", str(trained), "--prompt", "the king", "--loops", "2,6", "--max-new-tokens", "10"]
    assert main([*args, "--json", "--temperature", "0"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["loops"] for r in records] == [2, 6]
    for r in records:
        assert isinstance(r["text"], str) and r["tokens"] == len(r["token_ids"]) <= 10
        assert r["loops_per_token"] == [r["loops"]] * len(r["loops_per_token"])
        assert (
            r["prefill_ms"] > 0 and r["decode_ms"] > 0 and r["tokens_per_s"] > 0 and r["flops_per_token"] > 0
        )
    assert main([*args, "--exit", "kl:1e-2", "--kv-cache", "per-loop", "--json"]) == 0
    exits = json.loads(capsys.readouterr().out)
    assert all(1 <= t <= 6 for t in exits[1]["loops_per_token"]) and exits[1]["exit"] == "kl:1e-2"
    assert main([*args, "--exit", "kl:1e-2"]) == 0
    out = capsys.readouterr().out
    assert "exit kl:1e-2" in out and "loops per token: " in out and "the king" in out


def test_generate_with_a_flop_budget(trained, capsys):
    from looped.infer.engine import Engine

    model = Engine.from_checkpoint(trained).model
    budget = model.flops_per_token(3, 20) * 1.001
    argv = ["generate", str(trained), "--prompt", "a dog", "--max-new-tokens", "8", "--json"]
    assert main([*argv, "--max-flops-per-token", str(budget)]) == 0
    (record,) = json.loads(capsys.readouterr().out)
    assert set(record["loops_per_token"]) == {3}


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--prompt", ""], "the prompt is empty"),
        (["--prompt", "x" * 80], "the model's context is 64 tokens"),
        (["--prompt", "x", "--loops", "65"], "loops must lie in [1, 64]"),
        (["--prompt", "x", "--exit", "halt:1"], "unknown exit criterion 'halt'"),
        (["--prompt", "x", "--loops", "2", "--max-ms-per-token", "5"], "give one of"),
    ],
)
def test_generate_bad_input_is_one_line(trained, capsys, extra, match):
    one_line_error(capsys, ["generate", str(trained), *extra], match)


def test_loops_zero_is_refused_by_the_parser(trained, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", str(trained), "--prompt", "x", "--loops", "0"])
    assert e.value.code == 2 and "≥ 1" in capsys.readouterr().err


def test_generate_refuses_a_checkpoint_with_another_tokenizer(trained, tmp_path, capsys):
    from looped.data.tokenizer import Tokenizer

    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained, ckpt)
    Tokenizer.train_bpe(["the cat sees the moon"] * 50, vocab_size=300).save(ckpt / "tokenizer.json")
    one_line_error(capsys, ["generate", str(ckpt), "--prompt", "x"], "belongs to another model")


def test_calibrate_writes_a_profile_the_engine_uses(trained, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained, ckpt)
    assert main(["calibrate", str(ckpt), "--loops", "1,4", "--tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "ms per step" in out and (ckpt / "calibration.json").is_file()
    profile = json.loads((ckpt / "calibration.json").read_text())
    assert set(profile["measured"]["1"]) == {"1", "4"} and profile["machine"]["cpus"] >= 1
    argv = [
        "generate",
        str(ckpt),
        "--prompt",
        "a",
        "--max-new-tokens",
        "4",
        "--max-ms-per-token",
        "1e6",
        "--json",
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "measuring one now" not in captured.err  # the stored profile was used
    assert json.loads(captured.out)[0]["loops_per_token"][-1] == 64  # a generous target allows the cap
    assert (profile["device"], profile["dtype"]) == ("cpu", "float32")
    assert main([*argv, "--dtype", "bfloat16"]) == 0  # measured in float32: says nothing of bfloat16
    err = capsys.readouterr().err
    assert "calibration profile ignored: measured on cpu in float32, not on cpu in bfloat16" in err
    assert "measuring one now" in err


def test_chat_streams_replies_and_takes_commands(trained):
    lines = iter(["the cat", "/loops 2", "/exit kl:1e-2", "a dog", "/quit"])
    out = io.StringIO()
    chat(trained, max_new_tokens=12, temperature=0, read=lambda prompt: next(lines), out=out)
    text = out.getvalue()
    assert text.count("tokens/s") == 2 and "loops=2" in text and "exit=kl:1e-2" in text
    assert "mean loops 4.00" in text  # the first reply at the model's default of 4 loops


# ---------------------------------------------------------------- device and dtype


def with_infer(trained, tmp_path, **infer) -> Path:
    """A copy of the trained checkpoint whose config.toml sets these [infer] values."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained, ckpt)
    tree = tomllib.loads((ckpt / "config.toml").read_text())
    tree["infer"].update(infer)
    (ckpt / "config.toml").write_text(to_toml(from_dict(tree)))
    return ckpt


def test_engine_device_and_dtype_default_to_infer_config(trained, tmp_path):
    ckpt = with_infer(trained, tmp_path, dtype="bfloat16", device="cpu")
    engine = Engine.from_checkpoint(ckpt)
    assert next(engine.model.parameters()).dtype == torch.bfloat16 and engine.device.type == "cpu"
    assert engine.cache.dtype == torch.bfloat16  # the KV cache follows the weights
    engine = Engine.from_checkpoint(ckpt, dtype="float32")  # an argument wins over [infer]
    assert next(engine.model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("fastest", [torch.bfloat16, torch.float32])
def test_auto_dtype_is_what_the_device_computes_fastest(trained, tmp_path, monkeypatch, fastest):
    import looped.precision as precision

    asked = []
    monkeypatch.setattr(precision, "fastest_dtype", lambda device: asked.append(device) or fastest)
    engine = Engine.from_checkpoint(with_infer(trained, tmp_path, dtype="auto", device="cpu"))
    assert next(engine.model.parameters()).dtype == fastest and asked == [torch.device("cpu")]


def test_auto_device_is_cuda_when_available(monkeypatch):
    """ "auto" follows what torch reports, both ways (checked here whether or not this machine has a GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")
    assert Config().infer.device == "auto" and Config().infer.dtype == "float32"
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float8")


def spy(monkeypatch, target: str, returns=None) -> list[dict]:
    """Replace the library function `target` ("module.name") by one that records its keyword arguments and
    returns `returns`; it keeps the real signature, which the CLI inspects (`_placement`)."""
    import functools
    import importlib

    module, name = target.rsplit(".", 1)
    real = getattr(importlib.import_module(module), name)
    calls: list[dict] = []

    @functools.wraps(real)
    def fake(*args, **kwargs):
        calls.append(kwargs)
        return returns

    monkeypatch.setattr(target, fake)
    return calls


PLACED = ["--device", "cuda", "--dtype", "bfloat16"]  # neither is a default, and a spy needs no GPU


@pytest.mark.parametrize(
    ("argv", "target", "returns"),
    [
        (["generate", "CKPT", "--prompt", "x"], "looped.infer.session.generate_records", []),
        (["chat", "CKPT"], "looped.infer.session.chat", None),
        (
            ["calibrate", "CKPT", "--loops", "1,2"],
            "looped.infer.session.calibrate_checkpoint",
            (Profile(fit={1: (0.0, 1.0)}), Path("CKPT/calibration.json")),
        ),
        (["serve", "CKPT"], "looped.serve.app.serve", None),
        (["eval", "CKPT", "--json"], "looped.tasks.train.evaluate_task_checkpoint", {"task": "x"}),
        (["export", "hf", "CKPT", "OUT"], "looped.interop.hf.export_hf", Path("OUT")),
    ],
    ids=["generate", "chat", "calibrate", "serve", "eval-task", "export"],
)
def test_device_and_dtype_reach_the_library(monkeypatch, capsys, argv, target, returns):
    """Each command hands --device and --dtype to the library function it calls, by keyword."""
    calls = spy(monkeypatch, target, returns)
    assert main([*argv, *PLACED]) == 0, capsys.readouterr().err
    assert len(calls) == 1 and (calls[0]["device"], calls[0]["dtype"]) == ("cuda", "bfloat16")
    assert (
        main(argv) == 0
    )  # not given: None or left out, so the library takes [infer]'s (or its own) defaults
    assert (calls[1].get("device"), calls[1].get("dtype")) == (None, None)


def test_device_and_dtype_reach_evaluate_checkpoint(monkeypatch, capsys):
    """`looped eval` on a language model (not a task checkpoint) passes them to evaluate_checkpoint."""
    spy(monkeypatch, "looped.tasks.train.evaluate_task_checkpoint", None)
    calls = spy(monkeypatch, "looped.science.evaluate.evaluate_checkpoint", {"rows": []})
    assert main(["eval", "CKPT", "--json", *PLACED]) == 0, capsys.readouterr().err
    assert len(calls) == 1 and (calls[0]["device"], calls[0]["dtype"]) == ("cuda", "bfloat16")


def test_generate_in_bfloat16_on_the_cpu(trained, capsys):
    argv = ["generate", str(trained), "--prompt", "the king", "--loops", "2", "--max-new-tokens", "6"]
    assert main([*argv, "--device", "cpu", "--dtype", "bfloat16", "--temperature", "0", "--json"]) == 0
    (record,) = json.loads(capsys.readouterr().out)
    assert (record["device"], record["dtype"]) == ("cpu", "bfloat16")
    assert record["tokens"] >= 1 and set(record["loops_per_token"]) == {2}
    assert main([*argv, "--device", "cpu", "--json"]) == 0
    (record,) = json.loads(capsys.readouterr().out)
    assert (record["device"], record["dtype"]) == ("cpu", "float32")  # the checkpoint's [infer] dtype


def help_text(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare words


def test_export_help_says_its_own_device_and_dtype_defaults(capsys):
    """export converts on the CPU in float32 (interop.hf.export_hf), not at the [infer] device and dtype."""
    text = help_text(capsys, ["export", "hf"])
    assert "while exporting (default: cpu)" in text and "exported weights (default: float32)" in text
    assert "[infer]" not in text
    assert "(default [infer] device: auto, CUDA when available)" in help_text(capsys, ["generate"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["calibrate", "--loops", "1"]])
def test_cuda_without_cuda_is_one_line(trained, capsys, command):
    name, *rest = command
    one_line_error(capsys, [name, str(trained), *rest, "--device", "cuda"], "CUDA is not available")


@pytest.fixture
def full_float32_matmuls():
    """CUDA matmuls in full float32, as on the CPU, put back as they were afterwards. (monkeypatch.setattr
    cannot undo this one: torch serves the flag through a module __getattr__, which pytest takes for an
    instance attribute and deletes on undo.)"""
    matmul = torch.backends.cuda.matmul
    was = matmul.allow_tf32
    matmul.allow_tf32 = False
    yield
    matmul.allow_tf32 = was


@pytest.mark.gpu
def test_engine_generates_the_same_on_cuda_and_cpu(trained, full_float32_matmuls):
    """Greedy decoding, fixed loops and adaptive exit, in float32: the same tokens and loops on either device."""
    kwargs = {"max_new_tokens": 24, "temperature": 0}
    runs = {}
    for device in ("cpu", "cuda"):
        engine = Engine.from_checkpoint(trained, device=device, dtype="float32")
        assert engine.device.type == device
        runs[device] = [
            engine.generate(["the king", "a dog sees"], loops=[2, 6], **kwargs),
            engine.generate("the king", loops=8, exit="kl:1e-2", **kwargs),
        ]
    (cpu_fixed, cpu_exit), (gpu_fixed, gpu_exit) = runs["cpu"], runs["cuda"]
    assert [g.token_ids for g in gpu_fixed] == [g.token_ids for g in cpu_fixed]
    assert gpu_fixed[0].loops == cpu_fixed[0].loops and set(gpu_fixed[1].loops) == {6}
    assert gpu_exit.token_ids == cpu_exit.token_ids and gpu_exit.loops == cpu_exit.loops


def test_generate_speculative_gives_the_plain_greedy_tokens(trained, capsys):
    args = ["generate", str(trained), "--prompt", "the king", "--loops", "2,6", "--max-new-tokens", "12"]
    args += ["--kv-cache", "per-loop"]
    assert main([*args, "--json", "--temperature", "0"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*args, "--json", "--speculative", "1:3", "--temperature", "0"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert [r["token_ids"] for r in spec] == [r["token_ids"] for r in plain]
    assert all(r["speculative"] == [1, 3] and 0 <= r["accepted"] <= r["drafted"] for r in spec)
    assert main([*args, "--speculative", "1:3", "--temperature", "0"]) == 0
    assert "drafts at 1 loops, 3 ahead" in capsys.readouterr().out
    one_line_error(capsys, [*args, "--speculative", "1:3", "--exit", "kl:1e-3"], "adaptive exit")
    assert (
        main([*args, "--json", "--speculative", "1:3", "--temperature", "0.7", "--top-k", "5", "--seed", "3"])
        == 0
    )
    sampled = json.loads(capsys.readouterr().out)
    assert 1 <= len(sampled[0]["token_ids"]) <= 12 and sampled[0]["drafted"] > 0
    one_line_error(capsys, [*args, "--speculative", "three"], "DRAFT_LOOPS:LOOKAHEAD")
    one_line_error(capsys, [*args[:5], "1", *args[6:], "--speculative", "1:3"], "draft loops must be fewer")
