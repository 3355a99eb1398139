"""`lora info DIR`: describe a PEFT LoRA adapter directory (config, targets, ranks, counts).

A library function (`describe_adapter`) that returns text; the command line's parsing is in
lora/cli/commands.py.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

__all__ = ["describe_adapter"]


def describe_adapter(directory: str | os.PathLike) -> str:
    """A human-readable summary of the PEFT LoRA adapter in `directory`: its config, and per
    target module the kind (with the variant, e.g. "linear dora"), rank, scaling, shapes and
    parameter count (a variant's own tensors included), with the count of a
    full update of the same weights for comparison, and the names of further adapters saved
    beside it in subdirectories (PEFT's layout of several). Raises AdapterFormatError (a ValueError)
    for a missing, corrupt or non-LoRA adapter."""
    from ..io import peft as fmt
    from ..tuners.config import config_scaling
    from ..tuners.variants import variant_for

    if not os.path.isdir(directory):
        raise fmt.AdapterFormatError(f"{directory}: no such directory")
    config = fmt.read_config(directory)
    pairs, others = fmt.split_lora_tensors(fmt.read_tensors(directory))
    if not pairs:
        raise fmt.AdapterFormatError(
            f"{os.path.join(directory, fmt.WEIGHTS_NAME)}: holds no LoRA tensors"
        )

    lines = [f"adapter  {os.path.abspath(directory)}", "config"]
    shown = ("peft_type", "r", "lora_alpha", "projection_prng_key", "d_initial", "vera_dropout",
             "use_rslora", "lora_dropout", "target_modules",
             "exclude_modules", "bias", "init_lora_weights", "fan_in_fan_out", "rank_pattern",
             "alpha_pattern", "modules_to_save", "use_dora", "task_type",
             "base_model_name_or_path")
    for key in shown:
        if key in config:
            lines.append(f"  {key:<24} {config[key]!r}")

    variant = variant_for(config, os.path.join(directory, fmt.CONFIG_NAME))
    rows = []
    lora_total = full_total = 0
    for path in sorted(pairs, key=_natural_key):
        t = pairs[path]
        r = t.r
        n_lora = sum(v.size for v in t.extra.values())
        if t.A is not None:
            d_in, d_out = t.A[0].size, t.B.shape[0]  # a conv's d_in: in_channels * kh * kw
            n_lora += t.A.size + t.B.size
            n_full = d_in * d_out
            full_total += n_full
        else:  # VeRA: the layer's pair is a slice of the shared projections
            d_in, d_out, n_full = "?", max((v.size for v in t.extra.values()), default=0), "?"
        lora_total += n_lora
        scale = config_scaling(config, path, r) if variant.scaled else 1.0
        kind = t.kind if variant.name == "lora" else f"{t.kind} {variant.name}"
        rows.append((path, kind, str(r), f"{scale:g}", f"{d_in} -> {d_out}",
                     f"{n_lora:,}", f"{n_full:,}" if t.A is not None else n_full,
                     str(next(iter(t.extra.values())).dtype if t.A is None else t.A.dtype)))
    header = ("module", "kind", "r", "scaling", "in -> out", "LoRA params", "full W", "dtype")
    lines.append(f"targets  {len(pairs)} module(s)")
    lines += ["  " + line for line in _table(header, rows)]
    extra = sum(v.size for v in others.values())
    adapted = (f"for {full_total:,} weights they adapt ({100.0 * lora_total / full_total:.2f}%)"
               if full_total else "(the adapted weights' shapes are the base model's)")
    lines.append(
        f"total    {lora_total:,} LoRA parameters {adapted}"
        + (f"; plus {extra:,} in {len(others)} other tensor(s)" if others else "")
    )
    for key in sorted(others):
        lines.append(f"  other  {key}  {tuple(others[key].shape)}")
    named = sorted(e.name for e in os.scandir(directory) if e.is_dir()
                   and os.path.isfile(os.path.join(e.path, fmt.CONFIG_NAME)))
    if named:  # PEFT's layout of several adapters: the others in subdirectories
        lines.append(f"more     {len(named)} named adapter(s) in subdirectories: "
                     f"{', '.join(named)} (lora info {os.path.join(directory, named[0])})")
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
