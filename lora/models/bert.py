"""A BERT-family encoder on lora.nn, float32, forward and backward, for LoRA fine-tuning.

`BertModel.from_pretrained(directory)` reads a Hugging Face checkpoint directory (config.json
plus model.safetensors) into modules named exactly as in transformers
(`encoder.layer.0.attention.self.query`, ...), so `lora.wrap(model, target_modules=["query",
"value"])` and PEFT adapter files made for a transformers BertModel apply by name.
`BertForSequenceClassification` adds mean / CLS / pooler pooling and a linear head.

The Linear, Embedding, GELU and LayerNorm layers are lora.nn's (LoRA wraps the Linear ones;
GELU and LayerNorm run the C kernels in lora.functional). What lora.nn has no layer for lives
here: attention's own math (scaled scores, padding mask, softmax, the per-head matmuls), which
is the C kernel lora.functional.attention_forward/backward. Not here:
decoder/cross-attention, relative position embeddings, key/value caches, gradients for the
token ids.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields

import numpy as np

from .. import functional as F
from .. import nn
from ..nn import Module
from .hf import Weights, load_safetensors_dir, read_config
from .memory import keep_freed_memory

__all__ = ["BertConfig", "BertModel", "BertForSequenceClassification", "mean_pool", "cls_pool"]


# ---------------------------------------------------------------------------------------------
# config and checkpoint


@dataclass
class BertConfig:
    """The fields of a transformers BertConfig that the model uses (same names, same defaults)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    position_embedding_type: str = "absolute"

    @classmethod
    def from_dict(cls, d: dict) -> BertConfig:
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        if cfg.position_embedding_type != "absolute":
            raise NotImplementedError(
                f"position_embedding_type={cfg.position_embedding_type!r}: only 'absolute'")
        if cfg.hidden_act not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu"):
            raise NotImplementedError(f"hidden_act={cfg.hidden_act!r}")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        return cfg

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> BertConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def _hf_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keys as a transformers BertModel names them: drop a task model's `bert.` prefix and
    map the TF-era LayerNorm `gamma`/`beta` to `weight`/`bias`."""
    out = {}
    for k, v in tensors.items():
        if k.startswith("bert."):
            k = k[5:]
        k = k.replace("LayerNorm.gamma", "LayerNorm.weight")
        k = k.replace("LayerNorm.beta", "LayerNorm.bias")
        out[k] = v
    return out


# ---------------------------------------------------------------------------------------------
# the model, module by module, with transformers' names


def _rows(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1, a.shape[-1])


class BertEmbeddings(Module):
    """word + position + token-type embeddings, then LayerNorm and dropout. backward runs only
    when one of its parameters is trainable (the token ids have no gradient)."""

    def __init__(self, cfg: BertConfig, init: Weights):
        super().__init__()
        h = cfg.hidden_size
        self.word_embeddings = init.embedding("embeddings.word_embeddings", cfg.vocab_size, h,
                                              padding_idx=cfg.pad_token_id)
        self.position_embeddings = init.embedding(
            "embeddings.position_embeddings", cfg.max_position_embeddings, h)
        self.token_type_embeddings = init.embedding(
            "embeddings.token_type_embeddings", cfg.type_vocab_size, h)
        self.LayerNorm = init.layer_norm("embeddings.LayerNorm", h, cfg.layer_norm_eps)
        self.dropout = init.dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        b, s = input_ids.shape
        if s > self.position_embeddings.num_embeddings:
            raise ValueError(f"sequence length {s} exceeds max_position_embeddings "
                             f"{self.position_embeddings.num_embeddings}")
        x = self.word_embeddings(input_ids)
        x += self.position_embeddings(np.arange(s))
        x += self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))

    def needs_backward(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def backward(self, dout: np.ndarray) -> None:
        d = self.LayerNorm.backward(self.dropout.backward(dout))
        self.word_embeddings.backward(d)
        self.position_embeddings.backward(d.sum(axis=0))
        self.token_type_embeddings.backward(d)
        return None


def _key_mask(attention_mask: np.ndarray | None) -> np.ndarray | None:
    """The (batch, seq) keys each item attends to, as bool, or None when it is every key. A
    right-padded mask (what a tokenizer produces) lets the attention kernel skip the padded
    keys' work; see lora.functional.attention_forward for any other mask."""
    if attention_mask is None:
        return None
    m = np.asarray(attention_mask) > 0
    return None if m.all() else m


