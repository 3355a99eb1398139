"""LoRA layers: a frozen base layer plus a trainable low-rank update, PEFT's conventions.

`LoRALinear` wraps a `lora.nn.Linear` (or a GPT-2 style `Conv1D`, whose weight is stored
(in, out): PEFT's fan_in_fan_out) and computes y = x W^T + b + scaling * (drop(x) A^T) B^T
through the C kernels; `LoRAEmbedding` wraps a `lora.nn.Embedding` the way PEFT does
(y = W[ids] + scaling * A^T[ids] B^T, no dropout). Both keep the base layer's own weight and
bias Parameters (so a base state dict loads into a wrapped model by the same names), hold
`lora_A`/`lora_B` (`lora_embedding_A`/`lora_embedding_B`) Parameters, and merge/unmerge in
place through an explicit `merged` flag. Choosing which layers to wrap is
lora/tuners/wrap.py's job.
"""

from __future__ import annotations

import math

import numpy as np

from .. import functional as F
from ..nn import Conv1D, Embedding, Linear, Module, Parameter, QuantEmbedding, QuantLinear
from ..nn.layers import _check_ids, _Packable, _rows, _scatter_rows, as_input
from .config import MAX_ALPHA, check_positive_int, check_real, scaling_factor

__all__ = ["LoRAEmbedding", "LoRALinear", "init_lora_weights"]


class _LoRABase(Module):
    """What LoRALinear and LoRAEmbedding share: the base layer, scaling, merged/disabled."""

    def _setup(self, base: Module, r: int, lora_alpha: float, use_rslora: bool, rng) -> None:
        check_positive_int(r, "r", type(self).__name__)
        check_real(lora_alpha, "lora_alpha", type(self).__name__, MAX_ALPHA)
        object.__setattr__(self, "_base", base)  # not a child: its Parameters are ours
        self.weight = base.weight
        self.r, self.lora_alpha, self.use_rslora = r, lora_alpha, use_rslora
        self.scaling = scaling_factor(lora_alpha, r, use_rslora)
        self.merged = False
        self.disabled = False  # set by lora.disable_adapters: run the base layer only
        self.rng = rng if rng is not None else np.random.default_rng()
        self.weight.requires_grad = False

    def base_layer(self) -> Module:
        """The wrapped layer, sharing this layer's weight (and bias) Parameters."""
        return self._base

    @property
    def quantized(self) -> bool:
        """The base weight is held quantized (a lora.nn.QuantLinear or QuantEmbedding)."""
        return isinstance(self._base, (QuantLinear, QuantEmbedding))

    @property
    def compute_dtype(self) -> np.dtype:
        """The dtype of inputs and outputs: the weight's, or a quantized base's."""
        return self._base.compute_dtype if self.quantized else self.weight.dtype

    def _pair(self) -> tuple[Parameter, Parameter]:
        raise NotImplementedError

    def merge(self, safe_merge: bool = False) -> None:
        """weight += scaling * (B @ A), in place, once (a second call does nothing). With
        safe_merge the result is computed in a copy and committed only if it is finite."""
        if self.merged:
            return
        if self.quantized:
            raise ValueError(f"{type(self).__name__}.merge: the base weight is quantized "
                             f"({self._base.qtype}) and cannot take the update in place; "
                             "lora.merge_and_unload gives the merged model in float weights")
        A, B = self._pair()
        if safe_merge:
            merged = self.weight.data.copy()
            self._merge_into(merged, A.data, B.data, self.scaling)
            if not np.isfinite(merged).all():
                raise ValueError(f"{type(self).__name__}.merge: the merged weight is not finite")
            self.weight.data[...] = merged
        else:
            self._merge_into(self.weight.data, A.data, B.data, self.scaling)
        self.merged = True
        self._weight_changed()

    def unmerge(self) -> None:
        """Undo merge() (weight -= scaling * (B @ A)); does nothing when not merged."""
        if not self.merged:
            return
        A, B = self._pair()
        self._merge_into(self.weight.data, A.data, B.data, -self.scaling)
        self.merged = False
        self._weight_changed()


