"""A BERT-family encoder on lora.nn, float32, forward and backward, for LoRA fine-tuning.

`BertModel.from_pretrained(directory)` reads a Hugging Face checkpoint directory (config.json
plus model.safetensors) into modules named exactly as in transformers
(`encoder.layer.0.attention.self.query`, ...), so `lora.wrap(model, target_modules=["query",
"value"])` and PEFT adapter files made for a transformers BertModel apply by name.
`BertForSequenceClassification` adds mean / CLS / pooler pooling and a linear head.

The Linear, Embedding, GELU and LayerNorm layers are lora.nn's (LoRA wraps the Linear ones;
GELU and LayerNorm run the C kernels in lora.functional). What lora.nn has no layer for lives
here: attention's own math (scaled scores, padding mask, softmax, the per-head matmuls) with
its backward. Not here:
decoder/cross-attention, relative position embeddings, key/value caches, gradients for the
token ids.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, fields

import numpy as np

from .. import functional as F
from .. import nn
from ..nn import Module, Parameter

__all__ = [
    "BertConfig", "BertModel", "BertForSequenceClassification", "mean_pool", "cls_pool",
    "load_safetensors_dir",
]


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


def load_safetensors_dir(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of `model.safetensors` (or of the shards that
    `model.safetensors.index.json` lists) as float32 (integer tensors as they are)."""
    from safetensors import safe_open

    directory = os.fspath(directory)
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(directory, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{directory}: no model.safetensors (or its index) found")
    out = {}
    for name in files:
        with safe_open(os.path.join(directory, name), framework="np") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if np.issubdtype(t.dtype, np.floating) and t.dtype != np.float32:
                    t = t.astype(np.float32)
                out[key] = t
    return out


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


class _Init:
    """Hands each layer its arrays: from a checkpoint by name, or freshly initialised as
    transformers does (N(0, 0.02) weights, zero biases, unit LayerNorm)."""

    def __init__(self, tensors: dict | None, rng: np.random.Generator):
        self.tensors, self.rng, self.used = tensors, rng, set()

    def child_rng(self) -> np.random.Generator:
        """A generator for one dropout layer, drawn from the model's seed."""
        return np.random.default_rng(self.rng.integers(0, 2**63))

    def dropout(self, p: float) -> nn.Dropout:
        return nn.Dropout(p, rng=self.child_rng())

    def get(self, name: str, shape: tuple, kind: str) -> np.ndarray:
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

    def linear(self, prefix: str, d_in: int, d_out: int) -> nn.Linear:
        # built at size 1 and then given its arrays, so no throw-away random init is allocated
        lin = nn.Linear(1, 1)
        lin.in_features, lin.out_features = d_in, d_out
        lin.weight = Parameter(self.get(prefix + ".weight", (d_out, d_in), "normal"))
        lin.bias = Parameter(self.get(prefix + ".bias", (d_out,), "zeros"))
        return lin

    def embedding(self, prefix: str, num: int, dim: int, padding_idx=None) -> nn.Embedding:
        emb = nn.Embedding(1, dim)
        emb.num_embeddings, emb.padding_idx = num, padding_idx
        emb.weight = Parameter(self.get(prefix + ".weight", (num, dim), "normal"))
        return emb

    def layer_norm(self, prefix: str, dim: int, eps: float) -> nn.LayerNorm:
        ln = nn.LayerNorm(dim, eps=eps)
        ln.weight = Parameter(self.get(prefix + ".weight", (dim,), "ones"))
        ln.bias = Parameter(self.get(prefix + ".bias", (dim,), "zeros"))
        return ln


# A training step allocates and frees the same large activation arrays every time. glibc
# serves arrays above its mmap threshold with fresh mmap()s, so each step page-faults every
# activation in again (measured: ~1/3 of a MiniLM step). Raising the threshold keeps freed
# blocks in the heap for reuse. Done once, on the first training-mode forward pass; the cost is
# that the process keeps its peak heap instead of returning it to the OS. Opt out with
# LORA_KEEP_FREED_MEMORY=0 in the environment. glibc only; a no-op elsewhere.
_MALLOC_TUNED = False


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to reuse freed large blocks instead of unmapping them (mallopt
    M_MMAP_THRESHOLD = 32 MiB, its maximum; M_TRIM_THRESHOLD = 4 GiB). Returns whether it
    was applied."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED or os.environ.get("LORA_KEEP_FREED_MEMORY", "1") == "0":
        return _MALLOC_TUNED
    _MALLOC_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = mallopt(m_mmap_threshold, 32 << 20) == 1  # glibc caps the threshold at 32 MiB
    ok = mallopt(m_trim_threshold, (1 << 32) - 1) == 1 and ok
    return ok


# ---------------------------------------------------------------------------------------------
# the model, module by module, with transformers' names


def _rows(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1, a.shape[-1])


class BertEmbeddings(Module):
    """word + position + token-type embeddings, then LayerNorm and dropout. backward runs only
    when one of its parameters is trainable (the token ids have no gradient)."""

    def __init__(self, cfg: BertConfig, init: _Init):
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


class _AttentionMask:
    """Which keys each batch item attends to. A right-padded mask (ones, then zeros: what a
    tokenizer produces) becomes per-item key lengths, so padded keys cost no work at all;
    any other mask becomes an additive bias (0 or the most negative float32, not -inf, so a
    row never turns into inf - inf = nan) over all keys."""

    def __init__(self, attention_mask: np.ndarray | None, batch: int, seq: int):
        self.bias = self.padded = None
        self.lengths = np.full(batch, seq, np.int64)
        if attention_mask is None:
            return
        m = np.asarray(attention_mask) > 0
        lengths = m.sum(axis=1)
        if (m == (np.arange(seq) < lengths[:, None])).all() and lengths.min() > 0:
            self.lengths = lengths
            return
        self.padded = ~m.all(axis=1)
        self.bias = np.where(m[:, None, None, :], np.float32(0),
                             np.finfo(np.float32).min).astype(np.float32)


@contextlib.contextmanager
def _single_threaded_blas():
    """Run lora's OpenBLAS on one thread inside the block: the per-head GEMMs (seq x seq x
    head_dim, 128 x 128 x 32 for MiniLM) lose more to waking and syncing a second thread than
    they gain from it."""
    n = int(F.blas_info()["num_threads"])
    if n > 1:
        F.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            F.set_num_threads(n)


class BertSelfAttention(Module):
    """Multi-head scaled dot-product self-attention with a key padding mask.

    query/key/value are Linear layers (what LoRA targets); the attention itself runs on
    contiguous (batch, heads, seq, head_dim) copies of q, k and v, one GEMM per (item, head)
    through lora's kernels, with the softmax done in place on each item's (heads, seq, keys)
    score array, which backward reuses. Scores are q k^T / sqrt(head_dim); a right-padded item
    only has its real keys, any other mask is added as a bias."""

    def __init__(self, cfg: BertConfig, init: _Init, prefix: str):
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

    def _heads(self, a: np.ndarray) -> np.ndarray:
        """(batch, seq, hidden) -> a contiguous (batch, heads, seq, head_dim) copy."""
        b, s, _ = a.shape
        nh, d = self.num_attention_heads, self.attention_head_size
        return np.ascontiguousarray(a.reshape(b, s, nh, d).transpose(0, 2, 1, 3))

    @staticmethod
    def _merge(a: np.ndarray) -> np.ndarray:
        """(batch, heads, seq, head_dim) -> a contiguous (batch, seq, hidden) copy."""
        b, nh, s, d = a.shape
        return a.transpose(0, 2, 1, 3).reshape(b, s, nh * d)

    # Every matmul goes through lora.functional's dense kernels (lora's own OpenBLAS), per
    # (batch item, head): NumPy's matmul would run a second OpenBLAS whose thread pool fights
    # lora's for the cores. With y = dense_forward(x, W) = x W^T and
    # dense_backward(dy, x, W) = (dy W, dy^T x):
    #   scores = q k^T = dense_forward(q, k)       ctx = p v = dense_backward(p, ., v).dx
    #   dp = dctx v^T = dense_forward(dctx, v)     dv = p^T dctx = dense_backward(p, dctx, .).dW
    #   dq = ds k = dense_backward(ds, ., k).dx    dk = ds^T q = dense_backward(ds, q, .).dW

    def forward(self, x: np.ndarray, mask: _AttentionMask) -> np.ndarray:
        b, s, hidden = x.shape
        nh = self.num_attention_heads
        scale = np.float32(1.0 / math.sqrt(self.attention_head_size))
        q = self.query(x)
        q *= scale  # scaling q (b*s*h values) is cheaper than scaling the scores (b*nh*s*s)
        qh = self._heads(q)
        del q
        kh = self._heads(self.key(x))
        vh = self._heads(self.value(x))
        ctxh = np.empty_like(qh)
        p_drop = self.attention_probs_dropout_prob if self.training else 0.0
        inv_keep = np.float32(1.0 / (1.0 - p_drop))
        probs, keeps = [], []

        def scores(i, n):
            # (heads, s, n): every query row against the item's first n keys
            sc = np.empty((nh, s, n), np.float32)
            for h in range(nh):
                sc[h] = F.dense_forward(qh[i, h], kh[i, h, :n])
            if mask.bias is not None and mask.padded[i]:
                sc += mask.bias[i]
            return sc

        def item(i):
            n = int(mask.lengths[i])
            sc = scores(i, n)
            # Softmax, stabilised by each head's largest score rather than each row's: one
            # fast reduction instead of a slow one over short rows. It is exact unless a
            # whole row lies ~87 below its head's maximum (exp underflows to a zero sum);
            # that is detected and the item redone with per-row maxima.
            sc -= sc.reshape(nh, -1).max(axis=1)[:, None, None]
            np.exp(sc, out=sc)
            sums = sc.sum(axis=-1, keepdims=True)
            if not sums.min() > 1e-30:
                sc = scores(i, n)
                sc -= sc.max(axis=-1, keepdims=True)
                np.exp(sc, out=sc)
                sums = sc.sum(axis=-1, keepdims=True)
            sc /= sums
            keep = None
            if p_drop > 0:
                keep = self.rng.random(sc.shape, dtype=np.float32) >= p_drop
            pd = sc if keep is None else sc * keep * inv_keep
            for h in range(nh):
                ctxh[i, h] = F.dense_backward(pd[h], vh[i, h], vh[i, h, :n],
                                              need_dweight=False)[0]
            probs.append(sc)
            keeps.append(keep)

        with _single_threaded_blas():
            for i in range(b):  # serial: two threads calling one OpenBLAS contend for its pool
                item(i)
        self._save(qh, kh, vh, probs, keeps, inv_keep, mask)
        return self._merge(ctxh)

    def backward(self, dctx: np.ndarray) -> np.ndarray | None:
        qh, kh, vh, probs, keeps, inv_keep, mask = self._saved()
        nh = self.num_attention_heads
        dctxh = self._heads(dctx)
        key_grad = self.need_input_grad or any(p.requires_grad for p in self.key.parameters())
        dqh, dkh, dvh = np.empty_like(qh), np.empty_like(kh), np.empty_like(vh)

        def item(i):
            p, keep = probs[i], keeps[i]
            n = p.shape[-1]
            if n < p.shape[1]:  # keys past the item's length get no gradient
                dvh[i, :, n:] = 0
                dkh[i, :, n:] = 0
            pd = p if keep is None else p * keep * inv_keep
            dp = np.empty_like(p)
            for h in range(nh):
                dvh[i, h, :n] = F.dense_backward(pd[h], dctxh[i, h], vh[i, h, :n],
                                                 need_dx=False)[1]
                dp[h] = F.dense_forward(dctxh[i, h], vh[i, h, :n])
            if keep is not None:
                dp *= keep
                dp *= inv_keep
            # softmax backward: ds = p * (dp - sum(dp * p, -1))
            rowdot = np.einsum("hij,hij->hi", dp, p)
            dp -= rowdot[..., None]
            dp *= p
            for h in range(nh):
                dqh[i, h] = F.dense_backward(dp[h], qh[i, h], kh[i, h, :n], need_dweight=False)[0]
                if key_grad:
                    dkh[i, h, :n] = F.dense_backward(dp[h], qh[i, h], kh[i, h, :n],
                                                     need_dx=False)[1]

        with _single_threaded_blas():
            for i in range(len(probs)):
                item(i)
        dq = self._merge(dqh)
        dq *= np.float32(1.0 / math.sqrt(self.attention_head_size))  # q was scaled in forward
        dx = self.query.backward(dq)
        dxv = self.value.backward(self._merge(dvh))
        if dx is not None and dxv is not None:
            dx += dxv
        if key_grad:
            dxk = self.key.backward(self._merge(dkh))
            if dx is not None and dxk is not None:
                dx += dxk
        return dx if self.need_input_grad else None


class BertSelfOutput(Module):
    """LayerNorm(dropout(dense(h)) + input): the projection and residual after attention
    (also the FFN's second half, as BertOutput)."""

    def __init__(self, cfg: BertConfig, init: _Init, prefix: str, d_in: int):
        super().__init__()
        self.dense = init.linear(prefix + ".dense", d_in, cfg.hidden_size)
        self.LayerNorm = init.layer_norm(prefix + ".LayerNorm", cfg.hidden_size, cfg.layer_norm_eps)
        self.dropout = init.dropout(cfg.hidden_dropout_prob)

    def forward(self, h: np.ndarray, residual: np.ndarray) -> np.ndarray:
        y = self.dropout(self.dense(h))
        y += residual
        return self.LayerNorm(y)

    def backward(self, dout: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Returns (d h, d residual)."""
        d = self.LayerNorm.backward(dout)
        return self.dense.backward(self.dropout.backward(d)), d


BertOutput = BertSelfOutput


class BertAttention(Module):
    def __init__(self, cfg: BertConfig, init: _Init, prefix: str):
        super().__init__()
        self.self = BertSelfAttention(cfg, init, prefix + ".self")
        self.output = BertSelfOutput(cfg, init, prefix + ".output", cfg.hidden_size)

    def forward(self, x, mask):
        return self.output(self.self(x, mask), x)

    def backward(self, dout):
        dctx, dres = self.output.backward(dout)
        dx = self.self.backward(dctx)
        if dx is None:
            return None
        dx += dres
        return dx


class BertIntermediate(Module):
    def __init__(self, cfg: BertConfig, init: _Init, prefix: str):
        super().__init__()
        self.dense = init.linear(prefix + ".dense", cfg.hidden_size, cfg.intermediate_size)
        act = cfg.hidden_act
        self.intermediate_act_fn = nn.ReLU() if act == "relu" else nn.GELU(
            "none" if act == "gelu" else "tanh")

    def forward(self, x):
        return self.intermediate_act_fn(self.dense(x))

    def backward(self, dout):
        return self.dense.backward(self.intermediate_act_fn.backward(dout))


class BertLayer(Module):
    def __init__(self, cfg: BertConfig, init: _Init, prefix: str):
        super().__init__()
        self.attention = BertAttention(cfg, init, prefix + ".attention")
        self.intermediate = BertIntermediate(cfg, init, prefix + ".intermediate")
        self.output = BertOutput(cfg, init, prefix + ".output", cfg.intermediate_size)

    def forward(self, x, mask):
        a = self.attention(x, mask)
        return self.output(self.intermediate(a), a)

    def backward(self, dout):
        dh, dres = self.output.backward(dout)
        da = self.intermediate.backward(dh)
        da += dres
        return self.attention.backward(da)


class BertEncoder(Module):
    def __init__(self, cfg: BertConfig, init: _Init):
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

    def __init__(self, cfg: BertConfig, init: _Init):
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
        init = _Init(_tensors, np.random.default_rng(seed))
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
        directory = os.fspath(directory)
        cfg_path = os.path.join(directory, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{cfg_path}: no such file")
        with open(cfg_path, encoding="utf-8") as f:
            raw = json.load(f)
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
        mask = _AttentionMask(attention_mask, *input_ids.shape)
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