class BertSelfAttention(Module):
    """Multi-head scaled dot-product self-attention with a key padding mask.

    query/key/value are Linear layers (what LoRA targets); the attention itself (scores
    q k^T / sqrt(head_dim), softmax, dropout on the probabilities, the context) is
    lora.functional.attention_forward/backward, which reads q, k, v in the (batch, seq,
    hidden) layout the projections write and keeps only the probabilities for the backward
    (the dropout mask is regenerated from a seed)."""

    def __init__(self, cfg: BertConfig, init: Weights, prefix: str):
        super().__init__()
        h = cfg.hidden_size
        self.num_attention_heads = cfg.num_attention_heads
        self.attention_head_size = h // cfg.num_attention_heads
        self.query = init.linear(prefix + ".query", h, h)
        self.key = init.linear(prefix + ".key", h, h)
        self.value = init.linear(prefix + ".value", h, h)
        self.attention_probs_dropout_prob = cfg.attention_probs_dropout_prob
        self.rng = init.child_rng()
        self.need_input_grad = True

    def forward(self, x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        q, k, v = self.query(x), self.key(x), self.value(x)
        p_drop = self.attention_probs_dropout_prob if self.training else 0.0
        seed = int(self.rng.integers(2**63)) if p_drop > 0 else None
        ctx, probs = F.attention_forward(q, k, v, self.num_attention_heads, key_mask=mask,
                                         dropout=p_drop, seed=seed)
        self._save(q, k, v, probs, mask, p_drop, seed)
        return ctx

    def backward(self, dctx: np.ndarray, add_dx_to: np.ndarray | None = None) -> np.ndarray | None:
        """dx (None without need_input_grad), the three projections' input gradients summed
        by their GEMMs (beta = 1) into `add_dx_to` when given (BertAttention passes the
        residual's gradient), else into a new array."""
        q, k, v, probs, mask, p_drop, seed = self._saved()
        dq, dk, dv = F.attention_backward(dctx, q, k, v, probs, self.num_attention_heads,
                                          key_mask=mask, dropout=p_drop, seed=seed)
        del q, k, v, probs
        key_grad = self.need_input_grad or any(p.requires_grad for p in self.key.parameters())
        for proj in (self.query, self.key, self.value):
            proj.need_input_grad = self.need_input_grad
        dx = self.query.backward(dq, add_dx_to=add_dx_to)
        dx = self.value.backward(dv, add_dx_to=dx)
        if key_grad:
            dx = self.key.backward(dk, add_dx_to=dx)
        return dx if self.need_input_grad else None


class BertSelfOutput(Module):
    """LayerNorm(dropout(dense(h)) + input): the projection and residual after attention
    (also the FFN's second half, as BertOutput)."""

    def __init__(self, cfg: BertConfig, init: Weights, prefix: str, d_in: int):
        super().__init__()
        self.dense = init.linear(prefix + ".dense", d_in, cfg.hidden_size)
        self.LayerNorm = init.layer_norm(prefix + ".LayerNorm", cfg.hidden_size, cfg.layer_norm_eps)
        self.dropout = init.dropout(cfg.hidden_dropout_prob)

    def forward(self, h: np.ndarray, residual: np.ndarray) -> np.ndarray:
        # Without dropout the residual is added by the projection, in the pass that writes
        # its bias, instead of by a pass of its own.
        fused = not self.dropout.active
        self._save(fused)
        if fused:
            return self.LayerNorm(self.dense(h, residual=residual))
        y = self.dropout(self.dense(h))
        y += residual
        return self.LayerNorm(y)

    def backward(self, dout: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Returns (d h, d residual)."""
        (fused,) = self._saved()
        d = self.LayerNorm.backward(dout)
        return self.dense.backward(d if fused else self.dropout.backward(d)), d


BertOutput = BertSelfOutput


class BertAttention(Module):
    def __init__(self, cfg: BertConfig, init: Weights, prefix: str):
        super().__init__()
        self.self = BertSelfAttention(cfg, init, prefix + ".self")
        self.output = BertSelfOutput(cfg, init, prefix + ".output", cfg.hidden_size)

    def forward(self, x, mask):
        return self.output(self.self(x, mask), x)

    def backward(self, dout):
        dctx, dres = self.output.backward(dout)
        return self.self.backward(dctx, add_dx_to=dres)


class BertIntermediate(Module):
    def __init__(self, cfg: BertConfig, init: Weights, prefix: str):
        super().__init__()
        self.dense = init.linear(prefix + ".dense", cfg.hidden_size, cfg.intermediate_size)
        act = cfg.hidden_act
        self.intermediate_act_fn = nn.ReLU() if act == "relu" else nn.GELU(
            "none" if act == "gelu" else "tanh")

    def forward(self, x):
        return self.intermediate_act_fn(self.dense(x))

    def backward(self, dout, add_dx_to=None):
        return self.dense.backward(self.intermediate_act_fn.backward(dout), add_dx_to=add_dx_to)


class BertLayer(Module):
    def __init__(self, cfg: BertConfig, init: Weights, prefix: str):
        super().__init__()
        self.attention = BertAttention(cfg, init, prefix + ".attention")
        self.intermediate = BertIntermediate(cfg, init, prefix + ".intermediate")
        self.output = BertOutput(cfg, init, prefix + ".output", cfg.intermediate_size)

    def forward(self, x, mask):
        a = self.attention(x, mask)
        return self.output(self.intermediate(a), a)

    def backward(self, dout):
        dh, dres = self.output.backward(dout)
        # the residual's gradient and the FFN's input gradient summed by the GEMM (beta = 1)
        return self.attention.backward(self.intermediate.backward(dh, add_dx_to=dres))


class BertEncoder(Module):
    def __init__(self, cfg: BertConfig, init: Weights):
        super().__init__()
        self.layer = nn.ModuleList(
            BertLayer(cfg, init, f"encoder.layer.{i}") for i in range(cfg.num_hidden_layers))

    def forward(self, x, mask):
        for layer in self.layer:
            x = layer(x, mask)
        return x

    def backward(self, dout):
        for layer in reversed(list(self.layer)):
            dout = layer.backward(dout)
            if dout is None:
                return None
        return dout


class BertPooler(Module):
    """tanh(dense(h[:, 0])): BERT's next-sentence pooler, what transformers' sequence
    classifier pools with."""

    def __init__(self, cfg: BertConfig, init: Weights):
        super().__init__()
        self.dense = init.linear("pooler.dense", cfg.hidden_size, cfg.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, h):
        return self.activation(self.dense(h[:, 0]))

    def backward(self, dout, shape):
        dh = np.zeros(shape, np.float32)
        dh[:, 0] = self.dense.backward(self.activation.backward(dout))
        return dh


class BertModel(Module):
    """A BERT encoder: `model(input_ids, attention_mask=None, token_type_ids=None)` returns the
    last hidden state (batch, seq, hidden) float32, and `model.backward(d_last_hidden_state)`
    accumulates the gradients of every trainable parameter.

    The backward pass stops as low as it can: with the embeddings frozen, the gradient of the
    first layer's input is never formed (nor the first layer's frozen key projection's)."""

    def __init__(self, config: BertConfig, *, add_pooling_layer: bool = True,
                 seed: int | None = None, _tensors: dict | None = None):
        super().__init__()
        init = Weights(_tensors, np.random.default_rng(seed))
        self.config = config
        self.embeddings = BertEmbeddings(config, init)
        self.encoder = BertEncoder(config, init)
        has_pooler = _tensors is None or "pooler.dense.weight" in _tensors
        self.pooler = BertPooler(config, init) if add_pooling_layer and has_pooler else None
        self._init_used = init.used

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, add_pooling_layer: bool = True,
                        seed: int | None = None, **config_overrides) -> BertModel:
        """Load `<directory>/config.json` and `model.safetensors` (a transformers BertModel or
        a Bert*For* task checkpoint, whose `bert.` prefix is dropped). `seed` seeds the
        dropout masks; `config_overrides` replace config fields, e.g.
        `hidden_dropout_prob=0.0`."""
        raw = read_config(directory)
        raw.update(config_overrides)
        config = BertConfig.from_dict(raw)
        tensors = _hf_names(load_safetensors_dir(directory))
        model = cls(config, add_pooling_layer=add_pooling_layer, seed=seed, _tensors=tensors)
        return model

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> np.ndarray:
        input_ids = np.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {input_ids.shape}")
        if token_type_ids is None:
            token_type_ids = np.zeros(input_ids.shape, np.int64)
        if attention_mask is not None and np.shape(attention_mask) != input_ids.shape:
            raise ValueError(f"attention_mask shape {np.shape(attention_mask)} != input_ids "
                             f"shape {input_ids.shape}")
        mask = _key_mask(attention_mask)
        if self.training:
            keep_freed_memory()
        x = self.embeddings(input_ids, token_type_ids)
        first = self.encoder.layer[0].attention.self
        first.need_input_grad = self.embeddings.needs_backward()
        return self.encoder(x, mask)

    def backward(self, dout: np.ndarray) -> None:
        d = self.encoder.backward(np.ascontiguousarray(dout, dtype=np.float32))
        if d is not None:
            self.embeddings.backward(d)
        return None


# ---------------------------------------------------------------------------------------------
# pooling and a classification head


def mean_pool(h: np.ndarray, attention_mask: np.ndarray | None) -> np.ndarray:
    """Mean of the hidden states over unpadded positions: (batch, seq, hidden) -> (batch,
    hidden), as sentence-transformers' mean pooling (count clamped at 1e-9)."""
    if attention_mask is None:
        return h.mean(axis=1)
    m = attention_mask.astype(np.float32)
    summed = np.einsum("bsh,bs->bh", h, m)
    return summed / np.maximum(m.sum(axis=1, keepdims=True), np.float32(1e-9))


def mean_pool_backward(dpooled: np.ndarray, attention_mask: np.ndarray | None,
                       seq: int) -> np.ndarray:
    """The gradient of mean_pool: (batch, hidden) -> (batch, seq, hidden)."""
    if attention_mask is None:
        w = np.full((dpooled.shape[0], seq), 1.0 / seq, np.float32)
    else:
        m = attention_mask.astype(np.float32)
        w = m / np.maximum(m.sum(axis=1, keepdims=True), np.float32(1e-9))
    return w[:, :, None] * dpooled[:, None, :]


def cls_pool(h: np.ndarray) -> np.ndarray:
    """The first ([CLS]) position's hidden state, (batch, hidden)."""
    return h[:, 0]


class BertForSequenceClassification(Module):
    """`bert` (a BertModel), pooling, dropout and a `classifier` Linear: logits (batch,
    num_labels). Paths match transformers' BertForSequenceClassification (`bert.encoder...`,
    `classifier`). pooling: "mean" (sentence-transformers), "cls" (the raw [CLS] state) or
    "pooler" (tanh(dense([CLS])), transformers' choice)."""

    def __init__(self, bert: BertModel, num_labels: int, *, pooling: str = "mean",
                 classifier_dropout: float | None = None, seed: int | None = None):
        super().__init__()
        if pooling not in ("mean", "cls", "pooler"):
            raise ValueError(f"pooling must be 'mean', 'cls' or 'pooler', got {pooling!r}")
        if pooling == "pooler" and bert.pooler is None:
            raise ValueError("pooling='pooler' needs a model with its pooler layer")
        self.bert = bert
        self.pooling = pooling
        self.num_labels = num_labels
        p = bert.config.hidden_dropout_prob if classifier_dropout is None else classifier_dropout
        self.dropout = nn.Dropout(p, rng=np.random.default_rng(seed))
        self.classifier = nn.Linear(bert.config.hidden_size, num_labels,
                                    rng=np.random.default_rng(seed))
        self.classifier.weight.data[...] = 0.02 * np.random.default_rng(seed).standard_normal(
            self.classifier.weight.shape)
        self.classifier.bias.data[...] = 0

    @classmethod
    def from_pretrained(cls, directory, num_labels: int, *, pooling: str = "mean",
                        seed: int | None = None, **config_overrides):
        bert = BertModel.from_pretrained(directory, seed=seed, **config_overrides)
        return cls(bert, num_labels, pooling=pooling, seed=seed)

    def pool(self, h: np.ndarray, attention_mask) -> np.ndarray:
        if self.pooling == "mean":
            return mean_pool(h, attention_mask)
        if self.pooling == "cls":
            return np.ascontiguousarray(cls_pool(h))
        return self.bert.pooler(h)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> np.ndarray:
        h = self.bert(input_ids, attention_mask, token_type_ids)
        self._save(h.shape, None if attention_mask is None else np.asarray(attention_mask))
        return self.classifier(self.dropout(self.pool(h, attention_mask)))

    def backward(self, dlogits: np.ndarray) -> None:
        shape, mask = self._saved()
        dpooled = self.dropout.backward(self.classifier.backward(dlogits))
        if not any(p.requires_grad for p in self.bert.parameters()):
            return None
        if self.pooling == "mean":
            dh = mean_pool_backward(dpooled, mask, shape[1])
        elif self.pooling == "cls":
            dh = np.zeros(shape, np.float32)
            dh[:, 0] = dpooled
        else:
            dh = self.bert.pooler.backward(dpooled, shape)
        self.bert.backward(dh)
        return None
