"""lora.nn: a minimal module system for NumPy models, with hand-written backward passes.

    from lora import nn
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    loss, dlogits = nn.cross_entropy(model(x), y)
    model.backward(dlogits)

module.py holds Parameter, Module and the containers; layers.py the layers (dense ones on the
C kernels of lora.functional) and weight packing; losses.py the losses, which return the
gradient with the loss. No autograd: each layer's backward is written out.
"""

from .layers import (
    GELU,
    Conv1D,
    Dropout,
    Embedding,
    Identity,
    LayerNorm,
    Linear,
    ReLU,
    SiLU,
    Tanh,
    pack_weights,
    unpack_weights,
)
from .conv import Conv2d
from .quantized import QuantEmbedding, QuantLinear, quantize_model, set_quant_activations
from .losses import causal_lm_loss, cross_entropy, mse_loss
from .module import Module, ModuleDict, ModuleList, Parameter, Sequential

__all__ = [
    "Parameter",
    "Module",
    "pack_weights",
    "unpack_weights",
    "Linear",
    "QuantLinear",
    "QuantEmbedding",
    "quantize_model",
    "set_quant_activations",
    "Conv1D",
    "Conv2d",
    "Embedding",
    "LayerNorm",
    "Dropout",
    "ReLU",
    "GELU",
    "Tanh",
    "SiLU",
    "Identity",
    "Sequential",
    "ModuleList",
    "ModuleDict",
    "cross_entropy",
    "causal_lm_loss",
    "mse_loss",
]
