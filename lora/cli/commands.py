"""The `lora` command line: `lora demo`, `lora info DIR`, `lora merge` and `lora generate`;
all of its argument parsing is here.

Each subcommand is a thin shell over a library function, so everything the command does is
also reachable from Python: `lora.cli.demo.run`, `lora.cli.describe_adapter`,
`lora.merge_checkpoint` and `lora.cli.generate.generate_text`. Errors are one line on stderr
and a non-zero exit, never a traceback (set LORA_DEBUG=1 to get the traceback back). Heavy
modules are imported only by the subcommand that needs them, so `lora --help` is instant and
works whatever is installed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser", "add_merge_arguments", "run_merge"]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (plus a pointer to --help), exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _rank_list(text: str) -> list[int]:
    parts = [p for p in text.replace(" ", ",").split(",") if p]
    if not parts:
        raise argparse.ArgumentTypeError("expected a comma-separated list of ranks, e.g. 1,4,8,16")
    ranks = [_positive_int(p) for p in parts]
    if len(set(ranks)) != len(ranks):
        raise argparse.ArgumentTypeError(f"a rank appears twice in {text!r}")
    return ranks


def _add_demo(subparsers) -> None:
    from .demo import DEFAULT_EPOCHS, DEFAULT_OUTPUT_DIR, DEFAULT_RANKS  # light: no numpy work

    p = subparsers.add_parser(
        "demo",
        help="fine-tune the shipped digits MLP with LoRA at several ranks (offline, < 1 min)",
        description=(
            "Show LoRA's claim on a small pretrained model that ships with the package: an MLP "
            "trained on upright handwritten digits is adapted to digits scanned sideways "
            "(rotated 90 degrees), a task it was not trained for. Compares the untouched base, "
            "LoRA at each rank and full fine-tuning (trainable parameters, accuracy, time), "
            "then saves the best adapter (PEFT format) and a PNG of the loss curves."
        ),
    )
    # A string default goes through type=, so the help shows "1,4,8,16" and args get a list.
    p.add_argument("--ranks", type=_rank_list, default=",".join(map(str, DEFAULT_RANKS)),
                   metavar="R,R,...", help="LoRA ranks to try (default: %(default)s)")
    p.add_argument("--epochs", type=_positive_int, default=DEFAULT_EPOCHS,
                   help="training epochs per run (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, metavar="DIR",
                   help="where the adapter and the plot go (default: ./%(default)s)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="BLAS threads (default: 1, fastest for the demo's small layers)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    from . import demo

    demo.run(
        ranks=args.ranks,
        epochs=args.epochs,
        seed=args.seed,
        output_dir=args.output_dir,
        threads=args.threads,
        progress=not args.no_progress,
    )
    return 0


def _add_info(subparsers) -> None:
    p = subparsers.add_parser(
        "info",
        help="print an adapter's config, targets, ranks and parameter counts",
        description="Describe a PEFT LoRA adapter directory (adapter_config.json + "
        "adapter_model.safetensors), written by lora or by Hugging Face PEFT.",
    )
    p.add_argument("directory", metavar="DIR", help="the adapter directory")
    p.set_defaults(run=_run_info)


def _run_info(args) -> int:
    from .info import describe_adapter

    print(describe_adapter(args.directory))
    return 0


def add_merge_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the arguments of `lora merge` to a (sub)parser."""
    parser.description = parser.description or (
        "Merge PEFT LoRA adapters into a Hugging Face safetensors checkpoint, one tensor at "
        "a time, and write a new checkpoint directory."
    )
    parser.add_argument("base", metavar="BASE",
                        help="Hugging Face model directory, or a Llama-family GGUF file")
    parser.add_argument("adapters", metavar="ADAPTER_DIR", nargs="+",
                        help="PEFT adapter directories, merged in order")  # fmt: skip
    parser.add_argument("-o", "--output", metavar="OUT", required=True,
                        help="directory to create (written beside it, then renamed); for a "
                             "GGUF base, the GGUF file to write")  # fmt: skip
    parser.add_argument("--qtype", choices=["F16", "Q8_0", "Q4_0"], default="Q8_0",
                        help="GGUF base only: the type of the merged weights (default Q8_0)")
    parser.add_argument("--scale", metavar="S", type=float, nargs="+", default=None,
                        help="multiplier per adapter on lora_alpha/r (default 1.0)")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def run_merge(args: argparse.Namespace) -> int:
    """Run `lora merge` from parsed arguments; returns the exit status (0, or 1 with one
    error line on stderr)."""
    from ..io.checkpoint import merge_checkpoint
    from ..models.gguf import is_gguf

    try:
        if is_gguf(args.base):
            from ..models.gguf_export import merge_gguf

            stats = merge_gguf(args.base, args.adapters, args.output, qtype=args.qtype,
                               scales=args.scale, force=args.force)
            stats["tensors_merged"] = stats["tensors"]
        else:
            stats = merge_checkpoint(args.base, args.adapters, args.output, scales=args.scale,
                                     force=args.force, progress=not args.quiet)  # fmt: skip
    except (ValueError, OSError) as e:
        print(f"lora merge: error: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"merged {stats['updates']} LoRA pairs into {stats['tensors_merged']} tensors; "
              f"wrote {args.output}", file=sys.stderr)  # fmt: skip
    return 0


