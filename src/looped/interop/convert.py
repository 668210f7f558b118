"""`looped convert`: one entry point for every family, told apart by config.json and the weight names."""

from __future__ import annotations

from pathlib import Path

from looped.errors import ConversionError
from looped.interop import huginn, ouro
from looped.interop.hub import SourceDir, write_checkpoint

FAMILIES = ("huginn", "retrofit", "ouro", "parcae")


def detect(src: SourceDir) -> str:
    """The family of a released folder: Ouro and the huginn_raven pair by model_type (Huginn-0125 and a
    retrofitted Llama by their weights), Parcae by its layer keys."""
    if ouro.is_ouro(src.config):
        return "ouro"
    if huginn.is_raven(src.config):
        return "huginn" if huginn.is_huginn(src) else "retrofit"
    if "n_layers_in_recurrent_block" in src.config:
        return "parcae"
    kind = src.config.get("model_type", "no model_type")
    raise ConversionError(
        f"{src.path}: cannot tell the family from config.json ({kind}); name it: looped convert "
        f"{{{','.join(FAMILIES)}}} SRC OUT"
    )


def convert(
    src: str | Path, out: str | Path, family: str | None = None, dtype: str | None = None
) -> tuple[str, Path]:
    """Convert a released checkpoint folder into a native one at `out`; returns (family, out).

    Args:
        src: the folder as released: config.json, model.safetensors or shards with their index, tokenizer.
        out: the checkpoint directory to write (replaced atomically).
        family: huginn, retrofit, ouro or parcae; None detects it.
        dtype: float32, bfloat16 or float16 for the stored weights; None keeps the source's.
    """
    if family is not None and family not in FAMILIES:
        raise ConversionError(f"unknown family {family!r}; choose {', '.join(FAMILIES)}")
    if family == "parcae" or (family is None and _parcae_layout(Path(src))):
        from looped.interop.parcae import convert_parcae

        return "parcae", convert_parcae(src, out)
    source = SourceDir(src)
    family = family or detect(source)
    if family == "parcae":
        from looped.interop.parcae import convert_parcae

        return "parcae", convert_parcae(src, out)
    expected = {"ouro": "ouro"}.get(family, "huginn_raven")
    if source.config.get("model_type") != expected:
        raise ConversionError(
            f"{src}: config.json has model_type {source.config.get('model_type')!r}, not {expected!r} as "
            f"{family} checkpoints do"
        )
    if family == "ouro":
        plan = ouro.plan(source)
    else:
        if family == "huginn" and not huginn.is_huginn(source):
            raise ConversionError(f"{src}: no norm_3/norm_4 or freqs_cis: a retrofitted Llama, not Huginn")
        if family == "retrofit" and huginn.is_huginn(source):
            raise ConversionError(f"{src}: norm_3/norm_4 or freqs_cis present: Huginn-0125, not a retrofit")
        plan = huginn.plan(source)
    return family, write_checkpoint(source, plan, out, family, dtype)


def _parcae_layout(path: Path) -> bool:
    """A Parcae folder (its weights may be a torch file, which SourceDir does not read)."""
    import json

    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and "n_layers_in_recurrent_block" in config and "model_type" not in config
