"""looped: looped (recurrent-depth) transformers — a prelude, a core block run T times, a coda.

Public API: `ModelConfig`, `Config`, `load_config`, `LoopedLM`, `baseline`, `load`, `save`, `Engine`.
"""

__version__ = "0.1.0"

from looped.checkpoint import load, save
from looped.config import Config, ConfigError, ModelConfig, load_config
from looped.infer.engine import Engine
from looped.model import LoopedLM, LoopedOutput, StabilityReport, baseline

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
