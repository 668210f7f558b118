"""`looped export onnx`: a checkpoint as ONNX graphs whose loop count, exit and KV-cache mode stay choices of
the program that runs them (`looped.edge` on ONNX Runtime, or any ONNX runtime).

The folder holds:
- `prelude.onnx`, `core_step.onnx`, `coda.onnx`: the model in three graphs, the loop in host code
  (looped/interop/parts.py names their inputs and outputs);
- `prelude_cached.onnx`, `core_step_cached.onnx`, `coda_cached.onnx`: the same with a KV cache passed in
  and this call's keys and values passed out, for decoding one token at a time;
- `loop.onnx`: the whole model as one graph, its loop an ONNX `Loop` whose count is the input `loops`;
- with `quantize="int8"`, the same files as `*.int8.onnx` (ONNX Runtime's dynamic quantization of the
  weights of every matrix product);
- `manifest.json`: shapes, dtypes, the tokenizer, default and most loops, exit and KV-cache settings, file
  sizes, and the parity measured against PyTorch at export; `tokenizer.json`.

Each graph is traced by `torch.onnx.export(dynamo=True)` with the batch and sequence lengths (and the
cached length) left dynamic, then checked against the PyTorch model on random tokens in ONNX Runtime.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from looped.checkpoint import TOKENIZER, atomic_dir
from looped.edge.runtime import FORMAT, MANIFEST
from looped.errors import ConfigError
from looped.interop.parts import (
    CodaGraph,
    CoreStepGraph,
    ExportSource,
    LoopGraph,
    PreludeGraph,
    dynamic_shapes,
    example_inputs,
    quiet,
)
from looped.model.lm import LoopedLM

FORMAT_VERSION = 1
# Loop counts at which the export checks ONNX Runtime against PyTorch.
PARITY_LOOPS = (1, 4)
OPSET = 18
# Loop counts at which the export measures validation loss, and how many windows it reads.
LOSS_LOOPS = (1, 4, 8)
LOSS_WINDOWS = 16


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"looped export onnx needs onnx, onnxscript and onnxruntime (pip install 'looped[onnx]'): {e}"
        ) from None


def _export_graph(graph: torch.nn.Module, example: tuple, path: Path, max_seq_len: int) -> None:
    graph.eval()
    with torch.no_grad(), quiet():
        program = torch.onnx.export(
            graph,
            example,
            dynamo=True,
            input_names=list(graph.inputs),
            output_names=list(graph.outputs),
            dynamic_shapes=dynamic_shapes(graph, example, max_seq_len),
            opset_version=OPSET,
            optimize=True,
            verbose=False,
        )
    program.save(str(path))


def _describe(path: Path) -> dict:
    """Inputs and outputs of an ONNX file as the runtime sees them: name, shape (symbolic axes by name), dtype."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def one(v: Any) -> dict:
        t = v.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in t.shape.dim]
        return {
            "name": v.name,
            "shape": shape,
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
        }

    return {"inputs": [one(v) for v in graph.input], "outputs": [one(v) for v in graph.output]}


