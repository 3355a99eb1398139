"""Saving and loading LoRA adapters in Hugging Face PEFT's on-disk format.

save_adapter writes adapter_config.json and adapter_model.safetensors under PEFT's names (see
lora/io/peft.py) atomically; load_adapter reads what PEFT (or save_adapter) wrote into a
plain model (wrapping it from the file's config) or an already wrapped one. Loading checks
every key and shape before it assigns anything, so a mismatch leaves the model untouched.
Nothing is ever unpickled. The base model's weights are not part of an adapter: merging an
adapter into a base checkpoint on disk is lora/io/checkpoint.py's job.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np

from ..nn import Conv2d, Embedding, Module, Parameter
from ..tuners.config import LoraConfig
from ..tuners.conv import LoRAConv2d
from ..tuners.lora import LoRAEmbedding, LoRALinear, check_adapter_name
from ..tuners.variants import config_from_dict, variant_for
from ..tuners.wrap import (
    ModulesToSaveWrapper,
    _modules_to_save_paths,
    find_targets,
    lora_layers,
    unload,
    variant_options,
    wrap,
)
from . import atomic, safetensors
from . import peft as fmt
from .peft import AdapterFormatError

__all__ = ["AdapterFormatError", "adapter_state_dict", "load_adapter", "save_adapter"]

_LORA_NAMES = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")


def _extra_params(
    model: Module, lora_paths: set[str], saved_paths: list[str]
) -> dict[str, Parameter]:
    """The non-LoRA parameters an adapter file may hold, by their key in the file (without
    "base_model.model."): the trained copies of the modules_to_save at `saved_paths` as
    `<path>.<name>`, biases of LoRA layers as `<path>.base_layer.bias`, other biases as
    `<path>.bias`. Works on a wrapped model and, with `lora_paths` and `saved_paths` the
    layers wrap() will replace, on a plain one."""
    out = {}
    for name, p in model.named_parameters():
        if ".original_module." in f".{name}":
            continue
        path, _, leaf = name.rpartition(".")
        name = name.replace(".modules_to_save.", ".")
        if path in lora_paths:
            if leaf == "bias":
                out[f"{path}.base_layer.bias"] = p
        elif leaf == "bias" or any(name.startswith(s + ".") for s in saved_paths):
            out[name] = p
    return out


def _saved_paths(model: Module) -> list[str]:
    return [p for p, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]


def adapter_state_dict(model: Module, adapter_name: str | None = None) -> dict[str, np.ndarray]:
    """The tensors save_adapter writes for one adapter (default: the first active one), under
    PEFT's keys: for every LoRA layer it covers `base_model.model.<path>.lora_A.weight`
    (r, in) and `.lora_B.weight` (out, r), or `.lora_embedding_A` (r, num) and
    `.lora_embedding_B` (dim, r), a variant's own tensors beside them (DoRA's
    `.lora_magnitude_vector`; VeRA's `.vera_lambda_b`/`_d` and its shared
    `base_model.vera_A`/`vera_B` instead of the pairs; Tied-LoRA's `.tied_lora_u`/`_v` and
    its tied pairs `base_model.tied_lora_A.<out>x<in>`/`_B`); the trained copies of
    modules_to_save as `base_model.model.<path>.weight`/`.bias`; biases per config.bias (the
    first adapter's)."""
    name, config = _config_of(model, adapter_name)
    layers = lora_layers(model)
    tensors = {}
    for path, layer in layers:
        if name not in layer.adapters:
            continue
        ad = layer.adapter(name)
        if ad.variant.pair_in_file:
            keys = (fmt.embedding_keys(path) if isinstance(layer, LoRAEmbedding)
                    else fmt.linear_keys(path))
            for key, p, shape in zip(keys, (ad.A, ad.B), _file_shapes(layer, ad), strict=True):
                # a conv's as kernels (a view); the array itself otherwise
                tensors[key] = p.data if p.data.shape == shape else p.data.reshape(shape)
        for field, p in ad.extra.items():
            tensors[fmt.KEY_PREFIX + path + "." + field] = p.data
        tensors.update(ad.variant.model_tensors(ad.options))  # VeRA's projections, ...
    if config.bias == "none" and not config.modules_to_save:
        return {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    saved_paths = _saved_paths(model)
    for name, p in _extra_params(model, {p for p, _ in layers}, saved_paths).items():
        in_saved = any(name.startswith(s + ".") for s in saved_paths)
        if (
            in_saved
            or (config.bias == "all" and name.endswith(".bias"))
            or (config.bias == "lora_only" and name.endswith(".base_layer.bias"))
        ):
            tensors[fmt.KEY_PREFIX + name] = p.data
    return {k: np.ascontiguousarray(v) for k, v in tensors.items()}


def _config_of(model: Module, adapter_name: str | None = None) -> tuple[str, LoraConfig]:
    """(name, config) of `adapter_name`, or of the first active adapter."""
    known = model.__dict__.get("lora_configs")
    if not known or not lora_layers(model):
        raise ValueError("the model has no LoRA adapter (wrap it with lora.wrap first)")
    if adapter_name is None:
        active = model.__dict__.get("lora_active") or list(known)
        adapter_name = active[0]
    if adapter_name not in known:
        raise ValueError(f"no adapter named {adapter_name!r}; the model has {list(known)}")
    return adapter_name, known[adapter_name]


def _write_all(f, data: bytes) -> None:
    f.write(data)


def _carry_over(old: str, new: str, top: bool = True) -> None:
    """Give `new` every entry of the adapter directory `old` that a save does not write (a
    README, a tokenizer, subdirectories): files hard-linked (copied where links are not
    possible), symbolic links recreated as links, directories likewise, recursively (other
    adapters' subdirectories with their own two files). The temporary files of the in-place
    saves of earlier versions are dropped."""
    for entry in os.scandir(old):
        src, dst = entry.path, os.path.join(new, entry.name)
        if top and entry.name in (fmt.CONFIG_NAME, fmt.WEIGHTS_NAME) or os.path.lexists(dst):
            continue
        if entry.name.startswith(".") and entry.name.endswith(".tmp"):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(src), dst)
        elif entry.is_dir():
            os.mkdir(dst)
            _carry_over(src, dst, top=False)
        elif entry.is_file():
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)


