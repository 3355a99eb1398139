"""lora.functional: the LoRA kernels on NumPy arrays, stateless.

Each function is a C kernel in csrc/kernels/, bound in csrc/bind_*.c (csrc/README.md maps
them); their pure-NumPy twins, the readable spec and test oracle, are in lora/_reference.py.

Shapes follow PyTorch/PEFT: weight (d_out, d_in), A (r, d_in), B (d_out, r), x (..., d_in).
All arrays of a call share one dtype, float32 or float64. Every argument is validated
before any work; a bad one raises TypeError or ValueError naming it, and leaves every
array as it was. The GIL is released around the C work, so threads calling these run in
parallel.
"""

from . import _blas  # noqa: F401  (loads OpenBLAS before the extension)
from ._C import (
    PackedWeight,
    QuantWeight,
    adam_step,
    attention_backward,
    attention_forward,
    blas_info,
    causal_attention_backward,
    causal_attention_forward,
    col2im,
    dense_backward,
    dense_forward,
    gelu_backward,
    gelu_forward,
    im2col,
    layer_norm_backward,
    layer_norm_forward,
    linear_backward,
    linear_cross_entropy,
    linear_forward,
    dequantize,
    dora_norm,
    merge,
    mixed_forward,
    quantize,
    rms_norm_backward,
    rms_norm_forward,
    rope_backward,
    rope_forward,
    set_num_threads,
    swiglu_backward,
    swiglu_forward,
    unmerge,
)

__all__ = [
    "PackedWeight",
    "QuantWeight",
    "quantize",
    "dequantize",
    "linear_forward",
    "linear_backward",
    "mixed_forward",
    "merge",
    "unmerge",
    "dora_norm",
    "im2col",
    "col2im",
    "adam_step",
    "dense_forward",
    "dense_backward",
    "gelu_forward",
    "gelu_backward",
    "layer_norm_forward",
    "layer_norm_backward",
    "attention_forward",
    "attention_backward",
    "rms_norm_forward",
    "rms_norm_backward",
    "rope_forward",
    "rope_backward",
    "swiglu_forward",
    "swiglu_backward",
    "causal_attention_forward",
    "causal_attention_backward",
    "linear_cross_entropy",
    "blas_info",
    "set_num_threads",
]