class LoRALinear(_Packable, _LoRABase):
    """A Linear (or Conv1D) layer with a LoRA update.

    Shapes: x (..., in), weight (out, in) ((in, out) when fan_in_fan_out), lora_A (r, in),
    lora_B (out, r), y (..., out). The base weight is frozen; its bias keeps whatever
    requires_grad it had. Dropout (probability lora_dropout, training mode only) applies to
    the LoRA branch's input; each forward draws a fresh mask seed from `rng` and backward
    replays it. When merged (or with adapters disabled) the forward is the plain dense layer.
    pack() keeps a packed copy of the frozen weight for small batches (lora.nn.pack_weights).
    """

    def __init__(
        self,
        base: Linear | Conv1D,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        *,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        rng: np.random.Generator | None = None,
        loftq_config: dict | None = None,
    ):
        super().__init__()
        if not isinstance(base, (Linear, Conv1D)):
            raise TypeError(f"LoRALinear wraps a Linear or Conv1D, got {type(base).__name__}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"LoRALinear: lora_dropout must be in [0, 1), got {lora_dropout}")
        self._setup(base, r, lora_alpha, use_rslora, rng)
        self.bias = base.bias
        self.fan_in_fan_out = isinstance(base, Conv1D)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_dropout = lora_dropout
        dtype = self.compute_dtype
        self.lora_A = Parameter(np.zeros((r, self.in_features), dtype))
        self.lora_B = Parameter(np.zeros((self.out_features, r), dtype))
        _init_weights(self, init_lora_weights, loftq_config)

    def _pair(self):
        return self.lora_A, self.lora_B

    def _merge_into(self, weight, A, B, scaling):
        F.merge(weight, A, B, scaling, fan_in_fan_out=self.fan_in_fan_out)

    def _weight_arg(self, x: np.ndarray, backward: bool = False):
        if isinstance(self._base, QuantLinear):
            return self._base._weight_arg(x, backward)
        return super()._weight_arg(x, backward)


    def merged_float_base(self, safe_merge: bool = False) -> Linear:
        """For a quantized base: a new float Linear holding dequantize(W) + scaling * B A
        and the base's bias (the merged weight is not quantized again)."""
        if not self.quantized:
            raise ValueError("LoRALinear.merged_float_base: the base is not quantized; merge()")
        layer = self._base.to_linear()
        self._merge_into(layer.weight.data, self.lora_A.data, self.lora_B.data, self.scaling)
        if safe_merge and not np.isfinite(layer.weight.data).all():
            raise ValueError("LoRALinear.merge: the merged weight is not finite")
        return layer

    def _weight_out_in(self) -> np.ndarray:
        if isinstance(self._base, QuantLinear):
            return self._base.dequantize()
        w = self.weight.data
        return np.ascontiguousarray(w.T) if self.fan_in_fan_out else w

    def forward(self, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        """The base layer plus the LoRA branch, plus `residual` (a skip connection, added in
        the same pass) if given."""
        x = as_input(x, self.compute_dtype)
        if self.disabled and self.merged:
            self.unmerge()  # as PEFT: running without the adapter needs the base weight back
        W, fifo = self._weight_arg(x)  # read in place in either layout, or packed
        bias = None if self.bias is None else self.bias.data
        if self.disabled or self.merged:
            self._save("dense", x)
            return F.dense_forward(x, W, bias, fan_in_fan_out=fifo, residual=residual)
        p = self.lora_dropout if self.training else 0.0
        seed = int(self.rng.integers(0, 2**63)) if p > 0 else None
        y, xa = F.linear_forward(
            x, W, self.lora_A.data, self.lora_B.data, self.scaling, bias, dropout=p, seed=seed,
            fan_in_fan_out=fifo, residual=residual,
        )
        self._save("lora", x, xa, p, seed)
        return y

    def backward(self, dout: np.ndarray, add_dx_to: np.ndarray | None = None) -> np.ndarray:
        """dx (None without need_input_grad); with `add_dx_to`, dx is added to that array in
        place and it is returned."""
        kind, x, *rest = self._saved()
        W, fifo = self._weight_arg(x, backward=self.need_input_grad)
        add_dx_to = add_dx_to if self.need_input_grad else None
        if kind == "dense":
            if self.merged and (self.lora_A.requires_grad or self.lora_B.requires_grad):
                raise RuntimeError("LoRALinear.backward: the layer is merged; unmerge() to train")
            dx, _ = F.dense_backward(dout, x, W, need_dx=self.need_input_grad, need_dweight=False,
                                     fan_in_fan_out=fifo, add_dx_to=add_dx_to)
        else:
            xa, p, seed = rest
            dx, dA, dB = F.linear_backward(
                dout,
                x,
                xa,
                W,
                self.lora_A.data,
                self.lora_B.data,
                self.scaling,
                need_dx=self.need_input_grad,
                dropout=p,
                seed=seed,
                fan_in_fan_out=fifo,
                add_dx_to=add_dx_to,
            )
            if self.lora_A.requires_grad:
                self.lora_A.accumulate(dA)
            if self.lora_B.requires_grad:
                self.lora_B.accumulate(dB)
        if self.weight.requires_grad:
            _, dW = F.dense_backward(dout, x, self.weight.data, need_dx=False,
                                     fan_in_fan_out=self.fan_in_fan_out)
            self.weight.accumulate(dW)
        if self.bias is not None and self.bias.requires_grad:
            self.bias.accumulate(_rows(dout).sum(axis=0))
        return dx

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"scaling={self.scaling:g}, dropout={self.lora_dropout}, merged={self.merged}"
        )


class LoRAEmbedding(_LoRABase):
    """An Embedding with a LoRA update, as PEFT: lora_embedding_A (r, num_embeddings),
    lora_embedding_B (embedding_dim, r), y = W[ids] + scaling * A^T[ids] B^T; no dropout.
    ids is an integer array of any shape, y is ids.shape + (embedding_dim,)."""

    def __init__(
        self,
        base: Embedding,
        r: int = 8,
        lora_alpha: float = 8,
        *,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        rng: np.random.Generator | None = None,
    ):
        super().__init__()
        if not isinstance(base, Embedding):
            raise TypeError(f"LoRAEmbedding wraps an Embedding, got {type(base).__name__}")
        self._setup(base, r, lora_alpha, use_rslora, rng)
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx = base.padding_idx
        dtype = getattr(base, "compute_dtype", self.weight.dtype)
        self.lora_embedding_A = Parameter(np.zeros((r, self.num_embeddings), dtype))
        self.lora_embedding_B = Parameter(np.zeros((self.embedding_dim, r), dtype))
        _init_weights(self, init_lora_weights)

    def _pair(self):
        return self.lora_embedding_A, self.lora_embedding_B

    def _merge_into(self, weight, A, B, scaling):
        # weight is (num_embeddings, dim) = (d_in, d_out): the transposed layout
        F.merge(weight, A, B, scaling, fan_in_fan_out=True)

    def forward(self, ids: np.ndarray) -> np.ndarray:
        if self.disabled and self.merged:
            self.unmerge()
        ids = _check_ids(ids, self.num_embeddings)
        y = self._base.lookup(ids) if self.quantized else self.weight.data[ids]
        if self.disabled or self.merged:
            self._save(ids, None)
            return y
        after_a = self.lora_embedding_A.data.T[ids]  # ids.shape + (r,)
        self._save(ids, after_a)
        return y + self.scaling * (after_a @ self.lora_embedding_B.data.T)

    def backward(self, dout: np.ndarray) -> None:
        ids, after_a = self._saved()
        A, B = self.lora_embedding_A, self.lora_embedding_B
        if after_a is not None:
            dy = _rows(dout)
            if B.requires_grad:
                B.accumulate(self.scaling * (dy.T @ _rows(after_a)))
            if A.requires_grad:  # torch's embedding gives the padding row no gradient
                d_after = self.scaling * (dy @ B.data)
                A.accumulate(_scatter_rows(ids, d_after, A.shape[::-1], self.padding_idx).T)
        elif self.merged and (A.requires_grad or B.requires_grad):
            raise RuntimeError("LoRAEmbedding.backward: the layer is merged; unmerge() to train")
        if self.weight.requires_grad:
            self.weight.accumulate(_scatter_rows(ids, dout, self.weight.shape, self.padding_idx))

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, r={self.r}, "
            f"scaling={self.scaling:g}, merged={self.merged}"
        )


