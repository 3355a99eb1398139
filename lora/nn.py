"""lora.nn: a minimal module system for NumPy models, with hand-written backward passes.

A `Module` holds `Parameter`s and child modules under PyTorch's names ("0", "fc1",
"layers.3.attn.q_proj"), so a PyTorch or Hugging Face state dict, and a PEFT adapter, map onto
a mirrored model by name. Each layer's `forward` caches, in training mode only, the little its
`backward(dout) -> din` needs; `backward` accumulates into `Parameter.grad` (like torch) and
computes nothing for a frozen parameter. Dense layers run on the C kernels in lora.functional.

Deliberately not here: autograd, devices, hooks, buffers, convolutions. A module called twice
in one forward pass keeps only the last call's cache, so weight sharing needs its own module.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping

import numpy as np

from . import functional as F

__all__ = [
    "Parameter",
    "Module",
    "pack_weights",
    "unpack_weights",
    "Linear",
    "Conv1D",
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
    "mse_loss",
]


class Parameter:
    """A trainable array. `data` is the value (C-contiguous, updated in place by optimizers),
    `grad` is None or an array of the same shape that backward passes accumulate into."""

    __slots__ = ("data", "grad", "requires_grad")

    def __init__(self, data: np.ndarray, requires_grad: bool = True):
        self.data = np.ascontiguousarray(data)
        self.grad: np.ndarray | None = None
        self.requires_grad = bool(requires_grad)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def size(self) -> int:
        return self.data.size

    def accumulate(self, grad: np.ndarray) -> None:
        """grad += `grad` (the first call stores a copy)."""
        if self.grad is None:
            self.grad = np.array(grad, dtype=self.data.dtype, copy=True).reshape(self.data.shape)
        else:
            self.grad += grad

    def __repr__(self) -> str:
        return (
            f"Parameter(shape={self.shape}, dtype={self.dtype}, requires_grad={self.requires_grad})"
        )


class Module:
    """Base class: named parameters and children, train/eval mode, state dicts.

    Subclasses implement `forward(*args)` and `backward(dout) -> din`. Assigning a Parameter or
    a Module to an attribute registers it under that name, in assignment order.

    `need_input_grad = False` tells a layer that nothing upstream uses its input gradient
    (say, the first layer over frozen embeddings): Linear and LoRALinear then skip computing
    it, as autograd would, and backward returns None.
    """

    need_input_grad = True

    def __init__(self):
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        params, modules = self.__dict__.get("_parameters"), self.__dict__.get("_modules")
        if params is None:
            raise AttributeError("call Module.__init__() before assigning attributes")
        params.pop(name, None)
        modules.pop(name, None)
        self.__dict__.pop(name, None)
        if isinstance(value, Parameter):
            params[name] = value
        elif isinstance(value, Module):
            modules[name] = value
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name):
        d = self.__dict__
        if name in d.get("_parameters", ()):
            return d["_parameters"][name]
        if name in d.get("_modules", ()):
            return d["_modules"][name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __delattr__(self, name):
        if name in self._parameters:
            del self._parameters[name]
        elif name in self._modules:
            del self._modules[name]
        else:
            object.__delattr__(self, name)

    # -- structure ---------------------------------------------------------------------------
    def named_children(self) -> Iterator[tuple[str, Module]]:
        yield from self._modules.items()

    def children(self) -> Iterator[Module]:
        yield from self._modules.values()

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """(path, module) for this module ("" or `prefix`) and every descendant, depth first."""
        seen = set()
        stack = [(prefix, self)]
        while stack:
            path, module = stack.pop()
            if id(module) in seen:
                continue
            seen.add(id(module))
            yield path, module
            children = [(f"{path}.{n}" if path else n, m) for n, m in module._modules.items()]
            stack.extend(reversed(children))

    def modules(self) -> Iterator[Module]:
        for _, m in self.named_modules():
            yield m

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """(dotted name, Parameter), each Parameter once, in registration order."""
        seen = set()
        for path, module in self.named_modules(prefix):
            for name, p in module._parameters.items():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield (f"{path}.{name}" if path else name), p

    def parameters(self) -> Iterator[Parameter]:
        for _, p in self.named_parameters():
            yield p

    def get_submodule(self, path: str) -> Module:
        """The module at dotted `path` ("" is self); AttributeError naming the missing part."""
        module = self
        for part in path.split(".") if path else ():
            if part not in module._modules:
                raise AttributeError(
                    f"{type(module).__name__} has no submodule {part!r} ({path!r})"
                )
            module = module._modules[part]
        return module

    def set_submodule(self, path: str, new: Module) -> None:
        """Replace the module at dotted `path` (not "") by `new`."""
        parent_path, _, name = path.rpartition(".")
        parent = self.get_submodule(parent_path)
        if name not in parent._modules:
            raise AttributeError(f"{type(parent).__name__} has no submodule {name!r} ({path!r})")
        parent._modules[name] = new

    # -- modes and gradients -----------------------------------------------------------------
    def train(self, mode: bool = True) -> Module:
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self) -> Module:
        return self.train(False)

    def requires_grad_(self, requires_grad: bool = True) -> Module:
        for p in self.parameters():
            p.requires_grad = requires_grad
        return self

    def zero_grad(self) -> None:
        """Drop every parameter's gradient (grad = None, torch's default)."""
        for p in self.parameters():
            p.grad = None

    def astype(self, dtype) -> Module:
        """Convert every parameter to `dtype` (float32 or float64) in place; returns self."""
        for p in self.parameters():
            p.data = np.ascontiguousarray(p.data, dtype=dtype)
            p.grad = None
        return self

    # -- state dicts -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """{dotted name: array}; the arrays are the parameters' own (not copies)."""
        return {name: p.data for name, p in self.named_parameters()}

    def load_state_dict(self, state_dict: Mapping[str, np.ndarray], strict: bool = True):
        """Copy values into the parameters by name, keeping each parameter's dtype.

        Every key and shape is checked before anything is copied. With strict=True a missing
        or unexpected key raises KeyError; otherwise they are returned as
        (missing_keys, unexpected_keys). A shape mismatch always raises ValueError.
        """
        own = dict(self.named_parameters())
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if strict and (missing or unexpected):
            raise KeyError(
                f"load_state_dict: missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        for k, p in own.items():
            if k in state_dict and np.shape(state_dict[k]) != p.shape:
                raise ValueError(
                    f"load_state_dict: {k!r} has shape {np.shape(state_dict[k])}, "
                    f"the model expects {p.shape}"
                )
        for k, p in own.items():
            if k in state_dict:
                p.data[...] = np.asarray(state_dict[k])
        for m in self.modules():
            if isinstance(m, _Packable):
                m._weight_changed()
        return missing, unexpected

    # -- calling -----------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__}.forward")

    def backward(self, dout: np.ndarray) -> np.ndarray | None:
        raise NotImplementedError(f"{type(self).__name__}.backward")

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, child in self._modules.items():
            lines.append("  (" + name + "): " + repr(child).replace("\n", "\n  "))
        return lines[0] + ")" if len(lines) == 1 else "\n".join(lines) + "\n)"

    # the cache a backward pass needs; one slot per module
    def _save(self, *values) -> None:
        object.__setattr__(self, "_cache", values if self.training else None)

    def _saved(self) -> tuple:
        cache = self.__dict__.get("_cache")
        if cache is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward: no forward pass cached; call the module in "
                "training mode (model.train()) before backward, once per backward"
            )
        object.__setattr__(self, "_cache", None)
        return cache


