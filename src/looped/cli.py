"""The `looped` command line: argument parsing only; each subcommand calls one library function.

Every subcommand's parser sets `run`, its handler: a small function that imports what it calls (so that
`looped --help` imports no torch) and prints the result. A library error of the kinds in `looped.errors`
becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from looped.errors import USER_ERRORS

INFO_LOOPS = (1, 2, 4, 8, 16, 32)
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16", "auto")


# ---------------------------------------------------------------- argument types


def _int_list(text: str) -> list[int]:
    """ "1,4,16", or "8..512" for the doublings from 8 to 512."""
    try:
        values = []
        for v in (v.strip() for v in text.split(",") if v.strip()):
            lo, sep, hi = v.partition("..")
            if sep and int(lo) >= 1:
                values += [2**i * int(lo) for i in range(64) if 2**i * int(lo) <= int(hi)]
            else:
                values.append(int(v))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers or A..B, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"loop counts must be integers ≥ 1, got {text!r}")
    return values


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    return _positive(text) if text.strip() != "0" else 0


def _lrs(text: str | None) -> list[float] | None:
    """--lrs "1e-3,3e-3" as numbers (None stays None); a ValueError, reported as one line, otherwise."""
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--lrs must be comma-separated numbers, got {text!r}") from None


def _placement(fn: Callable[..., Any], args: argparse.Namespace) -> dict[str, str]:
    """The --device and --dtype given, as keyword arguments of `fn`; one that `fn` cannot take is refused
    rather than ignored."""
    import inspect

    given = {name: getattr(args, name) for name in ("device", "dtype") if getattr(args, name) is not None}
    accepted = inspect.signature(fn).parameters
    for name in given:
        if name not in accepted:
            raise ValueError(f"--{name} is not supported by looped {args.command} yet")
    return given


def _json_or(args: argparse.Namespace, value: Any, text: Callable[[Any], str], indent: int = 1) -> str:
    import json

    return json.dumps(value, indent=indent) if args.json else text(value)


def _no_checkpoint(args: argparse.Namespace) -> None:
    if args.checkpoint is not None:
        if "=" in args.checkpoint:
            raise ValueError(
                f"each --set takes one section.key=value: write --set before {args.checkpoint!r}"
            )
        raise ValueError(f"looped {args.command} takes --preset/--config/--set, not a checkpoint directory")


# ---------------------------------------------------------------- handlers: one per subcommand


def _info(args: argparse.Namespace) -> None:
    from looped.summary import info

    print(info(args.checkpoint, args.files, args.set, args.loops, args.seq_len, args.json))


def _probe(args: argparse.Namespace) -> None:
    from looped.summary import probe

    print(probe(args.checkpoint, args.files, args.set, args.loops, args.batch, args.seq_len, args.seed))


def _convert(args: argparse.Namespace) -> None:
    from looped.interop.convert import FAMILIES, convert

    if len(args.paths) == 3:
        family, src, out = args.paths
        if family not in FAMILIES:
            raise ValueError(
                f"unknown family {family!r}; choose {', '.join(FAMILIES)} (or give only SRC OUT)"
            )
    elif len(args.paths) == 2:
        family, (src, out) = None, args.paths
    else:
        raise ValueError("looped convert takes [FAMILY] SRC OUT")
    found, path = convert(src, out, family, args.dtype)
    print(f"wrote {path} ({found})")


def _data_prepare(args: argparse.Namespace) -> None:
    from looped.data.prepare import prepare

    manifest = prepare(
        args.source,
        args.out,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        shard_tokens=args.shard_tokens,
        text_field=args.text_field,
        invalid_utf8=args.invalid_utf8,
        seed=args.seed,
        workers=args.workers,
        bpe_sample=args.bpe_sample,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    tokens = manifest["tokens"]
    print(f"wrote {args.out}: {tokens['train']:,} train and {tokens['val']:,} validation tokens")


def _train(args: argparse.Namespace) -> None:
    _no_checkpoint(args)
    if args.task is not None:
        _train_task(args)
        return
    for flag, given in (("--size", args.size is not None), ("--baseline", args.baseline)):
        if given:
            raise ValueError(f"{flag} applies to task training only: add --task NAME (e.g. --task parity)")
    from looped.config import load_config
    from looped.train.trainer import train

    result = train(load_config(args.files, args.set), resume=args.resume)
    if result.rank == 0:
        print(result.summary())


def _train_task(args: argparse.Namespace) -> None:
    from looped.config import load_config
    from looped.tasks.train import after_training, baseline_config, parse_stages, train_curriculum, train_task
    from looped.train.state import TrainingStopped

    cfg = load_config(args.files, args.set)
    if args.baseline:
        cfg = baseline_config(cfg)
    try:
        if args.size is None:
            model, _ = train_task(cfg, args.task, None, resume=args.resume)
            size, mu = None, max(1, round(cfg.loops.mean_loops))
        else:
            stages = parse_stages(args.size)
            model, _ = train_curriculum(cfg, args.task, stages, resume=args.resume)
            size = stages[-1][1]  # μ grows with the problem size, as the curriculum scaled it
            mu = max(1, round(cfg.loops.mean_loops * size / stages[0][1]))
    except TrainingStopped as stop:  # a signal asked for it: a clean stop, as `looped train` makes one
        print(str(stop))
        return
    print(after_training(model, args.task, size, mu))
    if cfg.train.out:
        print(f"saved {cfg.train.out}/final")


def _finetune(args: argparse.Namespace) -> None:
    from looped.science.transfer import finetune

    if args.checkpoint is None:
        raise ValueError("looped finetune needs a checkpoint directory")
    result = finetune(args.checkpoint, args.files, args.set, resume=args.resume)
    if result.rank == 0:
        print(result.summary())


def _retrofit(args: argparse.Namespace) -> None:
    from looped.science.transfer import retrofit

    if args.checkpoint is None:
        raise ValueError("looped retrofit needs a checkpoint directory")
    try:
        layers = tuple(int(v) for v in args.layers.split(","))
    except ValueError:
        layers = ()
    if len(layers) != 3:
        raise ValueError(f"--layers must be prelude,core,coda, e.g. 2,2,2; got {args.layers!r}")
    result = retrofit(args.checkpoint, layers, args.files, args.set, resume=args.resume)
    if result.rank == 0:
        print(result.summary())


def _eval(args: argparse.Namespace) -> None:
    from looped.science.evaluate import evaluate_checkpoint, format_eval
    from looped.tasks.train import evaluate_task_checkpoint, format_task_result

    task = evaluate_task_checkpoint(
        args.checkpoint,
        args.task,
        args.sizes,
        args.loops,
        args.plot,
        args.baseline,
        problems=args.problems,
        **_placement(evaluate_task_checkpoint, args),
    )
    if task is not None:
        print(_json_or(args, task, format_task_result, indent=2))
        return
    given_flags = (
        ("--sizes", args.sizes is not None),
        ("--baseline", args.baseline is not None),
        ("--problems", args.problems is not None),
    )
    for flag, given in given_flags:
        if given:
            raise ValueError(f"{flag} applies to task checkpoints; {args.checkpoint} is a language model")
    result = evaluate_checkpoint(
        args.checkpoint,
        args.loops,
        args.data,
        args.max_windows,
        args.batch_size,
        args.plot,
        exit=args.exit,
        kv_cache=args.kv_cache,
        min_loops=args.min_loops,
        **_placement(evaluate_checkpoint, args),
    )
    print(_json_or(args, result, format_eval, indent=2))


def _generate(args: argparse.Namespace) -> None:
    import json

    from looped.infer.records import format_record

    records = _onnx_records(args) if args.backend == "onnx" else _torch_records(args)
    if args.json:
        print(json.dumps(records, indent=2))
        return
    show = args.show_loops or args.exit is not None or args.max_ms_per_token is not None
    for r in records:
        print(format_record(args.prompt, r, show))


def _torch_records(args: argparse.Namespace) -> list[dict]:
    from looped.infer.session import generate_records

    return generate_records(
        args.checkpoint,
        args.prompt,
        args.loops or [None],
        kv_cache=args.kv_cache,
        device=args.device,
        dtype=args.dtype,
        exit=args.exit,
        min_loops=args.min_loops,
        max_ms_per_token=args.max_ms_per_token,
        max_flops_per_token=args.max_flops_per_token,
        warm_start=args.warm_start or None,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        speculative=args.speculative,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        stop=args.stop,
        seed=args.seed,
    )


# What the ONNX backend does not do; each refused by name instead of silently ignored.
_ONNX_REFUSED = {
    "max_flops_per_token": "--max-flops-per-token",
    "warm_start": "--warm-start",
    "speculative": "--speculative",
    "repetition_penalty": "--repetition-penalty",
    "stop": "--stop",
    "device": "--device",
    "dtype": "--dtype",
}


def _onnx_records(args: argparse.Namespace) -> list[dict]:
    from looped.edge.session import generate_records

    given = [flag for key, flag in _ONNX_REFUSED.items() if getattr(args, key, None) not in (None, False)]
    if given:
        raise ValueError(f"--backend onnx does not take {', '.join(given)} (the torch backend does)")
    return generate_records(
        args.checkpoint,
        args.prompt,
        args.loops or [None],
        variant=args.variant,
        threads=args.threads,
        exit=args.exit,
        min_loops=args.min_loops or 1,
        kv_cache=args.kv_cache,
        budget_ms=args.max_ms_per_token,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )


def _chat(args: argparse.Namespace) -> None:
    from looped.infer.session import chat

    if args.loops is not None and len(args.loops) > 1:
        raise ValueError("looped chat takes one loop count")
    chat(
        args.checkpoint,
        kv_cache=args.kv_cache,
        loops=args.loops[0] if args.loops else None,
        exit=args.exit,
        max_ms_per_token=args.max_ms_per_token,
        max_flops_per_token=args.max_flops_per_token,
        min_loops=args.min_loops,
        warm_start=args.warm_start or None,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
    )


def _calibrate(args: argparse.Namespace) -> None:
    from looped.infer.session import calibrate_checkpoint, format_profile

    profile, path = calibrate_checkpoint(
        args.checkpoint,
        args.loops,
        args.batch_sizes,
        args.tokens,
        args.kv_cache,
        args.out,
        device=args.device,
        dtype=args.dtype,
    )
    print(format_profile(profile, path))


def _compare(args: argparse.Namespace) -> None:
    from looped.science.compare import compare, format_compare

    _no_checkpoint(args)
    summary = compare(
        args.files,
        args.set,
        args.budget,
        seeds=args.seeds,
        lrs=_lrs(args.lrs),
        eval_loops=args.loops,
        eval_windows=args.eval_windows,
        out=args.out,
        parallel=args.parallel,
    )
    print(_json_or(args, summary, format_compare))


def _fit(args: argparse.Namespace) -> None:
    from looped.science.fits import fit_results, format_fit, save_fit

    fit = fit_results(args.results, bootstrap_samples=args.bootstrap, seed=args.seed)
    saved = ""
    if args.out:
        from looped.science.plots import plot_fits

        fit.plots = [str(p) for p in plot_fits(fit, args.out)]
        saved = f"\nwrote {save_fit(fit, args.out)}"
    print(_json_or(args, fit.to_json(), lambda _: format_fit(fit) + saved))


def _report(args: argparse.Namespace) -> None:
    from looped.science.report import write_report

    page, notes = write_report(args.dir)
    print(f"wrote {page} and {notes}")


def _study_stability(args: argparse.Namespace) -> None:
    from looped.science.study import format_stability, study_stability

    _no_checkpoint(args)
    summary = study_stability(args.files, args.set, _lrs(args.lrs), args.out, parallel=args.parallel)
    print(_json_or(args, summary, format_stability))


def _study_transfer(args: argparse.Namespace) -> None:
    from looped.science.compare import parse_budget
    from looped.science.transfer import format_transfer, study_transfer

    _no_checkpoint(args)
    lrs = _lrs(args.lrs)
    kind, tokens = parse_budget(args.budget)
    if kind != "tokens":
        raise ValueError(f"looped study transfer takes --budget tokens=N, got {args.budget!r}")
    summary = study_transfer(
        args.files,
        args.set,
        tokens,
        args.finetune_tokens or tokens / 4,
        args.mus,
        lrs,
        args.out,
        eval_loops=args.eval_loops,
        parallel=args.parallel,
    )
    print(_json_or(args, summary, format_transfer))


def _sweep(args: argparse.Namespace) -> None:
    from looped.science.sweep import format_table, load_grid, read_results, run_sweep

    if args.table:
        grid = load_grid(args.grid)
        print(format_table(read_results(grid.out / "results.jsonl"), [name for name, _ in grid.runs()]))
        return
    print(f"wrote {run_sweep(args.grid, commands=args.commands)}")


def _serve(args: argparse.Namespace) -> None:
    if args.hash_key:
        _hash_key(args)
        return
    if args.checkpoint is None:
        raise ValueError("looped serve needs a checkpoint directory")
    try:
        from looped.serve.app import serve
    except ImportError as e:
        raise ValueError(
            f"looped serve needs FastAPI and uvicorn: pip install 'looped[serve]' ({e})"
        ) from None
    serve(args.checkpoint, args.files, args.set, host=args.host, port=args.port, **_placement(serve, args))


def _hash_key(args: argparse.Namespace) -> None:
    """Print the digest of a key read from stdin (when piped) or typed at a hidden prompt, never from argv,
    so that the key stays out of shell history and process lists."""
    from looped.serve.auth import hash_key

    if args.checkpoint is not None:
        raise ValueError(
            "--hash-key reads the key from stdin or a hidden prompt, not from the command line "
            "(e.g. looped serve --hash-key < key.txt)"
        )
    if sys.stdin is not None and not sys.stdin.isatty():
        key = sys.stdin.readline().rstrip("\r\n")
    else:
        import getpass

        key = getpass.getpass("API key (not shown): ")
    if not key:
        raise ValueError(
            "no key given: pipe it in (looped serve --hash-key < key.txt) or type it at the prompt"
        )
    print(hash_key(key))


def _export_onnx(args: argparse.Namespace) -> None:
    from looped.interop.onnx_export import export_onnx, format_export

    manifest = export_onnx(
        args.checkpoint,
        args.out,
        kv_cache=args.kv_cache,
        max_seq_len=args.max_seq_len,
        quantize=args.quantize,
        data=args.data,
    )
    print(format_export(args.out, manifest))


def _export_executorch(args: argparse.Namespace) -> None:
    from looped.interop.executorch_export import export_executorch, format_export

    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    manifest = export_executorch(
        args.checkpoint, args.out, kv_cache=args.kv_cache, max_seq_len=args.max_seq_len, variants=variants
    )
    print(format_export(args.out, manifest))


def _export_hf(args: argparse.Namespace) -> None:
    from looped.interop.hf import export_hf

    print(
        f"wrote {export_hf(args.checkpoint, args.out, num_loops=args.loops, **_placement(export_hf, args))}"
    )


# ---------------------------------------------------------------- parsers


def _model_source(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoint", nargs="?", help="a looped checkpoint directory (instead of --preset/--config)"
    )
    # Presets and files share one list, so they apply in the order given on the command line.
    p.add_argument(
        "--preset", dest="files", action="append", default=[], metavar="NAME", help="a preset from configs/"
    )
    p.add_argument("--config", dest="files", action="append", metavar="FILE", help="a TOML config file")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable)",
    )


def _placement_args(
    p: argparse.ArgumentParser,
    device_help: str = "where the model runs (default [infer] device: auto, CUDA when available)",
    dtype_help: str = "weights and activations; auto: bfloat16 where the device has it (default [infer] dtype: float32)",
) -> None:
    """--device and --dtype; a command whose defaults are not [infer]'s says its own in the help texts."""
    p.add_argument("--device", choices=DEVICES, default=None, help=device_help)
    p.add_argument("--dtype", choices=DTYPES, default=None, help=dtype_help)


