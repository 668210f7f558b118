"""The `looped` command line: argument parsing only; each subcommand calls one library function."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from looped.checkpoint import CheckpointError
from looped.config import ConfigError
from looped.interop.parcae import ConversionError

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
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
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
    return parser


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
    except (ConfigError, CheckpointError, ConversionError, ValueError) as e:
        print(f"looped {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
