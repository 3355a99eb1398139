"""QuantLinear: a Linear layer whose frozen weight stays in quantized blocks (lora.quant), and
quantize_model, which converts a model's Linear layers to it in place.

The products read the blocks directly (csrc/kernels/quant.c through a
lora.functional.QuantWeight): up to 4 rows of input, dot products straight from each row of
W dequantized in L1 (decode); from 5 rows, and in backward, 1 MB tiles of W dequantized and
multiplied by the BLAS GEMM. A float copy of the whole weight is never made. LoRA wraps a
QuantLinear like any Linear (QLoRA: y = x dequant(W)^T + b + s x A^T B^T), training A and B.
"""

from __future__ import annotations

import numpy as np

from .. import functional as F
from .. import quant
from .._checks import kernel_dtype
from .layers import Embedding, Linear, _check_ids, _rows, as_input
from .module import Module, Parameter

__all__ = ["QuantEmbedding", "QuantLinear", "quantize_model", "set_quant_activations"]


class QuantLinear(Linear):
    """y = x W^T + b, W (out_features, in_features) frozen as `qtype` blocks.

    `weight` is a frozen Parameter holding the block bytes (uint8, (out, row bytes): see
    lora.quant.row_bytes), so a state dict carries the quantized weight as it is; `qweight`
    is the same bytes as a lora.quant.QTensor. Inputs and outputs are `dtype` (float32, or
    float64). The bias, if any, is a float Parameter and may be trained. The weight cannot be
    (requires_grad stays False): quantized values have no gradient step.

    `activations` ("float", or "q8": see set_quant_activations) is how forwards of up to 4
    rows (decoding) take x.
    """

    activations = "float"

    def __init__(self, qweight: quant.QTensor, bias: np.ndarray | None = None, *,
                 dtype=np.float32):
        Module.__init__(self)
        if not isinstance(qweight, quant.QTensor) or qweight.ndim != 2:
            raise TypeError("QuantLinear: qweight must be a 2-D lora.quant.QTensor, got "
                            f"{qweight!r}")
        self.compute_dtype = np.dtype(kernel_dtype(dtype, "QuantLinear"))
        self.out_features, self.in_features = qweight.shape
        self.qtype = qweight.qtype
        self.weight = Parameter(qweight.data, requires_grad=False)
        if bias is not None:
            bias = np.asarray(bias, self.compute_dtype)
            if bias.shape != (self.out_features,):
                raise ValueError(f"QuantLinear: bias must have shape ({self.out_features},), "
                                 f"got {bias.shape}")
        self.bias = None if bias is None else Parameter(bias)
        object.__setattr__(self, "_qt", qweight)

    @classmethod
    def from_linear(cls, layer: Linear, qtype: str) -> QuantLinear:
        """A QuantLinear holding `layer`'s weight quantized to `qtype` (Q8_0, Q4_0, Q4_1, NF4,
        NF4_DQ) and its bias (the same Parameter, trainable as it was)."""
        q = cls(quant.quantize(layer.weight.data, qtype), None, dtype=layer.weight.dtype)
        q.bias = layer.bias
        return q

    @property
    def qweight(self) -> quant.QTensor:
        """The weight as a QTensor (over `weight.data`; remade if that array was replaced,
        as load_state_dict does)."""
        if self._qt.data is not self.weight.data:
            object.__setattr__(self, "_qt", quant.QTensor(self.weight.data, self.qtype,
                                                          (self.out_features, self.in_features)))
        return self._qt

    def dequantize(self) -> np.ndarray:
        """W as a new (out_features, in_features) array of the layer's dtype."""
        return self.qweight.dequantize().astype(self.compute_dtype, copy=False)

    def to_linear(self) -> Linear:
        """A float Linear with the dequantized weight and this layer's bias Parameter."""
        layer = Linear.from_arrays(self.dequantize())
        layer.weight.requires_grad = False
        layer.bias = self.bias
        return layer

    def pack(self, backward: bool = True):
        raise ValueError("QuantLinear.pack: a quantized weight is not packed (its products "
                         "read the blocks directly)")

    def _weight_arg(self, x: np.ndarray, backward: bool = False):
        return self.qweight.kernel_weight(self.activations), False

    def forward(self, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        x = as_input(x, self.compute_dtype)
        self._save(x)
        return F.dense_forward(x, self.qweight.kernel_weight(self.activations),
                               None if self.bias is None else self.bias.data, residual=residual)

    def backward(self, dout: np.ndarray, add_dx_to: np.ndarray | None = None) -> np.ndarray:
        if self.weight.requires_grad:
            raise RuntimeError("QuantLinear.backward: the quantized weight cannot be trained "
                               "(set weight.requires_grad = False; train LoRA on top)")
        (x,) = self._saved()
        dx = None
        if self.need_input_grad:
            dx, _ = F.dense_backward(dout, x, self.qweight.kernel_weight(), need_dweight=False,
                                     add_dx_to=add_dx_to)
        if self.bias is not None and self.bias.requires_grad:
            self.bias.accumulate(_rows(dout).sum(axis=0))
        return dx

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"qtype={self.qtype}, bias={self.bias is not None}")