def _compute_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--loops",
        type=_int_list,
        default=None,
        help="loop counts, e.g. 1,4,16 (one run each; with --exit, the most loops); default: the model's",
    )
    p.add_argument(
        "--exit",
        default=None,
        help="adaptive exit per token, e.g. kl:1e-3, entropy:1e-2, state:1e-2, argmax:2",
    )
    p.add_argument("--min-loops", type=_positive, default=None, help="with --exit: no token stops earlier")
    p.add_argument("--max-ms-per-token", type=float, default=None, help="pick loops to fit this latency")
    p.add_argument("--max-flops-per-token", type=float, default=None, help="pick loops to fit these FLOPs")
    p.add_argument("--warm-start", action="store_true", help="start each token from the last one's state")
    p.add_argument("--kv-cache", choices=["shared", "per-loop"], default=None, help="default [infer]: shared")
    _placement_args(p)


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info", help="parameters, FLOPs per token and KV-cache bytes of a config or checkpoint"
    )
    _model_source(p)
    p.add_argument(
        "--loops",
        type=_int_list,
        default=list(INFO_LOOPS),
        help="loop counts to tabulate (default 1,2,4,8,16,32)",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="sequence length for attention FLOPs (default model.max_seq_len)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(run=_info)


def _add_probe(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "probe", help="run the model at several loop counts: time, state norms, ρ(Ā), contraction"
    )
    _model_source(p)
    p.add_argument(
        "--loops", type=_int_list, default=[1, 2, 4, 8, 16], help="loop counts (default 1,2,4,8,16)"
    )
    p.add_argument("--batch", type=_positive, default=4)
    p.add_argument("--seq-len", type=_positive, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_probe)


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a released checkpoint (Huginn, retrofitted Llama, Ouro, Parcae) into a looped checkpoint",
        description="looped convert [FAMILY] SRC OUT: SRC is the folder as released (config.json, "
        "model.safetensors or shards with model.safetensors.index.json, tokenizer files); the family "
        "(huginn, retrofit, ouro, parcae) is detected from config.json and the weights unless named.",
    )
    p.add_argument("paths", nargs="+", metavar="[FAMILY] SRC OUT")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="dtype of the stored weights (default: the source's, e.g. bfloat16 stays bfloat16)",
    )
    p.set_defaults(run=_convert)


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="prepare token data for training")
    data = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = data.add_parser("prepare", help="tokenize a text source into shards with a train/validation split")
    c.add_argument(
        "source",
        help="'shakespeare' (built in), a .txt/.jsonl/.parquet file or folder, or hf:NAME[:CONFIG][@SPLIT]",
    )
    c.add_argument("out", help="output directory")
    c.add_argument(
        "--tokenizer",
        default="bpe",
        metavar="bpe|bytes|FILE",
        help="fit a BPE (default), use bytes, or use this tokenizer.json (or the one in this folder)",
    )
    c.add_argument("--vocab-size", type=_positive, default=4096, help="BPE vocabulary size (default 4096)")
    c.add_argument(
        "--bpe-sample",
        type=_positive,
        default=100_000_000,
        metavar="CHARS",
        help="fit the BPE on at most this many characters of train text (default 100,000,000)",
    )
    c.add_argument(
        "--workers", type=_positive, default=None, help="processes that encode (default: every core)"
    )
    c.add_argument(
        "--val-fraction", type=float, default=0.05, help="share of documents held out (default 0.05)"
    )
    c.add_argument("--shard-tokens", type=_positive, default=16_777_216, help="tokens per shard file")
    c.add_argument("--text-field", default="text", help="the text field of .jsonl/.parquet/hf sources")
    c.add_argument(
        "--invalid-utf8",
        choices=["replace", "skip", "error"],
        default="replace",
        help="text that is not UTF-8: replace bad bytes (default), skip the document, or stop",
    )
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(run=_data_prepare)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a looped LM (also under torchrun: python -m looped train ...)")
    _model_source(p)
    p.add_argument(
        "--task",
        default=None,
        help="train on a task instead: prefix_sums, parity, addition, mazes (algorithmic); digits, "
        "moving_digits (vision); digit_names (two streams: image and text)",
    )
    p.add_argument(
        "--size",
        default=None,
        help="with an algorithmic --task: the training problem size N, or LO:HI for a size drawn per step "
        "(default 32); several, comma-separated (16,32), train a curriculum, train.steps steps each",
    )
    p.add_argument(
        "--baseline",
        action="store_true",
        help="with --task: train the non-looped baseline instead (the same blocks, each run once)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the run in train.out from its newest checkpoint"
    )
    p.set_defaults(run=_train)


