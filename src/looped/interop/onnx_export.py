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

import contextlib
import io
import json
import logging
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from looped.checkpoint import TOKENIZER, atomic_dir, check_tokenizer, load, load_config_dir
from looped.errors import CheckpointError, ConfigError
from looped.interop.parts import (
    CodaGraph,
    CoreStepGraph,
    LoopGraph,
    PartGraph,
    PreludeGraph,
    check_exportable,
)
from looped.model import accounting
from looped.model.lm import LoopedLM

FORMAT = "looped-onnx"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
GRAPHS = ("prelude", "core_step", "coda", "prelude_cached", "core_step_cached", "coda_cached", "loop")
# Loop counts at which the export checks ONNX Runtime against PyTorch.
PARITY_LOOPS = (1, 4)
OPSET = 18
# Loop counts at which the export measures validation loss, and how many windows it reads.
LOSS_LOOPS = (1, 4, 8)
LOSS_WINDOWS = 16


def _require_onnx() -> Any:
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"looped export onnx needs onnx, onnxscript and onnxruntime (pip install 'looped[onnx]'): {e}"
        ) from None
    return onnxruntime


def _dynamic_shapes(graph: torch.nn.Module, example: tuple[torch.Tensor, ...], max_seq_len: int) -> list:
    """Which axes of each input stay free: batch and sequence of every (B, S, ...) tensor, the cached length
    of every past key/value; a 0-d input (start, loops) and a per-channel term (the decay) are fixed."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=1, max=max_seq_len)
    past = torch.export.Dim("past", min=0, max=max_seq_len - 1)
    shapes = []
    for name, x in zip(graph.inputs, example, strict=True):
        if name.startswith("past_"):
            shapes.append({0: batch, 1: past})
        elif x.ndim >= 2:
            shapes.append({0: batch, 1: seq})
        else:
            shapes.append(None)
    return {"tensors": tuple(shapes)}


def _examples(model: LoopedLM, cached: bool) -> dict[str, tuple[torch.Tensor, ...]]:
    """Example inputs of every graph, made by running the model's own pieces on random tokens: batch 2,
    3 new tokens after 5 cached (sizes that export does not specialise on)."""
    cfg = model.cfg
    B, S, past = 2, 3, 5
    ids = torch.randint(0, cfg.vocab_size, (B, S))
    prelude = PreludeGraph(model, cached)
    kv_shape = (B, past, cfg.resolved_n_kv_heads, cfg.resolved_head_dim)

    def pasts(graph: PartGraph) -> tuple[torch.Tensor, ...]:
        return tuple(torch.randn(kv_shape) for _ in range(2 * len(graph.kv)))

    start = (torch.tensor(past),) if cached else ()
    with torch.no_grad():
        out = prelude(ids, *start, *pasts(prelude))
    layout = prelude.layout
    n = layout.inject + len(layout.core_ves)
    h, step_inputs = out[0], out[1 : 1 + n]
    coda_ves = out[1 + n : 1 + n + len(layout.coda_ves)]
    core, coda = CoreStepGraph(model, cached), CodaGraph(model, cached)
    return {
        "prelude": (ids, *start, *pasts(prelude)),
        "core_step": (h, *step_inputs, *start, *pasts(core)),
        "coda": (h, *coda_ves, *start, *pasts(coda)),
    }


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's and the quantizer's chatter (warnings, log lines, prints); errors still raise."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def _export_graph(graph: torch.nn.Module, example: tuple, path: Path, max_seq_len: int) -> None:
    graph.eval()
    with torch.no_grad(), _quiet():
        program = torch.onnx.export(
            graph,
            example,
            dynamo=True,
            input_names=list(graph.inputs),
            output_names=list(graph.outputs),
            dynamic_shapes=_dynamic_shapes(graph, example, max_seq_len),
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
        checkpoint: A language-model checkpoint directory with its tokenizer.json.
        out: The folder to write (replaced; written to a temporary name first).
        kv_cache: The KV-cache mode the manifest names as default, `shared` or `per-loop`; the cached graphs
            serve both. None: the checkpoint's `infer.kv_cache`.
        max_seq_len: The longest sequence (prompt and generated tokens) the graphs accept; None: the model's.
        quantize: None, or "int8" to add dynamically quantized graphs beside the float32 ones.
        data: Prepared data whose validation split measures the loss of PyTorch and of each exported variant
            at LOSS_LOOPS (the manifest's "loss"); None: the checkpoint's data.path if it is there, else none.
        progress: Print a line per graph.

    Raises:
        CheckpointError: the checkpoint is unreadable or has no tokenizer.
        ConfigError: a model the graphs do not cover, or a setting out of range.
    """
    ort = _require_onnx()
    checkpoint, out = Path(checkpoint), Path(out)
    cfg = load_config_dir(checkpoint)
    model = load(checkpoint).eval()
    check_exportable(model)
    if not (checkpoint / TOKENIZER).is_file():
        raise CheckpointError(f"{checkpoint}: no {TOKENIZER}; an edge export carries the tokenizer")
    from looped.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(checkpoint)
    check_tokenizer(checkpoint, tokenizer, cfg.model.vocab_size)
    kv_cache = kv_cache or cfg.infer.kv_cache
    if kv_cache not in ("shared", "per-loop"):
        raise ConfigError(f"--kv-cache must be shared or per-loop, got {kv_cache!r}")
    max_seq_len = max_seq_len or cfg.model.max_seq_len
    if not 8 <= max_seq_len <= cfg.model.max_seq_len:
        raise ConfigError(f"--max-seq-len must lie in [8, model.max_seq_len = {cfg.model.max_seq_len}]")
    if quantize not in (None, "int8"):
        raise ConfigError(f"--quantize takes int8, got {quantize!r}")
    # The eval-mode initial state is a table by position, drawn once; make it before tracing so that the
    # graphs hold it as a constant.
    model.initial_state(torch.zeros(1, 1, cfg.model.width))
    torch.manual_seed(0)
    with atomic_dir(out) as tmp:
        files = _write_graphs(model, tmp, max_seq_len, progress)
        parity = check_parity(model, tmp, files, ort)
        if quantize == "int8":
            files.update(_quantize(tmp, files, progress))
        shutil.copy(checkpoint / TOKENIZER, tmp / TOKENIZER)
        windows = _val_windows(data, cfg, max_seq_len, tokenizer)
        loss = measure_loss(model, tmp, files, windows) if windows is not None else None
        manifest = _manifest(cfg, tmp, files, kv_cache, max_seq_len, tokenizer, parity)
        manifest["loss"] = loss
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _write_graphs(model: LoopedLM, out: Path, max_seq_len: int, progress: bool) -> dict[str, str]:
    files = {}
    for cached in (False, True):
        examples = _examples(model, cached)
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
        with _quiet():
            quantize_dynamic(str(out / file), str(out / target), weight_type=QuantType.QInt8)
        made[f"{name}.int8"] = target
        if progress:
            print(f"  {target:<22} quantized", flush=True)
    return made