def save_adapter(model: Module, directory: str | os.PathLike,
                 selected_adapters: list[str] | None = None) -> None:
    """Write the model's adapters to `directory` (created if needed) as PEFT's
    save_pretrained does: adapter_config.json (sorted keys, 2-space indent, inference_mode
    true) and adapter_model.safetensors (metadata {"format": "pt"}) of the adapter named
    "default" in `directory` itself, and of each other adapter in `directory/<name>`.
    selected_adapters (default: all of them) picks which.

    The directory changes as one: both files are written and fsynced in a new directory
    beside it (with the directory's other files linked in), which then replaces it in one
    atomic rename (lora/io/atomic.py). A save that fails or is killed at any moment leaves
    either the previous adapter or the new one, never the weights of one save next to the
    config of another; the next save removes what a killed one left behind. With several
    adapters each directory changes as one, the subdirectories first.
    """
    known = model.__dict__.get("lora_configs") or {}
    names = list(known) if selected_adapters is None else list(selected_adapters)
    for name in names or [None]:
        _config_of(model, name)  # every name checked before anything is written
    target = os.fspath(directory)
    for name in sorted(names, key=lambda n: n == "default"):  # the root last: it carries
        _save_one(model, name, target if name == "default" else os.path.join(target, name))


def _save_one(model: Module, name: str, directory: str) -> None:
    _, config = _config_of(model, name)
    tensors = adapter_state_dict(model, name)
    config_dict = dataclasses.replace(config, inference_mode=True).to_dict()
    config_bytes = (json.dumps(config_dict, indent=2, sort_keys=True) + "\n").encode()
    weights_bytes = safetensors.serialize(tensors, metadata={"format": "pt"})

    target = os.path.abspath(os.fspath(directory))
    parent, name = os.path.split(target)
    if os.path.lexists(target) and not os.path.isdir(target):
        raise NotADirectoryError(f"save_adapter: {target} exists and is not a directory")
    os.makedirs(parent, exist_ok=True)
    atomic.remove_leftovers(parent, name, "save")
    new = atomic.new_temp_dir(parent, name, "save")
    try:
        atomic.write_file(os.path.join(new, fmt.WEIGHTS_NAME), weights_bytes, _write_all)
        atomic.write_file(os.path.join(new, fmt.CONFIG_NAME), config_bytes, _write_all)
        if os.path.isdir(target):
            _carry_over(target, new)
            os.chmod(new, os.stat(target).st_mode & 0o7777)
        else:
            os.chmod(new, 0o777 & ~atomic.umask())
        atomic.fsync_dir(new)
        atomic.replace_dir(new, target)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise


