"""Several named adapters on one model, with PEFT's names and semantics: add_adapter,
set_adapter, delete_adapter, active_adapters, merge_adapter / unmerge_adapter, and
adapter_names (a batch whose rows use different adapters).

The model holds its adapters' configs as `model.lora_configs` ({name: LoraConfig}, in the
order they were added; the first is "default" unless named otherwise) and the active ones as
`model.lora_active`; `model.lora_config` is the config of the first active adapter (what a
single-adapter script reads). Each LoRA layer holds the pairs of the adapters that target it
(lora/tuners/lora.py). Several active adapters sum; only the active ones train. Combining
adapters into a new one is lora/tuners/combine.py's job; saving and loading lora/io/adapter.py's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator, Sequence

import numpy as np

from .._checks import check_fields
from ..nn import Embedding, Module
from .config import LoraConfig
from .lora import BASE_ROWS, BATCH_ADAPTERS, LoRAEmbedding, LoRALinear, check_adapter_name
from .variants import variant_for
from .wrap import find_targets, lora_class, lora_layers, unload, variant_options, wrap

__all__ = [
    "active_adapters",
    "add_adapter",
    "adapter_names",
    "delete_adapter",
    "list_adapters",
    "merge_adapter",
    "set_adapter",
    "unmerge_adapter",
]


def configs(model: Module, where: str) -> dict[str, LoraConfig]:
    """The model's {adapter name: LoraConfig} (of the model or, when a part of it was
    wrapped, of that part); ValueError when it has no adapter."""
    found = model.__dict__.get("lora_configs")
    if found is None:
        found = next((m.__dict__["lora_configs"] for m in model.modules()
                      if "lora_configs" in m.__dict__), None)
    if not found or not lora_layers(model):
        raise ValueError(f"{where}: the model has no LoRA adapter (wrap it with lora.wrap first)")
    return found


def record(model: Module, configs_: dict[str, LoraConfig], active: list[str]) -> None:
    """Store the adapters' configs and the active list on the model, and lora_config."""
    model.lora_configs = configs_
    model.lora_active = list(active)
    model.lora_config = configs_[active[0] if active else next(iter(configs_))]


def list_adapters(model: Module) -> list[str]:
    """The names of the model's adapters, in the order they were added."""
    return list(configs(model, "list_adapters"))


def active_adapters(model: Module) -> list[str]:
    """The names of the active adapters (those a forward adds and training updates)."""
    configs(model, "active_adapters")
    return list(model.lora_active)


