"""lora: LoRA fine-tuning, merging and serving for NumPy, with a C core.

    import lora
    y, xa = lora.functional.linear_forward(x, W, A, B, scale)

See docs/ for the guide and API reference.
"""

from . import functional
from .functional import blas_info, set_num_threads
from . import nn, optim
from .adapter import AdapterFormatError, load_adapter, save_adapter
from .checkpoint import merge_checkpoint
from .config import LoraConfig
from .layers import LoRAEmbedding, LoRALinear, init_lora_weights
from .tuner import (
    disable_adapters,
    merge_and_unload,
    print_trainable_parameters,
    trainable_parameters,
    unload,
    wrap,
)

__version__ = "0.1.0"

__all__ = ["functional", "blas_info", "set_num_threads", "__version__"]
__all__ += ["nn", "optim", "LoraConfig", "LoRALinear", "LoRAEmbedding", "init_lora_weights"]
__all__ += ["wrap", "trainable_parameters", "print_trainable_parameters", "merge_and_unload"]
__all__ += ["unload", "disable_adapters", "save_adapter", "load_adapter", "AdapterFormatError"]
__all__ += ["merge_checkpoint"]