def _uniform(rng: np.random.Generator, shape, bound: float, dtype) -> np.ndarray:
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def _rows(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1, a.shape[-1])


class _Packable:
    """pack() and unpack() for the layers with a frozen 2-D weight: Linear, Conv1D and
    LoRALinear. A packed layer keeps its weight as it was and, beside it, a
    lora.functional.PackedWeight (one copy of the weight with backward=False, two with),
    used for batches of up to its max_rows rows (set by the extension for the CPU and the
    dtype, lora_panel_max_rows in csrc/kernels.c: beyond it OpenBLAS on the weight itself
    is as fast)."""

    _packed = None
    _packed_from = None
    fan_in_fan_out = False

    def pack(self, backward: bool = True):
        """Copy the frozen weight into a PackedWeight, for small batches; returns self.
        backward=False packs for forwards only (half the memory; a backward then reads the
        weight itself). merge(), unmerge() and load_state_dict() pack again; any other
        change to the weight's values needs pack() again."""
        if self.weight.requires_grad:
            raise ValueError(f"{type(self).__name__}.pack: the weight is trainable; only a "
                             "frozen weight (requires_grad=False) can be packed")
        packed = F.PackedWeight(self.weight.data, fan_in_fan_out=self.fan_in_fan_out,
                                backward=backward)
        object.__setattr__(self, "_packed", packed)
        object.__setattr__(self, "_packed_from", self.weight.data)
        return self

    def unpack(self):
        """Drop the packed copy; returns self."""
        object.__setattr__(self, "_packed", None)
        object.__setattr__(self, "_packed_from", None)
        return self

    @property
    def packed(self) -> bool:
        return self._packed is not None

    def _weight_changed(self) -> None:
        if self._packed is not None:
            self.pack(backward=self._packed.backward_panels is not None)

    def _weight_arg(self, x: np.ndarray, backward: bool = False):
        """(weight, fan_in_fan_out) for a call on x: the PackedWeight when there is one, it
        was made from the weight array the layer holds now (not replaced, as astype does),
        the weight is still frozen, the batch is small, and it has the direction needed."""
        pw = self._packed
        if (pw is not None and self._packed_from is self.weight.data
                and not self.weight.requires_grad
                and x.size <= pw.max_rows * max(x.shape[-1], 1)
                and (not backward or pw.backward_panels is not None)):
            return pw, False
        return self.weight.data, self.fan_in_fan_out


