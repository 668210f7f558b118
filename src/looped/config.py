"""Configuration: one dataclass per section, TOML presets and `--set` overrides, validation, saving.

Precedence, lowest first: dataclass defaults < TOML files in the order given < `--set section.key=value`.
Unknown sections and keys are errors that name the closest valid key. The resolved config is what
checkpoints store (`config.toml`), so a checkpoint directory alone rebuilds its model.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

PRESET_DIR = Path(__file__).resolve().parents[2] / "configs"

Injection = Literal["diagonal", "linear", "additive"]
MLPKind = Literal["swiglu", "relu2", "gelu"]
BlockNorm = Literal["pre-norm", "sandwich"]
StateInit = Literal["zero", "normal", "like-init"]
SpectralGroup = Literal["injection", "readout", "core-out", "core"]


class ConfigError(ValueError):
    """A config value, key or file that cannot be used; the message names the offending key."""


def _closest(name: str, valid: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.0)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _literal_choices(tp: Any) -> tuple | None:
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    return None


def _check_value(section: str, name: str, tp: Any, value: Any) -> None:
    """Type-check one field against its annotation (Literal, int, float, bool, str, list, Optional)."""
    where = f"{section}.{name}"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                _check_value(section, name, arg, value)
                return
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    choices = _literal_choices(tp)
    if choices is not None:
        if value not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            raise ConfigError(f"{where} = {value!r} is not one of {allowed}")
        return
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        for item in value:
            _check_value(section, name, item_tp, item)
        return
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
    elif tp is str and not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}")


def _accepts_float(tp: Any) -> bool:
    return tp is float or (
        typing.get_origin(tp) in (typing.Union, types.UnionType) and float in typing.get_args(tp)
    )


class Section:
    """Base for config sections: type and choice validation from the annotations, dict conversion."""

    _section: typing.ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if _accepts_float(hints[f.name]) and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))
            if isinstance(value, tuple):
                setattr(self, f.name, list(value))
            _check_value(self._section, f.name, hints[f.name], getattr(self, f.name))
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; subclasses raise ConfigError naming the field."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def field_docs(cls) -> dict[str, str]:
        """The one-line docstring of each field (from its metadata)."""
        return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(cls)}


def doc(default: Any, text: str) -> Any:
    """A dataclass field with a default and a one-line description."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