def load_adapter(model: Module, directory: str | os.PathLike, *, adapter_name: str = "default",
                 seed: int | None = None, is_trainable: bool | None = None) -> Module:
    """Load the adapter in `directory` (written by PEFT or save_adapter) as `adapter_name`
    and return the model.

    A plain model is wrapped from the file's config (seed seeds the layers' dropout), the
    adapter becoming its first, active and trainable. On a wrapped model, an adapter of that
    name already there must have exactly the file's LoRA layers and takes its values; a new
    name is added beside the others (lora.add_adapter), inactive and frozen as PEFT's
    load_adapter leaves it (is_trainable=True makes it trainable; set_adapter activates it).
    Every LoRA pair must have the shapes of its layer and the rank the config gives it;
    modules_to_save and bias tensors must name parameters of matching shape. The first
    mismatch raises AdapterFormatError naming it, before anything is changed. Unknown config
    keys are ignored with a warning. Values are cast to the model's dtype; the layers'
    scaling comes from the file's config. Base weights are never changed: a "pissa"/"olora"
    adapter applies to the residual base it was trained with, so its initialisation is not
    re-run.
    """
    from ..tuners import adapters as named

    directory = os.fspath(directory)
    where = os.path.join(directory, fmt.CONFIG_NAME)
    try:
        check_adapter_name(adapter_name, "load_adapter")
        config = config_from_dict(fmt.read_config(directory), where=where)
        variant = variant_for(config, where)
    except AdapterFormatError:
        raise
    except (TypeError, ValueError) as e:
        raise AdapterFormatError(str(e)) from None
    pairs, others = fmt.split_lora_tensors(fmt.read_tensors(directory))
    shared = fmt.pop_model_tensors(variant, others, "load_adapter")

    wrapped = bool(lora_layers(model))
    known = model.__dict__.get("lora_configs") or {}
    existing = wrapped and adapter_name in known
    if wrapped and not existing and (config.modules_to_save or config.bias != "none"):
        raise AdapterFormatError(f"load_adapter: {where} has modules_to_save or trained biases, "
                                 "which belong to a model's first adapter; load it into the "
                                 "plain model")
    if existing and shared is not None:
        raise AdapterFormatError(f"load_adapter: a {variant.name} adapter brings its own shared "
                                 "tensors; load it under a new adapter_name (or into the plain "
                                 f"model), not into the existing adapter {adapter_name!r}")
    if existing:
        merged = [p for p, layer in lora_layers(model) if layer.merged]
        if merged:
            raise AdapterFormatError(f"load_adapter: layer {merged[0]!r} is merged; unmerge first")
        expected = {
            path: (_kind(layer), *_file_shapes(layer, layer.adapter(adapter_name)),
                   {f: p.shape for f, p in layer.adapter(adapter_name).extra.items()})
            for path, layer in lora_layers(model) if adapter_name in layer.adapters
        }
    else:
        if config.target_modules is None:
            raise AdapterFormatError(f"{where}: target_modules is missing")
        try:
            targets = find_targets(model, config)
        except ValueError as e:
            raise AdapterFormatError(f"load_adapter: {e}") from None
        expected = {path: _expected_shapes(base, config.rank_for(path), variant)
                    for path, base in targets}
        if shared is not None and targets:  # they must fit the layers, checked here first
            try:
                variant_options(variant, config, [m for _, m in targets], shared)
            except ValueError as e:
                raise AdapterFormatError(f"load_adapter: {e}") from None
    _check_pairs(pairs, expected, config)
    if wrapped:
        saved_paths = _saved_paths(model)
    else:
        try:
            saved_paths = _modules_to_save_paths(model, config.modules_to_save)
        except ValueError as e:
            raise AdapterFormatError(f"load_adapter: {e}") from None
    extra = _extra_params(model, set(expected), saved_paths)
    for key, value in others.items():
        name = _extra_name(key)
        if name is None:
            continue
        if name not in extra:
            raise AdapterFormatError(f"load_adapter: {key!r} matches no parameter of the model")
        if value.shape != extra[name].shape:
            raise AdapterFormatError(
                f"load_adapter: {key!r} has shape {value.shape}, the model's parameter "
                f"{extra[name].shape}"
            )
    # -- everything checked; from here on only assignment, undone if anything still fails --
    if existing:
        undo = _snapshot(model, pairs, extra, adapter_name)
    init = dataclasses.replace(config, init_lora_weights=True)
    try:
        if not wrapped:
            wrap(model, init, seed=seed, adapter_name=adapter_name, tensors=shared)
            extra = _extra_params(model, set(expected), _saved_paths(model))
        elif not existing:
            named.add_adapter(model, adapter_name, init, seed=seed, tensors=shared)
        _assign(model, config, pairs, others, extra, adapter_name)
        if wrapped and not existing and is_trainable:
            for _, layer in lora_layers(model):
                if adapter_name in layer.adapters:
                    for p in layer.adapter(adapter_name).params():
                        p.requires_grad = True
    except BaseException:
        if existing:
            undo()
        elif wrapped:
            if adapter_name in (model.__dict__.get("lora_configs") or {}):
                named.delete_adapter(model, adapter_name)
        else:
            unload(model)
        raise
    return model


