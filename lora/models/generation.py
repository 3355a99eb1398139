"""Text generation for lora.models' causal LMs (LlamaForCausalLM, LoRA-wrapped or not):
greedy decoding and sampling with a preallocated KV cache, as transformers' generate().

`generate(model, input_ids, ...)` (also `model.generate(...)`) returns the prompt followed by
the new tokens, int64 (batch, prompt + new), with transformers' semantics: a left-padded batch
takes its positions from the attention mask (cumsum(mask) - 1), a finished item (eos) is
padded with pad_token_id until every item is done, and the logits go through
repetition_penalty, then (sampling only) temperature, top_k and top_p, in transformers' order
and with its formulas (the processors are public here: `repetition_penalty`, `temperature`,
`top_k`, `top_p`). Sampling draws from a numpy Generator seeded by `seed`, so a seed
reproduces a run (not torch's draws).

The cache holds, per layer, k and v as (batch, prompt + max_new_tokens, kv_heads*head_dim),
allocated once; each step writes its new rows and lora.functional.causal_attention_forward
reads the first kv_len rows in place. The prompt is one forward pass (prefill) that applies
the final norm and lm_head to its last position only; each later step runs one token per item.

`streamer` receives each step's new ids: a callable gets an int64 (batch,) array; an object
with put() and end() (transformers' streamer protocol, e.g. TextStreamer here) gets the prompt
first, then each step's ids, then end(). `stream(model, tokenizer, input_ids, ...)` yields the
new text piece by piece.

Not here: beam search, stopping strings, min_length, a cache kept between generate() calls,
sliding-window attention beyond its window (refused).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from .. import functional as F
from .. import nn
from ..nn.quantized import QuantLinear
from .llama import rope_tables

__all__ = ["generate", "generate_steps", "stream", "TextStreamer", "repetition_penalty",
           "temperature", "top_k", "top_p", "KVCache"]


# ---------------------------------------------------------------------------------------------
# the cached forward pass


class KVCache:
    """Per layer k and v, (batch, max_len, kv_heads*head_dim) each, and the key mask
    (batch, max_len) (None when no key is padding); `length` rows are filled."""

    def __init__(self, num_layers: int, batch: int, max_len: int, kv_dim: int, dtype,
                 key_mask: np.ndarray | None):
        self.k = [np.zeros((batch, max_len, kv_dim), dtype) for _ in range(num_layers)]
        self.v = [np.zeros((batch, max_len, kv_dim), dtype) for _ in range(num_layers)]
        self.key_mask = key_mask
        self.length = 0


def forward_cached(model, input_ids: np.ndarray, cos: np.ndarray, sin: np.ndarray,
                   cache: KVCache, plan: list | None = None) -> np.ndarray:
    """The logits (batch, vocab) of the last position of `input_ids` (batch, seq), the tokens
    at cache rows [cache.length, cache.length + seq), whose rope tables cos and sin are
    (batch, seq, head_dim); appends their keys and values to the cache. `plan`:
    decode_plan(model, input_ids.size), made here when not given (generate() keeps the one of
    its one-token steps)."""
    start, end = cache.length, cache.length + input_ids.shape[1]
    decoder = model.model
    if plan is None:
        plan = decode_plan(model, input_ids.size)
    x = decoder.embed_tokens(input_ids)
    for i, step in enumerate(plan):
        x = step(x, cos, sin, cache.k[i], cache.v[i], cache.key_mask, start, end)
    cache.length = end
    last = decoder.norm(np.ascontiguousarray(x[:, -1:]))
    return model.lm_head(last)[:, 0]


def _projection(layer, rows: int):
    """f(x, residual) = layer(x, residual=residual) for inputs of `rows` rows: the kernel
    itself with the weight argument the layer would pass (taken once) for a plain Linear or
    QuantLinear, whose forward in eval mode is that one call; the layer otherwise (a LoRA
    layer, whose adapters, dropout or mixed batch the module decides)."""
    if type(layer) not in (nn.Linear, QuantLinear):
        return layer
    dtype = getattr(layer, "compute_dtype", layer.weight.dtype)
    W, fifo = layer._weight_arg(np.empty((rows, layer.in_features), dtype))
    if fifo:
        return layer
    bias = None if layer.bias is None else layer.bias.data
    dense = F.dense_forward

    def project(x, residual=None):
        return dense(x, W, bias, residual=residual)

    return project


def decode_plan(model, rows: int) -> list:
    """One function per decoder layer running its cached forward (inputs of `rows` tokens in
    all: the prompt's, then one per item a step) with the same kernels, in the same order,
    as the modules do (LlamaDecoderLayer in eval mode, its new keys and values written to the
    cache), but called directly: a decoding step of a small model spends as long in the
    modules' Python as in its products. Made once per generate() call for its steps; the
    weights must not change while it is used."""
    steps = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        q, k, v, o = (_projection(p, rows) for p in
                      (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
        gate, up, down = (_projection(p, rows) for p in
                          (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
        heads, kv_heads = attn.num_heads, attn.num_key_value_heads

        def step(x, cos, sin, ck, cv, key_mask, start, end, q=q, k=k, v=v, o=o, gate=gate,
                 up=up, down=down, n1=n1, n2=n2, heads=heads, kv_heads=kv_heads):
            a, _ = F.rms_norm_forward(x, n1.weight.data, eps=n1.variance_epsilon)
            qa, ka, va = q(a), k(a), v(a)
            F.rope_forward(qa, cos, sin, heads)
            F.rope_forward(ka, cos, sin, kv_heads)
            ck[:, start:end] = ka
            cv[:, start:end] = va
            ctx, _ = F.causal_attention_forward(qa, ck, cv, heads, kv_heads,
                                                key_mask=key_mask, kv_len=end)
            h = o(ctx, residual=x)
            m, _ = F.rms_norm_forward(h, n2.weight.data, eps=n2.variance_epsilon)
            return down(F.swiglu_forward(gate(m), up(m)), residual=h)

        steps.append(step)
    return steps


# ---------------------------------------------------------------------------------------------
# logits processors: transformers' RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
# TopKLogitsWarper and TopPLogitsWarper (min_tokens_to_keep = 1), on (batch, vocab) scores


def repetition_penalty(scores: np.ndarray, ids: np.ndarray, penalty: float,
                       prompt_start: np.ndarray | None = None) -> np.ndarray:
    """Each token that occurs in ids (batch, n) from column prompt_start[b] on (the first
    unpadded one; default 0) has its score divided by penalty if positive, multiplied by it
    if negative (Keskar et al. 2019, CTRL). A new array."""
    scores = np.array(scores)
    seen = np.zeros(scores.shape, bool)
    for b in range(ids.shape[0]):
        row = ids[b, 0 if prompt_start is None else int(prompt_start[b]):]
        seen[b, row[row < scores.shape[1]]] = True
    penalised = np.where(scores < 0, scores * scores.dtype.type(penalty),
                         scores / scores.dtype.type(penalty))
    return np.where(seen, penalised, scores)


def temperature(scores: np.ndarray, t: float) -> np.ndarray:
    return scores / scores.dtype.type(t)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Scores below the k-th largest of their row set to -inf."""
    k = min(max(k, 1), scores.shape[-1])
    kth = np.partition(scores, -k, axis=-1)[..., -k, None]
    return np.where(scores < kth, -np.inf, scores).astype(scores.dtype)


def top_p(scores: np.ndarray, p: float) -> np.ndarray:
    """Nucleus filtering (Holtzman et al. 2019): with the scores sorted ascending, the tokens
    whose cumulative probability is at most 1 - p are set to -inf; the most likely token is
    always kept."""
    order = np.argsort(scores, axis=-1, kind="stable")
    ranked = np.take_along_axis(scores, order, axis=-1)
    e = np.exp(ranked - ranked[..., -1:])
    cum = np.cumsum(e / e.sum(axis=-1, keepdims=True), axis=-1, dtype=scores.dtype)
    remove_sorted = cum <= scores.dtype.type(1 - p)
    remove_sorted[..., -1] = False
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, -np.inf, scores).astype(scores.dtype)


