"""VeRA, vector-based random matrix adaptation (Kopiczko et al. 2024; PEFT's VeraConfig,
peft_type "VERA").

One pair of frozen random matrices is shared by every adapted layer of the model,
vera_A (r, max d_in) and vera_B (max d_out, r), each layer reading its top-left slice; the
layer trains only two vectors:

    y = x W^T + b + lambda_b * ((lambda_d * (drop(x) A_s^T)) B_s^T),
    A_s = vera_A[:, :d_in],  B_s = vera_B[:d_out, :]

which is the LoRA forward with A' = lambda_d A_s and B' = lambda_b B_s at scaling 1: the
fused kernels run it, after forming A' and B' (r (d_in + d_out) values per call), and the
vectors' gradients are the row sums of the pair's gradients times A_s and B_s. Merging adds
B' A'. lambda_b starts at 0 (the adapter starts as the base) and lambda_d at d_initial.

Files: PEFT's keys, `base_model.model.<path>.vera_lambda_b` / `.vera_lambda_d` per layer and,
with save_projection (the default), the shared `base_model.vera_A` / `base_model.vera_B`.
The projections are drawn here from NumPy's generator seeded by projection_prng_key, not
from PyTorch's, so they differ from the ones PEFT would draw: this library always saves them
(save_projection=False is refused), and an adapter PEFT saved without them cannot be loaded
here (PEFT's generator is not reproduced); the error says so. Linear and Conv1D layers;
PEFT's VeRA has no embedding layer either. A VeRA adapter runs alone (no stacking, no mixed
batches).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from ... import functional as F
from ..config import LoraConfig, _warn_unknown_keys, check_real
from .lora import Variant

LAMBDA_B, LAMBDA_D = "vera_lambda_b", "vera_lambda_d"
PROJECTIONS = ("vera_A", "vera_B")
MODEL_KEYS = {"vera_A": "base_model.vera_A", "vera_B": "base_model.vera_B"}


@dataclass
class _Projections:
    """The model's shared frozen pair: A (r, max d_in), B (max d_out, r)."""

    A: np.ndarray
    B: np.ndarray


# PEFT's VeraConfig fields, beside those LoraConfig shares (r, target_modules,
# fan_in_fan_out, bias, modules_to_save, task_type, base_model_name_or_path, inference_mode)
_PEFT_ONLY = {"peft_type", "auto_mapping", "revision", "peft_version", "init_weights",
              "layers_to_transform", "layers_pattern"}
_VERA_FIELDS = ("r", "target_modules", "projection_prng_key", "save_projection",
                "vera_dropout", "d_initial", "fan_in_fan_out", "bias", "modules_to_save",
                "task_type", "base_model_name_or_path", "inference_mode")


@dataclass
class VeraConfig(LoraConfig):
    """VeRA settings, as peft.VeraConfig: r (default 256: VeRA's vectors are cheap, its rank
    is high), target_modules, projection_prng_key (seeds the shared projections),
    save_projection (must stay True here: see the module docstring), vera_dropout,
    d_initial (lambda_d's initial value), fan_in_fan_out, bias ("none", "all" or
    "vera_only"), modules_to_save, task_type. The LoRA-only fields keep their defaults
    (lora_alpha is set to r: VeRA has no scaling)."""

    r: int = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1

    def __post_init__(self):
        if self.bias == "vera_only":
            self.bias = "lora_only"
        if not self.save_projection:
            raise ValueError("VeraConfig: save_projection=False is not supported: the shared "
                             "projections are drawn from NumPy's generator here, not PyTorch's "
                             "as in PEFT, so they must travel in the adapter file")
        if isinstance(self.projection_prng_key, bool) or not isinstance(
                self.projection_prng_key, int) or self.projection_prng_key < 0:
            raise ValueError("VeraConfig: projection_prng_key must be an int >= 0, got "
                             f"{self.projection_prng_key!r}")
        check_real(self.d_initial, "d_initial", "VeraConfig")
        if self.rank_pattern or self.alpha_pattern or self.use_dora or self.use_rslora:
            raise ValueError("VeraConfig: rank_pattern, alpha_pattern, use_dora and use_rslora "
                             "are LoRA's, not VeRA's")
        self.lora_alpha, self.lora_dropout = self.r, self.vera_dropout
        super().__post_init__()

    def to_dict(self) -> dict:
        """The JSON-ready dict PEFT's VeraConfig writes (peft_type "VERA")."""
        d = {k: getattr(self, k) for k in _VERA_FIELDS}
        d["bias"] = "vera_only" if self.bias == "lora_only" else self.bias
        if isinstance(d["target_modules"], list):
            d["target_modules"] = sorted(d["target_modules"])
        d.update(peft_type="VERA", init_weights=True, layers_to_transform=None,
                 layers_pattern=None)
        return d

    @classmethod
    def from_dict(cls, config: dict, where: str = "VeraConfig") -> VeraConfig:
        for key in ("layers_to_transform", "layers_pattern"):
            if config.get(key):
                raise ValueError(f"{where}: {key}={config[key]!r} is a PEFT feature this "
                                 "library does not support")
        if config.get("init_weights", True) is not True:
            raise ValueError(f"{where}: init_weights=false (random lambdas) is not supported")
        if not config.get("save_projection", True):
            raise ValueError(f"{where}: the adapter was saved without its projections "
                             "(save_projection=false): PEFT regenerates them from PyTorch's "
                             "generator, which this library does not reproduce; save it from "
                             "PEFT with save_projection=True")
        known = {f.name for f in fields(cls)}
        config = _warn_unknown_keys(config, set(_VERA_FIELDS) | _PEFT_ONLY, where)
        return cls(**{k: v for k, v in config.items() if k in known})


