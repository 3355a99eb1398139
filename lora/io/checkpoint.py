"""Merge PEFT LoRA adapters into a Hugging Face safetensors checkpoint, offline and streaming.

    lora.merge_checkpoint("llama-base", ["my-adapter"], "llama-merged")
    lora merge llama-base my-adapter -o llama-merged          # the same, from the shell

Everything is checked before anything is written (adapter modules exist in the base, shapes
and dtypes fit, every file parses), so a bad input leaves no output. Then each shard is
written tensor by tensor into a temporary directory beside OUT: untouched tensors are copied
by the kernel (copy_file_range), each LoRA target is memory-mapped alone, widened to float32
(bf16/fp16) or kept float64, updated by the C kernel `W += scale * B @ A` once per adapter
(a DoRA adapter's rows then scaled to its magnitudes: its variant's merge_into), and
rounded once back to its dtype. Headers, shards, dtypes and metadata are kept byte for byte;
the directory is renamed into place at the end. Peak memory is a few times the largest target
tensor plus the adapters, not the model.

Not handled (refused with an error, never merged approximately): non-safetensors
checkpoints, targets stored in integer or fp8 dtypes, and a DoRA adapter on a tensor that
another adapter of the same merge targets too.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from dataclasses import dataclass, field

import numpy as np

from .._progress import progress_bar
from ..tuners.config import config_scaling
from ..tuners.variants import VARIANTS, Variant, config_from_dict, variant_for
from . import atomic, peft
from .safetensors import (
    INDEX_FILE,
    STORAGE,
    Header,
    SafetensorsError,
    TensorInfo,
    checkpoint_shards,
    copy_range,
    from_compute,
    read_array,
    read_header,
    to_compute,
)

__all__ = ["merge_checkpoint", "CheckpointError"]


class CheckpointError(ValueError):
    """A base checkpoint, output directory or adapter/base combination that cannot be merged."""


@dataclass
class _Update:
    """One adapter's change to one base tensor: its variant's merge_into (W += scale * B @ A
    for plain LoRA; A (r, d_in), B (d_out, r), `extra` the variant's further tensors);
    `transposed` when W is stored (d_in, d_out): Conv1D and Embedding.
    Or, when `replace` is set, W = replace (already rounded to W's dtype)."""

    A: np.ndarray | None = None
    B: np.ndarray | None = None
    scale: float = 0.0
    transposed: bool = False
    replace: np.ndarray | None = None
    variant: Variant = VARIANTS["lora"]
    extra: dict = field(default_factory=dict)


@dataclass
class _Plan:
    base: str
    shards: list[str]  # file names in BASE_DIR, in index order
    headers: dict[str, Header]
    index: dict | None
    updates: dict[str, list[_Update]] = field(default_factory=dict)  # base tensor -> updates


def merge_checkpoint(
    base: str | os.PathLike,
    adapters: str | os.PathLike | list[str | os.PathLike],
    out: str | os.PathLike,
    scales: list[float] | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict[str, int]:
    """Merge PEFT LoRA adapters into a Hugging Face checkpoint and write a new checkpoint.

    Parameters
    ----------
    base : directory with config.json and model.safetensors, or shards listed in
        model.safetensors.index.json. Only read, never written.
    adapters : one PEFT adapter directory (adapter_config.json, adapter_model.safetensors)
        or a list of them, merged in order.
    out : the directory to create. Written beside itself under a temporary name, then renamed.
    scales : one multiplier per adapter on top of its own lora_alpha / r (default 1.0 each).
    force : replace `out` if it exists (only after the new checkpoint is complete).
    progress : show a progress bar by bytes on stderr.

    Returns
    -------
    {"tensors_merged": number of base tensors changed, "updates": LoRA pairs applied,
     "bytes": bytes of safetensors data written}

    Raises
    ------
    ValueError (CheckpointError, AdapterFormatError or SafetensorsError) naming the file or
    tensor at fault, before anything is written; FileExistsError when `out` exists without
    `force`.
    """
    base = os.path.abspath(os.fspath(base))
    out = os.path.abspath(os.fspath(out))
    if isinstance(adapters, (str, os.PathLike)):
        adapters = [adapters]
    adapters = [os.path.abspath(os.fspath(a)) for a in adapters]
    if not adapters:
        raise CheckpointError("no adapter given")
    if scales is None:
        scales = [1.0] * len(adapters)
    scales = [float(s) for s in scales]
    if len(scales) != len(adapters):
        raise CheckpointError(f"{len(scales)} scales given for {len(adapters)} adapters")
    if not all(np.isfinite(scales)):
        raise CheckpointError(f"scales must be finite, got {scales}")

    _check_out(base, adapters, out, force)
    plan = _plan(base, adapters, scales)
    return _write(plan, out, force, progress)


def _check_out(base: str, adapters: list[str], out: str, force: bool) -> None:
    def inside(path: str, directory: str) -> bool:
        path, directory = os.path.realpath(path), os.path.realpath(directory)
        return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)

    if not os.path.isdir(base):
        raise CheckpointError(f"{base}: no such directory")
    if inside(out, base):
        raise CheckpointError(f"{out}: output must not be the base checkpoint {base} or inside it")
    for directory in [base, *adapters]:
        if inside(directory, out):
            raise CheckpointError(f"{out}: output would replace the input {directory}")
    if os.path.lexists(out):
        if not force:
            raise FileExistsError(f"{out}: already exists (use --force / force=True to replace)")
        if not os.path.isdir(out) or os.path.islink(out):
            raise CheckpointError(f"{out}: exists and is not a directory; not replacing it")
    if not os.path.isdir(os.path.dirname(out)):
        raise CheckpointError(f"{os.path.dirname(out)}: no such directory for the output")


def _plan(base: str, adapters: list[str], scales: list[float]) -> _Plan:
    """Read and check every input; nothing is written here."""
    try:
        shards, index = checkpoint_shards(base)
    except (FileNotFoundError, SafetensorsError) as e:
        raise CheckpointError(str(e)) from None
    weight_map = None if index is None else index["weight_map"]
    headers = {}
    for shard in shards:
        path = os.path.join(base, shard)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: no such file (listed in {INDEX_FILE})")
        headers[shard] = read_header(path)
    located: dict[str, TensorInfo] = {}
    for header in headers.values():
        for name, info in header.tensors.items():
            if name in located:
                raise CheckpointError(f"{base}: tensor {name!r} is stored in two shards")
            located[name] = info
    if weight_map is not None:
        for name, shard in weight_map.items():
            if name not in headers[shard].tensors:
                raise CheckpointError(
                    f"{os.path.join(base, shard)}: tensor {name!r} listed in {INDEX_FILE} "
                    "is not in this file"
                )
    plan = _Plan(base, shards, headers, index)

    for directory, user_scale in zip(adapters, scales, strict=True):
        config = peft.read_config(directory)
        weights = os.path.join(directory, peft.WEIGHTS_NAME)
        tensors = peft.read_tensors(directory)
        pairs, others = peft.split_lora_tensors(tensors)
        if not pairs:
            raise peft.AdapterFormatError(f"{weights}: no LoRA tensors in the file")
        variant = variant_for(config, directory)
        if not variant.pair_in_file:  # VeRA, Tied-LoRA: each layer's pair is model-level
            _shared_pairs(variant, config, pairs, others, located, directory)
        # Full tensors PEFT saves beside the pairs (the embedding it saves when an embedding
        # is targeted, biases with bias="all") are loaded over the base before merging.
        for key in sorted(others):
            name = _replaced_tensor(key, others[key], located, weights, config, pairs)
            plan.updates.setdefault(name, []).append(_replacement(others[key], located[name]))
        for path, lora in pairs.items():
            name = _base_tensor(path, located, directory)
            plan.updates.setdefault(name, []).append(
                _update(lora, config, located[name], directory, user_scale)
            )
    for name, updates in plan.updates.items():
        alone = [u.variant.name for u in updates if u.replace is None and not u.variant.stacks]
        if alone and sum(u.replace is None for u in updates) > 1:
            raise CheckpointError(f"base tensor {name!r}: a {alone[0]} adapter merges alone, "
                                  "and several adapters target this tensor; merge them in turn")
    return plan


def _base_tensor(path: str, located: dict[str, TensorInfo], adapter: str) -> str:
    """The base tensor a module path refers to: `<path>.weight`, or, when the checkpoint was
    saved with or without the model's prefix (`transformer.`, `model.`), the one tensor whose
    name matches it up to that prefix."""
    name = path + ".weight"
    if name in located:
        return name
    matches = [k for k in located if k.endswith("." + name) or name.endswith("." + k)]
    if len(matches) == 1:
        return matches[0]
    what = "no tensor" if not matches else f"several tensors ({', '.join(matches[:3])})"
    raise CheckpointError(f"{adapter}: module {path!r}: {what} named {name!r} in the base")


# The embedding layers PEFT saves in full beside their LoRA pairs (peft.utils.constants).
_EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def _replaced_tensor(key: str, value: np.ndarray, located: dict, weights: str, config: dict,
                     pairs: dict) -> str:
    """The base tensor a non-LoRA tensor of the adapter replaces. Only what PEFT saves by
    design may: the full weights of layers the adapter targets or of embedding layers
    (save_embedding_layers), and biases when the config trains them; anything else is
    refused rather than silently overwriting a base tensor."""
    name = key[len(peft.KEY_PREFIX) :] if key.startswith(peft.KEY_PREFIX) else key
    name = name.replace(".base_layer.", ".")
    if name not in located:
        raise peft.AdapterFormatError(
            f"{weights}: tensor {key!r} is neither a LoRA pair nor a base tensor "
            "(modules_to_save and lora_bias are not supported)"
        )
    module, _, leaf = name.rpartition(".")
    by_design = (
        any(module == p or module.endswith("." + p) or p.endswith("." + module) for p in pairs)
        or module.rpartition(".")[2] in _EMBEDDING_LAYER_NAMES
        or (leaf == "bias" and config.get("bias", "none") != "none")
    )
    if not by_design:
        raise peft.AdapterFormatError(
            f"{weights}: tensor {key!r} would replace base tensor {name!r}, which is neither "
            "an embedding PEFT saves with an adapter, a layer the adapter targets, nor a "
            "bias its config trains; refusing to overwrite the base"
        )
    info = located[name]
    if info.shape != value.shape or info.dtype not in STORAGE:
        raise CheckpointError(
            f"{weights}: tensor {key!r} {value.shape} cannot replace base tensor {name!r} "
            f"({info.dtype} {info.shape})"
        )
    return name


def _replacement(value: np.ndarray, info: TensorInfo) -> _Update:
    # Rounded to the base dtype first, as loading it into the model would.
    stored = from_compute(
        value.astype(np.float64 if info.dtype == "F64" else np.float32), info.dtype
    )
    return _Update(replace=to_compute(stored, info.dtype))


def _shared_pairs(variant, config: dict, pairs: dict, others: dict, located: dict,
                  directory: str) -> None:
    """Give each layer of a variant without per-layer pairs (VeRA, Tied-LoRA) its A and B:
    from the adapter's model-level tensors (popped from `others`), by its base tensor's shape
    (VeRA's slices of the projections, Tied-LoRA's tied pair of that shape)."""
    shared = peft.pop_model_tensors(variant, others, directory)
    transposed = bool(config.get("fan_in_fan_out", False))
    dims = {}
    for path in pairs:
        shape = located[_base_tensor(path, located, directory)].shape
        if len(shape) != 2:
            raise CheckpointError(f"{directory}: module {path!r}: base tensor of shape {shape}")
        dims[path] = shape[::-1] if transposed else shape
    try:
        options = variant.options(config_from_dict(config, directory), list(dims.values()),
                                  np.float64, shared)
    except ValueError as e:
        raise peft.AdapterFormatError(f"{directory}: {e}") from None
    for path, t in pairs.items():  # arrays (VeRA's views) or Parameters (Tied-LoRA's)
        t.A, t.B = (getattr(p, "data", p) for p in variant.pair(options, *dims[path]))


def _update(lora, config: dict, info: TensorInfo, adapter: str, user_scale: float) -> _Update:
    A, B = lora.A, lora.B
    r, d_out = A.shape[0], B.shape[0]
    embedding, conv = lora.kind == "embedding", lora.kind == "conv2d"
    transposed = embedding or bool(config.get("fan_in_fan_out", False))
    if conv:  # the kernels flattened: the update of W (out, in, kh, kw) viewed (out, in kh kw)
        expected = (d_out, *A.shape[1:])
        A, B = A.reshape(r, -1), B.reshape(d_out, r)
    d_in = A.shape[1]
    if not conv:
        expected = (d_in, d_out) if transposed else (d_out, d_in)
    where = f"{adapter}: module {lora.path!r}"
    if info.dtype not in STORAGE:
        raise CheckpointError(
            f"{where}: base tensor {info.name!r} has dtype {info.dtype}; "
            "merging supports F32, F16, BF16 and F64"
        )
    if info.shape != expected:
        layout = ("embedding (num_embeddings, embedding_dim)" if embedding else
                  "conv (out, in, kh, kw)" if conv else
                  "fan_in_fan_out (in, out)" if transposed else "(out, in)")  # fmt: skip
        raise CheckpointError(
            f"{where}: lora_A {lora.A.shape} and lora_B {lora.B.shape} need base tensor "
            f"{info.name!r} of shape {expected} [{layout}], but it is {info.shape}"
        )
    scale = user_scale * config_scaling(config, lora.path, r)
    if not np.isfinite(scale):
        raise peft.AdapterFormatError(f"{where}: scaling {scale} is not finite")
    variant = variant_for(config, where)
    want = variant.extra_shapes(lora.kind, d_out, d_in, r)
    got = {k: v.shape for k, v in lora.extra.items()}
    if got != want:
        raise peft.AdapterFormatError(
            f"{where}: the {variant.name} adapter needs {want or 'no tensors'} beside lora_A and "
            f"lora_B, the file has {got or 'none'}"
        )
    compute = np.float64 if info.dtype == "F64" else np.float32
    return _Update(
        np.ascontiguousarray(A, compute), np.ascontiguousarray(B, compute), scale, transposed,
        variant=variant, extra={k: np.ascontiguousarray(v, compute) for k, v in lora.extra.items()},
    )


def _write(plan: _Plan, out: str, force: bool, progress: bool) -> dict[str, int]:
    parent, name = os.path.split(out)
    atomic.remove_leftovers(parent, name, "merge")
    tmp = atomic.new_temp_dir(parent, name, "merge")
    total = sum(h.file_size for h in plan.headers.values())
    stats = {"tensors_merged": len(plan.updates), "updates": 0, "bytes": 0}
    lora_pairs = sum(u.replace is None for us in plan.updates.values() for u in us)
    try:
        _copy_other_files(plan, tmp)
        with progress_bar(
            progress, auto=True, total=total, unit="B", unit_scale=True, unit_divisor=1024,
            desc="lora merge", file=sys.stderr,
        ) as bar:  # fmt: skip
            for shard in plan.shards:
                _write_shard(plan.headers[shard], os.path.join(tmp, shard), plan.updates, bar)
        if plan.index is not None:
            index = dict(plan.index)
            size = sum(t.nbytes for h in plan.headers.values() for t in h.tensors.values())
            if isinstance(index.get("metadata"), dict) and "total_size" in index["metadata"]:
                index["metadata"] = {**index["metadata"], "total_size": size}
            atomic.write_file(os.path.join(tmp, INDEX_FILE),
                              (json.dumps(index, indent=2) + "\n").encode())
        stats["updates"] = lora_pairs
        stats["bytes"] = total
        os.chmod(tmp, 0o777 & ~atomic.umask())
        atomic.fsync_dir(tmp)
        if os.path.lexists(out) and not force:  # appeared while we were writing
            raise FileExistsError(f"{out}: already exists (use --force to replace)")
        # Always the old checkpoint or the new one at `out`, never neither (lora/io/atomic.py).
        atomic.replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stats


def _readable_roots(base: str) -> list[str]:
    """Where a symbolic link in BASE_DIR may lead for its file to be copied: inside BASE_DIR,
    and, for a Hugging Face hub cache snapshot (`.../snapshots/<revision>`), the blobs of the
    same repository, which its files link to."""
    base = os.path.realpath(base)
    roots = [base]
    snapshots = os.path.dirname(base)
    if os.path.basename(snapshots) == "snapshots":
        roots.append(os.path.join(os.path.dirname(snapshots), "blobs"))
    return roots


def _inside(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def _copy_other_files(plan: _Plan, tmp: str) -> None:
    """Copy every file of BASE_DIR except the shards and index, which are rewritten."""
    rewritten = set(plan.shards) | ({INDEX_FILE} if plan.index is not None else set())
    _copy_tree(plan.base, tmp, rewritten, _readable_roots(plan.base))


def _copy_tree(src: str, dst: str, skip: set[str], roots: list[str]) -> None:
    """Regular files are copied (and fsynced); a symbolic link to a regular file inside the
    readable roots is copied as that file, any other link is recreated as a link, never
    followed (so a link to /dev/zero, to an outside directory or to `.` copies nothing);
    directories are walked; devices, FIFOs and sockets are refused."""
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        if entry.name in skip:
            continue
        target = os.path.join(dst, entry.name)
        if entry.is_symlink():
            real = os.path.realpath(entry.path)
            if _inside(real, roots) and os.path.isfile(real) and not os.path.islink(real):
                _copy_file(real, target, entry.path)
            else:
                os.symlink(os.readlink(entry.path), target)
        elif entry.is_dir(follow_symlinks=False):
            os.mkdir(target)
            _copy_tree(entry.path, target, set(), roots)
        elif entry.is_file(follow_symlinks=False):
            _copy_file(entry.path, target, entry.path)
        else:
            raise CheckpointError(f"{entry.path}: not a regular file, directory or link; "
                                  "refusing to copy it into the output")


def _copy_file(path: str, target: str, shown: str) -> None:
    if shown.endswith((".safetensors", ".bin", ".pt", ".pth", ".gguf")):
        warnings.warn(f"{shown}: weights outside the checkpoint are copied unmerged",
                      stacklevel=6)
    shutil.copy2(path, target)
    with open(target, "rb") as f:
        os.fsync(f.fileno())


def _write_shard(header: Header, dst: str, updates: dict[str, list[_Update]], bar) -> None:
    """Rewrite one shard with the same header and layout; merged tensors replace their bytes,
    the others are copied by the kernel in runs."""
    src = header.path
    with open(src, "rb") as fsrc, open(dst, "wb") as fdst:
        in_fd, out_fd = fsrc.fileno(), fdst.fileno()
        _pwrite_all(out_fd, header.raw, 0)
        bar.update(len(header.raw))
        run_start = run_end = header.data_start
        for info in header.tensors.values():
            if info.name not in updates:
                run_end = info.end
                continue
            if run_end > run_start:
                copy_range(in_fd, out_fd, run_start, run_start, run_end - run_start)
                bar.update(run_end - run_start)
            weight = to_compute(read_array(src, info), info.dtype)
            for u in updates[info.name]:
                if u.replace is not None:
                    weight[...] = u.replace
                else:  # a conv kernel as (out, in kh kw), a view
                    u.variant.merge_into(weight.reshape(weight.shape[0], -1), u.A, u.B, u.scale,
                                         u.extra, u.transposed)
            stored = from_compute(weight, info.dtype)
            if not _finite(weight, stored, info.dtype):
                raise CheckpointError(
                    f"{src}: merged tensor {info.name!r} has NaN or infinite values (the "
                    f"scaled update overflows {info.dtype}); nothing was written"
                )
            del weight
            _pwrite_all(out_fd, memoryview(stored).cast("B"), info.begin)
            bar.update(info.nbytes)
            run_start = run_end = info.end
        if run_end > run_start:
            copy_range(in_fd, out_fd, run_start, run_start, run_end - run_start)
            bar.update(run_end - run_start)
        os.fsync(out_fd)
        if os.fstat(out_fd).st_size != header.file_size:
            raise CheckpointError(f"{dst}: wrote {os.fstat(out_fd).st_size} bytes, "
                                  f"expected {header.file_size}")  # fmt: skip


def _finite(weight: np.ndarray, stored: np.ndarray, dtype: str) -> bool:
    """Whether a merged tensor is finite in the dtype it is written in: float16 and bfloat16
    can overflow in the rounding even when the float32 result is finite."""
    if dtype == "BF16":
        return not np.any((stored & np.uint16(0x7F80)) == np.uint16(0x7F80))
    return bool(np.isfinite(stored if dtype == "F16" else weight).all())


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
