"""Conv2d: torch.nn.Conv2d's 2-D convolution (groups = 1, zeros padding) on the C kernels.

A convolution is a dense layer on the patches of its input: im2col (lora.functional, C)
lays each output pixel's patch out as a row of (in_channels * kh * kw) values, the dense
kernels multiply those rows by the weight flattened to (out_channels, in_channels * kh * kw),
and the backward sums the patches' gradient back onto the images with col2im. The forward
keeps only its input for backward (the patches are made again there: a copy, cheap next to
the GEMMs, instead of holding kh * kw times the input). The LoRA conv layer
(lora/tuners/conv.py) runs the same rows through the LoRA kernels.
"""

from __future__ import annotations

import math

import numpy as np

from .. import functional as F
from .._checks import kernel_dtype
from .layers import _uniform, as_input
from .module import Module, Parameter

__all__ = ["Conv2d"]


def _pair(value, name: str, low: int) -> tuple[int, int]:
    """An int or a pair of ints (torch's convention), each at least `low`, as a pair."""
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer))
                             or v < low for v in pair):
        raise ValueError(f"Conv2d: {name} must be an int or a pair of ints, each at least "
                         f"{low}, got {value!r}")
    return int(pair[0]), int(pair[1])


class Conv2d(Module):
    """y = conv2d(x, weight) + bias, as torch.nn.Conv2d with groups=1 and zero padding.

    x is (n, in_channels, h, w) (a single image (in_channels, h, w) is taken as a batch of
    one), y (n, out_channels, oh, ow) with oh = (h + 2 padding - dilation (kh - 1) - 1) //
    stride + 1. weight is (out_channels, in_channels, kh, kw), bias (out_channels,), so a
    torch state dict loads by name. padding is an int, a pair, "valid" (0) or "same"
    (stride 1, an even dilation * (k - 1)). Initialised as torch: U(-1/sqrt(fan_in),
    1/sqrt(fan_in)) for both, fan_in = in_channels * kh * kw."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 *, dtype=np.float32, rng: np.random.Generator | None = None):
        super().__init__()
        dtype = kernel_dtype(dtype, "Conv2d")
        if groups != 1:
            raise ValueError(f"Conv2d: groups={groups!r} is not supported (only groups=1)")
        if padding_mode != "zeros":
            raise ValueError(f"Conv2d: padding_mode={padding_mode!r} is not supported (only "
                             "'zeros')")
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"Conv2d: {name} must be an int >= 1, got {v!r}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = _pair(kernel_size, "kernel_size", 1)
        self.stride = _pair(stride, "stride", 1)
        self.dilation = _pair(dilation, "dilation", 1)
        self.padding = self._padding(padding)
        rng = rng if rng is not None else np.random.default_rng()
        fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        bound = 1.0 / math.sqrt(fan_in)
        self.weight = Parameter(_uniform(rng, (out_channels, in_channels, *self.kernel_size),
                                         bound, dtype))
        self.bias = Parameter(_uniform(rng, (out_channels,), bound, dtype)) if bias else None

    def _padding(self, padding) -> tuple[int, int]:
        if padding == "valid":
            return 0, 0
        if padding == "same":
            total = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size, strict=True)]
            if self.stride != (1, 1) or any(t % 2 for t in total):
                raise ValueError("Conv2d: padding='same' needs stride 1 and an even "
                                 "dilation * (kernel_size - 1) (equal padding on both sides); "
                                 "give the padding as ints")
            return total[0] // 2, total[1] // 2
        return _pair(padding, "padding", 0)

    @classmethod
    def from_arrays(cls, weight: np.ndarray, bias: np.ndarray | None = None, stride=1,
                    padding=0, dilation=1) -> Conv2d:
        """A Conv2d holding `weight` (out, in, kh, kw) and `bias` (out,) as given."""
        weight = np.asarray(weight)
        if weight.ndim != 4:
            raise ValueError(f"Conv2d.from_arrays: weight must be (out_channels, in_channels, "
                             f"kh, kw), got shape {weight.shape}")
        layer = cls(weight.shape[1], weight.shape[0], weight.shape[2:], stride, padding,
                    dilation, bias=False, dtype=weight.dtype, rng=np.random.default_rng(0))
        layer.weight = Parameter(weight)
        layer.bias = None if bias is None else Parameter(np.asarray(bias, weight.dtype))
        return layer

    # ---- the patches, shared with the LoRA conv layer
    @property
    def in_features(self) -> int:
        """The length of one patch: in_channels * kh * kw (the flattened weight's columns)."""
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    @property
    def out_features(self) -> int:
        return self.out_channels

    def _geometry(self) -> dict:
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation}

    def images(self, x, dtype) -> np.ndarray:
        """x as a batch of images (n, in_channels, h, w) of `dtype`, checked."""
        x = as_input(x, dtype)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"Conv2d: x must be (n, {self.in_channels}, h, w) (or one image "
                             f"({self.in_channels}, h, w)), got shape {x.shape}")
        return x

    def patches(self, x: np.ndarray) -> np.ndarray:
        """The patches of images x as (n, oh * ow, in_features) rows (lora.functional.im2col)."""
        cols = F.im2col(x, self.kernel_size, **self._geometry())
        return cols.reshape(x.shape[0], -1, cols.shape[-1])

    def out_size(self, x_shape) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (self.kernel_size, self.stride, self.padding,
                                                  self.dilation)
        h, w = x_shape[-2:]
        return ((h + 2 * ph - dh * (kh - 1) - 1) // sh + 1,
                (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1)

    @staticmethod
    def to_images(rows: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
        """(n, oh * ow, c) rows as (n, c, oh, ow) images (a C-contiguous copy)."""
        n, _, c = rows.shape
        return np.ascontiguousarray(rows.transpose(0, 2, 1)).reshape(n, c, *out_size)

    @staticmethod
    def to_rows(images: np.ndarray) -> np.ndarray:
        """(n, c, oh, ow) images as (n, oh * ow, c) rows (a C-contiguous copy)."""
        n, c = images.shape[:2]
        return np.ascontiguousarray(images.reshape(n, c, -1).transpose(0, 2, 1))

    def fold(self, dcols: np.ndarray, x_shape) -> np.ndarray:
        """The images' gradient from the patches' (lora.functional.col2im)."""
        return F.col2im(dcols.reshape(-1, dcols.shape[-1]), tuple(x_shape), self.kernel_size,
                        **self._geometry())

    def weight_2d(self) -> np.ndarray:
        """The weight as (out_channels, in_features): a view sharing its memory."""
        return self.weight.data.reshape(self.out_channels, -1)

    # ---- the layer
    def forward(self, x) -> np.ndarray:
        single = np.ndim(x) == 3
        x = self.images(x, self.weight.dtype)
        self._save(x, single)
        y = F.dense_forward(self.patches(x), self.weight_2d(),
                            None if self.bias is None else self.bias.data)
        y = self.to_images(y, self.out_size(x.shape))
        return y[0] if single else y

    def backward(self, dout: np.ndarray) -> np.ndarray | None:
        """dx (None without need_input_grad), accumulating the weight's and bias' gradients."""
        x, single = self._saved()
        dy = self.rows_of(dout, x.shape)
        if self.bias is not None and self.bias.requires_grad:
            self.bias.accumulate(dy.sum(axis=(0, 1)))
        if self.weight.requires_grad:
            _, dw = F.dense_backward(dy, self.patches(x), self.weight_2d(), need_dx=False)
            self.weight.accumulate(dw.reshape(self.weight.shape))
        if not self.need_input_grad:
            return None
        dx = self.fold(F.dense_forward(dy, self.weight_2d(), fan_in_fan_out=True), x.shape)
        return dx[0] if single else dx

    def rows_of(self, dout, x_shape) -> np.ndarray:
        """The output gradient (n, out_channels, oh, ow) (or one image's) as
        (n, oh * ow, out_channels) rows, checked against the input's shape."""
        want = (x_shape[0], self.out_channels, *self.out_size(x_shape))
        dout = np.asarray(dout, self.weight.dtype)
        if dout.shape not in (want, want[1:] if want[0] == 1 else want):
            raise ValueError(f"Conv2d.backward: dout must have the output's shape {want}, got "
                             f"{dout.shape}")
        return self.to_rows(dout.reshape(want))

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}")
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        return s + ("" if self.bias is not None else ", bias=False")
