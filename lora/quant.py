"""lora.quant: weights held in quantized blocks (a frozen base need not be float32).

    qt = lora.quant.quantize(W, "Q4_0")      # a QTensor: GGUF's Q4_0 bytes
    W4 = qt.dequantize()                      # float32, W's shape

Formats (`QTYPES`): GGUF's Q8_0, Q4_0, Q4_1 (blocks of 32; quantize and dequantize), Q4_K and
Q6_K (super-blocks of 256; dequantize: read from GGUF files), bit for bit as the PyPI `gguf`
package's gguf.quants writes and reads them, and QLoRA's NF4 (blocks of 64, a float32
absmax scale and 16 NormalFloat codes; lora's own block layout, since GGUF has no NF4) and
NF4_DQ (NF4 with QLoRA's double quantization: the absmax scales in 8 bits, per row).
A tensor's last dimension is whole blocks; its rows are laid out one after another, as in a
GGUF file, each `row_bytes(qtype, K)` bytes. Both directions are C
(csrc/kernels/quant.c), threaded, the GIL released.

The layers that compute with a QTensor without dequantizing it whole are lora.nn.QuantLinear
and lora.quantize_model, which converts a model's Linear layers.
"""

from __future__ import annotations

import numpy as np

from . import functional as F

__all__ = ["QTYPES", "QTensor", "dequantize", "loftq", "quantize", "row_bytes"]

# name -> (elements per block, bytes per block, lora can write it). NF4_DQ's 33 bytes (a scale
# code and 32 bytes of codes) leave out each row's header: row_bytes counts a row.
QTYPES = {
    "Q8_0": (32, 34, True),
    "Q4_0": (32, 18, True),
    "Q4_1": (32, 20, True),
    "Q4_K": (256, 144, False),
    "Q6_K": (256, 210, False),
    "NF4": (64, 36, True),
    "NF4_DQ": (64, 33, True),
}

# NF4_DQ: a row's scales are quantized in groups of this many, each with a float32 absmax
DQ_GROUP = 256


def _check_qtype(qtype, writing: bool = False) -> str:
    if not isinstance(qtype, str) or qtype not in QTYPES or (writing and not QTYPES[qtype][2]):
        names = [q for q, (_, _, w) in QTYPES.items() if w or not writing]
        raise ValueError(f"qtype must be one of {names}, got {qtype!r}")
    return qtype


