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

from .dora import DoRA
from .lora import LoRA, Variant

__all__ = ["VARIANTS", "Variant", "extra_fields", "variant_for"]

VARIANTS: dict[str, Variant] = {v.name: v for v in (LoRA(), DoRA())}


def variant_for(config, where: str = "LoraConfig") -> Variant:
    """The variant a LoraConfig (or an adapter_config.json dict) selects: the one whose
    config_field is true, plain LoRA when none is; ValueError when several are."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    chosen = [v for v in VARIANTS.values() if v.config_field and get(v.config_field, False)]
    if len(chosen) > 1:
        raise ValueError(f"{where}: {' and '.join(v.config_field + '=True' for v in chosen)} "
                         "select different LoRA variants; choose one")
    return chosen[0] if chosen else VARIANTS["lora"]


def extra_fields() -> set[str]:
    """Every variant's further parameter names (their tensor keys end in '.<field>')."""
    return {f for v in VARIANTS.values() for f in v.extra_shapes("linear", 1, 1, 1)}
