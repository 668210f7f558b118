"""The `looped` command line, run in-process through `looped.cli.main` (plus one real console-script run)."""

from __future__ import annotations

import argparse
import inspect
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import fixture_dir

import looped
from looped.cli import INFO_LOOPS, _placement, build_parser, main
from looped.config import load_config
from looped.model import LoopedLM, param_counts


def parcae_tiny() -> Path:
    """The Parcae fixture beside the repository (skips, or fails under LOOPED_REQUIRE_FIXTURES=1, when absent)."""
    return fixture_dir("parcae-tiny")


def run(capsys, *argv):
    """main(argv) → (exit code, stdout, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def table_loops(out):
    """The loop counts of the rows under the FLOPs (or probe) table header."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["loops"])
    rows = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        rows.append(int(line.split()[0]))
    return rows


# ---------------------------------------------------------------- help


def test_console_script_help():
    script = Path(sys.executable).parent / "looped"
    assert script.is_file(), f"console script not installed at {script}"
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for command in ("info", "probe", "convert"):
        assert command in proc.stdout


def test_help_in_process(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("info", "probe", "convert"):
        assert command in out


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


# ---------------------------------------------------------------- info


def test_info_debug_total_and_default_loops(capsys):
    code, out, err = run(capsys, "info", "--preset", "debug")
    assert code == 0 and err == ""
    total = param_counts(load_config(["debug"]).model)["total"]
    assert re.search(rf"^\s*total\s+{total:,}$", out, re.MULTILINE)
    assert table_loops(out) == [1, 2, 4, 8, 16, 32] == list(INFO_LOOPS)


def test_info_json(capsys):
    code, out, _ = run(capsys, "info", "--preset", "debug", "--json", "--seq-len", "64")
    assert code == 0
    data = json.loads(out)
    assert {"params", "loops", "seq_len"} <= set(data)
    assert data["params"] == param_counts(load_config(["debug"]).model)
    assert data["seq_len"] == 64
    assert [row["loops"] for row in data["loops"]] == list(INFO_LOOPS)
    assert data["config"]["width"] == 64


def test_info_json_default_seq_len_and_custom_loops(capsys):
    code, out, _ = run(capsys, "info", "--preset", "debug", "--json", "--loops", "3,5")
    assert code == 0
    data = json.loads(out)
    assert data["seq_len"] == 128  # debug's max_seq_len
    assert [row["loops"] for row in data["loops"]] == [3, 5]


def test_info_parcae_140m(capsys):
    code, out, _ = run(capsys, "info", "--preset", "parcae-140m")
    assert code == 0
    assert "144,323,136" in out


def test_info_set_applies(capsys):
    code, out, _ = run(capsys, "info", "--preset", "debug", "--set", "model.width=128", "--json")
    assert code == 0
    assert json.loads(out)["params"] == param_counts(load_config(["debug"], ["model.width=128"]).model)


def test_info_standard_transformer_has_one_row(capsys):
    code, out, _ = run(capsys, "info", "--preset", "debug", "--set", "model.core_layers=0")
    assert code == 0
    assert "standard transformer" in out
    assert table_loops(out) == [1]


def test_info_unknown_set_key(capsys):
    code, out, err = run(capsys, "info", "--preset", "debug", "--set", "model.widht=64")
    assert code == 2
    assert out == ""
    assert "model.widht" in err and "'width'" in err
    assert "Traceback" not in err


def test_info_unknown_preset(capsys):
    code, _, err = run(capsys, "info", "--preset", "parcae-140")
    assert code == 2
    assert "parcae-140m" in err and "Traceback" not in err


# ---------------------------------------------------------------- probe


def test_probe_rows(capsys):
    code, out, err = run(
        capsys, "probe", "--preset", "debug", "--loops", "1,2", "--batch", "1", "--seq-len", "8"
    )
    assert code == 0, err
    assert "batch 1 × 8" in out
    assert table_loops(out) == [1, 2]
    assert "ρ(Ā)" in out


@pytest.mark.parametrize("loops", ["0", "a", "1,-2", ""])
@pytest.mark.parametrize("command", ["probe", "info"])
def test_bad_loops_rejected_by_argparse(capsys, command, loops):
    with pytest.raises(SystemExit) as exc:
        main([command, "--preset", "debug", "--loops", loops])
    assert exc.value.code == 2
    assert "--loops" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--batch", "--seq-len"])
def test_probe_sizes_below_one_are_rejected(flag):
    with pytest.raises(SystemExit) as exc:
        main(["probe", "--preset", "debug", "--loops", "1", flag, "0"])
    assert exc.value.code == 2


def test_presets_and_files_apply_in_command_line_order(capsys, tmp_path):
    wide = tmp_path / "wide.toml"
    wide.write_text("[model]\nwidth = 96\n")
    _, out, _ = run(capsys, "info", "--config", str(wide), "--preset", "debug", "--json")
    assert json.loads(out)["config"]["width"] == 64  # the preset came last
    _, out, _ = run(capsys, "info", "--preset", "debug", "--config", str(wide), "--json")
    assert json.loads(out)["config"]["width"] == 96


# ---------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = load_config(["debug"]).model
    return looped.save(LoopedLM(cfg), tmp_path_factory.mktemp("ckpt") / "ck"), cfg


def test_info_checkpoint(capsys, checkpoint):
    path, cfg = checkpoint
    code, out, err = run(capsys, "info", str(path))
    assert code == 0, err
    assert f"{param_counts(cfg)['total']:,}" in out
    code, out, _ = run(capsys, "info", str(path), "--json")
    assert json.loads(out)["config"] == cfg.to_dict()


def test_probe_checkpoint(capsys, checkpoint):
    path, _ = checkpoint
    code, out, err = run(capsys, "probe", str(path), "--loops", "2", "--batch", "1", "--seq-len", "4")
    assert code == 0, err
    assert table_loops(out) == [2]


@pytest.mark.parametrize("extra", [["--preset", "debug"], ["--set", "model.loops=2"]])
@pytest.mark.parametrize("command", ["info", "probe"])
def test_checkpoint_and_config_is_an_error(capsys, checkpoint, command, extra):
    path, _ = checkpoint
    code, out, err = run(capsys, command, str(path), *extra, "--loops", "1", "--seq-len", "4")
    assert code == 2
    assert out == ""
    assert "not both" in err and "Traceback" not in err


def test_info_missing_checkpoint(capsys, tmp_path):
    code, _, err = run(capsys, "info", str(tmp_path / "nope"))
    assert code == 2
    assert "config.toml" in err


# ---------------------------------------------------------------- convert parcae


def test_convert_without_config_json(capsys, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    code, out, err = run(capsys, "convert", "parcae", str(src), str(tmp_path / "out"))
    assert code == 2 and out == ""
    assert "config.json" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "config_json, expected",
    [("{not json", ["config.json", "not valid JSON"]), ("{}", ["no weights found", "model.safetensors"])],
)
def test_convert_bad_source_directory(capsys, tmp_path, config_json, expected):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(config_json)
    code, _, err = run(capsys, "convert", "parcae", str(src), str(tmp_path / "out"))
    assert code == 2
    assert all(text in err for text in expected)


def parcae_copy(tmp_path, **changes):
    """A copy of the parcae-tiny fixture with config.json keys changed (None deletes the key)."""
    src = tmp_path / "parcae"
    shutil.copytree(parcae_tiny(), src)
    pc = json.loads((src / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            pc.pop(key, None)
        else:
            pc[key] = value
    (src / "config.json").write_text(json.dumps(pc))
    return src


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("injection_type", "linear"),
        ("block_class_name", "SandwichBlock"),
        ("bias", True),
        ("qk_bias", True),
        ("nonlin_name", "GELU"),
        ("norm_class_name", "LayerNorm"),
        ("clip_qkv", 8.0),
        ("recurrent_embedding_dimension", 128),
        ("state_init", "embed"),
        ("rope_settings", {"use_rope": False}),
    ],
)
def test_convert_unsupported_config_value(capsys, tmp_path, key, value):
    src = parcae_copy(tmp_path, **{key: value})
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, "convert", "parcae", str(src), str(out_dir))
    assert code == 2 and out == ""
    assert f"config.json: {key}" in err and "Traceback" not in err
    assert not out_dir.exists()