def _add_finetune_retrofit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="continue training a checkpoint, e.g. at another mean loop count")
    _model_source(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted fine-tune")
    p.set_defaults(run=_finetune)

    p = sub.add_parser("retrofit", help="turn a trained standard checkpoint into a looped one, then train it")
    _model_source(p)
    p.add_argument("--layers", required=True, help="prelude,core,coda layers taken from it, e.g. 2,2,2")
    p.add_argument("--resume", action="store_true", help="continue an interrupted retrofit run")
    p.set_defaults(run=_retrofit)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="validation loss, perplexity and bits per byte against loops (and adaptive exit)"
    )
    p.add_argument("checkpoint")
    p.add_argument("--loops", type=_int_list, default=[1, 2, 4, 8, 16, 32], help="default 1,2,4,8,16,32")
    p.add_argument(
        "--data", default=None, help="prepared data directory (default: the checkpoint's data.path)"
    )
    p.add_argument("--max-windows", type=_positive, default=None, help="validation sequences to use")
    p.add_argument("--batch-size", type=_positive, default=None)
    p.add_argument("--plot", default=None, metavar="PNG", help="write loss against loops as a PNG")
    p.add_argument(
        "--exit",
        default=None,
        help="also evaluate adaptive exit (e.g. kl:1e-3) with each loop count as the most",
    )
    p.add_argument("--min-loops", type=_positive, default=1, help="with --exit: no token stops earlier")
    p.add_argument("--kv-cache", choices=["shared", "per-loop"], default="shared", help="with --exit")
    p.add_argument(
        "--task",
        default=None,
        help="exact match on an algorithmic task (default: the one the checkpoint was trained on, if any)",
    )
    p.add_argument("--sizes", type=_int_list, default=None, help="with a task: problem sizes, e.g. 32,64,128")
    p.add_argument(
        "--problems", type=_positive, default=None, help="with a task: test problems per size (default 256)"
    )
    p.add_argument(
        "--baseline",
        default=None,
        help="with a task: a non-looped checkpoint (looped train --task … --baseline) to show alongside",
    )
    _placement_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_eval)


