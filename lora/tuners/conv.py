"""LoRA on a 2-D convolution (lora.nn.Conv2d), PEFT's layout.

PEFT's lora_A is a conv with the base's kernel size, stride and padding and r output
channels, its lora_B a 1x1 conv to the base's output channels:

    y = conv(x, W) + b + scaling * conv1x1(conv(drop(x), A), B)

On the patches of x (im2col, lora.nn.Conv2d.patches) a conv is a dense layer, and so is
this: with A flattened to (r, in_channels * kh * kw) and B to (out_channels, r), the update
is the Linear LoRA update on the patch rows, so `LoRAConv2d` is a `LoRALinear` whose input
rows are the patches, and everything LoRALinear does (the fused C kernels, named adapters,
several active ones, mixed batches, merge, the optimizer) holds for it unchanged. Merging
adds scaling * B A, reshaped to the kernel, to W (PEFT's get_delta_weight). Files hold A and
B as conv kernels, (r, in_channels, kh, kw) and (out_channels, r, 1, 1), as PEFT's.

Differences from PEFT, both deliberate: dropout (lora_dropout > 0, training only) drops
elements of the patches, not of the input before its patches are made (the same rate and
expectation; PEFT's mask is shared by the patches that overlap); and lora_A takes the base's
dilation (PEFT's does not, so its forward fails on a dilated base while its merge assumes
it). The training forward keeps its input for backward, not the patch rows (kh * kw times
larger): backward makes them again.
"""

from __future__ import annotations

import numpy as np

from ..nn import Conv2d
from .lora import LoRALinear

__all__ = ["LoRAConv2d"]

_PATCHES = object()  # in the saved forward, where the patches were: made again in backward


class LoRAConv2d(LoRALinear):
    """A lora.nn.Conv2d with LoRA updates: lora_A (r, in_channels * kh * kw) and lora_B
    (out_channels, r) (PEFT's conv kernels, flattened); x (n, in_channels, h, w) or one image
    (in_channels, h, w), y as the base conv's. Built and used as LoRALinear (same arguments);
    plain LoRA only (DoRA and VeRA adapt Linear layers)."""

    _KIND = "conv2d"
    _BASES = (Conv2d,)

    def weight_2d(self) -> np.ndarray:
        return self._base.weight_2d()

    def file_shapes(self, r: int) -> tuple[tuple, tuple]:
        base = self._base
        return (r, base.in_channels, *base.kernel_size), (base.out_channels, r, 1, 1)

    def forward(self, x) -> np.ndarray:
        base = self._base
        single = np.ndim(x) == 3
        x = base.images(x, self.compute_dtype)
        cols = base.patches(x)
        rows = super().forward(cols)  # (n, oh * ow, out_channels)
        cache = self.__dict__.get("_cache")
        if cache is not None:  # keep the images, not their kh * kw times larger patches
            object.__setattr__(self, "_cache", tuple(_PATCHES if c is cols else c for c in cache))
        object.__setattr__(self, "_images", (x, single) if self.training else None)
        y = base.to_images(rows, base.out_size(x.shape))
        return y[0] if single else y

    def backward(self, dout: np.ndarray) -> np.ndarray | None:
        """dx (None without need_input_grad), accumulating the adapters' gradients."""
        x, single = self.__dict__.get("_images") or (None, None)
        cache = self.__dict__.get("_cache")
        if x is None or cache is None:
            raise RuntimeError("LoRAConv2d.backward: no forward pass cached; call the module "
                               "in training mode (model.train()) before backward, once per "
                               "backward")
        object.__setattr__(self, "_images", None)
        cols = self._base.patches(x)  # made again: a copy, cheap next to the GEMMs
        object.__setattr__(self, "_cache", tuple(cols if c is _PATCHES else c for c in cache))
        shape = x.shape
        dcols = super().backward(self._base.rows_of(dout, shape))
        if dcols is None:
            return None
        dx = self._base.fold(dcols, shape)
        return dx[0] if single else dx

    def extra_repr(self) -> str:
        base = self._base
        return (f"{base.in_channels}, {base.out_channels}, kernel_size={base.kernel_size}, "
                f"stride={base.stride}, r={self.r}, scaling={self.scaling:g}, "
                f"dropout={self.lora_dropout}, merged={self.merged}")
