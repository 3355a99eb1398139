"""The on-disk format of a Hugging Face PEFT LoRA adapter: names, keys and checked reading.

An adapter is a directory with adapter_config.json and adapter_model.safetensors. Tensor keys
are `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight` for Linear layers and
`base_model.model.<module path>.lora_embedding_A` / `lora_embedding_B` for Embedding layers,
plus a variant's own tensors beside them (DoRA's `<module path>.lora_magnitude_vector`) and
its model-level ones (VeRA's `base_model.vera_A`, Tied-LoRA's `base_model.tied_lora_A.<o>x<i>`).
This module only reads and names things; building or checking a model is lora/io/adapter.py's
job and merging into a checkpoint is lora/io/checkpoint.py's. It never unpickles anything.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from ..tuners.config import check_values
from ..tuners.variants import field_owners, peft_types
from .safetensors import SafetensorsError, read_float_tensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."

_LINEAR_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}
_EMBEDDING_SUFFIXES = {".lora_embedding_A": "A", ".lora_embedding_B": "B"}


class AdapterFormatError(ValueError):
    """An adapter directory or file that is missing, corrupt or not a PEFT LoRA adapter."""


@dataclass
class LoraTensors:
    """The LoRA pair of one module. A is (r, d_in), B is (d_out, r) for a Linear layer;
    for an Embedding layer A is (r, num_embeddings) and B is (embedding_dim, r); for a
    Conv2d (kind "conv2d") A is (r, in_channels, kh, kw) and B (out_channels, r, 1, 1). `extra`
    holds a variant's further tensors by field (DoRA's lora_magnitude_vector, key
    `<path>.lora_magnitude_vector`)."""

    path: str
    kind: str  # "linear", "embedding" or "conv2d"
    A: np.ndarray | None  # None for a variant without per-layer pairs (VeRA)
    B: np.ndarray | None
    extra: dict = field(default_factory=dict)
    rank: int | None = None  # the rank when there is no A to read it from

    @property
    def r(self) -> int:
        return self.A.shape[0] if self.A is not None else self.rank


def linear_keys(path: str) -> tuple[str, str]:
    return KEY_PREFIX + path + ".lora_A.weight", KEY_PREFIX + path + ".lora_B.weight"


def embedding_keys(path: str) -> tuple[str, str]:
    return KEY_PREFIX + path + ".lora_embedding_A", KEY_PREFIX + path + ".lora_embedding_B"


def read_config(directory: str | os.PathLike) -> dict:
    """adapter_config.json as a dict, checked to be a LoRA config."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise AdapterFormatError(f"{path}: no such file (not a PEFT adapter directory?)")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFormatError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise AdapterFormatError(f"{path}: JSON nested too deeply to be a config") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object, got {type(config).__name__}")
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() not in peft_types():
        raise AdapterFormatError(f"{path}: peft_type is {peft_type!r}; this library reads "
                                 f"{', '.join(sorted(peft_types()))} adapters")
    try:
        check_values(config, path)
    except ValueError as e:
        raise AdapterFormatError(str(e)) from None
    return config


def read_tensors(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of adapter_model.safetensors as float32 arrays (float64 when stored so;
    float16 and bfloat16 widened exactly), read by lora.io.safetensors; a clear error when the
    file is missing, truncated, corrupt or holds non-float tensors."""
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise AdapterFormatError(f"{path}: no such file")
    try:
        tensors = read_float_tensors(path)
    except SafetensorsError as e:
        raise AdapterFormatError(f"corrupt or truncated safetensors file: {e}") from None
    for key, value in tensors.items():
        if not np.isfinite(value).all():
            raise AdapterFormatError(f"{path}: tensor {key!r} contains NaN or infinity")
    return tensors


def split_lora_tensors(tensors: dict[str, np.ndarray]) -> tuple[dict[str, LoraTensors], dict]:
    """Group LoRA tensors by module path. Returns ({path: LoraTensors}, {other key: array})
    where the others are modules_to_save weights, DoRA magnitudes and the like."""
    halves: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    others = {}
    for key, value in tensors.items():
        for suffixes, kind in ((_LINEAR_SUFFIXES, "linear"), (_EMBEDDING_SUFFIXES, "embedding")):
            match = next((s for s in suffixes if key.endswith(s)), None)
            if match and key.startswith(KEY_PREFIX):
                path = key[len(KEY_PREFIX) : -len(match)]
                halves.setdefault((path, kind), {})[suffixes[match]] = value
                break
        else:
            others[key] = value
    pairs = {}
    for (path, kind), ab in halves.items():
        if not path or any(not part or set(part) & set("/\\\0") for part in path.split(".")):
            raise AdapterFormatError(f"tensor key {KEY_PREFIX + path!r}: {path!r} is not a "
                                     "module path (dot-separated names, no slashes)")
        if set(ab) != {"A", "B"}:
            missing = "B" if "A" in ab else "A"
            raise AdapterFormatError(f"module {path!r}: lora_{missing} is missing from the file")
        A, B = ab["A"], ab["B"]
        if kind == "linear" and A.ndim == 4 and B.ndim == 4 and B.shape[2:] == (1, 1):
            kind = "conv2d"  # PEFT's Conv2d: lora_A a conv kernel, lora_B a 1x1 one
        elif A.ndim != 2 or B.ndim != 2:
            A = B = np.zeros((0, 0))
        if A.shape[0] != B.shape[1] or A.shape[0] == 0:
            raise AdapterFormatError(
                f"module {path!r}: lora_A {ab['A'].shape} and lora_B {ab['B'].shape} do not form "
                "a (r, in) / (out, r) pair (or, for a Conv2d, an (r, in, kh, kw) / "
                "(out, r, 1, 1) pair) with r >= 1"
            )
        if path in pairs:
            raise AdapterFormatError(f"module {path!r}: both Linear and Embedding LoRA keys")
        pairs[path] = LoraTensors(path, kind, A, B)
    owners = field_owners()
    for key in list(others):  # the variants' tensors (DoRA's magnitudes) join their pair
        name = next((f for f in owners if key.endswith("." + f)), None)
        if name is None or not key.startswith(KEY_PREFIX):
            continue
        path = key[len(KEY_PREFIX):-len(name) - 1]
        owner = owners[name]
        if path not in pairs and owner.pair_in_file:
            raise AdapterFormatError(f"tensor {key!r}: {name} for module {path!r}, which has no "
                                     "lora_A/lora_B pair in the file")
        t = pairs.setdefault(path, LoraTensors(path, "linear", None, None))
        t.extra[name] = others.pop(key)
        if t.A is None and name == owner.rank_field:
            t.rank = t.extra[name].shape[0] if t.extra[name].ndim == 1 else 0
    return pairs, others


def pop_model_tensors(variant, others: dict, where: str) -> dict | None:
    """The adapter's model-level tensors (VeRA's projections, Tied-LoRA's tied pairs) by key,
    popped from `others` (split_lora_tensors'); None for a variant with per-layer pairs.
    AdapterFormatError when one the variant always needs is missing."""
    if variant.pair_in_file:
        return None
    shared = {k: others.pop(k) for k in list(others) if variant.is_model_tensor(k)}
    for key in variant.model_tensors_keys():
        if key not in shared:
            raise AdapterFormatError(f"{where}: the {variant.name} adapter has no {key!r}")
    return shared
