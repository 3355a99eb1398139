"""Putting LoRA on a model and taking it off: wrap, trainable parameters, merge_and_unload,
unload, disable_adapters.

`wrap(model, config)` replaces the layers `config.target_modules` selects by LoRA layers (in
place, keeping every module path), freezes everything else per `config.bias`, gives each of
`config.modules_to_save` a trainable copy, and records the config as the model's first
adapter ("default" unless named). More adapters, switching between them and mixed batches are
lora/tuners/adapters.py.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from collections.abc import Iterator

import numpy as np

from .._checks import check_fields
from .config import LoraConfig
from .conv import LoRAConv2d
from .lora import LoRAEmbedding, LoRALinear, check_adapter_name
from .variants import variant_for
from ..nn import Conv1D, Conv2d, Embedding, Linear, Module, Parameter, QuantLinear


class ModulesToSaveWrapper(Module):
    """A module trained in full (PEFT's modules_to_save): `original_module` stays frozen and
    untouched, `modules_to_save` is a trainable copy that runs unless adapters are disabled."""

    def __init__(self, module: Module):
        super().__init__()
        self.original_module = module.requires_grad_(False)
        self.modules_to_save = copy.deepcopy(module).requires_grad_(True)
        self.disabled = False

    def active(self) -> Module:
        return self.original_module if self.disabled else self.modules_to_save

    def forward(self, *args, **kwargs):
        object.__setattr__(self, "_ran", self.active())
        return self._ran(*args, **kwargs)

    def backward(self, dout):
        return self.__dict__["_ran"].backward(dout)


def lora_layers(model: Module) -> list[tuple[str, LoRALinear | LoRAEmbedding]]:
    """(path, layer) of every LoRA layer in `model`."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAEmbedding))]


def _output_layer_paths(model: Module) -> set[str]:
    """Layers "all-linear" leaves alone: a Hugging Face style output head."""
    paths = {p for p, _ in model.named_modules() if p.rsplit(".", 1)[-1] == "lm_head"}
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter) and (head := getter()) is not None:
        paths |= {p for p, m in model.named_modules() if m is head}
    return paths


def _match(path: str, names: list[str]) -> bool:
    return any(path == n or path.endswith("." + n) for n in names)


def find_targets(model: Module, config: LoraConfig) -> list[tuple[str, Module]]:
    """(path, module) of the layers `config` puts LoRA on, in model order, without changing
    anything. ValueError when a selected module is of a type LoRA does not support."""
    targets = []
    if config.target_modules == "all-linear":
        skip = _output_layer_paths(model)
        for path, m in model.named_modules():
            if (isinstance(m, (Linear, Conv1D, LoRALinear)) and path not in skip
                    and not config.excluded(path)):
                targets.append((path, m))
        return targets
    for path, m in model.named_modules():
        if path and config.matches(path):
            if not isinstance(m, (Linear, Conv1D, Conv2d, Embedding, LoRALinear,
                                  LoRAEmbedding)):
                raise ValueError(
                    f"target module {path!r} is a {type(m).__name__}; LoRA supports Linear, "
                    "Conv1D, Conv2d and Embedding layers"
                )
            targets.append((path, m))
    return targets


def lora_class(base: Module) -> type[LoRALinear]:
    """The LoRA layer class that wraps a Linear, Conv1D or Conv2d layer."""
    return LoRAConv2d if isinstance(base, Conv2d) else LoRALinear


def layer_dims(m: Module) -> tuple[int, int]:
    """(d_out, d_in) of a layer LoRA adapts: (embedding_dim, num_embeddings) for an
    embedding."""
    if isinstance(m, (Embedding, LoRAEmbedding)):
        return m.embedding_dim, m.num_embeddings
    return m.out_features, m.in_features


def variant_options(variant, config: LoraConfig, modules: list[Module],
                    tensors: dict | None = None) -> dict:
    """What the layers of one new adapter of `variant` share (Variant.options), for the
    target `modules`; `tensors` a file's model-level tensors when loading."""
    first = modules[0]
    dtype = getattr(first, "compute_dtype", None) or first.weight.dtype
    return variant.options(config, [layer_dims(m) for m in modules], dtype, tensors)


def _modules_to_save_paths(model: Module, names: list[str] | None) -> list[str]:
    """The paths of the modules `names` selects (a path equal to a name or ending in "." +
    name; outermost only). A name that selects nothing is absent from this model and ignored,
    as PEFT does: task_type="SEQ_CLS" lists both "classifier" (BERT) and "score" (Llama)."""
    paths = []
    for path, _ in model.named_modules():
        if path and _match(path, names or []) and not any(path.startswith(p + ".") for p in paths):
            paths.append(path)
    return paths