def init_lora_weights(layer: LoRALinear | LoRAEmbedding, init: bool | str = True,
                      loftq_config: dict | None = None) -> None:
    """Initialise a LoRA layer's A and B in place, as PEFT's `init_lora_weights`.

    LoRALinear: True: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform, a=sqrt(5)), B = 0;
    "gaussian": A ~ N(0, (1/r)^2), B = 0; False: A as True and B ~ U(-1/sqrt(r), 1/sqrt(r))
    (not a no-op; for tests); "pissa": A, B from the top-r singular triplets of W and the base
    weight replaced by W - scaling * B A (Meng et al. 2024); "olora": A, B from W's QR
    decomposition, base likewise replaced (Buyukakyuz 2024); "loftq": the base becomes a
    lora.nn.QuantLinear holding W quantized and A, B come from LoftQ (lora.quant.loftq; Li et
    al. 2023), so the quantized base plus the update starts close to W; loftq_config as
    LoraConfig's (default NF4, one iteration). LoRAEmbedding: any true value
    gives A = 0, B ~ N(0, 1); False gives A, B ~ N(0, 1). Random draws use layer.rng.
    """
    rng, dtype = layer.rng, getattr(layer, "compute_dtype", layer.weight.dtype)
    if isinstance(layer, LoRAEmbedding):
        A, B = layer.lora_embedding_A, layer.lora_embedding_B
        A.data[...] = rng.standard_normal(A.shape) if init is False else 0
        B.data[...] = rng.standard_normal(B.shape)
        return
    if not isinstance(layer, LoRALinear):
        raise TypeError(f"init_lora_weights: not a LoRA layer: {type(layer).__name__}")
    A, B, r = layer.lora_A, layer.lora_B, layer.r
    if init is True or init is False:
        A.data[...] = rng.uniform(-1, 1, A.shape) / math.sqrt(layer.in_features)
        B.data[...] = 0 if init else rng.uniform(-1, 1, B.shape) / math.sqrt(r)
    elif init == "gaussian":
        A.data[...] = rng.standard_normal(A.shape) / r
        B.data[...] = 0
    elif init == "loftq":
        _loftq_init(layer, loftq_config or {})
    elif init in ("pissa", "olora"):
        if isinstance(layer.base_layer(), QuantLinear):
            raise ValueError(f"init_lora_weights={init!r} replaces the base weight, which is "
                             "quantized here; initialise before quantizing")
        if layer.merged:
            raise RuntimeError("init_lora_weights: unmerge() before a pissa/olora init")
        W = layer._weight_out_in().astype(np.float64)  # (out, in); decompositions in float64
        if r > min(W.shape):
            raise ValueError(f"init_lora_weights={init!r}: r={r} exceeds min{W.shape}")
        if init == "pissa":
            U, S, Vt = np.linalg.svd(W, full_matrices=False)
            root = np.sqrt(S[:r] / layer.scaling)
            a, b = root[:, None] * Vt[:r], U[:, :r] * root
        else:
            Q, R = np.linalg.qr(W)
            a, b = R[:r], Q[:, :r]
        A.data[...], B.data[...] = a, b
        residual = (W - layer.scaling * (b @ a)).astype(dtype)
        layer.weight.data[...] = residual.T if layer.fan_in_fan_out else residual
    else:
        raise ValueError(f"init_lora_weights: unknown method {init!r}")


def _loftq_init(layer: LoRALinear, loftq_config: dict) -> None:
    from .. import quant
    from .config import loftq_qtype

    qtype, iters = loftq_qtype(loftq_config)
    if layer.quantized:
        raise ValueError("init_lora_weights='loftq' needs the float base weight, and this one "
                         "is quantized already; wrap the float model (LoftQ quantizes it)")
    if layer.fan_in_fan_out or layer.merged:
        raise ValueError("init_lora_weights='loftq': the base must be an unmerged Linear "
                         "(not a Conv1D)")
    q, a, b = quant.loftq(layer.weight.data, layer.r, qtype, iters, layer.scaling)
    layer.lora_A.data[...], layer.lora_B.data[...] = a, b
    base = QuantLinear(q, None, dtype=layer.compute_dtype)
    base.bias = layer.bias
    layer.unpack()
    object.__setattr__(layer, "_base", base)
    layer.weight = base.weight


_init_weights = init_lora_weights  # the layers' argument of the same name shadows it
