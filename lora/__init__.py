"""lora: LoRA fine-tuning, merging and serving for NumPy, with a C core.

    import lora
    y, xa = lora.functional.linear_forward(x, W, A, B, scale)

See docs/ for the guide and API reference.
"""

from . import functional, nn, optim
from .functional import blas_info, set_num_threads
from .adapter import AdapterFormatError, load_adapter, save_adapter
from .checkpoint import merge_checkpoint
from .config import LoraConfig
from .layers import LoRAEmbedding, LoRALinear, init_lora_weights
from .nn import pack_weights, unpack_weights
from .tuner import (
    disable_adapters,
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
    "merge_and_unload",
    "merge_checkpoint",
    "nn",
    "optim",
    "pack_weights",
    "print_trainable_parameters",
    "save_adapter",
    "set_num_threads",
    "trainable_parameters",
    "unload",
    "unpack_weights",
    "wrap",
]
