"""lora.tuners: putting LoRA on a model. config.py holds LoraConfig and the one scaling
formula, lora.py the LoRA layers, wrap.py choosing and replacing layers (wrap, merge_and_unload,
unload, disable_adapters). No file I/O here: that is lora.io.
"""

from .config import LoraConfig, scaling_factor
from .lora import LoRAEmbedding, LoRALinear, init_lora_weights
from .wrap import (
    ModulesToSaveWrapper,
    disable_adapters,
    find_targets,
    lora_layers,
    merge_and_unload,
    merged_state_dict,
    print_trainable_parameters,
    trainable_parameters,
    unload,
    wrap,
)

__all__ = [
    "LoraConfig",
    "scaling_factor",
    "LoRALinear",
    "LoRAEmbedding",
    "init_lora_weights",
    "ModulesToSaveWrapper",
    "disable_adapters",
    "find_targets",
    "lora_layers",
    "merge_and_unload",
    "merged_state_dict",
    "print_trainable_parameters",
    "trainable_parameters",
    "unload",
    "wrap",
]