def test_convert_missing_required_key(capsys, tmp_path):
    src = parcae_copy(tmp_path, n_layers_in_coda=None)
    code, _, err = run(capsys, "convert", "parcae", str(src), str(tmp_path / "out"))
    assert code == 2
    assert "missing key 'n_layers_in_coda'" in err


def test_convert_config_that_looped_rejects(capsys, tmp_path):
    src = parcae_copy(tmp_path, num_attention_heads=3)
    code, _, err = run(capsys, "convert", "parcae", str(src), str(tmp_path / "out"))
    assert code == 2
    assert "config.json" in err and "n_heads" in err


def test_convert_then_info(capsys, tmp_path):
    out_dir = tmp_path / "converted"
    code, out, err = run(capsys, "convert", "parcae", str(parcae_tiny()), str(out_dir))
    assert code == 0, err
    assert str(out_dir) in out
    assert (out_dir / "config.toml").is_file() and (out_dir / "model.safetensors").is_file()
    model = looped.load(out_dir)
    assert (model.cfg.prelude_layers, model.cfg.core_layers, model.cfg.coda_layers) == (1, 2, 1)
    code, out, _ = run(capsys, "info", str(out_dir), "--json")
    assert code == 0
    assert json.loads(out)["params"] == param_counts(model.cfg)


