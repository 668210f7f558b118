"""`looped export executorch`: the KV-cached graphs as the three methods of one ExecuTorch program, so that an
app on a phone runs the loop itself and picks the loop count, exit and cache mode per token.

The folder holds `model.pte` (ExecuTorch's portable kernels, any batch), `model.xnnpack.pte` (delegated to
XNNPACK, batch 1: the delegate takes no dynamic batch), `manifest.json` (what a host needs: cache sizes, loop
counts, exit and sampling defaults, each method's inputs and outputs in order, parity measured at export)
and `tokenizer.json`. The methods are `prelude_cached`, `core_step_cached` and `coda_cached` with the inputs
and outputs of looped/interop/parts.py; a call with `start = 0` and empty pasts is the uncached model.

`ExecuTorchGraphs` runs a program through ExecuTorch's Python runtime with looped.edge's host loop (cache
rules, exit, budget): what the parity check and the tests use, and the loop an app reimplements.
`while_loop` (the single-graph form of the ONNX export) is not lowered by `to_executorch`, so there is no
one-graph program here.
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
from looped.edge.decode import Generation, Piece, export_tokenizer
from looped.edge.runtime import MANIFEST, read_manifest
from looped.errors import ConfigError, EdgeError
from looped.interop.parts import (
    CodaGraph,
    CoreStepGraph,
    ExportSource,
    PreludeGraph,
    dynamic_shapes,
    example_inputs,
    quiet,
)

FORMAT = "looped-executorch"
FORMAT_VERSION = 1
PROGRAMS = {"portable": "model.pte", "xnnpack": "model.xnnpack.pte"}
PARITY_LOOPS = (1, 4)


def _require_executorch() -> None:
    try:
        import executorch.exir  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"looped export executorch needs executorch (pip install 'looped[executorch]'): {e}"
        ) from None


def _programs(source: ExportSource, batch: bool) -> dict[str, torch.export.ExportedProgram]:
    """The three cached graphs traced by torch.export; `batch` False fixes the batch at 1."""
    model = source.model
    examples = example_inputs(model, cached=True, batch=2 if batch else 1)
    out = {}
    for cls in (PreludeGraph, CoreStepGraph, CodaGraph):
        graph = cls(model, cached=True).eval()
        example = examples[graph.part]
        shapes = dynamic_shapes(graph, example, source.max_seq_len, batch=batch)
        with torch.no_grad(), quiet():
            out[f"{graph.part}_cached"] = torch.export.export(
                graph, example, dynamic_shapes=shapes, strict=False
            )
    return out


def _lower(programs: dict, variant: str) -> bytes:
    from executorch.exir import to_edge, to_edge_transform_and_lower

    with quiet():
        if variant == "xnnpack":
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

            edge = to_edge_transform_and_lower(programs, partitioner=[XnnpackPartitioner()])
        else:
            edge = to_edge(programs)
        return edge.to_executorch().buffer


def export_executorch(
    checkpoint: str | Path,
    out: str | Path,
    *,
    kv_cache: str | None = None,
    max_seq_len: int | None = None,
    variants: tuple[str, ...] = ("portable", "xnnpack"),
    progress: bool = True,
) -> dict:
    """Write a checkpoint as ExecuTorch programs (see the module docstring); returns the manifest.

    Args:
        checkpoint: A language-model checkpoint directory (its tokenizer.json, if any, goes with it).
        out: The folder to write (replaced; written to a temporary name first).
        kv_cache: The KV-cache mode the manifest names as default (the methods serve both).
        max_seq_len: The longest sequence the methods accept; None: the model's.
        variants: Which programs to write: "portable" and/or "xnnpack".
        progress: Print a line per program.
    """
    _require_executorch()
    unknown = set(variants) - set(PROGRAMS)
    if unknown or not variants:
        raise ConfigError(
            f"variants must be among {', '.join(PROGRAMS)}, got {', '.join(variants) or 'none'}"
        )
    checkpoint, out = Path(checkpoint), Path(out)
    source = ExportSource.open(checkpoint, kv_cache, max_seq_len)
    torch.manual_seed(0)
    graphs = [cls(source.model, cached=True) for cls in (PreludeGraph, CoreStepGraph, CodaGraph)]
    methods = {f"{g.part}_cached": {"inputs": g.inputs, "outputs": g.outputs} for g in graphs}
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        **source.manifest(),
        "methods": methods,
        "programs": {},
        "parity": {},
    }
    with atomic_dir(out) as tmp:
        for variant in variants:
            t0 = time.perf_counter()
            buffer = _lower(_programs(source, batch=variant == "portable"), variant)
            (tmp / PROGRAMS[variant]).write_bytes(buffer)
            manifest["programs"][variant] = {
                "file": PROGRAMS[variant],
                "bytes": len(buffer),
                "batch": "dynamic" if variant == "portable" else 1,
            }
            if progress:
                print(
                    f"  {PROGRAMS[variant]:<20} {len(buffer) / 2**20:7.2f} MiB  {time.perf_counter() - t0:5.1f} s"
                )
        if source.tokenizer is not None:
            shutil.copy(checkpoint / TOKENIZER, tmp / TOKENIZER)
        for variant in variants:
            programs = ExecuTorchGraphs(tmp, variant, manifest=manifest)
            manifest["parity"][variant] = check_parity(source.model, programs)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


@torch.no_grad()
def check_parity(model, graphs: ExecuTorchGraphs) -> dict[str, float]:
    """Largest |logit difference| against PyTorch at PARITY_LOOPS: a 10-token prompt, then two tokens decoded
    with the per-loop cache (which equals the uncached model at a fixed loop count)."""
    ids = torch.randint(0, model.cfg.vocab_size, (1, 12))
    result = {}
    for loops in PARITY_LOOPS:
        ref = model(ids, loops=loops).logits[0].numpy()
        gen = Generation(graphs, kv_cache="per-loop")
        got = [gen.step(ids[0, :10].tolist(), loops)[0]]
        got += [gen.step([int(ids[0, i])], loops)[0] for i in (10, 11)]
        result[str(loops)] = float(
            max(np.abs(g - ref[i]).max() for g, i in zip(got, (9, 10, 11), strict=True))
        )
    return result


class ExecuTorchGraphs:
    """An exported program run by ExecuTorch's Python runtime behind the interface looped.edge's generation
    needs (`looped.edge.decode.Graphs`): manifest, `run(name, feeds)`, tokenizer, default loops."""

    def __init__(self, path: str | Path, variant: str = "portable", manifest: dict | None = None) -> None:
        from executorch.runtime import Runtime

        self.path = Path(path)
        # `manifest`: the export's, before it is written (the export checks its programs first)
        self.manifest = manifest or read_manifest(self.path, FORMAT, "executorch")
        if variant not in self.manifest["programs"]:
            raise EdgeError(f"{self.path}: no {variant} program (has {', '.join(self.manifest['programs'])})")
        self.program = Runtime.get().load_program(str(self.path / self.manifest["programs"][variant]["file"]))
        self._methods: dict[str, Any] = {}
        self.default_loops = int(self.manifest["loops"]["default"])
        self.max_seq_len = int(self.manifest["max_seq_len"])
        self.tokenizer = export_tokenizer(self.path, self.manifest)

    def run(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        method = self._methods.get(name) or self._methods.setdefault(name, self.program.load_method(name))
        spec = self.manifest["methods"][name]
        # Copies with plain strides: ExecuTorch checks every stride, also of size-1 and empty axes, which a
        # slice of a preallocated cache keeps from its parent.
        out = method.execute([_plain(feeds[n]) for n in spec["inputs"]])
        return {n: t.numpy() for n, t in zip(spec["outputs"], out, strict=True)}

    def generate(self, prompt: str | list[int], **options: Any) -> list[Piece]:
        """The tokens after `prompt`, as `looped.edge.EdgeModel.generate` makes them (options alike)."""
        return list(Generation(self, **options).stream(prompt))


def _plain(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(x))
    return torch.empty(t.shape, dtype=t.dtype).copy_(t)


def format_export(out: str | Path, manifest: dict) -> str:
    """What `looped export executorch` prints: programs, sizes and parity with PyTorch."""
    lines = [f"wrote {out}"]
    for variant, p in manifest["programs"].items():
        worst = max(manifest["parity"][variant].values())
        lines.append(
            f"  {p['file']:<20} {p['bytes'] / 2**20:7.2f} MiB  batch {p['batch']}  "
            f"max |Δ logit| vs PyTorch {worst:.2e} (T = {', '.join(manifest['parity'][variant])})"
        )
    return "\n".join(lines)