class VeRA(Variant):
    name = "vera"
    peft_type = "VERA"
    config_class = VeraConfig
    stacks = False
    pair_in_file = False  # no lora_A/lora_B per layer: the shared projections instead
    rank_field = LAMBDA_D
    scaled = False
    kinds = ("linear",)

    def extra_shapes(self, kind, d_out, d_in, r):
        return {LAMBDA_B: (d_out,), LAMBDA_D: (r,)}

    def trainable(self, ad) -> list:
        return list(ad.extra.values())

    # ---- the shared projections
    def options(self, config, dims: list[tuple[int, int]], dtype, tensors: dict | None = None):
        """{"projections": the shared pair, "d_initial": ...} for layers of `dims`
        ((d_out, d_in) each): from `tensors` (a file's base_model.vera_A/B) when given, else
        drawn as PEFT's kaiming-uniform bounds from projection_prng_key."""
        r = config.r
        d_out = max(d for d, _ in dims)
        d_in = max(d for _, d in dims)
        if tensors is not None:
            A, B = (np.ascontiguousarray(tensors[MODEL_KEYS[k]], dtype) for k in PROJECTIONS)
            if A.ndim != 2 or B.ndim != 2 or A.shape[0] != r or B.shape[1] != r or \
                    A.shape[1] < d_in or B.shape[0] < d_out:
                raise ValueError(f"vera_A {A.shape} and vera_B {B.shape} do not cover rank {r} "
                                 f"and the adapted layers' largest shape ({d_out}, {d_in})")
        else:
            rng = np.random.default_rng(config.projection_prng_key)
            A = rng.uniform(-1, 1, (r, d_in)) * math.sqrt(6.0 / d_in)
            B = rng.uniform(-1, 1, (d_out, r)) * math.sqrt(6.0 / r)
            A, B = A.astype(dtype), B.astype(dtype)
        A.flags.writeable = B.flags.writeable = False
        return {"projections": _Projections(A, B), "d_initial": config.d_initial}

    def pair(self, options: dict, d_out: int, d_in: int):
        """The layer's frozen slices of the shared pair (views, not copies)."""
        p = options["projections"]
        return p.A[:, :d_in], p.B[:d_out, :]

    def model_tensors_keys(self) -> tuple[str, ...]:
        return tuple(MODEL_KEYS.values())

    def model_tensors(self, options: dict) -> dict[str, np.ndarray]:
        p = options["projections"]
        return {MODEL_KEYS["vera_A"]: p.A, MODEL_KEYS["vera_B"]: p.B}

    def init(self, layer, ad) -> None:
        ad.extra[LAMBDA_B].data[...] = 0
        ad.extra[LAMBDA_D].data[...] = ad.options.get("d_initial", 0.1)

    # ---- Linear: the LoRA kernels on the scaled pair
    def linear_forward(self, layer, live, x, W, fifo, bias, residual):
        (ad,) = live
        p = ad.lora_dropout if layer.training else 0.0
        A, B = _scaled(ad.A.data, ad.B.data, {k: v.data for k, v in ad.extra.items()}, x.dtype)
        seed = int(layer.rng.integers(0, 2**63)) if p > 0 else None
        y, xa = F.linear_forward(x, W, A, B, 1.0, bias, dropout=p, seed=seed,
                                 fan_in_fan_out=fifo, residual=residual)
        layer._save("variant", self, x, (ad, xa, p, seed, A, B))
        return y

    def linear_backward(self, layer, saved, x, dout, W, fifo, add_dx_to):
        ad, xa, p, seed, A, B = saved
        dx, dA, dB = F.linear_backward(dout, x, xa, W, A, B, 1.0,
                                       need_dx=layer.need_input_grad, dropout=p, seed=seed,
                                       fan_in_fan_out=fifo, add_dx_to=add_dx_to)
        lb, ld = ad.extra[LAMBDA_B], ad.extra[LAMBDA_D]
        if ld.requires_grad:
            ld.accumulate(np.einsum("ki,ki->k", dA, ad.A.data).astype(ld.dtype, copy=False))
        if lb.requires_grad:
            lb.accumulate(np.einsum("jk,jk->j", dB, ad.B.data).astype(lb.dtype, copy=False))
        return dx

    def embedding_forward(self, layer, live, ids, y):
        raise ValueError("VeRA adapts Linear and Conv1D layers, not embeddings (as PEFT's)")

    # ---- the update of the weight
    def merge_into(self, weight, A, B, scaling, extra, transposed):
        F.merge(weight, *_scaled(A, B, extra, weight.dtype), 1.0, fan_in_fan_out=transposed)

    def unmerge_from(self, weight, A, B, scaling, extra, transposed, state) -> None:
        F.unmerge(weight, *_scaled(A, B, extra, weight.dtype), 1.0, fan_in_fan_out=transposed)


def _scaled(A, B, extra: dict, dtype) -> tuple[np.ndarray, np.ndarray]:
    """The LoRA pair VeRA computes with: lambda_d A (r, d_in) and lambda_b B (d_out, r),
    new contiguous arrays of `dtype`."""
    lb, ld = extra[LAMBDA_B], extra[LAMBDA_D]
    return (np.ascontiguousarray(ld[:, None] * A, dtype),
            np.ascontiguousarray(lb[:, None] * B, dtype))
