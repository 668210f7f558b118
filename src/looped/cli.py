"""The `looped` command line: argument parsing only; each subcommand calls one library function."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from looped.checkpoint import CheckpointError
from looped.config import ConfigError
from looped.data.errors import DataError
from looped.interop.parcae import ConversionError
from looped.train.trainer import TrainingError

INFO_LOOPS = (1, 2, 4, 8, 16, 32)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="looped", description="Looped (recurrent-depth) transformers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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

    p = sub.add_parser("convert", help="convert a checkpoint from another format into a looped checkpoint")
    conv = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    c = conv.add_parser(
        "parcae",
        help="a Parcae checkpoint directory (config.json + model.safetensors / model.pt / pytorch_model.bin)",
    )
    c.add_argument("src")
    c.add_argument("out")
    p = sub.add_parser("data", help="prepare token data for training")
    data = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = data.add_parser("prepare", help="tokenize a text source into shards with a train/validation split")
    c.add_argument(
        "source", help="'shakespeare' (built in), a .txt/.jsonl/.parquet file or folder, or hf:NAME"
    )
    c.add_argument("out", help="output directory")
    c.add_argument("--tokenizer", choices=["bpe", "bytes"], default="bpe")
    c.add_argument("--vocab-size", type=_positive, default=4096, help="BPE vocabulary size (default 4096)")
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

    p = sub.add_parser("finetune", help="continue training a checkpoint, e.g. at another mean loop count")
    _model_source(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted fine-tune")

    p = sub.add_parser("retrofit", help="turn a trained standard checkpoint into a looped one, then train it")
    _model_source(p)
    p.add_argument("--layers", required=True, help="prelude,core,coda layers taken from it, e.g. 2,2,2")
    p.add_argument("--resume", action="store_true", help="continue an interrupted retrofit run")

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
        "--baseline",
        default=None,
        help="with a task: a non-looped checkpoint (looped train --task … --baseline) to show alongside",
    )
    p.add_argument("--json", action="store_true")

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
    p.add_argument("--json", action="store_true", help="text, tokens, loops per token and timings as JSON")

    p = sub.add_parser(
        "chat", help="an interactive session with a checkpoint, streaming, loops shown per reply"
    )
    p.add_argument("checkpoint")
    _compute_args(p)
    p.add_argument("--max-new-tokens", type=_positive, default=128)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("calibrate", help="measure decode ms per token against loops; store the profile")
    p.add_argument("checkpoint")
    p.add_argument("--loops", type=_int_list, default=[1, 2, 4, 8, 16], help="default 1,2,4,8,16")
    p.add_argument("--batch-sizes", type=_int_list, default=[1], help="default 1")
    p.add_argument("--tokens", type=_positive, default=16, help="decode steps per measurement")
    p.add_argument("--kv-cache", choices=["shared", "per-loop"], default=None)
    p.add_argument("--out", default=None, help="profile file (default CHECKPOINT/calibration.json)")

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

    p = sub.add_parser(
        "fit", help="fit scaling laws (test-time, training, unified) to a sweep's results.jsonl"
    )
    p.add_argument("results", help="results.jsonl from looped sweep or looped compare")
    p.add_argument("--out", default=None, help="write fit.json and plots here")
    p.add_argument("--bootstrap", type=_positive, default=200, help="bootstrap resamples for the intervals")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser(
        "report", help="one self-contained HTML (and Markdown) report of a run, sweep, comparison or study"
    )
    p.add_argument("dir", help="a training run, sweep, compare or study output directory")

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

    p = sub.add_parser("sweep", help="train a grid of runs (resumable) into results.jsonl for `looped fit`")
    p.add_argument("grid", help="GRID.toml: [sweep] settings and a [grid] of 'section.key' = [values]")
    p.add_argument(
        "--commands",
        choices=["torchrun", "slurm"],
        default=None,
        help="write the commands for torchrun or a Slurm array instead of running here",
    )

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server; each request picks its loops or tier")
    _model_source(p)
    p.add_argument("--host", default=None, help="address (default serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default serve.port, 8000)")
    p.add_argument(
        "--hash-key", metavar="KEY", help="print the sha256 to put in serve.keys for KEY, and exit"
    )

    p = sub.add_parser("export", help="export a checkpoint to another format")
    exp = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    c = exp.add_parser("hf", help="a Hugging Face transformers folder (LoopedForCausalLM + tokenizer)")
    c.add_argument("checkpoint")
    c.add_argument("out")
    c.add_argument("--loops", type=_positive, default=None, help="num_loops in the exported config")
    return parser


def _train(args: argparse.Namespace) -> None:
    from looped.config import load_config
    from looped.train.trainer import train

    if args.checkpoint is not None:
        if "=" in args.checkpoint:
            raise ValueError(
                f"each --set takes one section.key=value: write --set before {args.checkpoint!r}"
            )
        raise ValueError("looped train takes --preset/--config/--set, not a checkpoint directory")
    if args.task is not None:
        from looped.tasks.train import after_training, baseline_config, parse_stages, train_curriculum

        cfg = load_config(args.files, args.set)
        if args.baseline:
            cfg = baseline_config(cfg)
        if args.size is None:
            from looped.tasks.train import train_task

            model, _ = train_task(cfg, args.task, None)
            size = None
        else:
            stages = parse_stages(args.size)
            model, _ = train_curriculum(cfg, args.task, stages)
            size = stages[-1][1]
        mu = max(1, round(cfg.loops.mean_loops * (size / stages[0][1] if size else 1)))
        print(after_training(model, args.task, size, mu))
        if cfg.train.out:
            print(f"saved {cfg.train.out}/final")
        return
    result = train(load_config(args.files, args.set), resume=args.resume)
    if result.rank == 0:
        print(result.summary())


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


def _non_negative(text: str) -> int:
    value = _positive(text) if text.strip() != "0" else 0
    return value


def _generate(args: argparse.Namespace) -> None:
    import json

    from looped.infer.session import format_record, generate_records

    records = generate_records(
        args.checkpoint,
        args.prompt,
        args.loops or [None],
        kv_cache=args.kv_cache,
        exit=args.exit,
        min_loops=args.min_loops,
        max_ms_per_token=args.max_ms_per_token,
        max_flops_per_token=args.max_flops_per_token,
        warm_start=args.warm_start or None,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        stop=args.stop,
        seed=args.seed,
    )
    if args.json:
        print(json.dumps(records, indent=2))
        return
    show = args.show_loops or args.exit is not None or args.max_ms_per_token is not None
    for r in records:
        print(format_record(args.prompt, r, show))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "info":
            from looped.summary import info

            print(info(args.checkpoint, args.files, args.set, args.loops, args.seq_len, args.json))
        elif args.command == "probe":
            from looped.summary import probe

            print(
                probe(
                    args.checkpoint,
                    args.files,
                    args.set,
                    args.loops,
                    args.batch,
                    args.seq_len,
                    args.seed,
                )
            )
        elif args.command == "convert":
            from looped.interop.parcae import convert_parcae

            out = convert_parcae(args.src, args.out)
            print(f"wrote {out}")
        elif args.command == "data":
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
                progress=not args.no_progress,
                overwrite=args.overwrite,
            )
            tokens = manifest["tokens"]
            print(f"wrote {args.out}: {tokens['train']:,} train and {tokens['val']:,} validation tokens")
        elif args.command == "train":
            _train(args)
        elif args.command in ("finetune", "retrofit"):
            from looped.science import transfer

            if args.checkpoint is None:
                raise ValueError(f"looped {args.command} needs a checkpoint directory")
            if args.command == "finetune":
                result = transfer.finetune(args.checkpoint, args.files, args.set, resume=args.resume)
            else:
                try:
                    layers = tuple(int(v) for v in args.layers.split(","))
                except ValueError:
                    layers = ()
                if len(layers) != 3:
                    raise ValueError(f"--layers must be prelude,core,coda, e.g. 2,2,2; got {args.layers!r}")
                result = transfer.retrofit(args.checkpoint, layers, args.files, args.set, resume=args.resume)
            if result.rank == 0:
                print(result.summary())
        elif args.command == "eval":
            import json

            from looped.science.evaluate import evaluate_checkpoint, format_eval
            from looped.tasks.train import evaluate_task_checkpoint, format_task_result

            task = evaluate_task_checkpoint(
                args.checkpoint, args.task, args.sizes, args.loops, args.plot, args.baseline
            )
            if task is not None:
                print(json.dumps(task, indent=2) if args.json else format_task_result(task))
                return 0
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
            )
            print(json.dumps(result, indent=2) if args.json else format_eval(result))
        elif args.command == "generate":
            _generate(args)
        elif args.command == "chat":
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
            )
        elif args.command == "calibrate":
            from looped.infer.session import calibrate_checkpoint, format_profile

            profile, path = calibrate_checkpoint(
                args.checkpoint, args.loops, args.batch_sizes, args.tokens, args.kv_cache, args.out
            )
            print(format_profile(profile, path))
        elif args.command == "compare":
            import json

            from looped.science.compare import compare, format_compare

            if args.checkpoint is not None:
                raise ValueError("looped compare takes --preset/--config/--set, not a checkpoint directory")
            try:
                lrs = [float(v) for v in args.lrs.split(",")] if args.lrs else None
            except ValueError:
                raise ValueError(f"--lrs must be comma-separated numbers, got {args.lrs!r}") from None
            summary = compare(
                args.files,
                args.set,
                args.budget,
                seeds=args.seeds,
                lrs=lrs,
                eval_loops=args.loops,
                eval_windows=args.eval_windows,
                out=args.out,
                parallel=args.parallel,
            )
            print(json.dumps(summary, indent=1) if args.json else format_compare(summary))
        elif args.command == "fit":
            import json

            from looped.science.fit import fit_results, format_fit

            result = fit_results(
                args.results, out_dir=args.out, bootstrap_samples=args.bootstrap, seed=args.seed
            )
            print(json.dumps(result, indent=1) if args.json else format_fit(result))
        elif args.command == "report":
            from looped.science.report import write_report

            page, notes = write_report(args.dir)
            print(f"wrote {page} and {notes}")
        elif args.command == "study":
            import json

            from looped.science.study import format_stability, study_stability

            if args.checkpoint is not None:
                raise ValueError("looped study takes --preset/--config/--set, not a checkpoint directory")
            try:
                lrs = [float(v) for v in args.lrs.split(",")]
            except ValueError:
                raise ValueError(f"--lrs must be comma-separated numbers, got {args.lrs!r}") from None
            if args.study == "stability":
                summary = study_stability(args.files, args.set, lrs, args.out, parallel=args.parallel)
                print(json.dumps(summary, indent=1) if args.json else format_stability(summary))
            else:
                from looped.science.compare import parse_budget
                from looped.science.transfer import format_transfer, study_transfer

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
                print(json.dumps(summary, indent=1) if args.json else format_transfer(summary))
        elif args.command == "sweep":
            from looped.science.sweep import run_sweep

            path = run_sweep(args.grid, commands=args.commands)
            print(f"wrote {path}")
        elif args.command == "serve":
            if args.hash_key is not None:
                from looped.serve.auth import hash_key

                print(hash_key(args.hash_key))
                return 0
            if args.checkpoint is None:
                raise ValueError("looped serve needs a checkpoint directory")
            try:
                from looped.serve.app import serve
            except ImportError as e:
                raise ValueError(
                    f"looped serve needs FastAPI and uvicorn: pip install 'looped[serve]' ({e})"
                ) from None
            serve(args.checkpoint, args.files, args.set, host=args.host, port=args.port)
        elif args.command == "export":
            from looped.interop.hf import export_hf

            print(f"wrote {export_hf(args.checkpoint, args.out, num_loops=args.loops)}")
    except (ConfigError, CheckpointError, ConversionError, DataError, TrainingError, ValueError) as e:
        print(f"looped {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
