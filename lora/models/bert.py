"""A BERT-family encoder on lora.nn, float32, forward and backward, for LoRA fine-tuning.

`BertModel.from_pretrained(directory)` reads a Hugging Face checkpoint directory (config.json
plus model.safetensors) into modules named exactly as in transformers
(`encoder.layer.0.attention.self.query`, ...), so `lora.wrap(model, target_modules=["query",
"value"])` and PEFT adapter files made for a transformers BertModel apply by name.
`BertForSequenceClassification` is transformers' classifier (the pooler, dropout and a linear
`classifier`; mean or CLS pooling by name), loaded head included from a transformers
checkpoint. Loaded models come back in eval mode, as transformers returns them; a training
loop calls `model.train()`. `save_pretrained` writes a (fine-tuned, LoRA merged) model back in
transformers' layout; `encode` gives sentence embeddings as sentence-transformers does and
`predict_proba` class probabilities, both from texts.

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
from .._checks import check_fields
from ..nn import Module
from ..tuners.adapters import takes_adapter_names
from ..tuners.wrap import merged_state_dict
from .hf import (
    Weights,
    check_model_type,
    load_safetensors_dir,
    read_config,
)
from .hf import save_pretrained as _save_pretrained
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
    pad_token_id: int | None = 0
    position_embedding_type: str = "absolute"
    classifier_dropout: float | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BertConfig: {name} must be a positive integer, got {value!r}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
            value = getattr(self, name)
            if value is None and name == "classifier_dropout":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not 0.0 <= value < 1.0:
                raise ValueError(f"BertConfig: {name} must be a probability in [0, 1), "
                                 f"got {value!r}")
        if not (isinstance(self.layer_norm_eps, (int, float)) and self.layer_norm_eps > 0):
            raise ValueError(f"BertConfig: layer_norm_eps must be positive, got "
                             f"{self.layer_norm_eps!r}")
        if self.pad_token_id is not None and not (
                isinstance(self.pad_token_id, int) and 0 <= self.pad_token_id < self.vocab_size):
            raise ValueError(f"BertConfig: pad_token_id must be in [0, vocab_size="
                             f"{self.vocab_size}), got {self.pad_token_id!r}")
        if self.position_embedding_type != "absolute":
            raise NotImplementedError(
                f"position_embedding_type={self.position_embedding_type!r}: only 'absolute'")
        if self.hidden_act not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu"):
            raise NotImplementedError(f"hidden_act={self.hidden_act!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"BertConfig: hidden_size {self.hidden_size} must be a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, d: dict) -> BertConfig:
        """From a config.json dict: the fields above are read, its other keys (transformers'
        bookkeeping, `architectures`, `id2label`, ...) are ignored. ValueError for an impossible
        value (a zero size, a dropout of 1)."""
        names = set(cls.field_names())
        return cls(**{k: v for k, v in d.items() if k in names})

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
        self.name_or_path: str | None = None  # the checkpoint directory, set by from_pretrained
        self.hf_config: dict = {}  # its config.json, for save_pretrained

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, add_pooling_layer: bool = True,
                        seed: int | None = None, **config_overrides) -> BertModel:
        """Load `<directory>/config.json` and `model.safetensors` (a transformers BertModel or
        a Bert*For* task checkpoint, whose `bert.` prefix is dropped), in eval mode (dropout
        off, as transformers returns it; call `model.train()` to fine-tune). `seed` seeds the
        dropout masks; `config_overrides` replace BertConfig fields, e.g.
        `hidden_dropout_prob=0.0`: TypeError for a name that is not one (naming the closest),
        ValueError for an impossible value. ValueError naming the model_type and its loader for
        a checkpoint of another architecture (a Llama, a GPT-2)."""
        model, _ = cls._load(directory, add_pooling_layer, seed, config_overrides,
                             "BertModel.from_pretrained")
        return model.eval()

    @classmethod
    def _load(cls, directory, add_pooling_layer, seed, overrides, where):
        """(model, tensors): the encoder of the checkpoint in `directory`, and every tensor of
        it under transformers' BertModel names (a task model's head keeps its own)."""
        raw = read_config(directory)
        check_model_type(raw, directory, where, ("bert",))
        check_fields(where, overrides, BertConfig.field_names())
        raw.update(overrides)
        config = BertConfig.from_dict(raw)
        tensors = _hf_names(load_safetensors_dir(directory))
        model = cls(config, add_pooling_layer=add_pooling_layer, seed=seed, _tensors=tensors)
        model.name_or_path, model.hf_config = os.fspath(directory), raw
        return model, tensors

    def config_dict(self) -> dict:
        """config.json for this model: the checkpoint's (when loaded from one) with the
        config's fields as they are now."""
        d = {k: v for k, v in self.hf_config.items() if k not in ("architectures", "_name_or_path")}
        d.update({f.name: getattr(self.config, f.name) for f in fields(self.config)})
        d.update(model_type="bert", architectures=["BertModel"])
        return d

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the model in transformers' layout: config.json and model.safetensors (LoRA
        layers merged into the saved weights; the model itself is left as it is), plus the
        tokenizer files of the checkpoint it came from, so that `from_pretrained` here and
        transformers' `BertModel.from_pretrained` load it."""
        _save_pretrained(directory, self.config_dict(), merged_state_dict(self),
                         source=self.name_or_path)

    @property
    def tokenizer(self):
        """A lora.models.data.Tokenizer for the checkpoint directory (made on first use;
        needs the `tokenizers` package and the directory's tokenizer.json)."""
        tok = self.__dict__.get("_tokenizer")
        if tok is None:
            if self.name_or_path is None:
                raise ValueError("the model was not loaded from a directory: pass tokenizer=")
            from .data import Tokenizer

            tok = Tokenizer(self.name_or_path)
            object.__setattr__(self, "_tokenizer", tok)
        return tok

    def encode(self, texts, *, batch_size: int = 32, normalize_embeddings: bool | None = None,
               tokenizer=None) -> np.ndarray:
        """Sentence embeddings (len(texts), hidden_size) float32, as sentence-transformers'
        `SentenceTransformer(directory).encode(texts)` gives them: the pooling its
        1_Pooling/config.json names (mean over tokens when there is none), L2-normalised when
        its modules.json has a Normalize step (or as `normalize_embeddings` says), texts
        truncated at sentence_bert_config.json's max_seq_length (else the tokenizer's limit).
        Runs in eval mode and leaves the mode as it was."""
        if isinstance(texts, str):
            texts = [texts]
        tok = tokenizer if tokenizer is not None else self.tokenizer
        pooling, normalize, max_length = _sentence_transformers_setup(self.name_or_path)
        if normalize_embeddings is not None:
            normalize = normalize_embeddings
        was_training = self.training
        self.eval()
        try:
            out = []
            for i in range(0, len(texts), batch_size):
                enc = tok(list(texts[i:i + batch_size]), max_length=max_length)
                h = self(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
                out.append(cls_pool(h) if pooling == "cls" else mean_pool(h, enc["attention_mask"]))
        finally:
            self.train(was_training)
        e = np.concatenate(out) if out else np.zeros((0, self.config.hidden_size), np.float32)
        if normalize:
            e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), np.float32(1e-12))
        return e.astype(np.float32, copy=False)

    @takes_adapter_names
    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> np.ndarray:
        """The last hidden states (batch, seq, hidden); adapter_names= (one adapter name per
        row of the batch) runs a mixed-adapter batch, see lora.adapter_names."""
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


