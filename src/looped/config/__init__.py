"""Configuration: one dataclass per section, TOML presets and `--set` overrides, validation, saving.

Precedence, lowest first: dataclass defaults < TOML files in the order given < `--set section.key=value`.
Unknown sections and keys are errors that name the closest valid key. The resolved config is what
checkpoints store (`config.toml`), so a checkpoint directory alone rebuilds its model.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from looped.config.runtime import InferConfig, ServeConfig
from looped.config.section import ConfigError, Section, _check_value, _closest, doc
from looped.config.sections import (
    BlockNorm,
    DataConfig,
    EvalConfig,
    Injection,
    LoopsConfig,
    MLPKind,
    ModelConfig,
    OptimConfig,
    SamplerKind,
    SpectralGroup,
    StateInit,
    TrainConfig,
)

__all__ = [
    "BlockNorm",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "InferConfig",
    "ServeConfig",
    "Injection",
    "SamplerKind",
    "LoopsConfig",
    "MLPKind",
    "ModelConfig",
    "OptimConfig",
    "Section",
    "SpectralGroup",
    "StateInit",
    "TrainConfig",
    "doc",
    "from_dict",
    "load_config",
    "presets",
    "resolve_file",
    "to_toml",
]

PRESET_DIR = Path(__file__).resolve().parents[3] / "configs"


@dataclass
class Config:
    """The whole run configuration, one section per concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loops: LoopsConfig = field(default_factory=LoopsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    SECTIONS: typing.ClassVar[dict[str, type[Section]]] = {
        "model": ModelConfig,
        "loops": LoopsConfig,
        "data": DataConfig,
        "optim": OptimConfig,
        "train": TrainConfig,
        "eval": EvalConfig,
        "infer": InferConfig,
        "serve": ServeConfig,
    }

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: getattr(self, name).to_dict() for name in self.SECTIONS}


# Keys renamed since checkpoints were first written: (section, old) → new. An old name is read as its new
# name wherever a config comes from (a checkpoint's config.toml, a config file, --set), so checkpoints and run
# configs written before a rename keep working; what is saved afterwards uses the new name only.
RENAMED = {("loops", "max_loops"): "max_sampled_loops", ("infer", "max_loops"): "max_request_loops"}


def _current_name(section: str, key: str) -> str:
    """The name section.key has now (`loops.max_loops` → `max_sampled_loops`); other keys are unchanged."""
    return RENAMED.get((section, key), key)


def _set_in(tree: dict[str, dict[str, Any]], section: str, key: str, value: Any, source: str) -> None:
    if section not in Config.SECTIONS:
        raise ConfigError(f"{source}: unknown section [{section}]{_closest(section, Config.SECTIONS)}")
    names = [f.name for f in dataclasses.fields(Config.SECTIONS[section])]
    key = _current_name(section, key)
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
                owners = [
                    n
                    for n, c in Config.SECTIONS.items()
                    if section in {f.name for f in dataclasses.fields(c)}
                ]
                hint = (
                    f" (it belongs under ['{owners[0]}'])" if owners else _closest(section, Config.SECTIONS)
                )
                raise ConfigError(f"{path}: top-level key '{section}' must be a [section]{hint}")
            for key, value in values.items():
                _set_in(tree, section, key, value, str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        dotted, text = item.split("=", 1)
        if "." not in dotted:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. model.width=256")
        section, key = dotted.strip().split(".", 1)
        key = _current_name(section, key)
        _set_in(tree, section, key, _override_value(section, key, text.strip()), "--set")
    return from_dict(tree)


def _override_value(section: str, key: str, text: str) -> Any:
    """A `--set` value read by the type of the field it sets: TOML (numbers, booleans, lists, quoted strings),
    except that a field that takes a string takes any text as it is (`train.out=123` is the folder "123")."""
    tp = _field_type(section, key)
    value = _parse_value(text)
    if value in ("none", "None") and _optional(tp):
        return None  # TOML has no null: `--set model.attn_window=none` clears an optional field
    if not isinstance(value, str) and _takes_text(tp):
        try:
            _check_value(section, key, tp, value)
        except ConfigError:
            return text
    return value


def _field_type(section: str, key: str) -> Any:
    """The annotation of section.key, or None when there is no such field (`_set_in` then says so)."""
    cls = Config.SECTIONS.get(section)
    return typing.get_type_hints(cls).get(key) if cls is not None else None


def _optional(tp: Any) -> bool:
    """Whether a field of type `tp` may be None (and "none" is not one of its string values)."""
    args = typing.get_args(tp)
    return type(None) in args and not any("none" in typing.get_args(a) for a in args)


def _takes_text(tp: Any) -> bool:
    """Whether a field of type `tp` accepts a free string (str, or a union with str; not a Literal)."""
    return tp is str or str in typing.get_args(tp)


def from_dict(tree: dict[str, dict[str, Any]]) -> Config:
    """A Config from nested {section: {key: value}}; unknown keys raise ConfigError."""
    sections = {}
    for section, cls in Config.SECTIONS.items():
        if not isinstance(tree.get(section, {}), dict):
            raise ConfigError(f"config: [{section}] must be a table of keys, got {tree[section]!r}")
        values = dict(tree.get(section, {}))
        for (where, old), new in RENAMED.items():  # a checkpoint written before the rename
            if where == section and old in values and new not in values:
                values[new] = values.pop(old)
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
    if isinstance(value, dict):  # an inline table
        return "{" + ", ".join(f"{_toml_value(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} to TOML")


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML; fields that are None (derived defaults) are left out, so they load back as None."""
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
        lines.append("")
    return "\n".join(lines)
