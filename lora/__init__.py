"""lora: LoRA fine-tuning, merging and serving for NumPy, with a C core.

    import lora
    y, xa = lora.functional.linear_forward(x, W, A, B, scale)

The package's folders follow its layers: lora.functional (the C kernels), lora.nn (modules),
lora.tuners (LoRA config, layers and wrapping), lora.io (safetensors, PEFT adapters, merging
checkpoints), lora.models (pretrained models), lora.optim, lora.cli. See docs/design.md.
"""

from . import functional, nn, optim, quant
from .functional import blas_info, set_num_threads
from .io import AdapterFormatError, load_adapter, merge_checkpoint, save_adapter
from .nn import pack_weights, quantize_model, set_quant_activations, unpack_weights
from .tuners import (
    LoRAConv2d,
    LoRAEmbedding,
    LoRALinear,
    LoraConfig,
    TiedLoraConfig,
    VeraConfig,
    active_adapters,
    adapter_names,
    add_adapter,
    add_weighted_adapter,
    delete_adapter,
    disable_adapters,
    init_lora_weights,
    list_adapters,
    lora_layers,
    merge_adapter,
    merge_and_unload,
    print_trainable_parameters,
    set_adapter,
    trainable_parameters,
    unload,
    unmerge_adapter,
    wrap,
)

__version__ = "0.1.0"

__all__ = [
    "AdapterFormatError",
    "LoRAConv2d",
    "LoRAEmbedding",
    "LoRALinear",
    "LoraConfig",
    "TiedLoraConfig",
    "VeraConfig",
    "__version__",
    "active_adapters",
    "adapter_names",
    "add_adapter",
    "add_weighted_adapter",
    "delete_adapter",
    "list_adapters",
    "merge_adapter",
    "set_adapter",
    "unmerge_adapter",
    "blas_info",
    "disable_adapters",
    "functional",
    "init_lora_weights",
    "load_adapter",
    "lora_layers",
    "merge_and_unload",
    "merge_checkpoint",
    "nn",
    "optim",
    "pack_weights",
    "print_trainable_parameters",
    "quant",
    "quantize_model",
    "set_quant_activations",
    "save_adapter",
    "set_num_threads",
    "trainable_parameters",
    "unload",
    "unpack_weights",
    "wrap",
]
