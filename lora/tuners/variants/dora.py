"""DoRA, weight-decomposed low-rank adaptation (Liu et al. 2024; PEFT's use_dora=True).

The adapted weight is split into a direction and a trained magnitude m (one per output):

    W' = m * (W + s B A) / ||W + s B A||        (norms per output row of W)
    Linear:    y = b + g * (x W^T + s (x A^T) B^T),     g = m / ||W + s B A||
    Embedding: y = g * (W[ids] + s A^T[ids] B^T),       g per embedding dimension

The norm is treated as a constant in backward (the paper's sec. 4.3, as PEFT does), and is
computed without forming W + s B A (lora.functional.dora_norm: one product of A's r rows
with W). With dropout in training, as PEFT: y = x W^T + b + (g - 1) * (xd W^T) + g * s
(xd A^T) B^T for the dropped-out input xd, one more GEMM than without. The magnitude is
PEFT's `lora_magnitude_vector` (the same key in adapter_model.safetensors), initialised to
||W + s B A||, so a new adapter starts as the base. A DoRA adapter runs alone: not stacked
with other active adapters and not in mixed batches (PEFT refuses those too); its base
weight is frozen.
"""

from __future__ import annotations

import numpy as np

from ... import functional as F
from ...nn.layers import _rows, _scatter_rows
from .lora import Variant

MAGNITUDE = "lora_magnitude_vector"


class DoRA(Variant):
    name = "dora"
    config_field = "use_dora"
    stacks = False
    kinds = ("linear", "embedding")

    def extra_shapes(self, kind, d_out, d_in, r):
        return {MAGNITUDE: (d_out,)}

    def init(self, layer, ad) -> None:
        ad.extra[MAGNITUDE].data[...] = layer.dora_norm(ad)

    def _gain(self, layer, ad) -> tuple[np.ndarray, np.ndarray]:
        norm = layer.dora_norm(ad)
        return ad.extra[MAGNITUDE].data / norm, norm

    @staticmethod
    def _frozen_base(layer) -> None:
        if layer.weight.requires_grad:
            raise ValueError(f"{type(layer).__name__}: DoRA trains with a frozen base weight; "
                             "set weight.requires_grad = False")

    # ---- Linear
    def linear_forward(self, layer, live, x, W, fifo, bias, residual):
        (ad,) = live
        g, norm = self._gain(layer, ad)
        p = ad.lora_dropout if layer.training else 0.0
        A, B, s = ad.A.data, ad.B.data, ad.scaling
        if p == 0:
            z, xa = F.linear_forward(x, W, A, B, s, fan_in_fan_out=fifo)
            y = z * g
            if bias is not None:
                y += bias
            if residual is not None:
                y += residual
            keep = None
        else:
            keep = layer.rng.random(x.shape) >= p
            xd = x * keep
            xd *= 1.0 / (1.0 - p)
            z, xa = F.linear_forward(xd, W, A, B, s, fan_in_fan_out=fifo)
            y = F.dense_forward(x - xd, W, bias, fan_in_fan_out=fifo, residual=residual)
            y += z * g
            x = xd  # the branch's input, for backward
        layer._save("variant", self, x, (ad, xa, z, g, norm, keep, p))
        return y

    def linear_backward(self, layer, saved, x, dout, W, fifo, add_dx_to):
        ad, xa, z, g, norm, keep, p = saved
        self._frozen_base(layer)
        dz = dout * g
        need_dx = layer.need_input_grad
        if keep is None:
            dx, dA, dB = F.linear_backward(dz, x, xa, W, ad.A.data, ad.B.data, ad.scaling,
                                           need_dx=need_dx, fan_in_fan_out=fifo,
                                           add_dx_to=add_dx_to)
        else:  # x is xd: dx = dy W + mask * (d(xd) - dy W), mask = keep / (1 - p)
            dxd, dA, dB = F.linear_backward(dz, x, xa, W, ad.A.data, ad.B.data, ad.scaling,
                                            need_dx=need_dx, fan_in_fan_out=fifo)
            dx = None
            if need_dx:
                base, _ = F.dense_backward(dout, x, W, need_dweight=False, fan_in_fan_out=fifo)
                dxd -= base
                dxd *= keep
                dxd *= 1.0 / (1.0 - p)
                dxd += base
                dx = dxd if add_dx_to is None else np.add(add_dx_to, dxd, out=add_dx_to)
        self._grads(ad, dA, dB, _rows(dout), _rows(z), norm)
        return dx

    @staticmethod
    def _grads(ad, dA, dB, dy, z, norm) -> None:
        m = ad.extra[MAGNITUDE]
        if ad.A.requires_grad:
            ad.A.accumulate(dA)
        if ad.B.requires_grad:
            ad.B.accumulate(dB)
        if m.requires_grad:
            dm = np.einsum("ij,ij->j", dy, z) / norm
            m.accumulate(dm.astype(m.dtype, copy=False))

    # ---- Embedding
    def embedding_forward(self, layer, live, ids, y):
        (ad,) = live
        g, norm = self._gain(layer, ad)
        a = ad.A.data.T[ids]  # ids.shape + (r,)
        z = y + ad.scaling * (a @ ad.B.data.T)
        layer._save("variant", self, ids, (ad, a, z, g, norm))
        return z * g

    def embedding_backward(self, layer, saved, ids, dout):
        ad, a, z, g, norm = saved
        self._frozen_base(layer)
        dz = _rows(dout * g)
        dA = dB = None
        if ad.B.requires_grad:
            dB = ad.scaling * (dz.T @ _rows(a))
        if ad.A.requires_grad:
            dA = _scatter_rows(ids, ad.scaling * (dz @ ad.B.data), ad.A.shape[::-1],
                               layer.padding_idx).T
        self._grads(ad, dA, dB, _rows(dout), _rows(z), norm)
        return None

    # ---- the update of the weight
    def merge_into(self, weight, A, B, scaling, extra, transposed):
        norm = F.dora_norm(weight, A, B, scaling, fan_in_fan_out=transposed)
        gain = (extra[MAGNITUDE] / norm).astype(weight.dtype, copy=False)
        F.merge(weight, A, B, scaling, fan_in_fan_out=transposed)
        weight *= gain if transposed else gain[:, None]
        return gain

    def unmerge_from(self, weight, A, B, scaling, extra, transposed, state) -> None:
        weight /= state if transposed else state[:, None]
        F.unmerge(weight, A, B, scaling, fan_in_fan_out=transposed)