@dataclass
class ModelConfig(Section):
    """Architecture of a looped LM: embed → prelude → loops × (inject, core) → readout → coda → head."""

    _section: typing.ClassVar[str] = "model"

    vocab_size: int = doc(512, "Vocabulary size (rows of the embedding and the head).")
    width: int = doc(128, "Residual width d of every block, the recurrent state and the embedding.")
    n_heads: int = doc(4, "Attention query heads.")
    n_kv_heads: int | None = doc(None, "Key/value heads for grouped-query attention; None means n_heads.")
    head_dim: int | None = doc(None, "Per-head width; None means width // n_heads.")
    mlp: MLPKind = doc("relu2", "MLP kind: swiglu (gated), relu2 (ReLU squared) or gelu.")
    mlp_hidden: int | None = doc(
        None, "MLP hidden width; None means 4·width (swiglu: 8/3·width, rounded to 64)."
    )
    block_norm: BlockNorm = doc(
        "pre-norm", "Block layout: pre-norm, or sandwich (norm before and after each branch)."
    )
    norm_eps: float = doc(1e-5, "RMSNorm epsilon.")
    rope_base: float = doc(50000.0, "Rotary embedding base (theta).")
    qk_norm: bool = doc(True, "Parameter-free RMSNorm on queries and keys per head.")
    value_embeds: bool = doc(False, "Gated value embeddings on alternating layers (last layer included).")
    value_embed_layers: list[int] | None = doc(
        None,
        "Explicit layer indices (prelude, core, coda in order) with value embeddings; overrides value_embeds.",
    )
    value_gate_channels: int = doc(32, "Input channels the value-embedding gate reads.")
    logit_softcap: float | None = doc(None, "Soft-cap c: logits ← c·tanh(logits / c); None disables.")
    tie_embeddings: bool = doc(True, "Share the embedding matrix with the output head.")
    max_seq_len: int = doc(1024, "Longest sequence the rotary table covers.")
    prelude_layers: int = doc(1, "Blocks run once before the loop.")
    core_layers: int = doc(2, "Blocks in the shared core, run once per loop; 0 makes a standard transformer.")
    coda_layers: int = doc(1, "Blocks run once after the loop.")
    loops: int = doc(4, "Default number of loops T at inference and in eval mode.")
    injection: Injection = doc(
        "diagonal", "How the prelude output e enters each loop: diagonal (Parcae), linear (Huginn), additive."
    )
    prelude_norm: bool = doc(True, "RMSNorm on the prelude output e before it is injected.")
    readout: bool = doc(True, "Linear readout C from the recurrent state to the coda.")
    state_init: StateInit = doc(
        "zero", "Initial recurrent state: zero, normal (std 1) or like-init (truncated normal, init std)."
    )
    state_seed: int = doc(0, "Seed for a random initial state in eval mode (training draws fresh noise).")
    init_std: float | None = doc(None, "Std of hidden matrices at init; None means sqrt(2 / (5·width)).")
    init_decay: float = doc(
        0.447, "Initial per-channel decay of the diagonal injection (Parcae: ≈ sqrt(1/5))."
    )
    spectral_norm: list[SpectralGroup] = doc(
        [], "Weight groups held at σ_max ≤ spectral_bound: injection, readout, core-out, core."
    )
    spectral_bound: float = doc(1.0, "Upper bound on the largest singular value of constrained weights.")

    def validate(self) -> None:
        positive = ("vocab_size", "width", "n_heads", "max_seq_len", "loops", "value_gate_channels")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("prelude_layers", "core_layers", "coda_layers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.{name} must be ≥ 0, got {getattr(self, name)}")
        if self.prelude_layers + self.core_layers + self.coda_layers == 0:
            raise ConfigError("model.core_layers: the model needs at least one block")
        if self.head_dim is None and self.width % self.n_heads:
            raise ConfigError(
                f"model.n_heads = {self.n_heads} must divide model.width = {self.width} (or set model.head_dim)"
            )
        if self.head_dim is not None and (self.head_dim < 2 or self.head_dim % 2):
            raise ConfigError(
                f"model.head_dim must be an even number ≥ 2 for rotary embeddings, got {self.head_dim}"
            )
        if self.head_dim is None and (self.width // self.n_heads) % 2:
            raise ConfigError(
                f"model.width // model.n_heads = {self.width // self.n_heads} must be even for rotary embeddings"
            )
        kv = self.kv_heads
        if kv < 1 or self.n_heads % kv:
            raise ConfigError(
                f"model.n_kv_heads = {kv} must be ≥ 1 and divide model.n_heads = {self.n_heads}"
            )
        if self.mlp_hidden is not None and self.mlp_hidden < 1:
            raise ConfigError(f"model.mlp_hidden must be ≥ 1, got {self.mlp_hidden}")
        if self.norm_eps <= 0:
            raise ConfigError(f"model.norm_eps must be > 0, got {self.norm_eps}")
        if self.rope_base <= 1:
            raise ConfigError(f"model.rope_base must be > 1, got {self.rope_base}")
        if self.logit_softcap is not None and self.logit_softcap <= 0:
            raise ConfigError(
                f"model.logit_softcap must be > 0 (or None to disable), got {self.logit_softcap}"
            )
        if self.init_std is not None and self.init_std <= 0:
            raise ConfigError(f"model.init_std must be > 0, got {self.init_std}")
        if not 0 < self.init_decay < 1:
            raise ConfigError(f"model.init_decay must lie in (0, 1), got {self.init_decay}")
        if self.spectral_bound <= 0:
            raise ConfigError(f"model.spectral_bound must be > 0, got {self.spectral_bound}")
        if self.value_gate_channels > self.width:
            raise ConfigError(
                f"model.value_gate_channels = {self.value_gate_channels} exceeds model.width = {self.width}"
            )
        n = self.n_layers
        if self.value_embed_layers is not None:
            bad = [i for i in self.value_embed_layers if not 0 <= i < n]
            if bad:
                raise ConfigError(
                    f"model.value_embed_layers: {bad} outside 0..{n - 1} (the model has {n} distinct layers)"
                )
        if self.core_layers == 0:
            if "core" in self.spectral_norm or "core-out" in self.spectral_norm:
                raise ConfigError("model.spectral_norm names core weights, but model.core_layers = 0")
        if "injection" in self.spectral_norm and self.injection == "additive":
            raise ConfigError(
                "model.spectral_norm: 'injection' has no weights to constrain with model.injection = 'additive'"
            )
        if "readout" in self.spectral_norm and not self.readout:
            raise ConfigError("model.spectral_norm: 'readout' needs model.readout = true")

    # Derived sizes, used by the model and by accounting.
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def dim_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.width // self.n_heads

    @property
    def hidden(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp == "swiglu":
            return 64 * math.ceil(8 * self.width / 3 / 64)
        return 4 * self.width

    @property
    def n_layers(self) -> int:
        """Distinct blocks: prelude + core + coda."""
        return self.prelude_layers + self.core_layers + self.coda_layers

    @property
    def looped(self) -> bool:
        return self.core_layers > 0

    @property
    def ve_layers(self) -> list[int]:
        """Global layer indices that carry a gated value embedding."""
        if self.value_embed_layers is not None:
            return sorted(set(self.value_embed_layers))
        if not self.value_embeds:
            return []
        n = self.n_layers
        return [i for i in range(n) if i % 2 == (n - 1) % 2]

    @property
    def std(self) -> float:
        return self.init_std if self.init_std is not None else math.sqrt(2 / (5 * self.width))


@dataclass
class Config:
    """The whole run configuration; later issues add training, data, inference and serving sections."""

    model: ModelConfig = field(default_factory=ModelConfig)

    SECTIONS: typing.ClassVar[dict[str, type[Section]]] = {"model": ModelConfig}

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: getattr(self, name).to_dict() for name in self.SECTIONS}


def _set_in(tree: dict[str, dict[str, Any]], section: str, key: str, value: Any, source: str) -> None:
    if section not in Config.SECTIONS:
        raise ConfigError(f"{source}: unknown section [{section}]{_closest(section, Config.SECTIONS)}")
    names = [f.name for f in dataclasses.fields(Config.SECTIONS[section])]
    if key not in names:
        raise ConfigError(f"{source}: unknown key {section}.{key}{_closest(key, names)}")
    tree.setdefault(section, {})[key] = value


def _parse_value(text: str) -> Any:
    """A `--set` value as TOML (numbers, booleans, lists, quoted strings); anything else is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def resolve_file(name: str | Path) -> Path:
    """A config file path, or a preset name from configs/ (`debug`, `parcae-140m`, ...)."""
    path = Path(name)
    if path.is_file():
        return path
    preset = PRESET_DIR / f"{name}.toml"
    if preset.is_file():
        return preset
    known = sorted(p.stem for p in PRESET_DIR.glob("*.toml"))
    raise ConfigError(
        f"no config file or preset named '{name}'{_closest(str(name), known)}; presets: {', '.join(known)}"
    )


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_config(files: typing.Sequence[str | Path] = (), overrides: typing.Sequence[str] = ()) -> Config:
    """Build a Config from defaults, then TOML files (paths or preset names) in order, then `section.key=value` overrides."""
    tree: dict[str, dict[str, Any]] = {}
    for name in files:
        path = resolve_file(name)
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(
                    f"{path}: top-level key '{section}' must be a [section]{_closest(section, Config.SECTIONS)}"
                )
            for key, value in values.items():
                _set_in(tree, section, key, value, str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        dotted, text = item.split("=", 1)
        if "." not in dotted:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. model.width=256")
        section, key = dotted.strip().split(".", 1)
        _set_in(tree, section, key, _parse_value(text.strip()), "--set")
    return from_dict(tree)


def from_dict(tree: dict[str, dict[str, Any]]) -> Config:
    """A Config from nested {section: {key: value}}; unknown keys raise ConfigError."""
    sections = {}
    for section, cls in Config.SECTIONS.items():
        if not isinstance(tree.get(section, {}), dict):
            raise ConfigError(f"config: [{section}] must be a table of keys, got {tree[section]!r}")
        values = dict(tree.get(section, {}))
        for key in values:
            _set_in({}, section, key, None, "config")
        sections[section] = cls(**values)
    for section in tree:
        if section not in Config.SECTIONS:
            _set_in({}, section, "", None, "config")
    return Config(**sections)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML; fields that are None (derived defaults) are left out, so they load back as None."""
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
        lines.append("")
    return "\n".join(lines)
