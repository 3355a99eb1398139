"""Hugging Face checkpoint directories, for every model in lora.models: config.json, the
weights (model.safetensors or the shards an index lists), and `Weights`, which hands each layer
of a model being built its arrays by name.

Read with lora's own safetensors reader (lora/io/safetensors.py), one tensor at a time, so
float16 and bfloat16 checkpoints load. `save_pretrained` writes the same layout back.

Which class loads a directory is one table, LOADERS (config.json's model_type -> class) and
ARCHITECTURES (its `architectures` entry -> a task model's class), read by
`from_pretrained(directory)` and by `check_model_type`, which every model's own
from_pretrained calls so that a checkpoint of another architecture is refused naming what it
is and what loads it. A new model adds its line to the tables. Beyond those names nothing
here knows a particular architecture; a model file (bert.py, ...) maps transformers' names
onto its modules. Nothing is downloaded.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil

import numpy as np

from .. import nn
from ..quant import QTensor
from ..io.safetensors import (
    INDEX_FILE,
    INTEGER,
    STORAGE,
    SafetensorsError,
    checkpoint_shards,
    read_array,
    read_header,
    serialize,
    to_compute,
)

__all__ = ["ARCHITECTURES", "LOADERS", "Weights", "check_model_type", "from_pretrained",
           "load_safetensors_dir", "read_config", "save_pretrained"]

# config.json's model_type -> the class whose from_pretrained loads it (imported when used).
LOADERS = {
    "bert": "lora.models.bert.BertModel",
    "llama": "lora.models.llama.LlamaForCausalLM",
    "mistral": "lora.models.llama.LlamaForCausalLM",
    "qwen2": "lora.models.llama.LlamaForCausalLM",
}
# config.json's `architectures` entry -> the task model that loads it whole, head included.
ARCHITECTURES = {
    "BertModel": "lora.models.bert.BertModel",
    "BertForSequenceClassification": "lora.models.bert.BertForSequenceClassification",
    "LlamaForCausalLM": "lora.models.llama.LlamaForCausalLM",
    "MistralForCausalLM": "lora.models.llama.LlamaForCausalLM",
    "Qwen2ForCausalLM": "lora.models.llama.LlamaForCausalLM",
}
# Files of a checkpoint directory that describe its tokenizer (and sentence-transformers'
# pipeline); save_pretrained copies them along, so the saved directory tokenizes and encodes
# as the original did.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt", "modules.json", "sentence_bert_config.json",
                   "1_Pooling/config.json")


def _public_name(dotted: str) -> str:
    """"lora.models.bert.BertModel" -> "lora.models.BertModel", the name users import."""
    module, _, name = dotted.rpartition(".")
    return f"lora.models.{name}" if module.startswith("lora.models.") else dotted


def _resolve(dotted: str) -> type:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def check_model_type(config: dict, directory, loader: str, model_types: tuple[str, ...]) -> None:
    """ValueError unless config.json's model_type (when it has one) is one of `model_types`,
    naming the model_type found and the loader of lora.models that takes it, if any.
    `loader` is the function checking ("BertModel.from_pretrained")."""
    found = config.get("model_type")
    if found is None or found in model_types:
        return
    path = os.path.join(os.fspath(directory), "config.json")
    wanted = " or ".join(repr(t) for t in model_types)
    if found in LOADERS:
        hint = (f"load it with {_public_name(LOADERS[found])}.from_pretrained (or "
                "lora.models.from_pretrained, which picks the loader from config.json)")
    else:
        known = ", ".join(f"{t!r} ({_public_name(c)})" for t, c in LOADERS.items())
        hint = f"lora.models has no loader for {found!r}; it loads model_type {known}"
    raise ValueError(f"{loader}: {path} is a {found!r} checkpoint, not {wanted}; {hint}")


def from_pretrained(directory: str | os.PathLike, **kwargs):
    """Load a checkpoint directory with the class its config.json names: the task model of
    its `architectures` entry when lora.models has one (BertForSequenceClassification, head
    included), else the model of its model_type (BertModel). `kwargs` go to that class's
    from_pretrained. ValueError naming the model_type when no loader takes it. The model comes
    back in eval mode, as every from_pretrained returns it. A `.gguf` file loads by its
    general.architecture (gguf.ARCHITECTURES); another architecture is refused by name."""
    from . import gguf

    if gguf.is_gguf(directory):
        gguf.architecture(gguf.read_header(directory))
        return _resolve(LOADERS["llama"]).from_pretrained(directory, **kwargs)
    config = read_config(directory)
    for arch in config.get("architectures") or []:
        if arch in ARCHITECTURES:
            return _resolve(ARCHITECTURES[arch]).from_pretrained(directory, **kwargs)
    model_type = config.get("model_type")
    if model_type not in LOADERS:
        path = os.path.join(os.fspath(directory), "config.json")
        known = ", ".join(f"{t!r} ({_public_name(c)})" for t, c in LOADERS.items())
        what = "has no model_type" if model_type is None else f"has model_type {model_type!r}"
        raise ValueError(f"from_pretrained: {path} {what}; lora.models loads model_type {known}")
    return _resolve(LOADERS[model_type]).from_pretrained(directory, **kwargs)


def save_pretrained(directory: str | os.PathLike, config: dict, tensors: dict[str, np.ndarray],
                    source: str | os.PathLike | None = None) -> None:
    """Write `config` as `<directory>/config.json` (sorted keys, 2-space indent) and `tensors`
    as `model.safetensors` (metadata {"format": "pt"}, as transformers writes it), creating
    the directory; with `source`, the checkpoint directory the model came from, also copy
    its tokenizer files (TOKENIZER_FILES) that exist."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    data = serialize({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                     metadata={"format": "pt"})
    with open(os.path.join(directory, "model.safetensors"), "wb") as f:
        f.write(data)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    if source is not None and os.path.abspath(source) != os.path.abspath(directory):
        for name in TOKENIZER_FILES:
            src = os.path.join(os.fspath(source), name)
            if os.path.isfile(src):
                os.makedirs(os.path.dirname(os.path.join(directory, name)), exist_ok=True)
                shutil.copyfile(src, os.path.join(directory, name))


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
            if isinstance(t, QTensor):  # kept quantized, but wanted here as floats
                return t.dequantize()
            return np.ascontiguousarray(t, dtype=np.float32)
        if kind == "normal":
            return (0.02 * self.rng.standard_normal(shape)).astype(np.float32)
        return (np.ones if kind == "ones" else np.zeros)(shape, dtype=np.float32)

    def linear(self, prefix: str, d_in: int, d_out: int, bias: bool = True) -> nn.Linear:
        """A Linear, or a QuantLinear when the checkpoint holds the weight as a QTensor."""
        q = (self.tensors or {}).get(prefix + ".weight")
        if isinstance(q, QTensor) and q.shape == (d_out, d_in):
            self.used.add(prefix + ".weight")
            return nn.QuantLinear(
                q, self.get(prefix + ".bias", (d_out,), "zeros") if bias else None)
        weight = self.get(prefix + ".weight", (d_out, d_in), "normal")
        return nn.Linear.from_arrays(
            weight, self.get(prefix + ".bias", (d_out,), "zeros") if bias else None)

    def embedding(self, prefix: str, num: int, dim: int, padding_idx=None) -> nn.Embedding:
        q = (self.tensors or {}).get(prefix + ".weight")
        if isinstance(q, QTensor) and q.shape == (num, dim):
            self.used.add(prefix + ".weight")
            return nn.QuantEmbedding(q, padding_idx)
        emb = nn.Embedding(1, dim)  # given its arrays below: no throw-away random table
        emb.num_embeddings, emb.padding_idx = num, padding_idx
        emb.weight = nn.Parameter(self.get(prefix + ".weight", (num, dim), "normal"))
        return emb

    def layer_norm(self, prefix: str, dim: int, eps: float) -> nn.LayerNorm:
        ln = nn.LayerNorm(dim, eps=eps)
        ln.weight = nn.Parameter(self.get(prefix + ".weight", (dim,), "ones"))
        ln.bias = nn.Parameter(self.get(prefix + ".bias", (dim,), "zeros"))
        return ln