def add_adapter(model: Module, adapter_name: str, config: LoraConfig | None = None, *,
                seed: int | None = None, tensors: dict | None = None,
                **config_kwargs) -> Module:
    """Add a new adapter named `adapter_name` to a wrapped model (a plain model is wrapped,
    the adapter becoming its first), with its own config: r, lora_alpha, target_modules,
    lora_dropout, use_rslora, rank/alpha patterns, init_lora_weights. Layers it targets that
    carry LoRA already get a second pair; others are wrapped. As in PEFT the new adapter is
    not made active (set_adapter does that), so its matrices are frozen until then.
    modules_to_save and trained biases belong to the first adapter only: a later one with
    modules_to_save or bias other than "none" raises ValueError. Returns the model."""
    if config is None:
        check_fields("add_adapter", config_kwargs, [f.name for f in dataclasses.fields(LoraConfig)])
        config = LoraConfig(**config_kwargs)
    elif config_kwargs:
        raise TypeError("add_adapter: pass either a LoraConfig or its fields, not both")
    check_adapter_name(adapter_name, "add_adapter")
    if not lora_layers(model):
        return wrap(model, config, seed=seed, adapter_name=adapter_name, tensors=tensors)
    known = configs(model, "add_adapter")
    if adapter_name in known:
        raise ValueError(f"add_adapter: the model already has an adapter named {adapter_name!r}")
    if config.modules_to_save or config.bias != "none":
        raise ValueError("add_adapter: modules_to_save and bias belong to a model's first "
                         f"adapter; {adapter_name!r} has modules_to_save="
                         f"{config.modules_to_save!r}, bias={config.bias!r}")
    if config.target_modules is None:
        raise ValueError("add_adapter: config.target_modules is None; name the layers to adapt")
    targets = find_targets(model, config)
    if not targets:
        raise ValueError(f"add_adapter: target_modules {config.target_modules!r} match no "
                         "module of the model")
    rng = np.random.default_rng(seed)
    variant = variant_for(config)
    options = variant_options(variant, config, [m for _, m in targets], tensors)
    done: list[tuple[str, Module, Module]] = []  # (path, module before, after) to undo
    try:
        for path, m in targets:
            layer_rng = np.random.default_rng(rng.integers(0, 2**63))
            r, alpha = config.rank_for(path), config.alpha_for(path)
            kwargs = dict(use_rslora=config.use_rslora, init_lora_weights=config.init_lora_weights,
                          variant=variant.name, variant_options=options)
            if isinstance(m, (LoRALinear, LoRAEmbedding)):
                saved_rng = m.rng
                m.rng = layer_rng
                try:
                    if isinstance(m, LoRALinear):
                        m.add_adapter(adapter_name, r, alpha, config.lora_dropout,
                                      loftq_config=config.loftq_config, **kwargs)
                    else:
                        m.add_adapter(adapter_name, r, alpha, **kwargs)
                finally:
                    m.rng = saved_rng
                done.append((path, m, m))
                continue
            if isinstance(m, Embedding):
                layer = LoRAEmbedding(m, r, alpha, rng=layer_rng, adapter_name=adapter_name,
                                      **kwargs)
            else:
                layer = lora_class(m)(m, r, alpha, config.lora_dropout, rng=layer_rng,
                                   loftq_config=config.loftq_config, adapter_name=adapter_name,
                                   **kwargs)
            layer.train(model.training)
            model.set_submodule(path, layer)
            done.append((path, m, layer))
    except BaseException:
        for path, before, after in reversed(done):
            if before is after:
                after.delete_adapter(adapter_name)
            else:
                model.set_submodule(path, before)
        raise
    known = {**known, adapter_name: config}
    record(model, known, model.lora_active)
    for _, layer in lora_layers(model):
        layer.set_adapter(model.lora_active)
    return model


def set_adapter(model: Module, adapter_name: str | Sequence[str]) -> None:
    """Make `adapter_name` (a name or a list of names) the active adapters, as PEFT's
    set_adapter: a forward adds all of them (their updates sum), and only their matrices are
    trainable (requires_grad), so trainable_parameters and a new optimizer follow. Make the
    optimizer after set_adapter."""
    known = configs(model, "set_adapter")
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    for n in names:
        if n not in known:
            raise ValueError(f"set_adapter: no adapter named {n!r}; the model has {list(known)}")
    if len(set(names)) != len(names):
        raise ValueError(f"set_adapter: adapter names repeat: {names}")
    for _, layer in lora_layers(model):
        layer.set_adapter(names)
    record(model, known, names)


def delete_adapter(model: Module, adapter_name: str) -> Module:
    """Remove adapter `adapter_name` (unmerged first where merged). Layers left with no
    adapter become their base layer again; when the active adapter goes, the first remaining
    one becomes active, as in PEFT. Deleting the last adapter unloads LoRA from the model.
    Returns the model."""
    known = configs(model, "delete_adapter")
    if adapter_name not in known:
        raise ValueError(f"delete_adapter: no adapter named {adapter_name!r}; the model has "
                         f"{list(known)}")
    if len(known) == 1:
        return unload(model)
    for path, layer in lora_layers(model):
        if adapter_name in layer.adapters:
            if len(layer.adapters) == 1:
                layer.unmerge()
                model.set_submodule(path, layer.base_layer().train(model.training))
            else:
                layer.delete_adapter(adapter_name)
    rest = {n: c for n, c in known.items() if n != adapter_name}
    active = [n for n in model.lora_active if n != adapter_name] or [next(iter(rest))]
    record(model, rest, active)
    for _, layer in lora_layers(model):
        layer.set_adapter(active)
    return model


