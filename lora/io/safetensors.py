"""The safetensors file format, read and written by hand: the one reader and writer of the
library (adapters, model checkpoints, `lora merge`).

Why not the `safetensors` package: its NumPy API has no bfloat16 (NumPy has none), so PEFT
adapters and checkpoints saved in bf16 would not load, and it loads whole files; a streaming
merge needs bf16, the raw bytes of every tensor, and a writer that never holds more than one
tensor. The format (https://github.com/huggingface/safetensors) is:
an 8-byte little-endian header length N, N bytes of JSON
`{"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [begin, end]}}`
(offsets relative to the first byte after the header), then the raw little-endian data.

bfloat16 is carried as uint16 bit patterns; `bf16_to_f32` / `f32_to_bf16` convert them the way
PyTorch does (c10/util/BFloat16.h: round to nearest even, NaN -> 0x7FC0).
This module does not know about LoRA or models: lora/io/adapter.py and lora/models/hf.py read
through it, lora/io/checkpoint.py merges with it.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np

# Byte size of one element per dtype; None for sub-byte types whose size is not checked.
ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
    "F4": None, "F6_E2M3": None, "F6_E3M2": None,
}  # fmt: skip
# How each floating dtype is stored in NumPy: bf16 as its uint16 bit pattern.
STORAGE = {"F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F32": np.dtype("<f4"),
           "F64": np.dtype("<f8")}  # fmt: skip
# Integer and bool dtypes, which read_array also reads (transformers' position_ids buffers).
INTEGER = {"I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"),
           "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?")}  # fmt: skip
MAX_HEADER = 100_000_000  # the limit the safetensors package enforces
# A Hugging Face checkpoint directory holds one of these.
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsError(ValueError):
    """A safetensors file that is missing, truncated or malformed."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    """A parsed, checked header. `raw` is the 8-byte length plus the JSON bytes, verbatim,
    so a file with the same tensors can be rewritten with an identical header."""

    path: str
    raw: bytes
    metadata: dict
    tensors: dict[str, TensorInfo]  # in data-offset order
    file_size: int

    @property
    def data_start(self) -> int:
        return len(self.raw)


def read_header(path: str | os.PathLike) -> Header:
    """Parse and check the header of a safetensors file: valid JSON, known dtypes, offsets
    that match the shapes, tile the data without gaps or overlaps, and end at the file's end
    (so a truncated file is caught before anything is written)."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise SafetensorsError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER or 8 + n > size:
                raise SafetensorsError(f"{path}: corrupt safetensors header (length {n})")
            header_bytes = f.read(n)
    except OSError as e:
        raise SafetensorsError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        obj = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(obj, dict):
        raise SafetensorsError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise SafetensorsError(f"{path}: __metadata__ must be a JSON object")
    start = 8 + n
    infos = []
    for name, entry in obj.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            shape = tuple(int(d) for d in shape)
            ok = all(isinstance(v, int) and v >= 0 for v in (begin, end, *shape)) and begin <= end
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise SafetensorsError(f"{path}: tensor {name!r}: malformed header entry {entry!r}")
        if dtype not in ITEMSIZE:
            raise SafetensorsError(f"{path}: tensor {name!r}: unknown dtype {dtype!r}")
        itemsize = ITEMSIZE[dtype]
        if itemsize is not None and end - begin != itemsize * math.prod(shape):  # exact ints
            raise SafetensorsError(
                f"{path}: tensor {name!r}: {end - begin} bytes do not hold {dtype} {list(shape)}"
            )
        infos.append(TensorInfo(name, dtype, shape, start + begin, start + end))
    infos.sort(key=lambda t: (t.begin, t.end))
    position = start
    for info in infos:
        if info.begin != position:
            raise SafetensorsError(f"{path}: tensor {info.name!r}: data overlaps or leaves a gap")
        position = info.end
    if position != size:
        raise SafetensorsError(
            f"{path}: truncated or corrupt: header describes {position} bytes, file has {size}"
        )
    return Header(path, prefix + header_bytes, metadata, {t.name: t for t in infos}, size)


def checkpoint_shards(directory: str | os.PathLike) -> tuple[list[str], dict | None]:
    """The safetensors files of a Hugging Face checkpoint directory, as file names in the order
    the index first lists them, and the parsed index, whose "weight_map" is checked to map
    names to file names (None for a single model.safetensors). Only the index is read.
    Raises FileNotFoundError when the directory has neither file, SafetensorsError for an
    index that is not one or that names a shard outside the directory."""
    directory = os.fspath(directory)
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                index = json.load(f)
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()
            ):
                raise TypeError("weight_map must map tensor names to file names")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise SafetensorsError(f"{index_path}: not a safetensors index ({e})") from None
        shards = list(dict.fromkeys(weight_map.values()))
        for shard in shards:
            if os.path.basename(shard) != shard or shard in ("", ".", ".."):
                raise SafetensorsError(f"{index_path}: shard {shard!r} is not a file name")
        return shards, index
    if os.path.isfile(os.path.join(directory, SINGLE_FILE)):
        return [SINGLE_FILE], None
    raise FileNotFoundError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors "
                            "checkpoints are supported)")


