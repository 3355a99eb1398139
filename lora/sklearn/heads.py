"""The task models the estimators train: a base (a pretrained text model loaded from a path,
or a lora.nn module over numbers), a pooling step and a linear head.

`TextModel` keeps transformers' module paths, so the adapter it saves is a PEFT SEQ_CLS
adapter: a BERT encoder sits at `bert` with its head at `classifier` (as
BertForSequenceClassification), a decoder at `model` with its head at `score` (as
LlamaForSequenceClassification). Pooling: "mean" over unpadded tokens (sentence-transformers',
the default for encoders), "cls", "pooler" (BERT's tanh pooler), or "last" (the last non-pad
token, what transformers' sequence classification does for a decoder, and the default there).
`NumericModel` is `base` followed by `classifier`. Not here: training (base.py), input
checking (data.py). Paths load only through lora.models.from_pretrained and the tokenizer
through lora.models.data.Tokenizer, so every format lora.models learns to read works here.
"""

from __future__ import annotations

import numpy as np

from .. import nn
from ..nn import Module

POOLINGS = ("auto", "mean", "cls", "pooler", "last")


def load_backbone(path) -> tuple[Module, str]:
    """(backbone, family) for the pretrained model at `path`: a BERT-family encoder
    ("encoder": called as (ids, mask, token_types), returns hidden states) or a Llama-family
    decoder ("decoder": its LlamaModel without the LM head). ValueError for another model."""
    from .. import models
    from ..models.bert import BertForSequenceClassification, BertModel
    from ..models.llama import LlamaForCausalLM

    loaded = models.from_pretrained(path)
    if isinstance(loaded, BertForSequenceClassification):
        return loaded.bert, "encoder"
    if isinstance(loaded, BertModel):
        return loaded, "encoder"
    if isinstance(loaded, LlamaForCausalLM):
        return loaded.model, "decoder"
    raise ValueError(f"base: {path!r} loaded as a {type(loaded).__name__}; the estimators take "
                     "BERT-family encoders and Llama-family decoders")


def _mean_pool_backward(dpooled, mask, seq):
    w = mask.astype(np.float32)
    w = w / np.maximum(w.sum(axis=1, keepdims=True), np.float32(1e-9))
    return w[:, :, None] * dpooled[:, None, :]


class TextModel(Module):
    """backbone -> pooling -> `head` Linear (n_outputs). forward(batch) takes the dict a
    lora.models.data.Tokenizer returns and gives (batch, n_outputs); `features(batch)` the
    pooled embedding (batch, hidden)."""

    def __init__(self, backbone: Module, family: str, n_outputs: int, pooling: str,
                 rng: np.random.Generator):
        super().__init__()
        if pooling == "auto":
            pooling = "mean" if family == "encoder" else "last"
        if pooling in ("cls", "pooler") and family != "encoder":
            raise ValueError(f"pooling={pooling!r} needs an encoder (BERT); a decoder pools "
                             "'last' or 'mean'")
        if pooling == "pooler" and getattr(backbone, "pooler", None) is None:
            raise ValueError("pooling='pooler': this checkpoint has no pooler layer")
        names = ("bert", "classifier") if family == "encoder" else ("model", "score")
        object.__setattr__(self, "names", names)
        self.family, self.pooling, self.head_width = family, pooling, n_outputs
        hidden = backbone.config.hidden_size
        head = nn.Linear(hidden, n_outputs, rng=rng)
        head.weight.data[...] = 0.02 * rng.standard_normal(head.weight.shape)
        head.bias.data[...] = 0
        setattr(self, names[0], backbone)
        setattr(self, names[1], head)

    @property
    def backbone(self) -> Module:
        return getattr(self, self.names[0])

    @property
    def head(self) -> Module:
        return getattr(self, self.names[1])


    def features(self, batch: dict) -> np.ndarray:
        mask = batch["attention_mask"]
        if self.family == "encoder":
            h = self.backbone(batch["input_ids"], mask, batch.get("token_type_ids"))
        else:
            h = self.backbone(batch["input_ids"], mask)
        self._save(h.shape, mask)
        if self.pooling == "mean":
            m = mask.astype(np.float32)
            return np.einsum("bsh,bs->bh", h, m) / np.maximum(m.sum(1, keepdims=True), 1e-9)
        if self.pooling == "cls":
            return np.ascontiguousarray(h[:, 0])
        if self.pooling == "pooler":
            return self.backbone.pooler(h)
        last = _last_positions(mask)
        return np.ascontiguousarray(h[np.arange(len(h)), last])

    def forward(self, batch: dict) -> np.ndarray:
        return self.head(self.features(batch))

    def backward(self, dout: np.ndarray) -> None:
        shape, mask = self._saved()
        dpooled = self.head.backward(dout)
        if not any(p.requires_grad for p in self.backbone.parameters()):
            return None
        dpooled = np.asarray(dpooled, np.float32)
        if self.pooling == "mean":
            dh = _mean_pool_backward(dpooled, mask, shape[1])
        elif self.pooling == "pooler":
            dh = self.backbone.pooler.backward(dpooled, shape)
        else:
            dh = np.zeros(shape, np.float32)
            rows = np.arange(shape[0])
            dh[rows, 0 if self.pooling == "cls" else _last_positions(mask)] = dpooled
        self.backbone.backward(np.ascontiguousarray(dh, dtype=np.float32))
        return None


def _last_positions(mask: np.ndarray) -> np.ndarray:
    """Index of the rightmost unpadded token of each row (0 for an all-padding row), as
    transformers' sequence classification finds the last non-pad token."""
    positions = np.arange(mask.shape[1])
    return (positions[None, :] * (mask > 0)).argmax(axis=1)


class NumericModel(Module):
    """`base` (any lora.nn module mapping (n, d_in) to (n, d)) -> `classifier` Linear."""

    def __init__(self, base: Module, n_features: int, n_outputs: int, rng: np.random.Generator,
                 dtype):
        super().__init__()
        self.base = base
        self.head_width = n_outputs
        self.classifier = nn.Linear(n_features, n_outputs, rng=rng, dtype=dtype)

    def features(self, x: np.ndarray) -> np.ndarray:
        h = self.base(x)
        return h.reshape(len(x), -1) if h.ndim != 2 else h

    def forward(self, x: np.ndarray) -> np.ndarray:
        h = self.base(x)
        object.__setattr__(self, "_shape", h.shape)
        return self.classifier(h.reshape(len(x), -1))

    def backward(self, dout: np.ndarray) -> None:
        dh = self.classifier.backward(dout)
        if any(p.requires_grad for p in self.base.parameters()):
            self.base.backward(np.asarray(dh).reshape(self._shape))
        return None