def _add_generate_chat_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt: fixed loops, adaptive exit or a latency budget")
    p.add_argument("checkpoint")
    p.add_argument("--prompt", required=True)
    _compute_args(p)
    p.add_argument("--max-new-tokens", type=_non_negative, default=None, help="default [infer] (128)")
    p.add_argument("--temperature", type=float, default=None, help="0 is greedy (default [infer]: 0.8)")
    p.add_argument("--top-k", type=_positive, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument(
        "--stop", action="append", default=None, metavar="TEXT", help="stop before TEXT (repeatable)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show-loops", action="store_true", help="print the loops each token ran")
    p.add_argument(
        "--speculative",
        metavar="DRAFT_LOOPS:LOOKAHEAD|auto",
        help="self-speculative decoding: draft LOOKAHEAD tokens at DRAFT_LOOPS loops, verify them in one pass "
        "at --loops (the same tokens as without it with the per-loop cache; sampling keeps the distribution); "
        "auto picks the pair from `looped calibrate`",
    )
    p.add_argument(
        "--backend",
        choices=["torch", "onnx"],
        default="torch",
        help="torch: CHECKPOINT is a checkpoint; onnx: CHECKPOINT is a folder from `looped export onnx`, run "
        "by looped.edge on ONNX Runtime without torch",
    )
    p.add_argument("--variant", choices=["float32", "int8"], default="float32", help="--backend onnx: graphs")
    p.add_argument("--threads", type=_positive, default=None, help="--backend onnx: threads per graph")
    p.add_argument("--json", action="store_true", help="text, tokens, loops per token and timings as JSON")
    p.set_defaults(run=_generate)

    p = sub.add_parser(
        "chat", help="an interactive session with a checkpoint, streaming, loops shown per reply"
    )
    p.add_argument("checkpoint")
    _compute_args(p)
    p.add_argument("--max-new-tokens", type=_positive, default=128)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_chat)

    p = sub.add_parser("calibrate", help="measure decode ms per token against loops; store the profile")
    p.add_argument("checkpoint")
    p.add_argument("--loops", type=_int_list, default=[1, 2, 4, 8, 16], help="default 1,2,4,8,16")
    p.add_argument("--batch-sizes", type=_int_list, default=[1], help="default 1")
    p.add_argument("--tokens", type=_positive, default=16, help="decode steps per measurement")
    p.add_argument("--kv-cache", choices=["shared", "per-loop"], default=None)
    p.add_argument("--out", default=None, help="profile file (default CHECKPOINT/calibration.json)")
    _placement_args(p)
    p.set_defaults(run=_calibrate)