def _assign(model: Module, config: LoraConfig, pairs: dict, others: dict, extra: dict,
            adapter_name: str) -> None:
    layers = dict(lora_layers(model))
    for path, t in pairs.items():
        ad = layers[path].adapter(adapter_name)
        if t.A is not None:  # a conv's kernels flattened
            ad.A.data[...] = t.A.reshape(ad.A.shape)
            ad.B.data[...] = t.B.reshape(ad.B.shape)
        for name, value in t.extra.items():
            ad.extra[name].data[...] = value
        ad.lora_alpha, ad.use_rslora = config.alpha_for(path), config.use_rslora
        ad.scaling = config.scaling_for(path, t.r)
    for key, value in others.items():
        name = _extra_name(key)
        if name is not None:
            extra[name].data[...] = value
    known = dict(model.__dict__.get("lora_configs") or {})
    known[adapter_name] = config
    model.lora_configs = known
    active = model.__dict__.get("lora_active") or [adapter_name]
    model.lora_config = known[active[0]]


def _snapshot(model: Module, pairs: dict, extra: dict, adapter_name: str):
    """A function that puts back what _assign changes on a wrapped model: the adapter's
    pairs, alpha and scaling, the extra parameters and the model's configs."""
    layers = dict(lora_layers(model))
    ads = [layers[path].adapter(adapter_name) for path in pairs]
    arrays = [(p, p.data.copy()) for ad in ads for p in ad.params()]
    arrays += [(p, p.data.copy()) for p in extra.values()]
    attrs = [(ad, ad.lora_alpha, ad.use_rslora, ad.scaling) for ad in ads]
    configs = dict(model.__dict__.get("lora_configs") or {})
    config = model.__dict__.get("lora_config")

    def undo() -> None:
        for p, data in arrays:
            p.data[...] = data
        for ad, alpha, rslora, scaling in attrs:
            ad.lora_alpha, ad.use_rslora, ad.scaling = alpha, rslora, scaling
        model.lora_configs, model.lora_config = configs, config

    return undo