def wrap(
    model: Module, config: LoraConfig | None = None, *, seed: int | None = None,
    adapter_name: str = "default", tensors: dict | None = None, **config_kwargs
) -> Module:
    """Put LoRA on `model` in place and return it.

    `config` is a LoraConfig, or its fields are given as keyword arguments:
    `wrap(model, target_modules=["q_proj", "v_proj"], r=8)`. Every parameter is frozen except
    the LoRA matrices, the biases `config.bias` asks for, and the trainable copies of
    `config.modules_to_save`. `seed` seeds the LoRA initialisation and dropout masks.
    `adapter_name` names the adapter (PEFT's "default"). `config` may be a VeraConfig
    (lora.VeraConfig: VeRA) or a TiedLoraConfig (Tied-LoRA); `tensors` are an adapter file's
    model-level tensors (VeRA's projections, Tied-LoRA's tied pairs), for load_adapter.
    ValueError when nothing matches target_modules or the model already has LoRA layers
    (lora.add_adapter adds another).
    """
    if config is None:
        check_fields("wrap", config_kwargs, [f.name for f in dataclasses.fields(LoraConfig)])
        config = LoraConfig(**config_kwargs)
    elif config_kwargs:
        raise TypeError("wrap: pass either a LoraConfig or its fields as keywords, not both")
    if lora_layers(model):
        raise ValueError("wrap: the model already has LoRA layers; lora.add_adapter(model, name, "
                         "config) adds another adapter")
    if config.target_modules is None:
        raise ValueError("wrap: config.target_modules is None; name the layers to adapt")
    targets = find_targets(model, config)
    if not targets:
        names = [p for p, _ in model.named_modules() if p][:10]
        raise ValueError(
            f"wrap: target_modules {config.target_modules!r} match no module of the model; "
            f"its modules include {names}"
        )
    save_paths = _modules_to_save_paths(model, config.modules_to_save)
    if config.modules_to_save and not save_paths:
        warnings.warn(
            f"wrap: modules_to_save {config.modules_to_save} match no module of the model, so "
            "only the LoRA matrices train and are saved"
            + (f" (task_type={config.task_type!r}: wrap the whole task model, head included)"
               if config.task_type else ""),
            stacklevel=2,
        )
    check_adapter_name(adapter_name, "wrap")
    variant = variant_for(config)
    options = variant_options(variant, config, [m for _, m in targets], tensors)
    variant = variant.name
    rng = np.random.default_rng(seed)
    model.requires_grad_(False)
    for path, base in targets:
        layer_rng = np.random.default_rng(rng.integers(0, 2**63))
        r, alpha = config.rank_for(path), config.alpha_for(path)
        if isinstance(base, Embedding):
            layer = LoRAEmbedding(
                base,
                r,
                alpha,
                use_rslora=config.use_rslora,
                init_lora_weights=config.init_lora_weights,
                rng=layer_rng,
                adapter_name=adapter_name,
                variant=variant,
                variant_options=options,
            )
        else:
            if config.fan_in_fan_out != isinstance(base, Conv1D):
                warnings.warn(
                    f"wrap: {path!r} is a {type(base).__name__}, so fan_in_fan_out is "
                    f"{isinstance(base, Conv1D)} for it (the config says {config.fan_in_fan_out})",
                    stacklevel=2,
                )
            layer = lora_class(base)(
                base,
                r,
                alpha,
                config.lora_dropout,
                use_rslora=config.use_rslora,
                init_lora_weights=config.init_lora_weights,
                rng=layer_rng,
                loftq_config=config.loftq_config,
                adapter_name=adapter_name,
                variant=variant,
                variant_options=options,
            )
        layer.train(model.training)
        model.set_submodule(path, layer)
    for path in save_paths:
        wrapper = ModulesToSaveWrapper(model.get_submodule(path)).train(model.training)
        model.set_submodule(path, wrapper)
    if config.bias != "none":
        for path, m in model.named_modules():
            if config.bias == "lora_only" and not isinstance(m, (LoRALinear, LoRAEmbedding)):
                continue
            if isinstance(m, ModulesToSaveWrapper) or ".original_module" in f".{path}.":
                continue
            if isinstance(getattr(m, "bias", None), Parameter):
                m.bias.requires_grad = True
    model.lora_configs, model.lora_active = {adapter_name: config}, [adapter_name]
    model.lora_config = config
    return model


