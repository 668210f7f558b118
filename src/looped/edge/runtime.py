"""EdgeModel: an exported folder's graphs in ONNX Runtime sessions — logits and loss at any loop count, and
token-by-token generation with a KV cache, adaptive exit and a latency budget (looped/edge/decode.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from looped.edge.decode import Generation, Piece, export_tokenizer
from looped.edge.exit import log_softmax
from looped.errors import EdgeError

MANIFEST = "manifest.json"
FORMAT = "looped-onnx"
VARIANTS = ("float32", "int8")


def read_manifest(path: Path, fmt: str, command: str) -> dict:
    """An export's manifest.json, checked to be of format `fmt` (written by `looped export COMMAND`)."""
    file = path / MANIFEST
    if not file.is_file():
        raise EdgeError(
            f"{path}: not an exported model (no {MANIFEST}; write one with `looped export {command}`)"
        )
    manifest = json.loads(file.read_text())
    if manifest.get("format") != fmt:
        raise EdgeError(f"{file}: format {manifest.get('format')!r}, not {fmt!r}")
    return manifest


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as e:
        raise EdgeError(f"looped.edge needs onnxruntime (pip install 'looped[edge]'): {e}") from None
    return onnxruntime


class EdgeModel:
    """The graphs of one export, run on ONNX Runtime's CPU provider.

    Args:
        path: A folder written by `looped export onnx`.
        variant: "float32", or "int8" for the quantized graphs (export with --quantize int8).
        threads: Intra-op threads per session; None lets ONNX Runtime choose (all cores).
        files: Graph name → file, instead of the manifest's (the export checks graphs before writing it).
    """

    def __init__(
        self,
        path: str | Path,
        variant: str = "float32",
        threads: int | None = None,
        files: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.ort = _import_ort()
        if variant not in VARIANTS:
            raise EdgeError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        self.manifest = read_manifest(self.path, FORMAT, "onnx") if files is None else {}
        files = files or {name: g["file"] for name, g in self.manifest["graphs"].items()}
        if variant == "float32":
            self.files = {n: f for n, f in files.items() if not n.endswith(".int8")}
        else:
            self.files = {n.removesuffix(".int8"): f for n, f in files.items() if n.endswith(".int8")}
        missing = [name for name in ("prelude", "core_step", "coda") if name not in self.files]
        if missing:
            hint = " (export with --quantize int8)" if variant == "int8" else ""
            raise EdgeError(f"{self.path}: no {variant} graphs for {', '.join(missing)}{hint}")
        self.variant, self.threads = variant, threads
        self._sessions: dict[str, tuple[Any, list[str], list[str]]] = {}
        self.tokenizer = export_tokenizer(self.path, self.manifest)

    # ------------------------------------------------------------------ sessions
    def session(self, name: str) -> tuple[Any, list[str], list[str]]:
        """The ONNX Runtime session of graph `name` (prelude, core_step, coda, their _cached forms, loop), with
        its input and output names."""
        found = self._sessions.get(name)
        if found is None:
            if name not in self.files:
                raise EdgeError(f"{self.path}: the export has no {name} graph")
            options = self.ort.SessionOptions()
            options.log_severity_level = 3
            if self.threads is not None:
                options.intra_op_num_threads = self.threads
                options.inter_op_num_threads = 1
            session = self.ort.InferenceSession(
                str(self.path / self.files[name]), options, providers=["CPUExecutionProvider"]
            )
            found = (session, [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
            self._sessions[name] = found
        return found

    def run(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run graph `name` on the inputs it names (others in `feeds` are ignored); outputs by name."""
        session, inputs, outputs = self.session(name)
        out = session.run(outputs, {k: feeds[k] for k in inputs})
        return dict(zip(outputs, out, strict=True))

    @property
    def default_loops(self) -> int:
        return int(self.manifest.get("loops", {}).get("default", 1))

    @property
    def max_seq_len(self) -> int:
        return int(self.manifest.get("max_seq_len", 1 << 30))

    # ------------------------------------------------------------------ uncached
    def logits(self, input_ids: np.ndarray, loops: int, graph: str = "parts") -> np.ndarray:
        """Next-token logits (B, S, V) float32 of `input_ids` (B, S) after `loops` loops, through the three
        part graphs with the loop here ("parts"), or through the one graph whose Loop node runs it ("loop")."""
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        if loops < 1:
            raise EdgeError(f"loops must be ≥ 1, got {loops}")
        if graph == "loop":
            return self.run("loop", {"input_ids": ids, "loops": np.array(loops, dtype=np.int64)})["logits"]
        feeds = self.run("prelude", {"input_ids": ids})
        for _ in range(loops):
            feeds["state"] = self.run("core_step", feeds)["next_state"]
        return self.run("coda", feeds)["logits"]

    def loss(self, windows: np.ndarray, loops: int, batch_size: int = 8) -> float:
        """Mean next-token loss (nats) on token windows (N, S+1): inputs [:, :-1], labels [:, 1:]."""
        total, count = 0.0, 0
        for i in range(0, len(windows), batch_size):
            rows = windows[i : i + batch_size]
            logprobs = log_softmax(self.logits(rows[:, :-1], loops))  # float64
            picked = np.take_along_axis(logprobs, rows[:, 1:, None], -1)
            total -= float(picked.sum())
            count += picked.size
        return total / max(count, 1)

    # ------------------------------------------------------------------ generation
    def generate(self, prompt: str | list[int], **options: Any) -> Iterator[Piece]:
        """Stream the tokens that follow `prompt` (text, or token ids); options as `decode.Generation`."""
        return Generation(self, **options).stream(prompt)
