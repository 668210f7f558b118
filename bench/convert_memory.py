"""Peak memory of `looped convert` on a large sharded bf16 checkpoint: it must not hold the model twice.

The script writes a synthetic Huginn-shaped checkpoint as the hub releases one (bfloat16 safetensors in
shards with `model.safetensors.index.json`, a tied head saved without `lm_head.weight`, random weights),
then runs `looped convert` on it in a fresh process and reads that process's peak resident memory
(its own VmHWM, Linux). The reference printed next to it is the checkpoint's size: a converter that
loads the state dict and then builds the model holds at least two copies of it.

    .venv/bin/python bench/convert_memory.py              # ≈ 2.2 GB of weights, about a minute
    .venv/bin/python bench/convert_memory.py --width 512  # a small smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import cpu_name, log  # bench/common.py: bench/ is on sys.path when a script runs
from safetensors.torch import save_file

CHILD = """
import sys
from looped.cli import main
code = main(["convert", sys.argv[1], sys.argv[2]])
status = open("/proc/self/status").read()
print(status.split("VmHWM:")[1].split()[0])
sys.exit(code)
"""


def huginn_config(width: int, layers: tuple[int, int, int], vocab: int, heads: int) -> dict:
    p, c, k = layers
    return {
        "model_type": "huginn_raven",
        "n_embd": width,
        "n_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": width // heads,
        "intermediate_size": 4 * width,
        "padded_vocab_size": vocab,
        "vocab_size": vocab,
        "n_layers_in_prelude": p,
        "n_layers_in_recurrent_block": c,
        "n_layers_in_coda": k,
        "block_size": 4096,
        "rope_base": 50000.0,
        "norm_eps": 1e-6,
        "qk_bias": True,
        "bias": False,
        "tie_embeddings": True,
        "injection_type": "linear",
        "mean_recurrence": 32,
        "torch_dtype": "bfloat16",
    }


def tensors(cfg: dict):
    """(name, tensor) of a Huginn checkpoint, one at a time, bf16, in Huginn's key names."""
    d, h, hd, inner = cfg["n_embd"], cfg["n_heads"], cfg["head_dim"], cfg["intermediate_size"]
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) / math.sqrt(shape[-1])).to(torch.bfloat16)

    yield "transformer.wte.weight", rand(cfg["vocab_size"], d)
    for stack, key in (
        ("prelude", "n_layers_in_prelude"),
        ("core_block", "n_layers_in_recurrent_block"),
        ("coda", "n_layers_in_coda"),
    ):
        for i in range(cfg[key]):
            a = f"transformer.{stack}.{i}"
            for n in range(1, 5):
                yield f"{a}.norm_{n}.weight", torch.ones(d, dtype=torch.bfloat16)
            yield f"{a}.attn.Wqkv.weight", rand(3 * h * hd, d)
            yield f"{a}.attn.qk_bias", torch.zeros(2, 1, h, hd, dtype=torch.bfloat16)
            yield f"{a}.attn.proj.weight", rand(d, h * hd)
            yield f"{a}.mlp.fc.weight", rand(2 * inner, d)
            yield f"{a}.mlp.proj.weight", rand(d, inner)
    yield "transformer.adapter.weight", rand(d, 2 * d)
    yield "transformer.ln_f.weight", torch.ones(d, dtype=torch.bfloat16)


def write_sharded(folder: Path, cfg: dict, shard_bytes: int) -> int:
    """The checkpoint in shards of about `shard_bytes`; returns the bytes of weights written."""
    (folder / "config.json").write_text(json.dumps(cfg))
    weight_map, shard, size, total, index = {}, {}, 0, 0, 1

    def flush():
        nonlocal shard, size, index
        name = f"model-{index:05d}.safetensors"
        save_file(shard, str(folder / name), {"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, size, index = {}, 0, index + 1

    for name, t in tensors(cfg):
        shard[name] = t
        size += t.numel() * t.element_size()
        total += t.numel() * t.element_size()
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--layers", default="2,10,2", help="prelude,core,coda")
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--shard-mb", type=int, default=500)
    args = parser.parse_args()
    layers = tuple(int(v) for v in args.layers.split(","))
    cfg = huginn_config(args.width, layers, args.vocab, heads=max(1, args.width // 128))
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        src, out = Path(tmp) / "huginn", Path(tmp) / "native"
        src.mkdir()
        log("writing the synthetic checkpoint ...")
        total = write_sharded(src, cfg, args.shard_mb * 2**20)
        shards = len(list(src.glob("model-*.safetensors")))
        log(f"converting {total / 2**30:.2f} GiB in {shards} shards ...")
        t = time.perf_counter()
        # The child reports its own high-water mark (VmHWM): ru_maxrss of children would also count the pages
        # a fork copies from this process, which holds the weights it just wrote.
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(src), str(out)], capture_output=True, text=True
        )
        seconds = time.perf_counter() - t
        if proc.returncode != 0:
            sys.exit(f"looped convert failed:\n{proc.stderr}")
        peak = int(proc.stdout.strip().splitlines()[-1]) * 1024  # kB
        written = (out / "model.safetensors").stat().st_size
    print(f"# convert memory · {datetime.date.today()} · {cpu_name()} · torch {torch.__version__}")
    print(f"{'checkpoint':>12} {'shards':>6} {'written':>9} {'peak RSS':>9} {'RSS/ckpt':>8} {'seconds':>7}")
    print(
        f"{total / 2**30:>10.2f} G {shards:>6} {written / 2**30:>7.2f} G {peak / 2**30:>7.2f} G "
        f"{peak / total:>8.2f} {seconds:>7.1f}"
    )


if __name__ == "__main__":
    main()
