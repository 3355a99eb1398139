"""The `lora` command line: `lora demo`, `lora info DIR` and `lora merge`.

Each subcommand is a thin shell over a library function, so everything the command does is
also reachable from Python: `lora.demo.run`, `lora.cli.describe_adapter`, and
`lora.checkpoint.merge_checkpoint`. Errors are one line on stderr and a non-zero exit, never a
traceback (set LORA_DEBUG=1 to get the traceback back). Heavy modules are imported only by
the subcommand that needs them, so `lora --help` is instant and works whatever is installed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

__all__ = ["main", "describe_adapter"]


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
    print(describe_adapter(args.directory))
    return 0


def describe_adapter(directory: str | os.PathLike) -> str:
    """A human-readable summary of the PEFT LoRA adapter in `directory`: its config, and per
    target module the kind, rank, scaling, shapes and parameter count, with the count of a
    full update of the same weights for comparison. Raises AdapterFormatError (a ValueError)
    for a missing, corrupt or non-LoRA adapter."""
    from . import _peft_format as fmt

    if not os.path.isdir(directory):
        raise fmt.AdapterFormatError(f"{directory}: no such directory")
    config = fmt.read_config(directory)
    pairs, others = fmt.split_lora_tensors(fmt.read_tensors(directory))
    if not pairs:
        raise fmt.AdapterFormatError(
            f"{os.path.join(directory, fmt.WEIGHTS_NAME)}: holds no LoRA tensors"
        )

    lines = [f"adapter  {os.path.abspath(directory)}", "config"]
    shown = ("peft_type", "r", "lora_alpha", "use_rslora", "lora_dropout", "target_modules",
             "exclude_modules", "bias", "init_lora_weights", "fan_in_fan_out", "rank_pattern",
             "alpha_pattern", "modules_to_save", "use_dora", "task_type",
             "base_model_name_or_path")
    for key in shown:
        if key in config:
            lines.append(f"  {key:<24} {config[key]!r}")

    rows = []
    lora_total = full_total = 0
    for path in sorted(pairs, key=_natural_key):
        t = pairs[path]
        r = t.r
        d_in, d_out = t.A.shape[1], t.B.shape[0]
        n_lora = t.A.size + t.B.size
        n_full = d_in * d_out
        lora_total += n_lora
        full_total += n_full
        scale = fmt.scaling(config, path, r)
        rows.append((path, t.kind, str(r), f"{scale:g}", f"{d_in} -> {d_out}",
                     f"{n_lora:,}", f"{n_full:,}", str(t.A.dtype)))
    header = ("module", "kind", "r", "scaling", "in -> out", "LoRA params", "full W", "dtype")
    lines.append(f"targets  {len(pairs)} module(s)")
    lines += ["  " + line for line in _table(header, rows)]
    extra = sum(v.size for v in others.values())
    lines.append(
        f"total    {lora_total:,} LoRA parameters for {full_total:,} weights they adapt "
        f"({100.0 * lora_total / full_total:.2f}%)"
        + (f"; plus {extra:,} in {len(others)} other tensor(s)" if others else "")
    )
    for key in sorted(others):
        lines.append(f"  other  {key}  {tuple(others[key].shape)}")
    return "\n".join(lines)


def _natural_key(path: str):
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.split(".")]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    left = {0, 1}  # text columns; numbers are right-aligned

    def fmt(row):
        cells = [str(c).ljust(w) if i in left else str(c).rjust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return "  ".join(cells).rstrip()

    return [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]


def _add_merge(subparsers) -> None:
    try:
        from .checkpoint import add_merge_arguments, run_merge
    except Exception as e:  # noqa: BLE001  (a broken optional module must not break --help)
        reason = f"{type(e).__name__}: {e}"
        p = subparsers.add_parser("merge", help="merge adapters into a checkpoint (unavailable)",
                                  description=f"lora merge is unavailable: {reason}")
        p.add_argument("args", nargs=argparse.REMAINDER)

        def unavailable(args) -> int:
            raise RuntimeError(f"unavailable in this installation ({reason})")

        p.set_defaults(run=unavailable)
        return
    p = subparsers.add_parser(
        "merge",
        help="merge PEFT adapters into a Hugging Face checkpoint, streaming, offline",
        description="Merge one or more PEFT LoRA adapters into a Hugging Face model directory, "
        "one tensor at a time, and write the merged checkpoint to OUT_DIR.",
    )
    add_merge_arguments(p)
    p.set_defaults(run=run_merge)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

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
