"""A Llama-family model written as a GGUF file that llama.cpp (and the tools built on it) run:
the model's weights, LoRA merged in, quantized to F16, Q8_0 or Q4_0 (lora.quant, bytes as
gguf.quants writes them), with the metadata and tokenizer of the GGUF file it came from.

    model = LlamaForCausalLM.from_pretrained("SmolLM2.Q4_1.gguf")
    lora.load_adapter(model, "my-adapter")
    export_gguf(model, "SmolLM2-mine.Q8_0.gguf", "Q8_0")

The tensors are the source file's, in its order and under its names (q and k permuted back to
ggml's interleaved rotary layout for llama); 1-D tensors (norms) are F32, a 2-D tensor whose
rows are not whole blocks of the type is F16; rope_freqs is copied as it is. The metadata is
copied byte for byte, but for general.file_type, which names the new type. The file is
written beside its target under a temporary name, fsynced, then renamed: a kill leaves the
old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import secrets
import struct

import numpy as np

from .. import quant
from .gguf import TYPE_IDS, _ROPE_FREQS, hf_name, is_gguf, read_header

__all__ = ["EXPORT_TYPES", "export_gguf", "merge_gguf"]

# qtype -> llama.cpp's general.file_type (LLAMA_FTYPE_MOSTLY_*)
EXPORT_TYPES = {"F16": 1, "Q4_0": 2, "Q8_0": 7}


def _kv_u32(key: str, value: int) -> bytes:
    k = key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<II", 4, value)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute (transformers' rotate-half rows to ggml's
    interleaved ones); gguf._unpermute undoes it."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _float_weights(model) -> dict:
    """The model's weights under transformers' names as float32: LoRA merged in (without
    changing the model), quantized layers dequantized."""
    from ..nn import QuantEmbedding, QuantLinear
    from ..tuners import lora_layers, merged_state_dict

    state = merged_state_dict(model) if lora_layers(model) else {
        n: p.data for n, p in model.named_parameters()}
    for path, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)) and path + ".weight" in state:
            state[path + ".weight"] = m.dequantize()
    return state


def _tensor_type(x: np.ndarray, qtype: str) -> str:
    """F32 for a vector, F16 when asked for or when rows are not whole blocks, else qtype."""
    if x.ndim == 1:
        return "F32"
    if qtype == "F16" or x.shape[-1] % quant.QTYPES[qtype][0]:
        return "F16"
    return qtype


def _nbytes(shape, tname: str) -> int:
    n = int(np.prod(shape))
    if tname in ("F32", "F16"):
        return n * (4 if tname == "F32" else 2)
    return n // shape[-1] * quant.row_bytes(tname, shape[-1])


def _tensor_bytes(x: np.ndarray, tname: str) -> bytes:
    if tname in ("F32", "F16"):
        return np.ascontiguousarray(x, "<f4" if tname == "F32" else "<f2").tobytes()
    return quant.quantize(np.ascontiguousarray(x, np.float32), tname).data.tobytes()


def export_gguf(model, path: str | os.PathLike, qtype: str = "Q8_0", *,
                source: str | os.PathLike | None = None, force: bool = False) -> dict:
    """Write `model` (a lora.models.LlamaForCausalLM, LoRA-wrapped or not) as the GGUF file
    `path`, its projection and embedding weights in `qtype` ("F16", "Q8_0" or "Q4_0").

    source: the GGUF file whose metadata (architecture, rope, tokenizer, chat template) and
    tensor list the export copies; default the file the model was loaded from. A model from
    a Hugging Face directory has none: convert it once with llama.cpp's convert_hf_to_gguf
    and pass that file. force: replace `path` if it exists.
    Returns {"tensors": count, "bytes": file size, "types": {type: count}}."""
    if qtype not in EXPORT_TYPES:
        why = " (GGUF has no NF4 type: llama.cpp could not read it)" if "NF4" in str(qtype) else ""
        raise ValueError(f"export_gguf: qtype must be one of {sorted(EXPORT_TYPES)}, got "
                         f"{qtype!r}{why}")
    source = os.fspath(source) if source is not None else getattr(model, "name_or_path", None)
    if not source or not is_gguf(source):
        raise ValueError("export_gguf: needs the GGUF file the model came from (source=...) "
                         f"for its metadata and tokenizer; got {source!r}")
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not force:
        raise FileExistsError(f"export_gguf: {path} exists (force=True replaces it)")
    header = read_header(source)
    cfg = model.config
    state = _float_weights(model)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    permuted = cfg.model_type == "llama"
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
    plan = []  # (gguf name, shape, type name, the float array or ("copy", its TensorInfo))
    for name, info in header.tensors.items():
        hf = hf_name(name)
        if name == _ROPE_FREQS or hf is None:
            plan.append((name, info.shape, info.type_name, ("copy", info)))
            continue
        if hf not in state:
            raise ValueError(f"export_gguf: the model has no tensor {hf!r} for {name!r} of "
                             f"{source}")
        x = np.asarray(state[hf], np.float32)
        if tuple(x.shape) != tuple(info.shape):
            raise ValueError(f"export_gguf: {hf!r} has shape {x.shape}, {source} holds "
                             f"{info.shape} for {name!r}")
        kind = name.split(".")[2] if name.startswith("blk.") else ""
        if permuted and kind in heads:
            x = _permute(x, heads[kind])
        plan.append((name, x.shape, _tensor_type(x, qtype), x))
    kv = [raw for key, raw in header.kv_raw.items() if key != "general.file_type"]
    kv.append(_kv_u32("general.file_type", EXPORT_TYPES[qtype]))
    align = header.alignment
    tmp = os.path.join(os.path.dirname(path),
                       f".{os.path.basename(path)}.lora-export-{os.getpid()}-{secrets.token_hex(4)}")
    types: dict = {}
    head = [b"GGUF", struct.pack("<IQQ", 3, len(plan), len(kv)), *kv]
    offset = 0
    for name, shape, tname, value in plan:
        n = name.encode()
        head.append(struct.pack("<Q", len(n)) + n + struct.pack("<I", len(shape)))
        head.append(struct.pack(f"<{len(shape)}Q", *reversed(shape)))
        head.append(struct.pack("<IQ", TYPE_IDS[tname], offset))
        size = value[1].nbytes if isinstance(value, tuple) else _nbytes(shape, tname)
        offset += -(-size // align) * align
        types[tname] = types.get(tname, 0) + 1
    head = b"".join(head)
    try:
        with open(source, "rb") as src, open(tmp, "xb") as f:
            f.write(head + b"\0" * (-len(head) % align))
            for _, _, tname, value in plan:  # one tensor's bytes at a time
                if isinstance(value, tuple):
                    src.seek(value[1].offset)
                    blob = src.read(value[1].nbytes)
                else:
                    blob = _tensor_bytes(value, tname)
                f.write(blob + b"\0" * (-len(blob) % align))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return {"tensors": len(plan), "bytes": os.path.getsize(path), "types": types}


def merge_gguf(base, adapters, out, qtype: str = "Q8_0", scales=None, force: bool = False
               ) -> dict:
    """`lora merge` for a GGUF base: load it (float32), merge each PEFT adapter in order
    (times its scale), and export_gguf the result to `out`. Returns export_gguf's dict with
    "updates", the LoRA pairs merged."""
    from ..io import load_adapter
    from ..tuners import lora_layers, merge_and_unload
    from .llama import LlamaForCausalLM

    adapters = [adapters] if isinstance(adapters, (str, os.PathLike)) else list(adapters)
    scales = [1.0] * len(adapters) if scales is None else list(scales)
    if len(scales) != len(adapters):
        raise ValueError(f"{len(scales)} scales for {len(adapters)} adapters")
    if os.path.exists(out) and not force:
        raise FileExistsError(f"{out} exists (--force replaces it)")
    model = LlamaForCausalLM.from_pretrained(base)
    updates = 0
    for adapter, scale in zip(adapters, scales, strict=True):
        load_adapter(model, adapter)
        for _, layer in lora_layers(model):
            layer.scaling *= scale
            updates += 1
        model = merge_and_unload(model)
    stats = export_gguf(model, out, qtype, source=base, force=force)
    stats["updates"] = updates
    return stats