def check_parity(model: LoopedLM, out: Path, files: dict[str, str], ort: Any) -> dict:
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


def _flops_coefficients(m) -> dict:
    """flops_per_token(T, s) = once[0] + once[1]·s + T·(per_loop[0] + per_loop[1]·s): the accounting's
    figure (linear in the context length s and in T) as four numbers the device can use without torch."""

    def line(value_at) -> list[float]:  # [v(0), slope] of a function linear in s, from s = 1 and 2
        slope = value_at(2) - value_at(1)
        return [value_at(1) - slope, slope]

    def per_loop(s: int) -> float:
        return accounting.flops_per_token(m, 2, s) - accounting.flops_per_token(m, 1, s)

    return {
        "once": line(lambda s: accounting.flops_per_token(m, 1, s) - per_loop(s)),
        "per_loop": line(per_loop),
    }


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
    cfg, out: Path, files: dict[str, str], kv_cache: str, max_seq_len: int, tokenizer, parity
) -> dict:
    m = cfg.model
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "opset": OPSET,
        "dtype": "float32",
        "model": cfg.to_dict()["model"],
        "vocab_size": m.vocab_size,
        "width": m.width,
        "kv_heads": m.resolved_n_kv_heads,
        "head_dim": m.resolved_head_dim,
        "layers": {"prelude": m.prelude_layers, "core": m.core_layers, "coda": m.coda_layers},
        "max_seq_len": max_seq_len,
        "loops": {
            "default": m.loops,
            "mean_loops": cfg.loops.mean_loops,
            "max": cfg.infer.max_request_loops,
        },
        "exit": {"default": cfg.infer.exit, "min_loops": cfg.infer.min_loops, "gate": m.exit_gate},
        "kv_cache": kv_cache,
        "sampling": {
            "temperature": cfg.infer.temperature,
            "top_k": cfg.infer.top_k,
            "top_p": cfg.infer.top_p,
            "max_new_tokens": cfg.infer.max_new_tokens,
        },
        "flops": _flops_coefficients(m),
        "tokenizer": TOKENIZER,
        "eot_id": tokenizer.eot_id,
        "graphs": {
            name: {"file": file, "bytes": (out / file).stat().st_size, **_describe(out / file)}
            for name, file in files.items()
        },
        "parity": parity,
    }