def pack_weights(model: Module, backward: bool = True) -> int:
    """pack() every Linear, Conv1D and LoRALinear of `model` whose weight is frozen: faster
    small batches (serving, small-batch fine-tuning) for the memory of one (backward=False)
    or two (backward=True) more copies of those weights. Returns the bytes the packed copies
    take."""
    total = 0
    for m in model.modules():
        if isinstance(m, _Packable) and not m.weight.requires_grad:
            total += m.pack(backward=backward)._packed.nbytes
    return total


def unpack_weights(model: Module) -> None:
    """unpack() every packed layer of `model`."""
    for m in model.modules():
        if isinstance(m, _Packable):
            m.unpack()


class Linear(_Packable, Module):
    """y = x W^T + b. weight is (out_features, in_features), bias (out_features,); x is
    (..., in_features). Initialised as torch.nn.Linear: U(-1/sqrt(in), 1/sqrt(in))."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        dtype=np.float32,
        rng: np.random.Generator | None = None,
    ):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng()
        self.in_features, self.out_features = in_features, out_features
        bound = 1.0 / math.sqrt(in_features) if in_features else 0.0
        self.weight = Parameter(_uniform(rng, (out_features, in_features), bound, dtype))
        self.bias = Parameter(_uniform(rng, (out_features,), bound, dtype)) if bias else None

    @classmethod
    def from_arrays(cls, weight: np.ndarray, bias: np.ndarray | None = None) -> Linear:
        """A Linear holding `weight` (out, in) and `bias` (out,) (no random init is drawn)."""
        layer = cls.__new__(cls)
        Module.__init__(layer)
        layer.out_features, layer.in_features = np.shape(weight)
        layer.weight = Parameter(weight)
        layer.bias = None if bias is None else Parameter(bias)
        return layer

    def forward(self, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        """x W^T + b, plus `residual` (a skip connection, added in the same pass) if given."""
        self._save(x)
        W, _ = self._weight_arg(x)
        return F.dense_forward(x, W, None if self.bias is None else self.bias.data,
                               residual=residual)

    def backward(self, dout: np.ndarray, add_dx_to: np.ndarray | None = None) -> np.ndarray:
        """dx (None without need_input_grad); with `add_dx_to`, dx is added to that array in
        place and it is returned (the gradients of layers sharing an input, summed)."""
        (x,) = self._saved()
        W, _ = self._weight_arg(x, backward=self.need_input_grad)
        dx, dw = F.dense_backward(dout, x, W, need_dx=self.need_input_grad,
                                  need_dweight=self.weight.requires_grad,
                                  add_dx_to=add_dx_to if self.need_input_grad else None)
        if dw is not None:
            self.weight.accumulate(dw)
        if self.bias is not None and self.bias.requires_grad:
            self.bias.accumulate(_rows(dout).sum(axis=0))
        return dx

    def extra_repr(self) -> str:
        has_bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={has_bias}"


class Conv1D(_Packable, Module):
    """GPT-2's "Conv1D": a linear layer whose weight is stored transposed, (in, out)
    (PEFT's fan_in_fan_out). y = x W + b; initialised N(0, 0.02^2) with zero bias, as in
    transformers."""

    def __init__(
        self, nf: int, nx: int, *, dtype=np.float32, rng: np.random.Generator | None = None
    ):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng()
        self.in_features, self.out_features = nx, nf
        self.weight = Parameter((0.02 * rng.standard_normal((nx, nf))).astype(dtype))
        self.bias = Parameter(np.zeros(nf, dtype=dtype))

    fan_in_fan_out = True

    def forward(self, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        self._save(x)
        W, fifo = self._weight_arg(x)
        return F.dense_forward(x, W, self.bias.data, fan_in_fan_out=fifo, residual=residual)

    def backward(self, dout: np.ndarray, add_dx_to: np.ndarray | None = None) -> np.ndarray:
        (x,) = self._saved()
        W, fifo = self._weight_arg(x, backward=self.need_input_grad)
        dx, dw = F.dense_backward(dout, x, W, need_dx=self.need_input_grad,
                                  need_dweight=self.weight.requires_grad, fan_in_fan_out=fifo,
                                  add_dx_to=add_dx_to if self.need_input_grad else None)
        if dw is not None:
            self.weight.accumulate(dw)
        if self.bias.requires_grad:
            self.bias.accumulate(_rows(dout).sum(axis=0))
        return dx

    def extra_repr(self) -> str:
        return f"nf={self.out_features}, nx={self.in_features}"


class Embedding(Module):
    """Row lookup: y = weight[ids]. weight is (num_embeddings, embedding_dim), ids an integer
    array of any shape; y is ids.shape + (embedding_dim,). Initialised N(0, 1) like torch; the
    padding_idx row starts at zero and gets no gradient. backward returns None (ids have no
    gradient)."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        *,
        dtype=np.float32,
        rng: np.random.Generator | None = None,
    ):
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        if padding_idx is not None and padding_idx < 0:
            padding_idx += num_embeddings
        self.padding_idx = padding_idx
        weight = rng.standard_normal((num_embeddings, embedding_dim)).astype(dtype)
        if padding_idx is not None:
            weight[padding_idx] = 0
        self.weight = Parameter(weight)

    @classmethod
    def from_arrays(cls, weight: np.ndarray, padding_idx: int | None = None) -> Embedding:
        """An Embedding holding `weight` (num_embeddings, embedding_dim), used as is."""
        layer = cls.__new__(cls)
        Module.__init__(layer)
        layer.num_embeddings, layer.embedding_dim = np.shape(weight)
        if padding_idx is not None and padding_idx < 0:
            padding_idx += layer.num_embeddings
        layer.padding_idx = padding_idx
        layer.weight = Parameter(weight)
        return layer

    def forward(self, ids: np.ndarray) -> np.ndarray:
        ids = _check_ids(ids, self.num_embeddings)
        self._save(ids)
        return self.weight.data[ids]

    def backward(self, dout: np.ndarray) -> None:
        (ids,) = self._saved()
        if self.weight.requires_grad:
            self.weight.accumulate(_scatter_rows(ids, dout, self.weight.shape, self.padding_idx))
        return None

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