def test_convert_config_json_not_an_object(capsys, tmp_path):
    src = parcae_copy(tmp_path)
    (src / "config.json").write_text("5")
    code, _, err = run(capsys, "convert", "parcae", str(src), str(tmp_path / "out"))
    assert code == 2
    assert "config.json" in err


def test_info_reports_matched_baselines(capsys):
    code, out, _ = run(capsys, "info", "--preset", "parcae-140m", "--json")
    assert code == 0
    baselines = json.loads(out)["baselines"]
    # prelude + core + coda: the injection and C weigh less than one block
    assert baselines["params"]["layers"] == 6
    assert baselines["flops"]["layers"] == 2 + 2 * 8 + 2
    _, text, _ = run(capsys, "info", "--preset", "parcae-140m")
    assert "parameter-matched: 6 layers" in text


# ---------------------------------------------------------------- structure and start-up cost


def _subcommands(parser: argparse.ArgumentParser, path=()):
    """(command path, parser) of every leaf subcommand, e.g. (("data", "prepare"), parser)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, child in subs[0].choices.items():
        yield from _subcommands(child, (*path, name))


def test_every_subcommand_has_a_handler():
    leaves = list(_subcommands(build_parser()))
    assert len(leaves) >= 18
    for path, parser in leaves:
        assert callable(parser.get_default("run")), f"looped {' '.join(path)} sets no handler"


def test_help_imports_no_torch():
    """`looped --help` and every subcommand's --help parse without importing torch (or numpy): the CLI imports
    what a command runs inside its handler, and `import looped` is lazy."""
    script = """