def _sentence_transformers_setup(directory) -> tuple[str, bool, int | None]:
    """(pooling "mean" or "cls", normalize, max_seq_length) from a sentence-transformers model
    directory's modules.json, 1_Pooling/config.json and sentence_bert_config.json; ("mean",
    False, None) for a plain transformers checkpoint, as sentence-transformers builds it."""
    pooling, normalize, max_length = "mean", False, None
    if directory is None:
        return pooling, normalize, max_length

    def read(*parts):
        path = os.path.join(os.fspath(directory), *parts)
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    for module in read("modules.json") or []:
        kind = str(module.get("type", ""))
        if kind.endswith(".Normalize"):
            normalize = True
        elif kind.endswith(".Pooling"):
            cfg = read(module.get("path", ""), "config.json") or {}
            if cfg.get("pooling_mode_cls_token") and not cfg.get("pooling_mode_mean_tokens"):
                pooling = "cls"
            elif not cfg.get("pooling_mode_mean_tokens", True):
                raise NotImplementedError(f"{directory}: sentence-transformers pooling {cfg}; "
                                          "encode supports mean and CLS pooling")
    max_length = (read("sentence_bert_config.json") or {}).get("max_seq_length")
    return pooling, normalize, max_length


POOLINGS = ("pooler", "mean", "cls")