class QuantEmbedding(Embedding):
    """Row lookup from a table frozen as `qtype` blocks: y = dequantize(W[ids]), only the
    rows looked up dequantized. `weight` holds the block bytes (uint8, (num, row bytes)),
    frozen; outputs are `dtype`. A tied lm_head computes with the same blocks (a QuantLinear
    sharing this Parameter)."""

    def __init__(self, qweight: quant.QTensor, padding_idx: int | None = None, *,
                 dtype=np.float32):
        Module.__init__(self)
        if not isinstance(qweight, quant.QTensor) or qweight.ndim != 2:
            raise TypeError(f"QuantEmbedding: qweight must be a 2-D QTensor, got {qweight!r}")
        self.compute_dtype = np.dtype(kernel_dtype(dtype, "QuantEmbedding"))
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.padding_idx = padding_idx
        self.qtype = qweight.qtype
        self.weight = Parameter(qweight.data, requires_grad=False)
        object.__setattr__(self, "_qt", qweight)

    qweight = QuantLinear.qweight
    dequantize = QuantLinear.dequantize

    @property
    def out_features(self) -> int:  # for qweight's shape
        return self.num_embeddings

    @property
    def in_features(self) -> int:
        return self.embedding_dim

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """The rows `ids` (checked) as floats, ids.shape + (embedding_dim,)."""
        rows = self.weight.data[ids.reshape(-1)]
        out = F.dequantize(rows, self.qtype, (rows.shape[0], self.embedding_dim))
        return out.reshape(*ids.shape, self.embedding_dim).astype(self.compute_dtype,
                                                                   copy=False)

    def forward(self, ids: np.ndarray) -> np.ndarray:
        ids = _check_ids(ids, self.num_embeddings)
        self._save(ids)
        return self.lookup(ids)

    def backward(self, dout: np.ndarray) -> None:
        if self.weight.requires_grad:
            raise RuntimeError("QuantEmbedding.backward: the quantized table cannot be trained")
        return None

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype}"


def quantize_model(model: Module, qtype: str = "Q4_0", *,
                   modules_to_not_convert: list[str] | None = None) -> Module:
    """Replace, in place, each lora.nn.Linear of `model` by a QuantLinear holding its weight
    in `qtype` blocks (Q8_0, Q4_0, Q4_1, NF4 or NF4_DQ: QLoRA's NF4 with double
    quantization); returns the model.

    Not converted: Linear layers named (by path or last name) in `modules_to_not_convert`
    (default: "lm_head", as transformers' quantizers leave the output layer), layers already
    wrapped by LoRA (quantize before lora.wrap), embeddings and any layer whose in_features
    is not a whole number of blocks. Converted weights are frozen (quantized values are not
    trained). The converted paths are in `model.quantized_modules`."""
    quant._check_qtype(qtype, writing=True)
    skip = ["lm_head"] if modules_to_not_convert is None else list(modules_to_not_convert)
    block = quant.QTYPES[qtype][0]
    done = []
    for path, m in list(model.named_modules()):
        if type(m) is not Linear or not path:
            continue
        if path in skip or path.rpartition(".")[2] in skip or m.in_features % block:
            continue
        model.set_submodule(path, QuantLinear.from_linear(m, qtype))
        done.append(path)
    object.__setattr__(model, "quantized_modules", done)
    return model


ACTIVATIONS = ("float", "q8")


def set_quant_activations(model: Module, activations: str = "q8") -> int:
    """How every QuantLinear of `model` (LoRA-wrapped ones included) takes x in forwards of up
    to 4 rows, the products of decoding; returns how many layers were set.

    "float" (the default): x as it is; the products equal those on dequantize(W) within
    float32 rounding. "q8": each row of x is rounded to 8 bits in blocks of 32 (scale
    amax / 127, as llama.cpp's Q8_1) and Q4_0, Q4_1 and Q8_0 blocks are multiplied in
    integers, as llama.cpp does on the CPU: about half the time of a decoding product on AVX2,
    for an error of x's 8-bit rounding (about 0.5% of a product's size). Larger batches
    (prefill, training), every backward, float64, NF4 and the LoRA terms stay in floats."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"set_quant_activations: activations must be one of {ACTIVATIONS}, "
                         f"got {activations!r}")
    n = 0
    for m in model.modules():
        base = m.base_layer() if hasattr(m, "base_layer") else None  # a LoRA layer's
        for layer in (m, base):
            if isinstance(layer, QuantLinear):
                layer.activations = activations
                n += 1
    return n