def _add_compare_fit_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="a looped model against its parameter- and FLOP-matched baselines")
    _model_source(p)
    p.add_argument("--budget", required=True, help="tokens=N or flops=F per run (e.g. tokens=2e6)")
    p.add_argument("--seeds", type=_positive, default=3, help="seeds per model at its best learning rate")
    p.add_argument(
        "--lrs", default=None, help="learning rates to try, e.g. 1e-3,3e-3,1e-2 (default optim.lr ×⅓, ×1, ×3)"
    )
    p.add_argument("--loops", type=_int_list, default=None, help="loop counts to evaluate (default 1,2,μ,2μ)")
    p.add_argument("--eval-windows", type=_positive, default=64)
    p.add_argument("--parallel", type=_positive, default=1, help="runs at once")
    p.add_argument("--out", default=None, help="output directory (default: train.out + '-compare')")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_compare)

    p = sub.add_parser(
        "fit", help="fit scaling laws (test-time, training, unified) to a sweep's results.jsonl"
    )
    p.add_argument("results", help="results.jsonl from looped sweep or looped compare")
    p.add_argument("--out", default=None, help="write fit.json and plots here")
    p.add_argument("--bootstrap", type=_positive, default=200, help="bootstrap resamples for the intervals")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_fit)

    p = sub.add_parser(
        "report", help="one self-contained HTML (and Markdown) report of a run, sweep, comparison or study"
    )
    p.add_argument("dir", help="a training run, sweep, compare or study output directory")
    p.set_defaults(run=_report)