def read_array(path: str | os.PathLike, info: TensorInfo) -> np.ndarray:
    """One tensor as a fresh, writeable, C-contiguous array in its storage dtype (bf16 as
    uint16; the floating dtypes of STORAGE and the integer ones of INTEGER). The file is
    memory-mapped for this tensor only and unmapped before returning, so resident memory is
    this one copy."""
    dtype = STORAGE.get(info.dtype, INTEGER.get(info.dtype))
    if dtype is None:
        raise SafetensorsError(f"{path}: tensor {info.name!r}: dtype {info.dtype} not readable")
    count = info.nbytes // dtype.itemsize
    if count == 0:
        return np.empty(info.shape, dtype)
    page = mmap.ALLOCATIONGRANULARITY
    base = info.begin - info.begin % page
    with (
        open(path, "rb") as f,
        mmap.mmap(f.fileno(), info.end - base, access=mmap.ACCESS_READ, offset=base) as mm,
    ):
        view = np.frombuffer(mm, dtype, count, info.begin - base)
        out = view.reshape(info.shape).copy()
        del view  # release the buffer export so the mapping can close
    return out


def read_float_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a (small) file as float32, or float64 when stored so; bf16 and fp16
    are widened exactly. Raises SafetensorsError naming the tensor for other dtypes."""
    header = read_header(path)
    tensors = {}
    for name, info in header.tensors.items():
        if info.dtype not in STORAGE:
            raise SafetensorsError(f"{path}: tensor {name!r} has dtype {info.dtype}; "
                                   "expected F32, F16, BF16 or F64")  # fmt: skip
        tensors[name] = to_compute(read_array(path, info), info.dtype)
    return tensors


# The dtype name of each NumPy dtype the writer takes (bf16 goes as float32, rounded by the
# caller with f32_to_bf16 and passed as BF16 bits via `dtypes=`).
_WRITABLE = {np.dtype(t): name for t, name in (
    (np.float64, "F64"), (np.float32, "F32"), (np.float16, "F16"), (np.int64, "I64"),
    (np.int32, "I32"), (np.int16, "I16"), (np.int8, "I8"), (np.uint8, "U8"), (np.bool_, "BOOL"))}


def serialize(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None,
              dtypes: dict[str, str] | None = None) -> bytes:
    """A safetensors file's bytes holding `tensors`, laid out as the safetensors package lays
    them (largest item size first, then by name; the header padded with spaces to 8 bytes).
    `dtypes` names the stored dtype of a tensor whose array holds its bit pattern (BF16 as
    uint16). Little-endian, C order; a tensor is copied only if it is not already so."""
    dtypes = dtypes or {}
    entries = []
    for name, array in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"safetensors: tensor names must be str, got {name!r}")
        array = np.asarray(array)
        dtype = dtypes.get(name) or _WRITABLE.get(array.dtype.newbyteorder("="))
        if dtype is None or (dtype == "BF16" and array.dtype.itemsize != 2):
            raise TypeError(f"safetensors: tensor {name!r} has dtype {array.dtype}, not writable")
        little = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False)
        entries.append((name, dtype, little))
    entries.sort(key=lambda e: (-e[2].dtype.itemsize, e[0]))
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, dtype, array in entries:
        header[name] = {"dtype": dtype, "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return b"".join([struct.pack("<Q", len(raw)), raw] + [a.tobytes() for _, _, a in entries])


def to_compute(stored: np.ndarray, dtype: str) -> np.ndarray:
    """A stored tensor in the dtype merges run in: float64 stays, everything else float32."""
    if dtype == "BF16":
        return bf16_to_f32(stored)
    if dtype == "F64":
        return stored
    return stored.astype(np.float32, copy=False)


def from_compute(values: np.ndarray, dtype: str) -> np.ndarray:
    """Round a float32/float64 result to the stored dtype, once, to nearest even."""
    if dtype == "BF16":
        return f32_to_bf16(values)
    with np.errstate(over="ignore"):  # an overflow to inf is the caller's to check
        return values.astype(STORAGE[dtype], copy=False)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) to float32: the bf16 bits are the high half; exact."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 to bfloat16 bit patterns, rounding to nearest even as PyTorch does
    (c10::detail::round_to_nearest_even): add 0x7FFF plus the lowest kept bit, truncate.
    Overflow rounds to +-inf. NaN becomes the quiet NaN 0x7FC0, as in c10's scalar
    conversion (ATen's vectorised one writes 0xFFFF; both are NaN)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    u = values.view(np.uint32)
    rounded = u >> np.uint32(16)  # one temporary, updated in place
    rounded &= np.uint32(1)
    rounded += np.uint32(0x7FFF)
    rounded += u  # wraps only for NaN patterns, which are overwritten below
    rounded >>= np.uint32(16)
    out = rounded.astype(np.uint16)
    out[np.isnan(values)] = np.uint16(0x7FC0)
    return out


def copy_range(src_fd: int, dst_fd: int, src_offset: int, dst_offset: int, count: int) -> None:
    """Copy bytes between files inside the kernel (copy_file_range) when it can, in bounded
    chunks through user space when it cannot."""
    if hasattr(os, "copy_file_range"):
        try:
            while count > 0:
                n = os.copy_file_range(src_fd, dst_fd, count, src_offset, dst_offset)
                if n == 0:
                    raise SafetensorsError("source file ended early while copying")
                src_offset, dst_offset, count = src_offset + n, dst_offset + n, count - n
            return
        except OSError:  # EXDEV on old kernels, ENOSYS, EINVAL on some filesystems
            pass
    chunk = 16 << 20
    while count > 0:
        data = os.pread(src_fd, min(chunk, count), src_offset)
        if not data:
            raise SafetensorsError("source file ended early while copying")
        os.pwrite(dst_fd, data, dst_offset)
        src_offset, dst_offset, count = (
            src_offset + len(data),
            dst_offset + len(data),
            count - len(data),
        )
