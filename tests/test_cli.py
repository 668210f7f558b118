"""The `looped` command line, run in-process through `looped.cli.main` (plus one real console-script run)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import fixture_dir

import looped
from looped.cli import INFO_LOOPS, main
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
