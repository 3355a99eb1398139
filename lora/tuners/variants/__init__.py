"""LoRA variants behind one extension point: VARIANTS, the registry.

A variant is one module here holding one subclass of `Variant` (lora.py, which is plain
LoRA and the interface): the parameters an adapter of it holds beyond A and B, with PEFT's
names (also their keys in adapter_model.safetensors), their initialisation, the layer's
forward and backward with it, and its update of the base weight (merge, unmerge, and the
merged tensors `lora merge` writes). The LoRA layers (lora/tuners/lora.py), wrap and
add_adapter, save and load (lora/io/adapter.py), merge_and_unload and merged_state_dict,
`lora merge` (lora/io/checkpoint.py) and `lora info` reach a variant only through this
registry: adding one is a new module, a line in VARIANTS and, when PEFT selects it by a
config flag, that flag as a LoraConfig field (docs/design.md).
"""

from __future__ import annotations

from ..config import LoraConfig
from .dora import DoRA
from .lora import LoRA, Variant
from .tied import TiedLoraConfig, TiedLoRA
from .vera import VeraConfig, VeRA

__all__ = ["VARIANTS", "TiedLoraConfig", "Variant", "VeraConfig", "config_from_dict",
           "extra_fields", "field_owners", "peft_types", "variant_for"]

VARIANTS: dict[str, Variant] = {v.name: v for v in (LoRA(), DoRA(), VeRA(), TiedLoRA())}


def _peft_type(config) -> str:
    if isinstance(config, dict):
        return str(config.get("peft_type") or "LORA").upper()
    return next((v.peft_type for v in VARIANTS.values()
                 if v.config_class is not None and isinstance(config, v.config_class)), "LORA")


def variant_for(config, where: str = "LoraConfig") -> Variant:
    """The variant a config (a LoraConfig, a VeraConfig, a TiedLoraConfig, or an
    adapter_config.json dict) selects: by its peft_type, then the one whose config_field is
    true, else that type's default; ValueError when several are."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    peft_type = _peft_type(config)
    of_type = [v for v in VARIANTS.values() if v.peft_type == peft_type]
    if not of_type:
        raise ValueError(f"{where}: peft_type {peft_type!r} is not one this library reads "
                         f"({', '.join(sorted(peft_types()))})")
    chosen = [v for v in of_type if v.config_field and get(v.config_field, False)]
    if len(chosen) > 1:
        raise ValueError(f"{where}: {' and '.join(v.config_field + '=True' for v in chosen)} "
                         "select different LoRA variants; choose one")
    return chosen[0] if chosen else next(v for v in of_type if not v.config_field)


def peft_types() -> set[str]:
    """The peft_type values of the adapters this library reads and writes."""
    return {v.peft_type for v in VARIANTS.values()}


def config_from_dict(config: dict, where: str = "adapter_config.json") -> LoraConfig:
    """The config class of the dict's peft_type (LoraConfig, VeraConfig, TiedLoraConfig)
    built from it."""
    cls = variant_for(config, where).config_class or LoraConfig
    return cls.from_dict(config, where=where)


def field_owners() -> dict[str, Variant]:
    """Every variant's further parameter names (their tensor keys end in '.<field>'), each
    with the variant that declares it."""
    return {f: v for v in VARIANTS.values() for f in v.extra_shapes("linear", 1, 1, 1)}


def extra_fields() -> set[str]:
    """Every variant's further parameter names."""
    return set(field_owners())
