"""Converting checkpoints as released on the Hugging Face hub into native looped checkpoints.

A released folder holds `config.json` and safetensors weights, one file or several shards listed by
`model.safetensors.index.json`, often in bfloat16, and usually its tokenizer. A family module
(`looped.interop.huginn`, `looped.interop.ouro`) says how its config becomes a `ModelConfig` and how each of
our weights is made from theirs (`Plan`); this module does the rest the same way for every family:

- reads tensors one at a time (each shard is opened for the read and closed again, so its pages leave the
  process), and writes `model.safetensors` as a stream: the header is computed from the plan's shapes, then
  each tensor is made, written and dropped. Converting never holds the model twice, nor once.
- refuses a source weight that no plan entry uses, naming it;
- keeps the source dtype (bfloat16 stays bfloat16) unless a dtype is given;
- carries the tokenizer files (tokenizer.json, tokenizer_config.json with its chat template, ...) along.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from looped.checkpoint import CONFIG, RUN, WEIGHTS, atomic_dir, run_info
from looped.config import Config, ModelConfig, to_toml
from looped.errors import ConversionError

INDEX = "model.safetensors.index.json"
# Files copied into the checkpoint when the source has them: the tokenizer and what generation needs.
CARRIED = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ST_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}
_FROM_ST = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64}


def config_getter(config: dict[str, Any]) -> Callable[..., Any]:
    """`get(key, default=None, required=False)` on a released config.json; a missing required key is a
    ConversionError that names it."""

    def get(key: str, default: Any = None, required: bool = False) -> Any:
        if required and key not in config:
            raise ConversionError(f"config.json: missing key '{key}'")
        return config.get(key, default)

    return get


class SourceDir:
    """A released checkpoint folder: its config.json and the tensors of its safetensors file(s) by name."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        file = self.path / "config.json"
        if not file.is_file():
            raise ConversionError(f"{self.path}: no config.json (expected a checkpoint folder as released)")
        try:
            self.config: dict[str, Any] = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ConversionError(f"{file}: not valid JSON: {e}") from None
        if not isinstance(self.config, dict):
            raise ConversionError(f"{file}: expected a JSON object")
        self.files = self._files()
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for name, shard in self.files.items():
            self._meta[name] = _tensor_meta(shard, name)

    def _files(self) -> dict[str, Path]:
        index = self.path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConversionError(f"{index}: not a safetensors index (weight_map): {e}") from None
            missing = sorted({f for f in weight_map.values() if not (self.path / f).is_file()})
            if missing:
                raise ConversionError(f"{index}: lists shard {missing[0]}, which is not in {self.path}")
            return {name: self.path / f for name, f in weight_map.items()}
        single = self.path / "model.safetensors"
        if not single.is_file():
            raise ConversionError(f"{self.path}: no model.safetensors and no {INDEX}")
        try:
            with safe_open(str(single), framework="pt") as f:
                return dict.fromkeys(f.keys(), single)
        except (SafetensorError, OSError) as e:
            raise ConversionError(f"{single}: cannot read: {e}") from None

    def keys(self) -> set[str]:
        return set(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][1]

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, read from its shard, which is closed again (its pages leave this process)."""
        if name not in self.files:
            raise ConversionError(f"{self.path}: missing weight {name}")
        with safe_open(str(self.files[name]), framework="pt") as f:
            return f.get_tensor(name)

    def config_dtype(self) -> torch.dtype | None:
        """The dtype config.json declares (`dtype`, or `torch_dtype` as older transformers write it)."""
        name = self.config.get("dtype") or self.config.get("torch_dtype")
        return DTYPES.get(name) if isinstance(name, str) else None


def _tensor_meta(shard: Path, name: str) -> tuple[tuple[int, ...], torch.dtype]:
    try:
        with safe_open(str(shard), framework="pt") as f:
            view = f.get_slice(name)
            dtype = _FROM_ST.get(view.get_dtype())
            if dtype is None:
                raise ConversionError(f"{name}: dtype {view.get_dtype()} is not supported")
            return tuple(view.get_shape()), dtype
    except (SafetensorError, OSError) as e:
        raise ConversionError(f"{shard}: cannot read {name}: {e}") from None


@dataclass
class Entry:
    """One of our weights: its shape and how to make it (reading source tensors only when called)."""

    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]


@dataclass
class Plan:
    """What a family's converter produces: our config, each of our weights, and the source keys it read
    or deliberately dropped (every other source key is an error)."""

    config: ModelConfig
    entries: dict[str, Entry] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)

    def copy(self, ours: str, theirs: str, src: SourceDir) -> None:
        """Our weight `ours` is their `theirs` as it is."""
        self.entries[ours] = Entry(src.shape(theirs), lambda: src.tensor(theirs))
        self.used.add(theirs)

    def split(self, ours: list[str], theirs: str, sizes: list[int], src: SourceDir, dim: int = 0) -> None:
        """Their fused `theirs` cut along `dim` into `sizes`, one piece per name in `ours`."""
        shape = src.shape(theirs)
        if sum(sizes) != shape[dim]:
            raise ConversionError(
                f"{theirs}: shape {list(shape)} does not split into {sizes} along dim {dim}"
            )
        start = 0
        for name, size in zip(ours, sizes, strict=True):
            piece = list(shape)
            piece[dim] = size
            self.entries[name] = Entry(
                tuple(piece), lambda a=start, n=size: src.tensor(theirs).narrow(dim, a, n).contiguous()
            )
            start += size
        self.used.add(theirs)


def expect_shape(src: SourceDir, name: str, shape: tuple[int, ...]) -> None:
    if name not in src.files:
        raise ConversionError(f"{src.path}: missing weight {name}")
    if src.shape(name) != shape:
        raise ConversionError(
            f"{name}: shape {list(src.shape(name))}, expected {list(shape)} from config.json"
        )


def write_streaming(path: Path, entries: dict[str, Entry], dtype: torch.dtype) -> None:
    """A safetensors file written tensor by tensor: the header from the entries' shapes, then each tensor
    made, cast to `dtype`, written and dropped."""
    size = torch.empty((), dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "looped"}}
    offset = 0
    for name, entry in entries.items():
        n = size * math.prod(entry.shape)
        header[name] = {
            "dtype": _ST_DTYPE[dtype],
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, entry in entries.items():
            t = entry.make()
            if tuple(t.shape) != entry.shape:
                raise ConversionError(f"{name}: made shape {list(t.shape)}, planned {list(entry.shape)}")
            f.write(t.to(dtype).contiguous().view(torch.uint8).numpy())  # the buffer itself, no copy
            del t


def write_checkpoint(
    src: SourceDir, plan: Plan, out: str | Path, family: str, dtype: str | None = None
) -> Path:
    """The native checkpoint of `plan` at `out` (atomically): config.toml, model.safetensors, run.json and
    the carried tokenizer files. Weights keep the source dtype unless `dtype` names another."""
    unused = sorted(src.keys() - plan.used)
    if unused:
        raise ConversionError(f"{unused[0]}: a {family} weight this converter does not know")
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}; choose {', '.join(DTYPES)}")
    if dtype is not None:
        target = DTYPES[dtype]
    else:  # the source's own precision (a float32 checkpoint stays float32)
        stored = {src.dtype(k) for k in plan.used if src.dtype(k).is_floating_point}
        target = src.config_dtype() or (stored.pop() if len(stored) == 1 else torch.float32)
    cfg = Config(model=plan.config)
    cfg.infer.max_request_loops = max(cfg.infer.max_request_loops, plan.config.loops)
    with atomic_dir(out) as tmp:
        (tmp / CONFIG).write_text(to_toml(cfg))
        write_streaming(tmp / WEIGHTS, plan.entries, target)
        for name in CARRIED:
            if (src.path / name).is_file():
                shutil.copyfile(src.path / name, tmp / name)
        info = run_info(
            converted_from=str(src.path.resolve()), source_format=family, weights_dtype=str(target)
        )
        (tmp / RUN).write_text(json.dumps(info, indent=2) + "\n")
    return Path(out)