def _add_study(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="studies: stability of injections; transfer across loop depths")
    studies = p.add_subparsers(dest="study", required=True, metavar="STUDY")
    c = studies.add_parser(
        "stability", help="injections × spectral norm × learning rates: divergence, spikes, ‖h‖, ρ(Ā)"
    )
    _model_source(c)
    c.add_argument("--lrs", required=True, help="learning rates, e.g. 1e-3,3e-3,1e-2,3e-2")
    c.add_argument("--out", required=True, help="output directory (resumable)")
    c.add_argument("--parallel", type=_positive, default=1, help="runs at once")
    c.add_argument("--json", action="store_true")
    c.set_defaults(run=_study_stability)
    c = studies.add_parser(
        "transfer",
        help="loss against loops trained at each μ, fine-tuned from μ₀ to other μ, and retrofitted from a "
        "standard model; learning-rate grid across μ",
    )
    _model_source(c)
    c.add_argument("--budget", required=True, help="tokens from scratch, e.g. tokens=5e5")
    c.add_argument(
        "--finetune-tokens", type=float, default=None, help="tokens per fine-tune (default budget/4)"
    )
    c.add_argument("--mus", type=_int_list, default=[1, 2, 4, 8], help="mean loop counts, default 1,2,4,8")
    c.add_argument("--lrs", required=True, help="learning rates, e.g. 3e-3,1e-2,3e-2")
    c.add_argument(
        "--eval-loops", type=_int_list, default=None, help="default 1,2,4,8,16 and each μ, 2·max μ"
    )
    c.add_argument("--out", required=True, help="output directory (resumable)")
    c.add_argument("--parallel", type=_positive, default=1, help="runs at once")
    c.add_argument("--json", action="store_true")
    c.set_defaults(run=_study_transfer)