def _check_ids(ids, n: int) -> np.ndarray:
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"embedding ids must be integers, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= n):
        raise IndexError(f"embedding ids must be in [0, {n}), got [{ids.min()}, {ids.max()}]")
    return ids


def _scatter_rows(ids, dout, shape, padding_idx=None) -> np.ndarray:
    """Sum the rows of dout (ids.shape + (d,)) into a zero (num, d) array at rows ids."""
    grad = np.zeros(shape, dtype=dout.dtype)
    np.add.at(grad, ids.reshape(-1), dout.reshape(-1, shape[-1]))
    if padding_idx is not None:
        grad[padding_idx] = 0
    return grad


class LayerNorm(Module):
    """Normalise over the trailing `normalized_shape` dims: (x - mean) / sqrt(var + eps) * w + b,
    var biased, as torch.nn.LayerNorm."""

    def __init__(
        self,
        normalized_shape,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        *,
        dtype=np.float32,
    ):
        super().__init__()
        shape = (
            (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        )
        self.normalized_shape, self.eps = shape, eps
        self.weight = Parameter(np.ones(shape, dtype)) if elementwise_affine else None
        self.bias = Parameter(np.zeros(shape, dtype)) if elementwise_affine and bias else None

    def forward(self, x: np.ndarray) -> np.ndarray:
        if len(self.normalized_shape) == 1 and self.weight is not None:
            # The usual case, one axis with a weight: the C kernel, one pass per row.
            bias = None if self.bias is None else self.bias.data
            y, mean, rstd = F.layer_norm_forward(x, self.weight.data, bias, eps=self.eps)
            self._save("kernel", x, mean, rstd)
            return y
        axes = tuple(range(-len(self.normalized_shape), 0))
        mean = x.mean(axis=axes, keepdims=True)
        centred = x - mean
        rstd = 1.0 / np.sqrt((centred * centred).mean(axis=axes, keepdims=True) + self.eps)
        xhat = (centred * rstd).astype(x.dtype, copy=False)
        self._save("numpy", xhat, rstd)
        y = xhat if self.weight is None else xhat * self.weight.data
        return y if self.bias is None else y + self.bias.data

    def backward(self, dout: np.ndarray) -> np.ndarray:
        kind, *cache = self._saved()
        if kind == "kernel":
            x, mean, rstd = cache
            need_dw = self.weight.requires_grad
            need_db = self.bias is not None and self.bias.requires_grad
            dx, dw, db = F.layer_norm_backward(dout, x, mean, rstd, self.weight.data,
                                               need_dweight=need_dw, need_dbias=need_db)
            if need_dw:
                self.weight.accumulate(dw)
            if need_db:
                self.bias.accumulate(db)
            return dx
        xhat, rstd = cache
        k = len(self.normalized_shape)
        axes, lead = tuple(range(-k, 0)), tuple(range(dout.ndim - k))
        if self.weight is not None and self.weight.requires_grad:
            self.weight.accumulate((dout * xhat).sum(axis=lead))
        if self.bias is not None and self.bias.requires_grad:
            self.bias.accumulate(dout.sum(axis=lead))
        g = dout if self.weight is None else dout * self.weight.data
        # d xhat / dx projects out the mean and the xhat direction (xhat has zero mean, unit var)
        return rstd * (
            g - g.mean(axis=axes, keepdims=True) - xhat * (g * xhat).mean(axis=axes, keepdims=True)
        )

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"


class Dropout(Module):
    """Zero each element with probability p in training mode and scale the rest by 1/(1-p);
    identity in eval mode. Masks come from the module's own Generator (`rng`)."""

    def __init__(self, p: float = 0.5, *, rng: np.random.Generator | None = None):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p = p
        self.rng = rng if rng is not None else np.random.default_rng()

    @property
    def active(self) -> bool:
        """Whether forward changes anything (training mode and p > 0)."""
        return self.training and self.p > 0.0

    def forward(self, x: np.ndarray) -> np.ndarray:
        if not self.active:
            self._save(None)
            return x
        scale = np.asarray(1.0 / (1.0 - self.p), dtype=x.dtype)
        mask = (self.rng.random(x.shape) >= self.p) * scale
        mask = mask.astype(x.dtype, copy=False)
        self._save(mask)
        return x * mask

    def backward(self, dout: np.ndarray) -> np.ndarray:
        (mask,) = self._saved()
        return dout if mask is None else dout * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Identity(Module):
    def forward(self, x):
        return x

    def backward(self, dout):
        return dout


class ReLU(Module):
    def forward(self, x: np.ndarray) -> np.ndarray:
        self._save(x > 0)
        return np.maximum(x, 0)

    def backward(self, dout: np.ndarray) -> np.ndarray:
        (positive,) = self._saved()
        return dout * positive


class GELU(Module):
    """x * Phi(x) (approximate="none", the C kernel lora.functional.gelu_forward) or its tanh
    approximation (approximate="tanh"), as torch.nn.GELU."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU: approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._save(x)
        if self.approximate == "tanh":
            return 0.5 * x * (1.0 + np.tanh(_K0 * (x + 0.044715 * x**3)))
        return F.gelu_forward(x)

    def backward(self, dout: np.ndarray) -> np.ndarray:
        (x,) = self._saved()
        if self.approximate == "tanh":
            t = np.tanh(_K0 * (x + 0.044715 * x**3))
            dinner = _K0 * (1.0 + 3 * 0.044715 * x * x)
            return dout * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dinner)
        return F.gelu_backward(dout, x)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


_K0 = math.sqrt(2.0 / math.pi)


class Tanh(Module):
    def forward(self, x: np.ndarray) -> np.ndarray:
        y = np.tanh(x)
        self._save(y)
        return y

    def backward(self, dout: np.ndarray) -> np.ndarray:
        (y,) = self._saved()
        return dout * (1.0 - y * y)


class SiLU(Module):
    """x * sigmoid(x)."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        s = _sigmoid(x)
        self._save(x, s)
        return x * s

    def backward(self, dout: np.ndarray) -> np.ndarray:
        x, s = self._saved()
        return dout * (s * (1.0 + x * (1.0 - s)))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(x))  # never overflows
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)