class BertForSequenceClassification(Module):
    """`bert` (a BertModel), pooling, dropout and a `classifier` Linear: logits (batch,
    num_labels), as transformers' BertForSequenceClassification, whose module paths it has
    (`bert.encoder...`, `classifier`), so its checkpoints and PEFT's SEQ_CLS adapters load by
    name. pooling: "pooler" (tanh(dense([CLS])), transformers' and the default), "mean"
    (sentence-transformers') or "cls" (the raw [CLS] state). The dropout before the
    classifier is config.classifier_dropout, else hidden_dropout_prob, as in transformers;
    the head starts N(0, 0.02) with zero bias."""

    def __init__(self, bert: BertModel, num_labels: int = 2, *, pooling: str = "pooler",
                 classifier_dropout: float | None = None, seed: int | None = None,
                 _head: tuple | None = None):
        super().__init__()
        if isinstance(num_labels, bool) or not isinstance(num_labels, (int, np.integer)) \
                or num_labels < 1:
            raise ValueError(f"BertForSequenceClassification: num_labels must be a positive "
                             f"integer, got {num_labels!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be 'pooler', 'mean' or 'cls', got {pooling!r}")
        if pooling == "pooler" and bert.pooler is None:
            raise ValueError("pooling='pooler' needs a model with its pooler layer (this "
                             "checkpoint has none): pass pooling='mean' or 'cls'")
        self.bert = bert
        self.pooling = pooling
        self.num_labels = int(num_labels)
        if classifier_dropout is None:
            classifier_dropout = bert.config.classifier_dropout
        p = bert.config.hidden_dropout_prob if classifier_dropout is None else classifier_dropout
        self.dropout = nn.Dropout(p, rng=np.random.default_rng(seed))
        self.classifier = nn.Linear(bert.config.hidden_size, self.num_labels,
                                    rng=np.random.default_rng(seed))
        if _head is not None:
            self.classifier.weight.data[...], self.classifier.bias.data[...] = _head
        else:
            self.classifier.weight.data[...] = 0.02 * np.random.default_rng(seed).standard_normal(
                self.classifier.weight.shape)
            self.classifier.bias.data[...] = 0

    @classmethod
    def from_pretrained(cls, directory, num_labels: int | None = None, *,
                        pooling: str | None = None, seed: int | None = None,
                        **config_overrides) -> BertForSequenceClassification:
        """The encoder of `directory` (any BERT checkpoint, see BertModel.from_pretrained) and
        a classifier head: the checkpoint's own `classifier` when it has one (a transformers
        BertForSequenceClassification, or one saved by save_pretrained), else a new one of
        `num_labels` classes (default: config.json's id2label count, else 2). `pooling`
        defaults to the one the checkpoint was saved with (save_pretrained records it), else
        "pooler". In eval mode; TypeError/ValueError for unknown or impossible overrides."""
        where = "BertForSequenceClassification.from_pretrained"
        bert, tensors = BertModel._load(directory, True, seed, config_overrides, where)
        raw = bert.hf_config
        head = None
        if "classifier.weight" in tensors:
            w, b = tensors["classifier.weight"], tensors.get("classifier.bias")
            if w.ndim != 2 or w.shape[1] != bert.config.hidden_size or b is None \
                    or b.shape != (w.shape[0],):
                raise ValueError(f"{where}: the checkpoint's classifier has shape {w.shape} "
                                 f"(bias {None if b is None else b.shape}); expected "
                                 f"(num_labels, {bert.config.hidden_size})")
            if num_labels is not None and num_labels != w.shape[0]:
                raise ValueError(f"{where}: the checkpoint's classifier has {w.shape[0]} "
                                 f"labels, num_labels={num_labels} was asked for")
            num_labels, head = w.shape[0], (w, b)
        elif num_labels is None:
            num_labels = len(raw["id2label"]) if raw.get("id2label") else raw.get("num_labels", 2)
        model = cls(bert, num_labels, pooling=pooling or raw.get("lora_pooling", "pooler"),
                    seed=seed, _head=head)
        id2label = raw.get("id2label") or {}
        if len(id2label) == model.num_labels:
            model.id2label = {int(k): v for k, v in id2label.items()}
        return model.eval()

    id2label: dict | None = None

    def config_dict(self) -> dict:
        d = self.bert.config_dict()
        id2label = self.id2label or {i: f"LABEL_{i}" for i in range(self.num_labels)}
        d.update(architectures=["BertForSequenceClassification"],
                 id2label={str(k): v for k, v in id2label.items()},
                 label2id={v: int(k) for k, v in id2label.items()},
                 classifier_dropout=self.dropout.p, lora_pooling=self.pooling)
        d.pop("num_labels", None)
        return d

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the whole fine-tuned classifier in transformers' BertForSequenceClassification
        layout: config.json (id2label, classifier_dropout, and `lora_pooling`, which
        from_pretrained reads back) and model.safetensors with `bert.*` and `classifier.*`
        (LoRA merged into the weights, a trained modules_to_save head in place of the
        original; the model itself is left as it is), plus the tokenizer files. transformers
        loads it and gives the same logits when pooling is "pooler" (its only pooling)."""
        _save_pretrained(directory, self.config_dict(), merged_state_dict(self),
                         source=self.bert.name_or_path)

    def pool(self, h: np.ndarray, attention_mask) -> np.ndarray:
        if self.pooling == "mean":
            return mean_pool(h, attention_mask)
        if self.pooling == "cls":
            return np.ascontiguousarray(cls_pool(h))
        return self.bert.pooler(h)

    @takes_adapter_names
    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> np.ndarray:
        """The logits (batch, num_labels); adapter_names= as BertModel.forward."""
        if attention_mask is not None:
            attention_mask = np.asarray(attention_mask)
        h = self.bert(input_ids, attention_mask, token_type_ids)
        self._save(h.shape, attention_mask)
        return self.classifier(self.dropout(self.pool(h, attention_mask)))

    def predict_proba(self, texts, *, batch_size: int = 32, tokenizer=None) -> np.ndarray:
        """Class probabilities (len(texts), num_labels) float32, the softmax of the logits, for
        a list of texts (tokenized with the checkpoint's tokenizer, or `tokenizer`) or a dict
        of arrays as a Tokenizer returns them. Runs in eval mode and leaves the mode as it
        was."""
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(texts, dict):
            batches = [texts]
        else:
            tok = tokenizer if tokenizer is not None else self.bert.tokenizer
            texts = list(texts)
            batches = [tok(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
        was_training = self.training
        self.eval()
        try:
            logits = [self(b["input_ids"], b.get("attention_mask"), b.get("token_type_ids"))
                      for b in batches]
        finally:
            self.train(was_training)
        z = np.concatenate(logits) if logits else np.zeros((0, self.num_labels), np.float32)
        z = z - z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return (p / p.sum(axis=1, keepdims=True)).astype(np.float32, copy=False)

    def predict(self, texts, **kwargs) -> np.ndarray:
        """The most probable class of each text, (len(texts),) int64; see predict_proba."""
        return self.predict_proba(texts, **kwargs).argmax(axis=1)

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