import contextlib, io, sys
from looped.cli import build_parser, main
commands = [[]] + [[*path] for path, _ in SUBCOMMANDS(build_parser())]
for command in commands:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main([*command, "--help"])
print(len(commands), sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "numpy")))
"""
    source = inspect.getsource(_subcommands).replace("_subcommands", "SUBCOMMANDS")
    code = "import argparse\n" + source + script
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    count, heavy = proc.stdout.split(" ", 1)
    assert int(count) >= 19 and heavy.strip() == "[]", proc.stdout


def test_import_looped_is_lazy_and_keeps_the_public_api():
    code = (
        "import sys, looped\n"
        "assert 'torch' not in sys.modules\n"
        "from looped import LoopedLM, Engine, load, save, baseline, Config, ConfigError, load_config\n"
        "assert 'torch' in sys.modules\n"
        "assert all(getattr(looped, n) is not None for n in looped.__all__)\n"
        "from looped.config import ConfigError as C\n"
        "assert ConfigError is C\n"
        "try:\n    looped.nope\nexcept AttributeError as e:\n    print(e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no attribute 'nope'" in proc.stdout


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("looped.config", "ConfigError"),
        ("looped.checkpoint", "CheckpointError"),
        ("looped.data", "DataError"),
        ("looped.data.errors", "DataError"),
        ("looped.interop.parcae", "ConversionError"),
        ("looped.science.fits", "FitError"),
        ("looped.train.trainer", "TrainingError"),
    ],
)
def test_each_error_type_is_defined_once_in_looped_errors(module, name):
    """The CLI catches the classes of looped.errors; a module that defined its own would escape as a
    traceback."""
    import importlib

    import looped.errors

    assert getattr(importlib.import_module(module), name) is getattr(looped.errors, name)
    assert getattr(looped.errors, name) in looped.errors.USER_ERRORS


def test_a_user_error_is_one_line_and_status_2(capsys, monkeypatch):
    from looped.errors import TrainingError

    def fail(args):
        raise TrainingError("the loss kept diverging")

    parser = build_parser()
    monkeypatch.setattr("looped.cli.build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["report"].set_defaults(run=fail)
    code, out, err = run(capsys, "report", "somewhere")
    assert code == 2 and out == ""
    assert err == "looped report: error: the loss kept diverging\n"


# ---------------------------------------------------------------- flags that would be ignored


@pytest.mark.parametrize(("extra", "flag"), [(["--size", "16"], "--size"), (["--baseline"], "--baseline")])
def test_train_task_flags_without_a_task_are_refused(capsys, tmp_path, extra, flag):
    code, out, err = run(capsys, "train", "--preset", "debug", "--set", f"train.out={tmp_path}", *extra)
    assert code == 2 and out == ""
    assert f"{flag} applies to task training only" in err and "--task" in err
    assert not any(tmp_path.iterdir())  # nothing was trained


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ([], [("train_task", None, False)]),
        (["--resume"], [("train_task", None, True)]),
        (["--size", "8,16", "--resume"], [("train_curriculum", [(8, 8), (16, 16)], True)]),
    ],
)
def test_train_task_resume_is_passed_on(capsys, monkeypatch, tmp_path, extra, expected):
    """--task [--size …] --resume reaches the task trainer (tests/tasks checks that it resumes)."""
    import looped.tasks.train as task_train

    calls = []

    def fake(name):
        def trainer(cfg, task, size, say=print, resume=False):
            calls.append((name, size, resume))
            return None, []

        return trainer

    monkeypatch.setattr(task_train, "train_task", fake("train_task"))
    monkeypatch.setattr(task_train, "train_curriculum", fake("train_curriculum"))
    monkeypatch.setattr(task_train, "after_training", lambda *args: "accuracy table")
    argv = ["train", "--preset", "debug", "--task", "parity", "--set", f"train.out={tmp_path}", *extra]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert calls == expected and "accuracy table" in out


def test_train_task_stopped_by_a_signal_exits_cleanly(capsys, monkeypatch, tmp_path):
    """A task run stopped by SIGINT/SIGTERM (after its checkpoint) exits 0 with the resume hint, as
    `looped train` does for a language model; tests/tasks checks the checkpoint itself."""
    import looped.tasks.train as task_train
    from looped.train.state import TrainingStopped

    def stopped(cfg, task, size, say=print, resume=False):
        raise TrainingStopped(f"stopped at step 6; the checkpoint in {tmp_path} continues with --resume")

    monkeypatch.setattr(task_train, "train_task", stopped)
    code, out, err = run(
        capsys, "train", "--preset", "debug", "--task", "parity", "--set", f"train.out={tmp_path}"
    )
    assert code == 0 and err == ""
    assert "stopped at step 6" in out and "--resume" in out


@pytest.mark.parametrize(
    ("extra", "flag"),
    [(["--sizes", "8"], "--sizes"), (["--baseline", "x"], "--baseline"), (["--problems", "8"], "--problems")],
)
def test_eval_task_flags_on_a_language_model_are_refused(capsys, checkpoint, extra, flag):
    path, _ = checkpoint
    code, out, err = run(capsys, "eval", str(path), "--loops", "1", *extra)
    assert code == 2 and out == ""
    assert f"{flag} applies to task checkpoints" in err


def test_device_or_dtype_a_function_cannot_take_is_refused():
    args = argparse.Namespace(command="export", device="cuda", dtype=None)

    def takes_device(checkpoint, device=None):
        pass

    def takes_neither(checkpoint):
        pass

    assert _placement(takes_device, args) == {"device": "cuda"}
    assert _placement(takes_neither, argparse.Namespace(command="x", device=None, dtype=None)) == {}
    with pytest.raises(ValueError, match="--device is not supported by looped export"):
        _placement(takes_neither, args)


@pytest.mark.parametrize(
    "command",
    [
        ["generate", "ck", "--prompt", "x"],
        ["chat", "ck"],
        ["eval", "ck"],
        ["calibrate", "ck"],
        ["serve", "ck"],
        ["export", "hf", "ck", "out"],
    ],
)
def test_device_and_dtype_flags(command):
    args = build_parser().parse_args([*command, "--device", "cuda", "--dtype", "bfloat16"])
    assert (args.device, args.dtype) == ("cuda", "bfloat16")
    args = build_parser().parse_args(command)
    assert (args.device, args.dtype) == (None, None)  # None: the checkpoint's [infer] device and dtype
    with pytest.raises(SystemExit):
        build_parser().parse_args([*command, "--device", "tpu"])


# ---------------------------------------------------------------- serve --hash-key


def test_hash_key_reads_stdin(capsys, monkeypatch):
    from looped.serve.auth import hash_key

    monkeypatch.setattr(sys, "stdin", io.StringIO("sk-secret\n"))
    code, out, err = run(capsys, "serve", "--hash-key")
    assert code == 0, err
    assert out == hash_key("sk-secret") + "\n"  # the newline that ends the line is not part of the key


def test_hash_key_prompts_without_echo_on_a_terminal(capsys, monkeypatch):
    from looped.serve.auth import hash_key

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    prompts = []
    monkeypatch.setattr(sys, "stdin", Terminal())
    monkeypatch.setattr("getpass.getpass", lambda prompt: prompts.append(prompt) or "sk-typed")
    code, out, _ = run(capsys, "serve", "--hash-key")
    assert code == 0 and out.strip() == hash_key("sk-typed") and len(prompts) == 1


@pytest.mark.parametrize(
    ("argv", "stdin", "match"), [(["sk-x"], "", "not from the command line"), ([], "\n", "no key")]
)
def test_hash_key_refuses_a_key_in_argv_or_no_key(capsys, monkeypatch, argv, stdin, match):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code, out, err = run(capsys, "serve", "--hash-key", *argv)
    assert code == 2 and out == ""
    assert match in err and "sk-x" not in err