class Sequential(Module):
    """Children named "0", "1", ... (or by an ordered mapping); forward chains them and
    backward runs their backward passes in reverse."""

    def __init__(self, *modules: Module):
        super().__init__()
        if len(modules) == 1 and isinstance(modules[0], Mapping):
            for name, m in modules[0].items():
                setattr(self, name, m)
        else:
            for i, m in enumerate(modules):
                setattr(self, str(i), m)

    def __getitem__(self, i: int) -> Module:
        return list(self._modules.values())[i]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def forward(self, x):
        for m in self._modules.values():
            x = m(x)
        return x

    def backward(self, dout):
        for m in reversed(self._modules.values()):
            dout = m.backward(dout)
        return dout


class ModuleList(Module):
    """A list of modules named "0", "1", ...; no forward of its own."""

    def __init__(self, modules: Iterable[Module] = ()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, module: Module) -> ModuleList:
        setattr(self, str(len(self._modules)), module)
        return self

    def __getitem__(self, i: int) -> Module:
        return list(self._modules.values())[i]

    def __setitem__(self, i: int, module: Module) -> None:
        setattr(self, list(self._modules)[i], module)

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())


class ModuleDict(Module):
    """Modules by name; no forward of its own."""

    def __init__(self, modules: Mapping[str, Module] | None = None):
        super().__init__()
        for name, m in (modules or {}).items():
            setattr(self, name, m)

    def __getitem__(self, name: str) -> Module:
        return self._modules[name]

    def __setitem__(self, name: str, module: Module) -> None:
        setattr(self, name, module)

    def __contains__(self, name: str) -> bool:
        return name in self._modules

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def keys(self):
        return self._modules.keys()

    def values(self):
        return self._modules.values()

    def items(self):
        return self._modules.items()


