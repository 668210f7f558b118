"""looped: looped (recurrent-depth) transformers — a prelude, a core block run T times, a coda.

Public API: `ModelConfig`, `Config`, `load_config`, `LoopedLM`, `baseline`, `load`, `save`, `Engine`.

The names are imported on first use (PEP 562), so that `import looped.cli` or `import looped.config` does
not import torch: `looped --help` answers at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name → the module that defines it
_EXPORTS = {
    "Config": "looped.config",
    "ConfigError": "looped.errors",
    "Engine": "looped.infer.engine",
    "LoopedLM": "looped.model",
    "LoopedOutput": "looped.model",
    "ModelConfig": "looped.config",
    "StabilityReport": "looped.model",
    "baseline": "looped.model",
    "load": "looped.checkpoint",
    "load_config": "looped.config",
    "save": "looped.checkpoint",
}

__all__ = [
    "Config",
    "ConfigError",
    "Engine",
    "LoopedLM",
    "LoopedOutput",
    "ModelConfig",
    "StabilityReport",
    "baseline",
    "load",
    "load_config",
    "save",
]

if TYPE_CHECKING:
    from looped.checkpoint import load, save
    from looped.config import Config, ModelConfig, load_config
    from looped.errors import ConfigError
    from looped.infer.engine import Engine
    from looped.model import LoopedLM, LoopedOutput, StabilityReport, baseline


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'looped' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