def export_onnx(
    checkpoint: str | Path,
    out: str | Path,
    *,
    kv_cache: str | None = None,
    max_seq_len: int | None = None,
    quantize: str | None = None,
    data: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Write a checkpoint as ONNX graphs (see the module docstring); returns the manifest.

    Args:
        checkpoint: A language-model checkpoint directory; its tokenizer.json goes with the export (without
            one, as from `looped convert`, the export takes token ids).
        out: The folder to write (replaced; written to a temporary name first).
        kv_cache: The KV-cache mode the manifest names as default, `shared` or `per-loop`; the cached graphs
            serve both. None: the checkpoint's `infer.kv_cache`.
        max_seq_len: The longest sequence (prompt and generated tokens) the graphs accept; None: the model's.
        quantize: None, or "int8" to add dynamically quantized graphs beside the float32 ones.
        data: Prepared data whose validation split measures the loss of PyTorch and of each exported variant
            at LOSS_LOOPS (the manifest's "loss"); None: the checkpoint's data.path if it is there, else none.
        progress: Print a line per graph.

    Raises:
        CheckpointError: the checkpoint is unreadable, or its tokenizer is not the model's.
        ConfigError: a model the graphs do not cover, or a setting out of range.
    """
    _require_onnx()
    if quantize not in (None, "int8"):
        raise ConfigError(f"--quantize takes int8, got {quantize!r}")
    checkpoint, out = Path(checkpoint), Path(out)
    source = ExportSource.open(checkpoint, kv_cache, max_seq_len)
    cfg, model, tokenizer, max_seq_len = source.cfg, source.model, source.tokenizer, source.max_seq_len
    torch.manual_seed(0)
    with atomic_dir(out) as tmp:
        files = _write_graphs(model, tmp, max_seq_len, progress)
        parity = check_parity(model, tmp, files)
        if quantize == "int8":
            files.update(_quantize(tmp, files, progress))
        if tokenizer is not None:
            shutil.copy(checkpoint / TOKENIZER, tmp / TOKENIZER)
        windows = _val_windows(data, cfg, max_seq_len, tokenizer) if tokenizer is not None else None
        loss = measure_loss(model, tmp, files, windows) if windows is not None else None
        manifest = _manifest(source, tmp, files, parity, loss)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _write_graphs(model: LoopedLM, out: Path, max_seq_len: int, progress: bool) -> dict[str, str]:
    files = {}
    for cached in (False, True):
        examples = example_inputs(model, cached)
        for cls in (PreludeGraph, CoreStepGraph, CodaGraph):
            graph = cls(model, cached)
            name = graph.part + ("_cached" if cached else "")
            t0 = time.perf_counter()
            _export_graph(graph, examples[graph.part], out / f"{name}.onnx", max_seq_len)
            files[name] = f"{name}.onnx"
            if progress:
                print(f"  {name + '.onnx':<22} {time.perf_counter() - t0:5.1f} s", flush=True)
    t0 = time.perf_counter()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 3))
    _export_graph(LoopGraph(model), (ids, torch.tensor(3)), out / "loop.onnx", max_seq_len)
    files["loop"] = "loop.onnx"
    if progress:
        print(f"  {'loop.onnx':<22} {time.perf_counter() - t0:5.1f} s", flush=True)
    return files


def _quantize(out: Path, files: dict[str, str], progress: bool) -> dict[str, str]:
    """int8 weights of every MatMul/Gemm of the part graphs (ONNX Runtime's dynamic quantization: activations
    are quantized per call, so no calibration data is needed). The Loop graph stays float32: the quantizer
    does not follow weights into a Loop's body."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    made = {}
    for name, file in files.items():
        if name == "loop":
            continue
        target = f"{name}.int8.onnx"
        with quiet():
            quantize_dynamic(str(out / file), str(out / target), weight_type=QuantType.QInt8)
        made[f"{name}.int8"] = target
        if progress:
            print(f"  {target:<22} quantized", flush=True)
    return made


def check_parity(model: LoopedLM, out: Path, files: dict[str, str]) -> dict:
    """Largest |logit difference| between ONNX Runtime and PyTorch on random tokens: the part graphs and the
    Loop graph at each of PARITY_LOOPS."""
    from looped.edge.runtime import EdgeModel

    edge = EdgeModel(out, files=files)
    ids = torch.randint(0, model.cfg.vocab_size, (2, min(12, model.cfg.max_seq_len)))
    result = {}
    with torch.no_grad():
        for loops in PARITY_LOOPS:
            ref = model(ids, loops=loops).logits.numpy()
            parts = edge.logits(ids.numpy(), loops)
            whole = edge.logits(ids.numpy(), loops, graph="loop")
            result[str(loops)] = {
                "parts": float(np.abs(parts - ref).max()),
                "loop": float(np.abs(whole - ref).max()),
            }
    return result


def _val_windows(data: str | Path | None, cfg, max_seq_len: int, tokenizer) -> np.ndarray | None:
    """The first LOSS_WINDOWS validation windows of `data` (or of the checkpoint's data.path when it is there
    and uses the same tokenizer), at the training sequence length capped by max_seq_len; None without data."""
    from looped.data.loader import TokenData, val_windows

    path = Path(data) if data is not None else Path(cfg.data.path)
    if data is None and not (path / "manifest.json").is_file():
        return None
    token_data = TokenData.open(path, verify=False)
    if token_data.tokenizer.vocab_size != tokenizer.vocab_size:
        if data is None:
            return None
        raise ConfigError(f"--data {path}: its tokenizer is not the checkpoint's")
    seq_len = min(cfg.data.seq_len, max_seq_len)
    return val_windows(token_data, seq_len, LOSS_WINDOWS).numpy()


def measure_loss(model: LoopedLM, out: Path, files: dict[str, str], windows: np.ndarray) -> dict:
    """Validation loss (nats) at LOSS_LOOPS of the PyTorch model and of each exported variant."""
    from looped.edge.runtime import EdgeModel
    from looped.eval import loss_by_loops

    result = {"windows": int(len(windows)), "tokens": int(windows[:, 1:].size)}
    result["torch"] = {
        str(t): v for t, v in loss_by_loops(model, torch.from_numpy(windows), list(LOSS_LOOPS)).items()
    }
    for variant in ("float32", "int8"):
        if variant == "int8" and "prelude.int8" not in files:
            continue
        edge = EdgeModel(out, variant=variant, files=files)
        result[variant] = {str(t): edge.loss(windows, t) for t in LOSS_LOOPS}
    return result


def format_export(out: str | Path, manifest: dict) -> str:
    """What `looped export onnx` prints: the files and sizes, parity with PyTorch, and the losses."""
    graphs = manifest["graphs"]
    lines = [f"wrote {out}"]
    for g in graphs.values():
        lines.append(f"  {g['file']:<28} {g['bytes'] / 2**20:8.2f} MiB")
    worst = max(max(p.values()) for p in manifest["parity"].values())
    loops = ", ".join(manifest["parity"])
    lines.append(f"parity with PyTorch at T = {loops}: max |Δ logit| {worst:.2e}")
    loss = manifest.get("loss")
    if loss:
        kinds = [k for k in ("torch", "float32", "int8") if k in loss]
        lines.append(f"validation loss on {loss['tokens']:,} tokens:")
        lines.append("  loops " + "".join(f"{k:>10}" for k in kinds))
        for t in loss["torch"]:
            lines.append(f"  {t:>5} " + "".join(f"{loss[k][t]:>10.4f}" for k in kinds))
    return "\n".join(lines)


def _manifest(
    source: ExportSource, out: Path, files: dict[str, str], parity: dict, loss: dict | None
) -> dict:
    graphs = {
        name: {"file": file, "bytes": (out / file).stat().st_size, **_describe(out / file)}
        for name, file in files.items()
    }
    head = {"format": FORMAT, "version": FORMAT_VERSION, "opset": OPSET}
    return {**head, **source.manifest(), "graphs": graphs, "parity": parity, "loss": loss}