def _file_shapes(layer, ad) -> tuple[tuple, tuple]:
    """The shapes of adapter ad's A and B in the file (a conv's as kernels)."""
    return layer.file_shapes(ad.r) if isinstance(layer, LoRALinear) else (ad.A.shape, ad.B.shape)


def _kind(layer: Module) -> str:
    if isinstance(layer, (LoRAEmbedding, Embedding)):
        return "embedding"
    return "conv2d" if isinstance(layer, (LoRAConv2d, Conv2d)) else "linear"


def _expected_shapes(base: Module, r: int, variant) -> tuple[str, tuple, tuple, dict]:
    """(kind, A's shape, B's, {field: shape} of the variant's tensors) for a layer, the
    pair's as the file holds them (a conv's as kernels)."""
    kind = _kind(base)
    if kind == "embedding":
        d_out, d_in = base.embedding_dim, base.num_embeddings
    else:
        d_out, d_in = base.out_features, base.in_features
    extra = variant.extra_shapes(kind, d_out, d_in, r)
    if not variant.pair_in_file:
        return kind, None, None, extra
    if kind == "conv2d":
        return kind, (r, base.in_channels, *base.kernel_size), (d_out, r, 1, 1), extra
    return kind, (r, d_in), (d_out, r), extra


def _check_pairs(pairs: dict, expected: dict, config: LoraConfig) -> None:
    for path, (kind, a_shape, b_shape, extra) in expected.items():
        if path not in pairs:
            raise AdapterFormatError(f"load_adapter: the adapter has no LoRA weights for {path!r}")
        t = pairs[path]
        if t.kind != kind:
            raise AdapterFormatError(
                f"load_adapter: {path!r} is a {kind} layer, the adapter has {t.kind} LoRA weights"
            )
        if t.r != config.rank_for(path):
            raise AdapterFormatError(
                f"load_adapter: {path!r} has rank {t.r} in the file, its config says "
                f"{config.rank_for(path)}"
            )
        if a_shape is None or t.A is None:
            if (a_shape is None) != (t.A is None):
                has = "has no" if t.A is None else "has"
                raise AdapterFormatError(f"load_adapter: the file {has} lora_A/lora_B for "
                                         f"{path!r}, which its config's LoRA variant "
                                         f"{'needs' if t.A is None else 'does not take'}")
        elif t.A.shape != a_shape or t.B.shape != b_shape:
            raise AdapterFormatError(
                f"load_adapter: {path!r}: the file's A {t.A.shape} and B {t.B.shape} do not fit "
                f"the model's A {a_shape} and B {b_shape}"
            )
        got = {f: v.shape for f, v in t.extra.items()}
        if got != extra:
            raise AdapterFormatError(
                f"load_adapter: {path!r}: the file has {got or 'no further tensors'} beside A and "
                f"B, the adapter's variant needs {extra or 'none'} (use_dora in the config and "
                "lora_magnitude_vector tensors go together, VeRA's vera_lambda_b/_d likewise)"
            )
    for path in pairs:
        if path not in expected:
            raise AdapterFormatError(
                f"load_adapter: the adapter has LoRA weights for {path!r}, which is not a LoRA "
                "layer of the model"
            )


def _extra_name(key: str) -> str | None:
    """A non-LoRA key's parameter name, or None for the frozen originals PEFT also writes
    (with bias="all")."""
    if not key.startswith(fmt.KEY_PREFIX):
        raise AdapterFormatError(f"load_adapter: unexpected tensor key {key!r}")
    name = key[len(fmt.KEY_PREFIX) :]
    if ".original_module." in f".{name}":
        return None
    return name.replace(".modules_to_save.", ".")
