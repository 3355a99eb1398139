"""Tied-LoRA, LoRA with weight tying (Renduchintala, Konuk and Kuchaiev 2024, arXiv 2311.09578).

One pair A (r, d_in), B (d_out, r) is shared ("tied") by every adapted layer of the same
shape (d_out, d_in); layers of another shape get a tied pair of their own. Each layer trains
two vectors of its own, u (r,) and v (d_out,):

    y = x W^T + b + s * v * ((u * (drop(x) A^T)) B^T),   s = lora_alpha / r (rsLoRA: / sqrt(r))
    merge:  W += s * diag(v) B diag(u) A

which is the LoRA forward with A' = u A and B' = v B: the fused kernels run it after forming
A' and B' (r (d_in + d_out) values per call). The vectors' gradients are the row sums of the
pair's gradients times A and B (as VeRA's); the tied A and B get dA' u and dB' v from every
layer, accumulated into the one Parameter each, so an optimizer sees and steps it once.

TiedLoraConfig says which of A, B, u, v train (default: all four). Init: A kaiming-uniform
and B = 0 (LoRA's), u = v = 1. A frozen B cannot stay 0, so it is drawn as LoRA's B with
init_lora_weights=False and the first trained of v, u, A starts at 0 instead: a fresh
adapter is the base model.

Files: PEFT has no Tied-LoRA, so this library's own format in PEFT's layout: peft_type
"TIED_LORA", `base_model.model.<path>.tied_lora_u` / `.tied_lora_v` per layer and the tied
pairs as `base_model.tied_lora_A.<d_out>x<d_in>` / `base_model.tied_lora_B.<d_out>x<d_in>`.
PEFT does not read it. Linear and Conv1D layers only; an adapter runs alone (no stacking, no
mixed batches).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ... import functional as F
from ...nn import Parameter
from ..config import LoraConfig
from .lora import Variant

U, V = "tied_lora_u", "tied_lora_v"
PARTS = ("A", "B", "u", "v")
PREFIX = "base_model.tied_lora_"


def model_key(part: str, d_out: int, d_in: int) -> str:
    """The file key of the tied A or B of the (d_out, d_in) layers."""
    return f"{PREFIX}{part}.{d_out}x{d_in}"


@dataclass
class TiedLoraConfig(LoraConfig):
    """Tied-LoRA settings: LoraConfig's (r, lora_alpha, lora_dropout, target_modules,
    use_rslora, alpha_pattern, bias, modules_to_save, ...) and which parts train: train_A and
    train_B (the tied pair), train_u and train_v (each layer's vectors); all four by default
    (the paper compares the combinations). rank_pattern is refused (the layers of a shape
    share one pair of rank r), and so are use_dora and an init_lora_weights other than True."""

    train_A: bool = True
    train_B: bool = True
    train_u: bool = True
    train_v: bool = True

    def __post_init__(self):
        super().__post_init__()
        for part, flag in self.trained.items():
            if not isinstance(flag, bool):
                raise ValueError(f"TiedLoraConfig: train_{part} must be True or False, got "
                                 f"{flag!r}")
        if not any(self.trained.values()):
            raise ValueError("TiedLoraConfig: train_A, train_B, train_u and train_v are all "
                             "False; nothing would train")
        if self.rank_pattern:
            raise ValueError("TiedLoraConfig: rank_pattern is not supported: the layers of one "
                             "shape share one tied pair, of rank r")
        if self.use_dora or self.init_lora_weights is not True:
            raise ValueError("TiedLoraConfig: use_dora and init_lora_weights other than True "
                             "are LoRA's; Tied-LoRA has its own init")

    @property
    def trained(self) -> dict[str, bool]:
        """{part: whether it trains} for A, B, u, v."""
        return {part: getattr(self, f"train_{part}") for part in PARTS}

    def to_dict(self) -> dict:
        """LoraConfig's dict with the train_* fields and peft_type "TIED_LORA"."""
        return {**super().to_dict(), "peft_type": "TIED_LORA"}


class TiedLoRA(Variant):
    name = "tied_lora"
    peft_type = "TIED_LORA"
    config_class = TiedLoraConfig
    stacks = False
    pair_in_file = False  # no lora_A/lora_B per layer: the tied pairs, once per shape
    rank_field = U
    pair_names = ("tied_lora_A", "tied_lora_B")
    kinds = ("linear",)

    def extra_shapes(self, kind, d_out, d_in, r):
        return {U: (r,), V: (d_out,)}

    def trainable(self, ad) -> list:
        parts = dict(zip(PARTS, (ad.A, ad.B, ad.extra[U], ad.extra[V]), strict=True))
        return [p for part, p in parts.items() if ad.options["train"][part]]

    # ---- the tied pairs
    def options(self, config, dims: list[tuple[int, int]], dtype, tensors: dict | None = None):
        """{"pairs": {(d_out, d_in): (A, B) Parameters} for the shapes of `dims`, "train":
        which parts train, "zero": the part a fresh adapter starts at 0, "undrawn": the shapes
        whose pair init() has still to draw}; the pairs from `tensors` (a file's) when given,
        which must be exactly those shapes' pairs at rank r."""
        r, train = config.r, config.trained
        shapes = list(dict.fromkeys(dims))
        want = {model_key(part, d_out, d_in): (part, (d_out, d_in), shape)
                for d_out, d_in in shapes
                for part, shape in (("A", (r, d_in)), ("B", (d_out, r)))}
        if tensors is not None:
            for key, (part, dims_, shape) in want.items():
                got = tensors[key].shape if key in tensors else None
                if got != shape:
                    raise ValueError(f"{key!r}: the tied {part} of the adapted {dims_} layers at "
                                     f"rank {r} must have shape {shape}, "
                                     + ("the file has none" if got is None else f"got {got}"))
            unknown = sorted(set(tensors) - set(want))
            if unknown:
                raise ValueError(f"{unknown[0]!r} is no tied pair of the adapted layers' shapes "
                                 f"{shapes}")
        pairs = {}
        for d_out, d_in in shapes:
            pairs[d_out, d_in] = tuple(
                Parameter(np.zeros(want[key][2], dtype) if tensors is None
                          else np.array(tensors[key], dtype), train[part])
                for part in "AB" for key in [model_key(part, d_out, d_in)])
        return {"pairs": pairs, "train": train,
                "zero": next(p for p in ("B", "v", "u", "A") if train[p]),
                "undrawn": set(shapes) if tensors is None else set()}

    def pair(self, options: dict, d_out: int, d_in: int):
        return options["pairs"][d_out, d_in]

    def is_model_tensor(self, key: str) -> bool:
        return key.startswith(PREFIX)

    def model_tensors(self, options: dict) -> dict[str, np.ndarray]:
        return {model_key(part, *dims): p.data for dims, pair in options["pairs"].items()
                for part, p in zip("AB", pair, strict=True)}

    def init(self, layer, ad) -> None:
        """u = v = 1 but the zero part; the tied pair drawn from the generator of its first
        layer (the seed of wrap)."""
        train, zero = ad.options["train"], ad.options["zero"]
        for part, field in (("u", U), ("v", V)):
            ad.extra[field].data[...] = 0 if zero == part else 1
            ad.extra[field].requires_grad = train[part]
        dims = (ad.B.shape[0], ad.A.shape[1])
        if dims in ad.options["undrawn"]:
            ad.options["undrawn"].discard(dims)
            for part, p, fan_in in (("A", ad.A, dims[1]), ("B", ad.B, ad.r)):
                p.data[...] = 0 if zero == part else layer.rng.uniform(-1, 1, p.shape)
                p.data /= math.sqrt(fan_in)  # kaiming-uniform (a = sqrt(5)) bounds, as LoRA's

    # ---- Linear: the LoRA kernels on the scaled pair
    def linear_forward(self, layer, live, x, W, fifo, bias, residual):
        (ad,) = live
        p = ad.lora_dropout if layer.training else 0.0
        A, B = _scaled(ad.A.data, ad.B.data, {k: v.data for k, v in ad.extra.items()}, x.dtype)
        seed = int(layer.rng.integers(0, 2**63)) if p > 0 else None
        y, xa = F.linear_forward(x, W, A, B, ad.scaling, bias, dropout=p, seed=seed,
                                 fan_in_fan_out=fifo, residual=residual)
        layer._save("variant", self, x, (ad, xa, p, seed, A, B))
        return y

    def linear_backward(self, layer, saved, x, dout, W, fifo, add_dx_to):
        ad, xa, p, seed, A, B = saved
        dx, dA, dB = F.linear_backward(dout, x, xa, W, A, B, ad.scaling,
                                       need_dx=layer.need_input_grad, dropout=p, seed=seed,
                                       fan_in_fan_out=fifo, add_dx_to=add_dx_to)
        u, v = ad.extra[U], ad.extra[V]  # dA, dB are the gradients of A' = u A, B' = v B
        if u.requires_grad:
            u.accumulate(np.einsum("ki,ki->k", dA, ad.A.data))
        if v.requires_grad:
            v.accumulate(np.einsum("jk,jk->j", dB, ad.B.data))
        if ad.A.requires_grad:
            ad.A.accumulate(dA * u.data[:, None])
        if ad.B.requires_grad:
            ad.B.accumulate(dB * v.data[:, None])
        return dx

    # ---- the update of the weight
    def merge_into(self, weight, A, B, scaling, extra, transposed):
        F.merge(weight, *_scaled(A, B, extra, weight.dtype), scaling, fan_in_fan_out=transposed)

    def unmerge_from(self, weight, A, B, scaling, extra, transposed, state) -> None:
        F.unmerge(weight, *_scaled(A, B, extra, weight.dtype), scaling,
                  fan_in_fan_out=transposed)


def _scaled(A, B, extra: dict, dtype) -> tuple[np.ndarray, np.ndarray]:
    """The LoRA pair Tied-LoRA computes with: u A (r, d_in) and v B (d_out, r), new
    contiguous arrays of `dtype`."""
    return (np.ascontiguousarray(extra[U][:, None] * A, dtype),
            np.ascontiguousarray(extra[V][:, None] * B, dtype))
