"""Parcae checkpoint import: logits match Parcae's own forward at every loop count; bad inputs name the key."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import fixture_dir
from safetensors.torch import load_file, save_file

import looped
from looped.cli import main
from looped.interop.parcae import ConversionError, convert_parcae, load_parcae

LOOPS = (1, 2, 4, 8, 16)


@pytest.fixture(scope="module")
def parcae_tiny():
    return fixture_dir("parcae-tiny")


@pytest.fixture(scope="module")
def reference(parcae_tiny):
    return load_file(str(parcae_tiny / "reference.safetensors"))


def copy_of(src, tmp_path):
    dst = tmp_path / "parcae"
    shutil.copytree(src, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    return dst


def test_converted_checkpoint_matches_reference_logits(parcae_tiny, reference, tmp_path):
    out = convert_parcae(parcae_tiny, tmp_path / "native")
    assert sorted(p.name for p in out.iterdir()) == ["config.toml", "model.safetensors", "run.json"]
    model = looped.load(out)
    assert not model.training and model.cfg.state_init == "zero"
    with torch.no_grad():
        for T in LOOPS:
            logits = model(reference["input_ids"], loops=T).logits
            err = (logits - reference[f"logits_T{T}"]).abs().max().item()
            assert err < 1e-4, f"T={T}: max abs error {err:.2e}"


def test_value_embedding_layers_follow_the_keys_present(parcae_tiny):
    model = load_parcae(parcae_tiny)
    # value_embeds.1/.3 exist and core_block.0 (layer 1) and coda.0 (layer 3) carry gates.
    assert model.cfg.ve_layers == [1, 3]
    assert model.core[0].attn.ve_gate is not None and model.core[1].attn.ve_gate is None


def test_torch_file_loads_with_weights_only(parcae_tiny, reference, tmp_path):
    src = copy_of(parcae_tiny, tmp_path)
    sd = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in sd.items()}}, src / "model.pt")
    model = load_parcae(src)
    with torch.no_grad():
        torch.testing.assert_close(
            model(reference["input_ids"], loops=4).logits, reference["logits_T4"], atol=1e-4, rtol=0
        )


def test_cli_convert_then_load(parcae_tiny, reference, tmp_path, capsys):
    assert main(["convert", "parcae", str(parcae_tiny), str(tmp_path / "out")]) == 0
    assert "wrote" in capsys.readouterr().out
    model = looped.load(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(
            model(reference["input_ids"], loops=8).logits, reference["logits_T8"], atol=1e-4, rtol=0
        )


def edit_weights(src, fn):
    sd = load_file(str(src / "model.safetensors"))
    fn(sd)
    save_file(sd, str(src / "model.safetensors"))


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda sd: sd.pop("transformer.core_block.1.mlp.fc.weight"), "core.1.mlp.w_in.weight"),
        (lambda sd: sd.__setitem__("transformer.C.weight", torch.zeros(64, 32)), "readout.weight"),
        (lambda sd: sd.__setitem__("transformer.extra.weight", torch.zeros(2)), "transformer.extra.weight"),
        (
            lambda sd: sd.__setitem__("transformer.coda.0.attn.c_qkv.weight", torch.zeros(2)),
            "attn.c_qkv.weight",
        ),
        (lambda sd: sd.__setitem__("lm_head.weight", torch.zeros(512, 64)), "lm_head.weight"),
        (lambda sd: sd.__setitem__("freqs_cis", torch.zeros(1, 64, 1, 8, 2)), "freqs_cis"),
    ],
)
def test_weights_that_do_not_fit_name_the_key(parcae_tiny, tmp_path, edit, key):
    src = copy_of(parcae_tiny, tmp_path)
    edit_weights(src, edit)
    with pytest.raises(ConversionError, match=key.replace(".", r"\.")):
        load_parcae(src)


@pytest.mark.parametrize(
    "key, value",
    [
        ("injection_type", "linear"),
        ("block_class_name", "SandwichBlock"),
        ("bias", True),
        ("nonlin_name", "SiLU"),
        ("state_init", "unit"),
        ("recurrent_embedding_dimension", 128),
        ("num_attention_heads", 5),
    ],
)
def test_config_that_does_not_fit_names_the_key(parcae_tiny, tmp_path, key, value):
    src = copy_of(parcae_tiny, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg[key] = value
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=key):
        load_parcae(src)


def test_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(ConversionError, match="config.json"):
        load_parcae(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConversionError, match="not valid JSON"):
        load_parcae(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConversionError, match="no weights found"):
        load_parcae(tmp_path)