def cross_entropy(
    logits: np.ndarray, targets: np.ndarray, *, ignore_index: int = -100, reduction: str = "mean"
) -> tuple[float, np.ndarray]:
    """Softmax cross-entropy as torch.nn.functional.cross_entropy.

    logits (..., C), targets integer (...); targets equal to ignore_index contribute nothing.
    reduction "mean" (over the non-ignored targets) or "sum". Returns (loss, dlogits) with
    dlogits the gradient of the loss, shaped like logits.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    targets = np.asarray(targets)
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"cross_entropy: logits {logits.shape} and targets {targets.shape} "
            "must agree on all but the last dim"
        )
    z = _rows(logits)
    t = targets.reshape(-1)
    keep = t != ignore_index
    tk = np.where(keep, t, 0)
    if np.any((tk < 0) | (tk >= z.shape[1])):
        raise IndexError(f"cross_entropy: targets must be in [0, {z.shape[1]}) or ignore_index")
    shifted = z - z.max(axis=1, keepdims=True)
    logsumexp = np.log(np.exp(shifted).sum(axis=1))
    logp_t = shifted[np.arange(len(t)), tk] - logsumexp
    count = int(keep.sum())
    denom = max(count, 1) if reduction == "mean" else 1
    loss = float(-(logp_t * keep).sum() / denom) if reduction == "sum" or count else float("nan")
    dz = np.exp(shifted - logsumexp[:, None])
    dz[np.arange(len(t)), tk] -= 1.0
    dz *= (keep / denom)[:, None]
    return loss, dz.astype(logits.dtype, copy=False).reshape(logits.shape)


def mse_loss(
    pred: np.ndarray, target: np.ndarray, *, reduction: str = "mean"
) -> tuple[float, np.ndarray]:
    """Squared error, "mean" over all elements or "sum". Returns (loss, dpred)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"mse_loss: reduction must be 'mean' or 'sum', got {reduction!r}")
    diff = pred - np.asarray(target, dtype=pred.dtype)
    n = diff.size if reduction == "mean" else 1
    return float((diff * diff).sum() / n), (2.0 / n) * diff