def merge_adapter(model: Module, adapter_names: Sequence[str] | None = None, *,
                  safe_merge: bool = False) -> None:
    """Merge `adapter_names` (default: the active adapters) into the base weights in place,
    keeping the LoRA layers (PEFT's merge_adapter); unmerge_adapter undoes it."""
    known = configs(model, "merge_adapter")
    names = list(model.lora_active if adapter_names is None else adapter_names)
    for n in names:
        if n not in known:
            raise ValueError(f"merge_adapter: no adapter named {n!r}")
    for _, layer in lora_layers(model):
        layer.merge(safe_merge=safe_merge, adapter_names=names)


def unmerge_adapter(model: Module) -> None:
    """Undo merge_adapter on every layer."""
    for _, layer in lora_layers(model):
        layer.unmerge()


@contextlib.contextmanager
def adapter_names(model: Module, names: Sequence[str] | None) -> Iterator[Module]:
    """Within the block, a forward of `model` gives row i of its batch the adapter names[i]
    alone ("__base__": the base model), as PEFT's `adapter_names=` argument: one batch serves
    several adapters, each row computed as if its adapter were the only one active. Layers
    an adapter does not target run their base layer for its rows. Forward only (a backward
    raises); the layers must not be merged. names=None changes nothing. The LoRA layers
    compute the rows of each adapter together (lora.functional.mixed_forward), from the
    adapters' values as the block's forwards find them (from the second forward in a block,
    each layer keeps B^T of the adapters the batch uses, so a decode loop transposes nothing
    and those values are the ones of that second forward); modules_to_save
    copies are the first adapter's for every row. The block's rows are this thread's: other
    threads can run their own mixed batches through the same model at the same time (in eval
    mode; the kernels release the GIL)."""
    if names is None:
        yield model
        return
    if isinstance(names, str):
        raise TypeError("adapter_names: give one adapter name per row of the batch (a list), "
                        f"got the string {names!r}")
    names = list(names)
    known = configs(model, "adapter_names")
    unknown = sorted({n for n in names if n != BASE_ROWS and n not in known}, key=str)
    if unknown:
        raise ValueError(f"adapter_names: no adapter named {unknown[0]!r}; the model has "
                         f"{list(known)} (and {BASE_ROWS!r} for the base model)")
    layers = lora_layers(model)
    merged = [p for p, layer in layers if layer.merged]
    if merged:
        raise ValueError(f"adapter_names: layer {merged[0]!r} is merged; mixed-adapter batches "
                         "need unmerged adapters (unmerge_adapter first)")
    if not hasattr(BATCH_ADAPTERS, "by_layer"):
        BATCH_ADAPTERS.by_layer = {}
    table = BATCH_ADAPTERS.by_layer  # this thread's: other threads keep their own batches
    before = {id(layer): table.get(id(layer)) for _, layer in layers}
    for path, layer in layers:
        table[id(layer)] = (names, path, {})
    try:
        yield model
    finally:
        for key, rows in before.items():
            if rows is None:
                table.pop(key, None)
            else:
                table[key] = rows


def takes_adapter_names(forward):
    """Give a model's forward (or generate) the keyword adapter_names=, which runs it
    inside `with adapter_names(model, names)`: PEFT's argument of that name."""

    @functools.wraps(forward)
    def run(self, *args, adapter_names=None, **kwargs):
        if adapter_names is None:
            return forward(self, *args, **kwargs)
        with _row_adapters(self, adapter_names):
            return forward(self, *args, **kwargs)

    return run


_row_adapters = adapter_names  # the keyword argument above shadows the function's name
