"""Llama-family causal language models on lora.nn, float32, forward and backward, for LoRA
fine-tuning: Llama, Mistral and Qwen2 checkpoints from Hugging Face directories or GGUF files.

`LlamaForCausalLM.from_pretrained(directory)` builds modules named exactly as transformers'
(`model.layers.0.self_attn.q_proj`, `model.layers.0.mlp.gate_proj`, `lm_head`), so
`lora.wrap(model, target_modules=["q_proj", "v_proj"])` and PEFT adapters made for a
transformers model apply by name. `model(input_ids, attention_mask=None)` returns the logits
(batch, seq, vocab); `model.backward(dlogits)` accumulates the gradients of every trainable
parameter; `lora.nn.causal_lm_loss` gives the loss and dlogits.

The Linear and Embedding layers are lora.nn's (LoRA wraps the Linear ones); RMSNorm, the
rotary embedding, SwiGLU and causal grouped-query attention are the C kernels of
lora.functional. The rotary tables (rope_theta, the "linear" and "llama3" rope_scaling kinds)
are computed here, as transformers' modeling_rope_utils does. `model.generate(...)` (greedy and
sampled decoding with a KV cache) is lora.models.generation's; reading a GGUF file
(`from_pretrained("model.gguf")`) is lora.models.gguf's.
`model.gradient_checkpointing_enable()` has each decoder layer recompute its forward in
backward instead of holding its activations. `save_pretrained` writes transformers' layout,
LoRA merged. `model(ids, labels=labels)` returns the loss, lm_head and the cross-entropy
fused in chunks (lora.functional.linear_cross_entropy). Not here (yet): Mistral's sliding
window beyond its length (refused), gradients for the token ids.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields

import numpy as np

from .. import functional as F
from .. import nn
from ..nn import Module
from ..tuners.adapters import adapter_names as adapter_rows
from ..tuners.adapters import takes_adapter_names
from ..tuners.wrap import merged_state_dict
from .gguf import is_gguf
from .gguf import load_llama as load_gguf
from .hf import Weights, load_safetensors_dir, read_config
from .hf import save_pretrained as _save_pretrained
from .memory import keep_freed_memory

__all__ = ["LlamaConfig", "LlamaModel", "LlamaForCausalLM", "rope_inv_freq", "rope_tables"]

MODEL_TYPES = ("llama", "mistral", "qwen2")


# ---------------------------------------------------------------------------------------------
# config


@dataclass
class LlamaConfig:
    """The fields of transformers' LlamaConfig the model uses (same names, same defaults).
    num_key_value_heads and head_dim default to num_attention_heads and
    hidden_size // num_attention_heads. Qwen2 checkpoints (model_type "qwen2") always carry
    q/k/v biases; `qkv_bias` says whether this one does."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    model_type: str = "llama"
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"LlamaConfig: model_type {self.model_type!r} is not one of "
                             f"{', '.join(MODEL_TYPES)}")
        if self.hidden_act != "silu":
            raise ValueError(f"LlamaConfig: hidden_act {self.hidden_act!r} is not supported "
                             "(only 'silu', the SwiGLU MLP)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"LlamaConfig: num_key_value_heads {self.num_key_value_heads} must "
                             f"divide num_attention_heads {self.num_attention_heads}")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig: head_dim must be even, got {self.head_dim}")
        rope_inv_freq(self)  # refuses an unknown rope_scaling here, not at the first forward

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias or self.model_type == "qwen2"

    @property
    def o_bias(self) -> bool:
        return self.attention_bias

    @classmethod
    def from_dict(cls, d: dict) -> LlamaConfig:
        """From a config.json dict. transformers 5 writes rope_theta and the scaling inside
        `rope_parameters`; both forms are read."""
        d = dict(d)
        rope = d.get("rope_parameters")
        if isinstance(rope, dict):
            if "rope_theta" in rope:
                d["rope_theta"] = rope["rope_theta"]
            kind = rope.get("rope_type", rope.get("type", "default"))
            if kind != "default":
                d["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        if d.get("model_type") == "qwen2" and not d.get("use_sliding_window", False):
            d["sliding_window"] = None
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ---------------------------------------------------------------------------------------------
# rotary position embedding


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """The (head_dim / 2,) inverse frequencies theta^(-2i/d), scaled as rope_scaling says:
    "linear" divides them by factor; "llama3" (Llama 3.1) divides the low frequencies by
    factor, keeps the high ones and interpolates between (transformers'
    _compute_llama3_parameters). float64."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    rs = cfg.rope_scaling
    if not rs:
        return inv
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / float(rs["factor"])
    if kind == "llama3":
        factor, low, high = float(rs["factor"]), float(rs["low_freq_factor"]), float(
            rs["high_freq_factor"])
        old = float(rs.get("original_max_position_embeddings") or cfg.max_position_embeddings)
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled)
    raise ValueError(f"LlamaConfig: rope_scaling type {kind!r} is not supported "
                     "(default, linear, llama3)")


def rope_tables(inv_freq: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin, float32, of shape positions.shape + (head_dim,): the angles position *
    inv_freq, repeated for the two halves (transformers' cat((freqs, freqs), -1))."""
    angles = np.asarray(positions, np.float64)[..., None] * inv_freq
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# layers


class LlamaRMSNorm(Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last axis (lora.functional.rms_norm_*)."""

    def __init__(self, weight: np.ndarray, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.variance_epsilon = eps
        self.need_input_grad = True

    def forward(self, x: np.ndarray) -> np.ndarray:
        y, rstd = F.rms_norm_forward(x, self.weight.data, eps=self.variance_epsilon)
        self._save(x, rstd)
        return y

    def backward(self, dout: np.ndarray) -> np.ndarray:
        x, rstd = self._saved()
        dx, dw = F.rms_norm_backward(dout, x, rstd, self.weight.data,
                                     need_dweight=self.weight.requires_grad)
        if dw is not None:
            self.weight.accumulate(dw)
        return dx

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}"


class LlamaAttention(Module):
    """Causal grouped-query self-attention: q/k/v projections, the rotary embedding applied in
    place to q and k, lora.functional.causal_attention_forward/backward (tiled, keeping only
    each row's log-sum-exp for the backward), and o_proj, which adds the residual in the pass
    that writes its output."""

    def __init__(self, cfg: LlamaConfig, init: Weights, prefix: str):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_key_value_heads, self.head_dim = (
            cfg.num_attention_heads, cfg.num_key_value_heads, d)
        self.q_proj = init.linear(prefix + ".q_proj", h, self.num_heads * d, cfg.qkv_bias)
        self.k_proj = init.linear(prefix + ".k_proj", h, self.num_key_value_heads * d,
                                  cfg.qkv_bias)
        self.v_proj = init.linear(prefix + ".v_proj", h, self.num_key_value_heads * d,
                                  cfg.qkv_bias)
        self.o_proj = init.linear(prefix + ".o_proj", self.num_heads * d, h, cfg.o_bias)
        self.need_input_grad = True

    def forward(self, x, residual, cos, sin, mask):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        F.rope_forward(q, cos, sin, self.num_heads)
        F.rope_forward(k, cos, sin, self.num_key_value_heads)
        ctx, lse = F.causal_attention_forward(q, k, v, self.num_heads, self.num_key_value_heads,
                                              key_mask=mask)
        self._save(q, k, v, ctx, lse, cos, sin, mask)
        return self.o_proj(ctx, residual=residual)

    def backward(self, dout: np.ndarray) -> np.ndarray | None:
        """d x (None without need_input_grad); the residual's gradient is dout itself."""
        q, k, v, ctx, lse, cos, sin, mask = self._saved()
        dctx = self.o_proj.backward(dout)
        dq, dk, dv = F.causal_attention_backward(dctx, q, k, v, ctx, lse, self.num_heads,
                                                 self.num_key_value_heads, key_mask=mask)
        del q, k, v, ctx, lse, dctx
        F.rope_backward(dq, cos, sin, self.num_heads)
        F.rope_backward(dk, cos, sin, self.num_key_value_heads)
        dx = None
        for proj, g in ((self.q_proj, dq), (self.k_proj, dk), (self.v_proj, dv)):
            trainable = any(p.requires_grad for p in proj.parameters())
            if not (self.need_input_grad or trainable):
                continue
            proj.need_input_grad = self.need_input_grad
            out = proj.backward(g, add_dx_to=dx)
            dx = out if self.need_input_grad else None
        return dx


class LlamaMLP(Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x)), the residual added by down_proj."""

    def __init__(self, cfg: LlamaConfig, init: Weights, prefix: str):
        super().__init__()
        h, m = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = init.linear(prefix + ".gate_proj", h, m, cfg.mlp_bias)
        self.up_proj = init.linear(prefix + ".up_proj", h, m, cfg.mlp_bias)
        self.down_proj = init.linear(prefix + ".down_proj", m, h, cfg.mlp_bias)

    def forward(self, x, residual):
        gate, up = self.gate_proj(x), self.up_proj(x)
        self._save(gate, up)
        return self.down_proj(F.swiglu_forward(gate, up), residual=residual)

    def backward(self, dout):
        gate, up = self._saved()
        dgate, dup = F.swiglu_backward(self.down_proj.backward(dout), gate, up)
        del gate, up
        return self.up_proj.backward(dup, add_dx_to=self.gate_proj.backward(dgate))


class LlamaDecoderLayer(Module):
    """h = x + attn(input_layernorm(x)); out = h + mlp(post_attention_layernorm(h))."""

    def __init__(self, cfg: LlamaConfig, init: Weights, prefix: str):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, init, prefix + ".self_attn")
        self.mlp = LlamaMLP(cfg, init, prefix + ".mlp")
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = LlamaRMSNorm(init.get(prefix + ".input_layernorm.weight", (h,),
                                                     "ones"), eps)
        self.post_attention_layernorm = LlamaRMSNorm(
            init.get(prefix + ".post_attention_layernorm.weight", (h,), "ones"), eps)
        self.need_input_grad = True
        self.gradient_checkpointing = False

    def forward(self, x, cos, sin, mask):
        if self.training and self.gradient_checkpointing:
            # keep the input and the random generators' states only; backward recomputes
            states = _rng_states(self)
            out = self._forward(x, cos, sin, mask)
            for m in self.modules():
                object.__setattr__(m, "_cache", None)
            self._save(x, cos, sin, mask, states)
            return out
        return self._forward(x, cos, sin, mask)

    def _forward(self, x, cos, sin, mask):
        h = self.self_attn(self.input_layernorm(x), x, cos, sin, mask)
        return self.mlp(self.post_attention_layernorm(h), h)

    def backward(self, dout):
        if self.__dict__.get("_cache") is not None:  # checkpointed: the forward again
            x, cos, sin, mask, states = self._saved()
            _set_rng_states(states)  # the same dropout masks as the first time
            self._forward(x, cos, sin, mask)
            del x
        dh = self.post_attention_layernorm.backward(self.mlp.backward(dout))
        dh += dout
        self.self_attn.need_input_grad = (self.need_input_grad or
                                          self.input_layernorm.weight.requires_grad)
        dn = self.self_attn.backward(dh)
        if dn is None:
            return None
        if not self.need_input_grad:
            self.input_layernorm.backward(dn)  # its weight's gradient only
            return None
        dx = self.input_layernorm.backward(dn)
        dx += dh
        return dx


def _rng_states(module: Module) -> list:
    """(generator, its state) for every numpy Generator the module's layers draw from (the
    dropout masks' seeds), so that a recomputed forward draws the same ones."""
    return [(g, g.bit_generator.state) for m in module.modules() for g in vars(m).values()
            if isinstance(g, np.random.Generator)]


def _set_rng_states(states: list) -> None:
    for g, state in states:
        g.bit_generator.state = state


def _key_mask(attention_mask, shape) -> np.ndarray | None:
    if attention_mask is None:
        return None
    m = np.asarray(attention_mask)
    if m.shape != shape:
        raise ValueError(f"attention_mask shape {m.shape} != input_ids shape {shape}")
    m = m > 0
    return None if m.all() else m


class LlamaModel(Module):
    """The decoder: embed_tokens, the layers, the final norm. `model(input_ids,
    attention_mask=None, position_ids=None)` returns the last hidden state (batch, seq,
    hidden). Positions are 0 .. seq-1, as transformers' forward without position_ids (also
    for a left-padded batch); position_ids (batch, seq) give each item its own."""

    def __init__(self, cfg: LlamaConfig, init: Weights):
        super().__init__()
        self.config = cfg
        self.embed_tokens = init.embedding("model.embed_tokens", cfg.vocab_size,
                                           cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, init, f"model.layers.{i}")
                                    for i in range(cfg.num_hidden_layers))
        self.norm = LlamaRMSNorm(init.get("model.norm.weight", (cfg.hidden_size,), "ones"),
                                 cfg.rms_norm_eps)
        object.__setattr__(self, "inv_freq", rope_inv_freq(cfg))

    @takes_adapter_names
    def forward(self, input_ids, attention_mask=None, position_ids=None) -> np.ndarray:
        input_ids = np.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {input_ids.shape}")
        b, s = input_ids.shape
        sw = self.config.sliding_window
        if sw is not None and s > sw:
            raise NotImplementedError(f"sequence length {s} exceeds sliding_window {sw}, "
                                      "which this model does not implement")
        mask = _key_mask(attention_mask, input_ids.shape)
        if position_ids is None:
            cos, sin = rope_tables(self.inv_freq, np.arange(s))
        else:
            position_ids = np.asarray(position_ids)
            if position_ids.shape != (b, s):
                raise ValueError(f"position_ids shape {position_ids.shape} != {(b, s)}")
            cos, sin = rope_tables(self.inv_freq, position_ids)
        if self.training:
            keep_freed_memory()
        x = self.embed_tokens(input_ids)
        self.layers[0].need_input_grad = self.embed_tokens.weight.requires_grad
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.norm(x)

    def backward(self, dout: np.ndarray) -> None:
        d = self.norm.backward(np.ascontiguousarray(dout, dtype=np.float32))
        for layer in reversed(list(self.layers)):
            d = layer.backward(d)
            if d is None:
                return None
        self.embed_tokens.backward(d)
        return None


class LlamaForCausalLM(Module):
    """A Llama-family causal LM: `model(input_ids, attention_mask=None)` -> logits (batch, seq,
    vocab) float32; `model.backward(dlogits)` accumulates every trainable parameter's gradient.
    With tie_word_embeddings, lm_head holds the embedding's Parameter itself (one array, one
    gradient)."""

    def __init__(self, config: LlamaConfig, *, seed: int | None = None,
                 _tensors: dict | None = None):
        super().__init__()
        init = Weights(_tensors, np.random.default_rng(seed))
        self.config = config
        self.model = LlamaModel(config, init)
        emb = self.model.embed_tokens
        if config.tie_word_embeddings and isinstance(emb, nn.QuantEmbedding):
            self.lm_head = nn.QuantLinear(emb.qweight, dtype=emb.compute_dtype)
            self.lm_head.weight = emb.weight  # the same blocks
        elif config.tie_word_embeddings:
            self.lm_head = nn.Linear.from_arrays(emb.weight.data)
            self.lm_head.weight = emb.weight
        else:
            self.lm_head = init.linear("lm_head", config.hidden_size, config.vocab_size, False)
        self._init_used = init.used
        self.name_or_path: str | None = None  # the checkpoint it came from, for its tokenizer
        self.hf_config: dict = {}  # that checkpoint's config.json, for save_pretrained

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, keep_quantized: bool = False,
                        **config_overrides) -> LlamaForCausalLM:
        """Load `<directory>/config.json` (model_type llama, mistral or qwen2) and its
        safetensors weights (float32, float16 or bfloat16, one file or shards), or a `.gguf`
        file (llama or qwen2; lora.models.gguf dequantizes it to float32), in eval mode.
        keep_quantized (GGUF only): the attention and MLP projections stay in the file's
        blocks (lora.nn.QuantLinear over the memory-mapped file; QLoRA trains LoRA on top).
        `config_overrides` replace config fields."""
        if is_gguf(directory):
            return load_gguf(cls, directory, keep_quantized, **config_overrides)
        if keep_quantized:
            raise ValueError(f"{os.fspath(directory)}: keep_quantized applies to a GGUF file's "
                             "blocks; quantize a float model with lora.quantize_model(model, "
                             "qtype)")
        raw = read_config(directory)
        raw.update(config_overrides)
        kind = raw.get("model_type")
        if kind not in MODEL_TYPES:
            raise ValueError(f"{os.fspath(directory)}: model_type {kind!r} is not a Llama-family "
                             f"model ({', '.join(MODEL_TYPES)})")
        config = LlamaConfig.from_dict(raw)
        tensors = load_safetensors_dir(directory)
        if config.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)
        model = cls(config, _tensors=tensors)
        model.name_or_path = os.fspath(directory)
        model.hf_config = raw
        unused = sorted(set(tensors) - model._init_used - {
            n for n in tensors if n.endswith("rotary_emb.inv_freq")})
        if unused:
            raise ValueError(f"{os.fspath(directory)}: checkpoint tensors the model has no place "
                             f"for: {', '.join(unused[:5])}{' ...' if len(unused) > 5 else ''}")
        return model.eval()

    @takes_adapter_names
    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None):
        """The logits (batch, seq, vocab); adapter_names= (one adapter name per row of the
        batch) runs a mixed-adapter batch (lora.adapter_names). With `labels` (batch, seq),
        the causal-LM loss
        instead (a float: position t predicts labels[:, t + 1], -100 ignored, the mean over
        the counted tokens, as transformers), and `backward()` with no argument then
        backpropagates it. The loss is fused with lm_head (lora.functional.
        linear_cross_entropy): chunks of rows of logits at a time, never the (batch x seq x
        vocab) array, in memory or in time. A LoRA-wrapped lm_head takes the plain way
        (logits, then lora.nn.causal_lm_loss), with the same result."""
        h = self.model(input_ids, attention_mask, position_ids)
        if labels is None:
            return self.lm_head(h)
        labels = np.asarray(labels)
        if labels.shape != h.shape[:2]:
            raise ValueError(f"labels shape {labels.shape} != input_ids shape {h.shape[:2]}")
        head = self.lm_head
        quantized = type(head) is nn.QuantLinear  # its fused loss takes the floats, frozen
        if type(head) is not nn.Linear and not quantized or head.bias is not None:
            loss, d = nn.causal_lm_loss(head(h), labels)
            object.__setattr__(self, "_loss_grad", ("dlogits", d))
            return loss
        b, s, hidden = h.shape
        shifted = np.ascontiguousarray(h[:, :-1]).reshape(-1, hidden)
        need_dw = head.weight.requires_grad and self.training and not quantized
        loss, dh, dw = F.linear_cross_entropy(
            shifted, head.dequantize() if quantized else head.weight.data,
            labels[:, 1:].reshape(-1), need_dhidden=self.training, need_dweight=need_dw)
        object.__setattr__(self, "_loss_grad", ("dhidden", (dh, dw, h.shape)) if self.training
                           else None)
        return loss

    def gradient_checkpointing_enable(self) -> None:
        """Gradient checkpointing, as transformers' method of that name: in training, each
        decoder layer keeps only its input through the forward pass and computes its forward
        again just before its backward (the same dropout masks), so the activations of one
        layer at a time are held instead of all of them, for about one more forward pass of
        compute. Gradients are unchanged."""
        for layer in self.model.layers:
            layer.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        for layer in self.model.layers:
            layer.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(layer.gradient_checkpointing for layer in self.model.layers)

    def generate(self, input_ids, attention_mask=None, *, adapter_names=None,
                 **kwargs) -> np.ndarray:
        """Greedy or sampled continuation with a KV cache, as transformers' generate():
        int64 (batch, prompt + new). See lora.models.generation.generate for the arguments;
        adapter_names= (one per row of the batch) decodes each row with its own adapter in
        one batch (lora.adapter_names)."""
        from .generation import generate

        with adapter_rows(self, adapter_names):
            return generate(self, input_ids, attention_mask, **kwargs)

    def backward(self, dlogits: np.ndarray | None = None) -> None:
        """Accumulate every trainable parameter's gradient: of `dlogits` (the gradient of the
        logits forward returned), or, with no argument, of the loss forward(labels=...)
        returned (in training mode)."""
        if dlogits is None:
            saved = self.__dict__.get("_loss_grad")
            object.__setattr__(self, "_loss_grad", None)
            if saved is None:
                raise RuntimeError("LlamaForCausalLM.backward(): no loss to backpropagate; call "
                                   "model(input_ids, labels=...) in training mode first, or "
                                   "pass dlogits")
            kind, value = saved
            if kind == "dlogits":
                dlogits = value
            else:
                dh, dw, shape = value
                if dw is not None:
                    self.lm_head.weight.accumulate(dw)
                d = np.zeros(shape, dtype=dh.dtype)
                d[:, :-1] = dh.reshape(shape[0], shape[1] - 1, shape[2])
                self.model.backward(d)
                return None
        self.lm_head.need_input_grad = True
        d = self.lm_head.backward(np.ascontiguousarray(dlogits, dtype=np.float32))
        self.model.backward(d)
        return None

    def config_dict(self) -> dict:
        """config.json for this model: the checkpoint's (when loaded from one) with the
        config's fields as they are now."""
        d = {k: v for k, v in self.hf_config.items() if k not in ("architectures", "_name_or_path")}
        d.update({f.name: getattr(self.config, f.name) for f in fields(self.config)})
        d.pop("rope_parameters", None)  # rope_theta and rope_scaling above say the same
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM"}[self.config.model_type]
        d.update(architectures=[arch], torch_dtype="float32")
        return d

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the model in transformers' layout: config.json and model.safetensors, LoRA
        layers merged into the saved weights (the model itself is left as it is), plus the
        tokenizer files of the checkpoint directory it came from, so that `from_pretrained`
        here and transformers' AutoModelForCausalLM load it. A tied lm_head is saved once, as
        the embedding."""
        tensors = merged_state_dict(self)
        if self.config.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)
        source = self.name_or_path if self.name_or_path and os.path.isdir(self.name_or_path) \
            else None
        _save_pretrained(directory, self.config_dict(), tensors, source=source)
