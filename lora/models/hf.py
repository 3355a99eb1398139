"""Hugging Face checkpoint directories, for every model in lora.models: config.json, the
weights (model.safetensors or the shards an index lists), and `Weights`, which hands each layer
of a model being built its arrays by name.

Read with lora's own safetensors reader (lora/io/safetensors.py), one tensor at a time, so
float16 and bfloat16 checkpoints load. Nothing here knows a particular architecture; a model
file (bert.py, ...) maps transformers' names onto its modules. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os

import numpy as np

from .. import nn
from ..io.safetensors import (
    INDEX_FILE,
    INTEGER,
    STORAGE,
    SafetensorsError,
    checkpoint_shards,
    read_array,
    read_header,
    to_compute,
)

__all__ = ["Weights", "load_safetensors_dir", "read_config"]


def read_config(directory: str | os.PathLike) -> dict:
    """`<directory>/config.json` as a dict. FileNotFoundError when it is missing, ValueError
    when it is not a JSON object."""
    path = os.path.join(os.fspath(directory), "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def load_safetensors_dir(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of `model.safetensors` (or of the shards that
    `model.safetensors.index.json` lists) as float32: float16 and bfloat16 checkpoints are
    widened exactly, integer tensors kept as they are. Raises FileNotFoundError for a
    directory with neither file."""
    directory = os.fspath(directory)
    shards, _ = checkpoint_shards(directory)
    out = {}
    for shard in shards:
        path = os.path.join(directory, shard)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file (listed in {INDEX_FILE})")
        for name, info in read_header(path).tensors.items():
            if info.dtype in STORAGE:
                t = to_compute(read_array(path, info), info.dtype)
                out[name] = t if t.dtype == np.float32 else t.astype(np.float32)
            elif info.dtype in INTEGER:
                out[name] = read_array(path, info)
            else:
                raise SafetensorsError(f"{path}: tensor {name!r} has dtype {info.dtype}; "
                                       "expected a float or integer type")
    return out


class Weights:
    """Hands each layer of a model being built its arrays: from a checkpoint by name
    (`tensors`, checked for shape; `used` records what was taken), or, with tensors None,
    freshly initialised as transformers does (N(0, 0.02) weights, zero biases, unit norms).
    `rng` also seeds each dropout layer's generator, so one seed fixes a model's masks."""

    def __init__(self, tensors: dict | None, rng: np.random.Generator):
        self.tensors, self.rng, self.used = tensors, rng, set()

    def child_rng(self) -> np.random.Generator:
        """A generator for one dropout layer, drawn from the model's seed."""
        return np.random.default_rng(self.rng.integers(0, 2**63))

    def dropout(self, p: float) -> nn.Dropout:
        return nn.Dropout(p, rng=self.child_rng())

    def get(self, name: str, shape: tuple, kind: str) -> np.ndarray:
        """The float32 array `name` of `shape`; kind ("normal", "zeros", "ones") says how to
        initialise it when there is no checkpoint."""
        if self.tensors is not None:
            if name not in self.tensors:
                raise KeyError(f"from_pretrained: checkpoint has no tensor {name!r}")
            t = self.tensors[name]
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"from_pretrained: {name!r} has shape {t.shape}, expected {shape}")
            self.used.add(name)
            return np.ascontiguousarray(t, dtype=np.float32)
        if kind == "normal":
            return (0.02 * self.rng.standard_normal(shape)).astype(np.float32)
        return (np.ones if kind == "ones" else np.zeros)(shape, dtype=np.float32)

    def linear(self, prefix: str, d_in: int, d_out: int, bias: bool = True) -> nn.Linear:
        weight = self.get(prefix + ".weight", (d_out, d_in), "normal")
        return nn.Linear.from_arrays(
            weight, self.get(prefix + ".bias", (d_out,), "zeros") if bias else None)

    def embedding(self, prefix: str, num: int, dim: int, padding_idx=None) -> nn.Embedding:
        emb = nn.Embedding(1, dim)  # given its arrays below: no throw-away random table
        emb.num_embeddings, emb.padding_idx = num, padding_idx
        emb.weight = nn.Parameter(self.get(prefix + ".weight", (num, dim), "normal"))
        return emb

    def layer_norm(self, prefix: str, dim: int, eps: float) -> nn.LayerNorm:
        ln = nn.LayerNorm(dim, eps=eps)
        ln.weight = nn.Parameter(self.get(prefix + ".weight", (dim,), "ones"))
        ln.bias = nn.Parameter(self.get(prefix + ".bias", (dim,), "zeros"))
        return ln