def _sample(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One token per row drawn from softmax(scores) (-inf: probability 0)."""
    s = scores.astype(np.float64)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    cdf = np.cumsum(e, axis=-1)
    u = rng.random((s.shape[0], 1)) * cdf[:, -1:]
    return np.minimum((cdf <= u).sum(axis=-1), s.shape[-1] - 1)


# ---------------------------------------------------------------------------------------------
# argument checks


def _int(name, value, lo, hi=None):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"generate: {name} must be an int, got {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"generate: {name} must be {bound}, got {value}")
    return int(value)


def _real(name, value, ok, what):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"generate: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (np.isfinite(value) and ok(value)):
        raise ValueError(f"generate: {name} must be {what}, got {value}")
    return value


def _token_ids(name, value, vocab):
    if value is None:
        return []
    values = [value] if isinstance(value, (int, np.integer)) and not isinstance(value, bool) \
        else value
    if not isinstance(values, (list, tuple, np.ndarray)):
        raise TypeError(f"generate: {name} must be an int or a list of ints, got "
                        f"{type(value).__name__}")
    return [_int(name, v, 0, vocab - 1) for v in values]


def _prompt(input_ids, attention_mask, vocab):
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"generate: input_ids must be an integer array (batch, seq), got "
                         f"{ids.dtype} of shape {ids.shape}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"generate: input_ids must hold at least one token per item, got "
                         f"shape {ids.shape}")
    if ids.min() < 0 or ids.max() >= vocab:
        raise ValueError(f"generate: input_ids must be in [0, {vocab}), got values in "
                         f"[{ids.min()}, {ids.max()}]")
    ids = ids.astype(np.int64)
    if attention_mask is None:
        return ids, None
    mask = np.asarray(attention_mask)
    if mask.ndim == 1:
        mask = mask[None]
    if mask.shape != ids.shape:
        raise ValueError(f"generate: attention_mask shape {mask.shape} != input_ids shape "
                         f"{ids.shape}")
    if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
        raise TypeError(f"generate: attention_mask must be of bool or integer dtype, got "
                        f"{mask.dtype}")
    mask = mask != 0
    bad = np.flatnonzero(~mask[:, -1])
    if bad.size:
        raise ValueError(f"generate: attention_mask: the last position of item {bad[0]} is "
                         "padding; pad prompts on the left for generation")
    return ids, mask


@contextlib.contextmanager
def _eval_mode(model):
    """The model in eval mode (no caches for backward, no dropout), restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            object.__setattr__(m, "training", mode)


# ---------------------------------------------------------------------------------------------
# generation


def generate_steps(model, input_ids, attention_mask=None, max_new_tokens: int = 20,
                   do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None, repetition_penalty: float | None = None,
                   seed: int | None = None, eos_token_id: int | Sequence[int] | None = None,
                   pad_token_id: int | None = None) -> Iterator[np.ndarray]:
    """generate() one step at a time: yields each step's new ids, int64 (batch,) (pad_token_id
    for a finished item), and stops after max_new_tokens or when every item is finished. The
    arguments are checked before the first token; see generate()."""
    cfg = model.config
    vocab = cfg.vocab_size
    ids, mask = _prompt(input_ids, attention_mask, vocab)
    max_new = _int("max_new_tokens", max_new_tokens, 0)
    if not isinstance(do_sample, (bool, np.bool_)):
        raise TypeError(f"generate: do_sample must be a bool, got {type(do_sample).__name__}")
    temp = _real("temperature", temperature, lambda t: t > 0, "> 0")
    k = None if top_k is None else _int("top_k", top_k, 0)
    p = None if top_p is None else _real("top_p", top_p, lambda t: 0 < t <= 1, "in (0, 1]")
    penalty = (None if repetition_penalty is None else
               _real("repetition_penalty", repetition_penalty, lambda t: t > 0, "> 0"))
    if seed is not None:
        _int("seed", seed, 0)
    eos = _token_ids("eos_token_id", cfg.eos_token_id if eos_token_id is None else eos_token_id,
                     vocab)
    if pad_token_id is None:
        pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else (
            eos[0] if eos else 0)
    pad = _int("pad_token_id", pad_token_id, 0, vocab - 1)
    batch, prompt_len = ids.shape
    total = prompt_len + max_new
    sw = cfg.sliding_window
    if sw is not None and total > sw:
        raise NotImplementedError(f"generate: prompt + max_new_tokens = {total} exceeds "
                                  f"sliding_window {sw}, which this model does not implement")
    return _steps(model, ids, mask, max_new, bool(do_sample), temp, k, p, penalty,
                  np.random.default_rng(seed), eos, pad)


def _steps(model, ids, mask, max_new, do_sample, temp, k, p, penalty, rng, eos, pad):
    if max_new == 0:
        return
    batch, prompt_len = ids.shape
    total = prompt_len + max_new
    decoder = model.model
    dtype = getattr(decoder.embed_tokens, "compute_dtype", decoder.embed_tokens.weight.dtype)
    attn = decoder.layers[0].self_attn if len(decoder.layers) else None
    kv_dim = attn.num_key_value_heads * attn.head_dim if attn is not None else 0
    key_mask = None
    if mask is not None and not mask.all():
        key_mask = np.ones((batch, total), bool)
        key_mask[:, :prompt_len] = mask
    cos_t, sin_t = (t.astype(dtype, copy=False) for t in
                    rope_tables(decoder.inv_freq, np.arange(total)))
    if mask is None:
        positions = np.broadcast_to(np.arange(prompt_len), ids.shape)
    else:  # transformers' _prepare_position_ids_for_generation
        positions = np.where(mask, np.cumsum(mask, axis=1) - 1, 0)
    prompt_start = None if mask is None else mask.argmax(axis=1)
    out = np.empty((batch, total), np.int64)
    out[:, :prompt_len] = ids
    unfinished = np.ones(batch, bool)
    with _eval_mode(model):
        cache = KVCache(len(decoder.layers), batch, total, kv_dim, dtype, key_mask)
        tokens, pos, plan = ids, positions, None
        for step in range(max_new):
            logits = forward_cached(model, tokens, cos_t[pos], sin_t[pos], cache, plan)
            plan = plan or decode_plan(model, batch)
            scores = logits.astype(np.float32, copy=False)
            n = prompt_len + step
            if penalty is not None and penalty != 1.0:
                scores = repetition_penalty(scores, out[:, :n], penalty, prompt_start)
            if do_sample:
                if temp != 1.0:
                    scores = temperature(scores, temp)
                if k:
                    scores = top_k(scores, k)
                if p is not None and p < 1.0:
                    scores = top_p(scores, p)
                nxt = _sample(scores, rng)
            else:
                nxt = scores.argmax(axis=-1)
            if eos:
                nxt = np.where(unfinished, nxt, pad)
            out[:, n] = nxt
            yield out[:, n].copy()
            if eos:
                unfinished &= ~np.isin(nxt, eos)
                if not unfinished.any():
                    return
            tokens, pos = out[:, n:n + 1], pos[:, -1:] + 1


def generate(model, input_ids, attention_mask=None, max_new_tokens: int = 20,
             do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, repetition_penalty: float | None = None,
             seed: int | None = None, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None,
             streamer: Callable[[np.ndarray], object] | object | None = None) -> np.ndarray:
    """The prompt and its continuation, int64 (batch, prompt + new): up to max_new_tokens
    new tokens per item, fewer when every item has produced an eos token first.

    input_ids (batch, seq) or (seq,), left-padded where attention_mask (same shape, nonzero
    at real tokens) says so. Greedy (argmax) unless do_sample, which draws from the softmax
    of the logits after temperature, top_k (0 or None: off) and top_p (1 or None: off);
    repetition_penalty (CTRL's, None or 1: off) applies in both modes. seed seeds the draws.
    eos_token_id (an int or a list; default the model config's) ends an item, which is then
    padded with pad_token_id (default the config's, else the first eos id). streamer: a
    callable given each step's ids (batch,), or an object with put() and end() (the prompt,
    each step's ids, then end()). The model runs in eval mode for the call (restored after)."""
    steps = generate_steps(model, input_ids, attention_mask, max_new_tokens, do_sample,
                           temperature, top_k, top_p, repetition_penalty, seed, eos_token_id,
                           pad_token_id)
    ids, _ = _prompt(input_ids, attention_mask, model.config.vocab_size)
    protocol = streamer is not None and hasattr(streamer, "put") and hasattr(streamer, "end")
    if streamer is not None and not (protocol or callable(streamer)):
        raise TypeError("generate: streamer must be a callable or have put() and end(), got "
                        f"{type(streamer).__name__}")
    if protocol:
        streamer.put(ids)
    new = []
    for tokens in steps:
        new.append(tokens)
        if protocol:
            streamer.put(tokens)
        elif streamer is not None:
            streamer(tokens)
    if protocol:
        streamer.end()
    if not new:
        return ids
    return np.concatenate([ids, np.stack(new, axis=1)], axis=1)


# ---------------------------------------------------------------------------------------------
# streaming text


class TextStreamer:
    """Incremental detokenization of one sequence for any tokenizer with decode(ids) -> str.

    put(ids) adds tokens (the first call is the prompt, skipped unless skip_prompt=False, as
    transformers' TextStreamer) and returns the new text they complete; end() returns the rest.
    Text is released only when the decoded suffix does not end in U+FFFD, i.e. a character
    split over byte-level tokens is held back until complete, and each piece is decoded
    together with the tokens before it, so leading spaces and merges come out as decode() of
    the whole sequence gives them. `on_text` (optional) is called with every non-empty piece.
    """

    def __init__(self, tokenizer, skip_prompt: bool = True,
                 on_text: Callable[[str], object] | None = None, **decode_kwargs):
        if not callable(getattr(tokenizer, "decode", None)):
            raise TypeError("TextStreamer: tokenizer must have a decode(ids) method")
        self.tokenizer, self.skip_prompt, self.on_text = tokenizer, skip_prompt, on_text
        self.decode_kwargs = decode_kwargs
        self.ids: list[int] = []
        self._prefix = self._read = 0  # token offsets: context start, text emitted up to
        self._prompt_pending = skip_prompt

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), **self.decode_kwargs)

    def _emit(self, text: str) -> str:
        if text and self.on_text is not None:
            self.on_text(text)
        return text

    def put(self, ids) -> str:
        ids = np.asarray(ids).reshape(-1) if np.ndim(ids) < 2 else np.asarray(ids)
        if ids.ndim == 2:
            if ids.shape[0] != 1:
                raise ValueError(f"TextStreamer: one sequence at a time, got batch {ids.shape[0]}")
            ids = ids[0]
        if self._prompt_pending:
            self._prompt_pending = False
            return ""
        self.ids.extend(int(i) for i in ids)
        before = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return self._emit(text[len(before):])
        return ""

    def end(self) -> str:
        before = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return self._emit(text[len(before):])


def stream(model, tokenizer, input_ids, **generate_kwargs) -> Iterator[str]:
    """Generate for one prompt and yield the new text piece by piece (see TextStreamer);
    generate_kwargs as generate()'s, but streamer. The pieces joined equal
    tokenizer.decode(new ids), the eos token included if it came."""
    if "streamer" in generate_kwargs:
        raise TypeError("stream: streamer is not an argument here (stream is the streamer)")
    ids = np.asarray(input_ids)
    if (ids.ndim == 2 and ids.shape[0] != 1) or ids.ndim not in (1, 2):
        raise ValueError(f"stream: one prompt at a time, (seq,) or (1, seq), got shape "
                         f"{ids.shape}")
    text = TextStreamer(tokenizer, skip_prompt=False)
    steps = generate_steps(model, input_ids, **generate_kwargs)
    for tokens in steps:
        piece = text.put(tokens)
        if piece:
            yield piece
    piece = text.end()
    if piece:
        yield piece
