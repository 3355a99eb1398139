"""lora.tuners: putting LoRA on a model. config.py holds LoraConfig and the one scaling
formula, lora.py the LoRA layers, wrap.py choosing and replacing layers (wrap, merge_and_unload,
unload, disable_adapters), adapters.py several named adapters (add, set, delete, mixed
batches), combine.py add_weighted_adapter. No file I/O here: that is lora.io.
"""

from .adapters import (
    active_adapters,
    adapter_names,
    add_adapter,
    delete_adapter,
    list_adapters,
    merge_adapter,
    set_adapter,
    unmerge_adapter,
)
from .combine import add_weighted_adapter

from .config import LoraConfig, scaling_factor
from .conv import LoRAConv2d
from .lora import LoRAEmbedding, LoRALinear, init_lora_weights
from .variants import TiedLoraConfig, VeraConfig
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
    "active_adapters",
    "adapter_names",
    "add_adapter",
    "add_weighted_adapter",
    "delete_adapter",
    "list_adapters",
    "merge_adapter",
    "set_adapter",
    "unmerge_adapter",
    "LoraConfig",
    "VeraConfig",
    "TiedLoraConfig",
    "scaling_factor",
    "LoRALinear",
    "LoRAConv2d",
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