def trainable_parameters(model: Module) -> list[Parameter]:
    """The parameters an optimizer should update (requires_grad), each once."""
    return [p for p in model.parameters() if p.requires_grad]


def print_trainable_parameters(model: Module) -> tuple[int, int]:
    """Print PEFT's line "trainable params: ... || all params: ... || trainable%: ..." and
    return (trainable, total) element counts."""
    total = sum(p.size for p in model.parameters())
    for m in model.modules():
        q = m.base_layer() if isinstance(m, LoRALinear) else m
        if isinstance(q, QuantLinear):  # its weight Parameter holds block bytes
            total += q.in_features * q.out_features - q.weight.size
    trainable = sum(p.size for p in trainable_parameters(model))
    percent = 100 * trainable / total if total else 0.0
    print(
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}"
    )
    return trainable, total


def _strip(model: Module, merge: bool, safe_merge: bool = False,
           adapter_names: list[str] | None = None) -> Module:
    names = model.__dict__.get("lora_active") if adapter_names is None else list(adapter_names)
    for path, layer in lora_layers(model):
        if not merge:
            layer.unmerge()
            base = layer.base_layer()
        elif isinstance(layer, LoRALinear) and layer.quantized:
            base = layer.merged_float_base(safe_merge=safe_merge, adapter_names=names)
        else:
            if any(n not in (names or layer.active_adapters) for n in layer.merged_adapters):
                layer.unmerge()  # merged adapters not asked for come out again
            layer.merge(safe_merge=safe_merge, adapter_names=names)
            base = layer.base_layer()
        base.train(model.training)
        if path:
            model.set_submodule(path, base)
        else:
            model = base
    for path, m in list(model.named_modules()):
        if isinstance(m, ModulesToSaveWrapper):
            model.set_submodule(path, m.modules_to_save)
    for attr in ("lora_config", "lora_configs", "lora_active"):
        model.__dict__.pop(attr, None)
    return model


def merged_state_dict(model: Module) -> dict[str, np.ndarray]:
    """The state dict of the plain model merge_and_unload(model) would give, leaving `model`
    as it is: each LoRA layer's weight plus scaling * B @ A (a new array; as it is when
    merged), the trained copies of modules_to_save under their module's own names, no LoRA
    matrices and no frozen originals. What a whole fine-tuned model is saved as."""
    layers = {id(layer.weight): layer for _, layer in lora_layers(model)}
    pairs = {id(p) for layer in layers.values() for ad in layer._adapters.values()
             for p in (ad.A, ad.B, *ad.extra.values())}  # frozen ones too (Tied-LoRA's)
    out = {}
    for name, p in model.named_parameters():
        if ".original_module." in f".{name}" or id(p) in pairs:
            continue
        value = p.data
        layer = layers.get(id(p))
        if layer is not None and not layer.merged:
            value = layer.base_layer().dequantize() if layer.quantized else value.copy()
            live = layer._live()
            layer._check_alone(live, "merging several adapters")
            for ad in live:
                layer._merge_one(value, ad)
        out[name.replace(".modules_to_save.", ".")] = value
    return out


def merge_and_unload(model: Module, *, safe_merge: bool = False,
                     adapter_names: list[str] | None = None) -> Module:
    """Merge the active adapters' updates (or those of `adapter_names`) into the base
    weights and put the plain layers back (trained copies of modules_to_save replace their
    originals); other adapters are dropped. Returns the plain model; its parameters stay
    frozen. safe_merge checks each merged weight is finite first. A layer
    over a quantized base (lora.nn.QuantLinear) comes back as a float Linear holding the
    dequantized weight plus the update (quantize_model the result to quantize it again)."""
    return _strip(model, merge=True, safe_merge=safe_merge, adapter_names=adapter_names)


def unload(model: Module) -> Module:
    """Remove the LoRA layers without merging (a merged layer is unmerged first), giving
    back the base model; trained copies of modules_to_save replace their originals."""
    return _strip(model, merge=False)


@contextlib.contextmanager
def disable_adapters(model: Module) -> Iterator[Module]:
    """Within the block, the model runs as its base model: LoRA layers compute the base layer
    only (merged ones are unmerged), modules_to_save use their original modules."""
    switches = [
        m
        for m in model.modules()
        if isinstance(m, (LoRALinear, LoRAEmbedding, ModulesToSaveWrapper))
    ]
    before = [m.disabled for m in switches]
    for m in switches:
        m.disabled = True
    try:
        yield model
    finally:
        for m, flag in zip(switches, before, strict=True):
            m.disabled = flag