def _edge_export_parser(exp: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    """The arguments both edge exports take: checkpoint, out, the default cache mode, the longest sequence."""
    c = exp.add_parser(name, help=help)
    c.add_argument("checkpoint")
    c.add_argument("out")
    c.add_argument(
        "--kv-cache",
        choices=["shared", "per-loop"],
        default=None,
        help="the default mode the manifest names (the graphs serve both)",
    )
    c.add_argument(
        "--max-seq-len", type=_positive, default=None, help="longest sequence (default: the model's)"
    )
    return c


def _add_sweep_serve_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="train a grid of runs (resumable) into results.jsonl for `looped fit`")
    p.add_argument("grid", help="GRID.toml: [sweep] settings and a [grid] of 'section.key' = [values]")
    p.add_argument(
        "--commands",
        choices=["torchrun", "slurm"],
        default=None,
        help="write the commands for torchrun or a Slurm array instead of running here",
    )
    p.add_argument(
        "--table",
        action="store_true",
        help="print validation loss against loops for the runs finished so far (seeds averaged), run nothing",
    )
    p.set_defaults(run=_sweep)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server; each request picks its loops or tier")
    _model_source(p)
    p.add_argument("--host", default=None, help="address (default serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default serve.port, 8000)")
    _placement_args(p)
    p.add_argument(
        "--hash-key",
        action="store_true",
        help="read a key from stdin (or a hidden prompt), print the sha256 to put in serve.keys, and exit",
    )
    p.set_defaults(run=_serve)

    p = sub.add_parser("export", help="export a checkpoint to another format")
    exp = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    c = exp.add_parser("hf", help="a Hugging Face transformers folder (LoopedForCausalLM + tokenizer)")
    c.add_argument("checkpoint")
    c.add_argument("out")
    c.add_argument("--loops", type=_positive, default=None, help="num_loops in the exported config")
    _placement_args(
        c,
        device_help="where the weights are loaded while exporting (default: cpu)",
        dtype_help="dtype of the exported weights (default: float32)",
    )
    c.set_defaults(run=_export_hf)

    c = _edge_export_parser(
        exp,
        "onnx",
        "ONNX graphs (prelude, one loop step, coda; KV-cached too; the whole loop) whose loop count stays a "
        "runtime input, with manifest.json and the tokenizer",
    )
    c.add_argument(
        "--quantize", choices=["int8"], default=None, help="add int8 graphs (dynamic quantization)"
    )
    c.add_argument(
        "--data",
        default=None,
        help="prepared data whose val split measures the loss of each variant "
        "(default: the checkpoint's data.path, when it exists)",
    )
    c.set_defaults(run=_export_onnx)

    c = _edge_export_parser(
        exp,
        "executorch",
        "an ExecuTorch program (.pte; portable and XNNPACK) whose methods are prelude, one loop step and coda "
        "with a KV cache, so the app on the device picks the loops",
    )
    c.add_argument(
        "--variants",
        default="portable,xnnpack",
        help="programs to write: portable (any batch), xnnpack (batch 1); default both",
    )
    c.set_defaults(run=_export_executorch)


def build_parser() -> argparse.ArgumentParser:
    """The `looped` parser; each subcommand's namespace carries `run`, its handler."""
    parser = argparse.ArgumentParser(prog="looped", description="Looped (recurrent-depth) transformers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _add_info,
        _add_probe,
        _add_convert,
        _add_data,
        _add_train,
        _add_finetune_retrofit,
        _add_eval,
        _add_generate_chat_calibrate,
        _add_compare_fit_report,
        _add_study,
        _add_sweep_serve_export,
    ):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `looped` command; returns the exit status (2, with one line on stderr, for a user error)."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except USER_ERRORS as e:
        print(f"looped {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
