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
from .nn import pack_weights, quantize_model, unpack_weights
from .tuners import (
    LoRAEmbedding,
    LoRALinear,
    LoraConfig,
    disable_adapters,
    init_lora_weights,
    lora_layers,
    merge_and_unload,
    print_trainable_parameters,
    trainable_parameters,
    unload,
    wrap,
)

__version__ = "0.1.0"

__all__ = [
    "AdapterFormatError",
    "LoRAEmbedding",
    "LoRALinear",
    "LoraConfig",
    "__version__",
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
    "save_adapter",
    "set_num_threads",
    "trainable_parameters",
    "unload",
    "unpack_weights",
    "wrap",
]