def row_bytes(qtype: str, K: int) -> int:
    """Bytes of one row of K values (K a positive multiple of the block) in `qtype`: K / block
    blocks of QTYPES[qtype][1] bytes; for NF4_DQ also the row's header, a float32 offset and
    one float32 absmax per group of 256 scales (docs/quantization.md)."""
    _check_qtype(qtype)
    block, nbytes, _ = QTYPES[qtype]
    if not isinstance(K, (int, np.integer)) or K <= 0 or K % block:
        raise ValueError(f"row_bytes: K must be a positive multiple of {block} (a {qtype} "
                         f"block), got {K!r}")
    nb = int(K) // block
    if qtype == "NF4_DQ":
        return 4 + 4 * -(-nb // DQ_GROUP) + nb * nbytes
    return nb * nbytes


class QTensor:
    """A tensor held as quantized blocks: `qtype` (GGUF's name, or "NF4", "NF4_DQ"), `shape`
    (of the values), `data` (uint8, shape[:-1] + (row_bytes(qtype, shape[-1]),): the blocks,
    rows as gguf.quants lays them out; possibly a read-only memory map of a GGUF file, never
    copied here)."""

    __slots__ = ("data", "qtype", "shape", "_kernel")

    def __init__(self, data: np.ndarray, qtype: str, shape):
        _check_qtype(qtype)
        shape = tuple(int(s) for s in shape)
        block = QTYPES[qtype][0]
        if not shape or shape[-1] <= 0 or shape[-1] % block:
            raise ValueError(f"QTensor: the last dimension of shape must be a positive "
                             f"multiple of {block} (a {qtype} block), got {shape}")
        data = np.asarray(data)
        if data.dtype != np.uint8:
            raise TypeError(f"QTensor: data must be uint8 block bytes, got {data.dtype}")
        nbytes = row_bytes(qtype, shape[-1])
        want = int(np.prod(shape[:-1])) * nbytes
        if data.size != want:
            raise ValueError(f"QTensor: {qtype} values of shape {shape} take {want} bytes, "
                             f"data holds {data.size}")
        if not data.flags.c_contiguous:
            data = np.ascontiguousarray(data)
        self.data = data.reshape(*shape[:-1], nbytes)
        self.qtype, self.shape, self._kernel = qtype, shape, {}

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dequantize(self) -> np.ndarray:
        """The values as a new float32 array of `shape`."""
        return F.dequantize(self.data, self.qtype, self.shape)

    def kernel_weight(self, activations: str = "float") -> F.QuantWeight:
        """The 2-D tensor as the lora.functional.QuantWeight the products take (made once per
        `activations`, "float" or "q8"; it shares `data`)."""
        kw = self._kernel.get(activations)
        if kw is None:
            if self.ndim != 2:
                raise ValueError(f"QTensor.kernel_weight: a weight is 2-D, got shape {self.shape}")
            kw = F.QuantWeight(self.data, self.qtype, self.shape, activations=activations)
            self._kernel[activations] = kw
        return kw

    def __getstate__(self):
        return {"data": np.array(self.data), "qtype": self.qtype, "shape": self.shape}

    def __setstate__(self, state):
        self.data, self.qtype, self.shape = state["data"], state["qtype"], state["shape"]
        self._kernel = {}

    def __repr__(self) -> str:
        return f"QTensor(qtype={self.qtype!r}, shape={self.shape}, nbytes={self.nbytes})"


def quantize(array, qtype: str, *, double_quant: bool = False) -> QTensor:
    """`array` (float, last dimension whole blocks, finite) quantized to `qtype` (one of
    Q8_0, Q4_0, Q4_1, NF4, NF4_DQ). For the GGUF types the bytes are those gguf.quants.quantize
    writes. double_quant=True with "NF4" is "NF4_DQ" (bitsandbytes' bnb_4bit_use_double_quant:
    the blocks' absmax scales quantized to 8 bits per row; 4.24 bits a weight for rows of 576,
    4.14 for rows of 4096, instead of NF4's 4.5)."""
    if double_quant:
        if qtype not in ("NF4", "NF4_DQ"):
            raise ValueError(f"quantize: double_quant applies to NF4 (QLoRA's scales), got "
                             f"qtype {qtype!r}")
        qtype = "NF4_DQ"
    _check_qtype(qtype, writing=True)
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
    return QTensor(F.quantize(array, qtype), qtype, array.shape)


def dequantize(data: np.ndarray, qtype: str, shape) -> np.ndarray:
    """The float32 values (of `shape`) of the block bytes `data` of `qtype`; for the GGUF
    types the values gguf.quants.dequantize gives."""
    _check_qtype(qtype)
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data)
    return F.dequantize(data, qtype, tuple(shape))


def loftq(weight, r: int, qtype: str = "NF4", num_iter: int = 1, scaling: float = 1.0):
    """LoftQ (Li et al. 2023), as PEFT's loftq_init: alternately quantize what the low-rank
    part leaves of W and take the rank-r SVD of what quantization leaves, so that
    Q + scaling * B A starts close to W. Returns (Q as a QTensor, A (r, in), B (out, r)),
    float64 A and B.

    The loop (num_iter >= 1): Q = quantize(W - scaling B A) (B A = 0 at first), then B, A =
    the top-r singular triplets of W - dequantize(Q), split as sqrt(S / scaling) on either
    side. PEFT assigns its factors without the scaling (it assumes lora_alpha = r); here
    scaling * B A is the SVD part whatever lora_alpha is."""
    _check_qtype(qtype, writing=True)
    if not isinstance(num_iter, int) or num_iter < 1:
        raise ValueError(f"loftq: num_iter must be an int >= 1, got {num_iter!r}")
    W = np.asarray(weight, np.float64)
    if W.ndim != 2 or not 1 <= r <= min(W.shape):
        raise ValueError(f"loftq: weight must be 2-D with r <= min(shape); got shape "
                         f"{W.shape}, r={r}")
    target = W
    for i in range(num_iter):
        q = quantize(target.astype(np.float32), qtype)
        U, S, Vt = np.linalg.svd(W - q.dequantize(), full_matrices=False)
        root = np.sqrt(S[:r] / scaling)
        B, A = U[:, :r] * root, root[:, None] * Vt[:r]
        if i + 1 < num_iter:
            target = W - scaling * (B @ A)
    return q, A, B