def _add_merge(subparsers) -> None:
    p = subparsers.add_parser(
        "merge",
        help="merge PEFT adapters into a Hugging Face checkpoint or a GGUF file, offline",
        description="Merge one or more PEFT LoRA adapters into a Hugging Face model directory, "
        "one tensor at a time, and write the merged checkpoint to OUT; or into a Llama-family "
        "GGUF file, writing a GGUF file (--qtype F16, Q8_0 or Q4_0; the source's metadata and "
        "tokenizer) that llama.cpp runs.",
    )
    add_merge_arguments(p)
    p.set_defaults(run=run_merge)


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _add_generate(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate text with a Llama-family model (HF directory or GGUF), adapters optional",
        description="Load a Llama-family causal LM (a Hugging Face directory or a .gguf file) "
        "and its tokenizer, apply PEFT LoRA adapters, and stream a reply to --prompt (rendered "
        "with the model's chat template unless --raw), or chat with --chat. Greedy unless "
        "--sample. Speed goes to stderr.",
    )
    p.add_argument("model", metavar="MODEL", help="model directory or .gguf file")
    p.add_argument("--adapter", action="append", default=[], metavar="DIR",
                   help="PEFT LoRA adapter directory (repeat for several, applied in order)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", help="the user message to answer")
    mode.add_argument("--chat", action="store_true", help="interactive chat loop on stdin")
    p.add_argument("--system", default=None, help="a system message before the conversation")
    p.add_argument("--raw", action="store_true",
                   help="feed --prompt as plain text, without the chat template")
    p.add_argument("--max-new-tokens", type=_positive_int, default=128, metavar="N",
                   help="tokens to generate at most (default: %(default)s)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=_positive_float, default=1.0,
                   help="sampling temperature (default: %(default)s)")
    p.add_argument("--top-k", type=_positive_int, default=None, metavar="K",
                   help="sample from the K most likely tokens")
    p.add_argument("--top-p", type=_probability, default=None, metavar="P",
                   help="sample from the smallest set of tokens with probability >= P")
    p.add_argument("--repetition-penalty", type=_positive_float, default=None, metavar="R",
                   help="divide the logits of tokens already present by R (CTRL's penalty)")
    p.add_argument("--seed", type=int, default=None, help="random seed for --sample")
    p.add_argument("--threads", type=_positive_int, default=None, help="BLAS threads")
    p.add_argument("--keep-quantized", action="store_true",
                   help="a .gguf MODEL: keep its quantized weights as they are (memory-mapped) "
                   "instead of dequantizing them to float32")
    p.add_argument("--q8", action="store_true",
                   help="with --keep-quantized: decode with 8-bit activations, as llama.cpp "
                   "does (faster; the products then see x rounded to 8 bits)")
    p.set_defaults(run=_run_generate)


def _run_generate(args) -> int:
    from .generate import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(
        prog="lora",
        description="LoRA fine-tuning, merging and serving on NumPy, with a C core.",
        epilog="Run 'lora demo' to see LoRA at work; 'lora COMMAND --help' for its options.",
    )
    parser.add_argument("--version", action="version", version=f"lora {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_demo(subparsers)
    _add_info(subparsers)
    _add_merge(subparsers)
    _add_generate(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lora` console script and of `python -m lora`; returns the exit
    status (0 on success, 1 on an error, 2 on a usage error, 130 on Ctrl-C)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(f"lora {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001  (one line, not a traceback; LORA_DEBUG=1 for it)
        if os.environ.get("LORA_DEBUG"):
            raise
        message = str(e) or type(e).__name__
        if not isinstance(e, (ValueError, OSError, RuntimeError)):
            message = f"{type(e).__name__}: {message}"
        message = " ".join(message.split())  # one line, whatever the exception held
        print(f"lora {args.command}: error: {message}", file=sys.stderr)
        return 1
