"""lora: LoRA fine-tuning, merging and serving for NumPy, with a C core.

    import lora
    y, xa = lora.functional.linear_forward(x, W, A, B, scale)

See docs/ for the guide and API reference.
"""

from . import functional
from .functional import blas_info, set_num_threads

__version__ = "0.1.0"

__all__ = ["functional", "blas_info", "set_num_threads", "__version__"]
