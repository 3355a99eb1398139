"""lora.merge_checkpoint / `lora merge` against PEFT's merge_and_unload on small random models.

Models are built from configs (no downloads): a tiny Llama (Linear targets, d_in != d_out,
embedding LoRA, sharded checkpoints) and a tiny GPT-2 (Conv1D, fan_in_fan_out). Every output
tensor is compared with PEFT's merged model: float32 within 1e-6 of |W| + |delta W|, fp16 and
bf16 within one unit in the last place. Bad inputs must raise or exit non-zero with one line
naming the culprit, and leave nothing behind. The bf16 conversions are checked bit for bit
against torch.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from safetensors.torch import load_file, save_file  # noqa: E402

from lora.io import checkpoint  # noqa: E402
from lora.io.safetensors import bf16_to_f32, f32_to_bf16, read_header  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LLAMA_TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "embed_tokens"]


def llama_config(hidden=64):
    return transformers.LlamaConfig(
        vocab_size=128, hidden_size=hidden, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip


def gpt2_config():
    return transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100,
                                   n_positions=32, bos_token_id=0, eos_token_id=0)  # fmt: skip


def make_adapter(model, directory, seed, b_scale=0.05, bias_shift=0.0, **lora_kwargs):
    """A PEFT adapter with random A and B (a trained adapter's delta is small next to W),
    and with bias="all", biases shifted by `bias_shift`."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(init_lora_weights=False, **lora_kwargs)
    wrapped = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.mul_(b_scale)
            elif name.endswith(".bias") and p.requires_grad:
                p.add_(bias_shift)
    wrapped.save_pretrained(directory)
    return directory


def load_dir(directory):
    tensors = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        tensors.update(load_file(path))
    return tensors


def peft_merge(model_cls, base_dir, adapters, dtype, scales=None):
    """PEFT's answer: each adapter loaded, scaled, merged and unloaded in turn."""
    model = model_cls.from_pretrained(base_dir, dtype=dtype)
    for i, adapter in enumerate(adapters):
        model = peft.PeftModel.from_pretrained(model, adapter)
        if scales is not None:
            for module in model.modules():
                if isinstance(module, peft.tuners.lora.LoraLayer):
                    # (scale_layer skips Embedding layers, so scale every layer's own factor)
                    for name in module.scaling:
                        module.scaling[name] *= scales[i]
        model = model.merge_and_unload()
    return {k: v.detach() for k, v in model.state_dict().items()}


def ordered(x):
    """16-bit floats as integers ordered like the values, so a difference counts ulps."""
    i = x.view(torch.int16).to(torch.int32)
    return torch.where(i < 0, -(i & 0x7FFF), i)


def delta_weight(adapter_dir, key, scaling):
    """delta W in float64 from the adapter file, laid out like (d_out, d_in) or, for an
    embedding, (num_embeddings, dim); with the bound of its rounding error, |s| |B| @ |A|."""
    path = "base_model.model." + key[: -len(".weight")]
    tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    embedding = path + ".lora_embedding_A" in tensors
    if embedding:
        A, B = tensors[path + ".lora_embedding_A"], tensors[path + ".lora_embedding_B"]
    else:
        A, B = tensors[path + ".lora_A.weight"], tensors[path + ".lora_B.weight"]
    A, B = A.double(), B.double()
    delta, size = (B @ A) * scaling, (B.abs() @ A.abs()) * abs(scaling)
    return (delta.T, size.T, True) if embedding else (delta, size, False)


def assert_matches_peft(ours, ref, base, dtype, deltas):
    """Every tensor of `ours` against PEFT's `ref`; returns the worst error seen."""
    worst = 0.0
    assert set(ours) <= set(ref)
    for name, a in ours.items():
        b = ref[name]
        assert a.dtype == b.dtype == dtype, name
        assert a.shape == b.shape, name
        if name not in deltas:  # untouched, or replaced by a copy saved in the adapter
            assert torch.equal(a, b), f"{name} is not a LoRA target and differs from PEFT"
            continue
        delta, size, embedding = deltas[name]
        if delta.shape != a.shape:
            delta, size = delta.T, size.T  # fan_in_fan_out
        assert not torch.equal(a, base[name]), f"{name} was not merged"
        if dtype == torch.float32:
            bound = 1e-6 * (base[name].double().abs() + size)
            err = ((a.double() - b.double()).abs() / bound).max().item() * 1e-6
            assert err <= 1e-6, f"{name}: error {err} relative to |W| + |s| |B| @ |A|"
        else:
            ulps = (ordered(a) - ordered(b)).abs()
            # Where W and delta W nearly cancel, float32 noise in delta W (about 1e-7 of the
            # terms, PEFT's or ours) is more than a 16-bit ulp of the small result.
            noise = (a.double() - b.double()).abs() <= 1e-6 * (base[name].double().abs() + size)
            ulps = torch.where(noise, torch.zeros_like(ulps), ulps)
            if embedding:
                # PEFT's Embedding.merge rounds delta W to the weight's dtype before adding
                # (a second rounding; Linear adds the fp32 delta). Allow that half ulp of
                # delta on top of the one ulp of the result.
                slack = (a.double() - b.double()).abs() - 0.5 * ulp_of(delta.to(dtype))
                ulps = torch.where(slack <= ulp_of(a), torch.zeros_like(ulps), ulps)
            err = ulps.max().item()
            assert err <= 1, f"{name}: {err} ulps from PEFT"
        worst = max(worst, err)
    return worst


def ulp_of(x):
    x = x.detach()
    up = torch.nextafter(x.abs(), torch.tensor(float("inf"), dtype=x.dtype))
    return (up.double() - x.abs().double()).abs()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama saved in three dtypes, sharded, plus two adapters."""
    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config())
    bases = {}
    for label, dtype in DTYPES.items():
        bases[label] = str(root / f"base-{label}")
        model.to(dtype).save_pretrained(bases[label], max_shard_size="40KB")
        model.to(torch.float32)
    adapter = make_adapter(copy.deepcopy(model), str(root / "adapter"),
                           seed=1, r=4, lora_alpha=8, target_modules=LLAMA_TARGETS)  # fmt: skip
    second = make_adapter(
        copy.deepcopy(model), str(root / "adapter2"), seed=2, r=8,
        lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "up_proj"],
        rank_pattern={"up_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 4},
    )  # fmt: skip
    return {"root": root, "bases": bases, "adapter": adapter, "adapter2": second}


def llama_deltas(adapter_dir, base, scale=1.0):
    config = json.load(open(os.path.join(adapter_dir, "adapter_config.json")))
    from lora.tuners.config import config_scaling as scaling

    deltas = {}
    for name in base:
        path = name[: -len(".weight")]
        key = os.path.join(adapter_dir, "adapter_model.safetensors")
        tensors = load_file(key)
        pfx = "base_model.model." + path
        if pfx + ".lora_A.weight" in tensors or pfx + ".lora_embedding_A" in tensors:
            a = tensors.get(pfx + ".lora_A.weight", tensors.get(pfx + ".lora_embedding_A"))
            deltas[name] = delta_weight(
                adapter_dir, name, scale * scaling(config, path, a.shape[0])
            )
    return deltas


@pytest.mark.parametrize("label", list(DTYPES))
def test_llama_matches_peft(llama, label, tmp_path):
    dtype, base_dir = DTYPES[label], llama["bases"][label]
    out = tmp_path / "merged"
    stats = checkpoint.merge_checkpoint(base_dir, [llama["adapter"]], out, progress=False)
    assert stats["updates"] == 2 * 5 + 1  # five Linear targets per layer, one embedding
    # Same files, shards and headers (so names, dtypes, order and metadata) as the base.
    assert sorted(os.listdir(out)) == sorted(os.listdir(base_dir))
    shards = [f for f in os.listdir(base_dir) if f.endswith(".safetensors")]
    assert len(shards) > 1
    for shard in shards:
        assert read_header(out / shard).raw == read_header(os.path.join(base_dir, shard)).raw
    index = json.load(open(out / "model.safetensors.index.json"))
    assert index == json.load(open(os.path.join(base_dir, "model.safetensors.index.json")))

    ours, base = load_dir(out), load_dir(base_dir)
    ref = peft_merge(transformers.LlamaForCausalLM, base_dir, [llama["adapter"]], dtype)
    deltas = llama_deltas(llama["adapter"], base)
    assert len(deltas) == stats["tensors_merged"]
    worst = assert_matches_peft(ours, ref, base, dtype, deltas)
    print(f"{label}: worst error vs PEFT {worst}")

    # transformers loads the output and computes what PEFT's merged model computes.
    loaded = transformers.LlamaForCausalLM.from_pretrained(out, dtype=dtype)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, ours[name]), name


def test_two_adapters_with_scales_rslora_and_patterns(llama, tmp_path):
    base_dir = llama["bases"]["fp32"]
    adapters, scales = [llama["adapter"], llama["adapter2"]], [0.5, -2.0]
    out = tmp_path / "merged"
    checkpoint.merge_checkpoint(base_dir, adapters, out, scales=scales, progress=False)
    ours, base = load_dir(out), load_dir(base_dir)
    ref = peft_merge(transformers.LlamaForCausalLM, base_dir, adapters, torch.float32, scales)
    d1, d2 = llama_deltas(adapters[0], base, 0.5), llama_deltas(adapters[1], base, -2.0)
    deltas = dict(d1)
    for name, (d, size, emb) in d2.items():
        if name in deltas:  # the error bound of a sum of two updates
            d, size = d + deltas[name][0], size + deltas[name][1]
        deltas[name] = (d, size, emb)
    assert_matches_peft(ours, ref, base, torch.float32, deltas)


@pytest.mark.parametrize("label", ["fp32", "bf16"])
def test_gpt2_conv1d_fan_in_fan_out(tmp_path, label):
    dtype = DTYPES[label]
    torch.manual_seed(3)
    base_dir = str(tmp_path / "gpt2")
    model = transformers.GPT2LMHeadModel(gpt2_config())
    model.to(dtype).save_pretrained(base_dir)
    # bias="all": PEFT saves every bias (here changed, as training would) beside the pairs,
    # and loading the adapter puts them in place of the base's.
    adapter = make_adapter(model.float(), str(tmp_path / "ad"), seed=4, r=4, lora_alpha=4,
                           fan_in_fan_out=True, bias="all", bias_shift=0.01,
                           target_modules=["c_attn", "c_proj", "c_fc", "wte"])  # fmt: skip
    out = tmp_path / "merged"
    checkpoint.merge_checkpoint(base_dir, adapter, out, progress=False)
    assert os.listdir(out).count("model.safetensors") == 1
    ours, base = load_dir(out), load_dir(base_dir)
    ref = peft_merge(transformers.GPT2LMHeadModel, base_dir, [adapter], dtype)
    deltas = llama_deltas(adapter, base)
    assert any(base[n].shape[0] != base[n].shape[1] for n in deltas if "c_attn" in n)
    assert len(deltas) == 2 * 4 + 1
    assert_matches_peft(ours, ref, base, dtype, deltas)
    biases = [n for n in base if n.endswith(".bias")]
    assert biases and all(not torch.equal(ours[n], base[n]) for n in biases)
    transformers.GPT2LMHeadModel.from_pretrained(out, dtype=dtype)


def test_cli_merges_and_copies_other_files(llama, tmp_path, capsys):
    base_dir = tmp_path / "base"
    shutil.copytree(llama["bases"]["bf16"], base_dir)
    (base_dir / "tokenizer.json").write_text('{"version": "1.0"}')
    (base_dir / "extra").mkdir()
    (base_dir / "extra" / "notes.txt").write_text("kept")
    out = tmp_path / "merged"
    status = run(["merge", str(base_dir), llama["adapter"], "-o", str(out), "-q"])
    assert status == 0
    assert (out / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert (out / "extra" / "notes.txt").read_text() == "kept"
    assert (out / "config.json").read_bytes() == (base_dir / "config.json").read_bytes()
    # --scale 0 merges nothing: the checkpoint comes back bit for bit.
    out0 = tmp_path / "merged0"
    assert run(["merge", str(base_dir), llama["adapter"], "-o", str(out0), "-q",
                "--scale", "0"]) == 0  # fmt: skip
    merged0, base = load_dir(out0), load_dir(base_dir)
    for name in base:
        assert torch.equal(merged0[name], base[name]), name
    # The embedding PEFT saves beside embedding LoRA replaces the base's, as PeftModel loads it.
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    edited = rewrite_adapter(llama["adapter"], tmp_path / "edited",
                             lambda t: {**t, key: t[key] * 3})  # fmt: skip
    out3 = tmp_path / "merged3"
    assert run(["merge", str(base_dir), str(edited), "-o", str(out3), "-q", "--scale", "0"]) == 0
    expected = (load_file(os.path.join(edited, "adapter_model.safetensors"))[key]).bfloat16()
    assert torch.equal(load_dir(out3)["model.embed_tokens.weight"], expected)


def run(argv):
    from lora.cli import commands as cli_main

    parser = argparse.ArgumentParser(prog="lora")
    sub = parser.add_subparsers()
    cli_main.add_merge_arguments(sub.add_parser("merge"))
    args = parser.parse_args(argv)
    return cli_main.run_merge(args)


# --------------------------------------------------------------------- bad inputs write nothing


def rewrite_adapter(src, dst, edit):
    shutil.copytree(src, dst)
    path = os.path.join(dst, "adapter_model.safetensors")
    tensors = edit(load_file(path))
    save_file(tensors, path, metadata={"format": "pt"})
    return dst


def rename_key(tensors, old, new):
    return {k.replace(old, new): v for k, v in tensors.items()}


def bad_inputs(llama, tmp):
    base, adapter = llama["bases"]["fp32"], llama["adapter"]
    cases = {}
    small = make_adapter(transformers.LlamaForCausalLM(llama_config(hidden=32)),
                         str(tmp / "small"), seed=5, r=4, target_modules=["q_proj"])  # fmt: skip
    cases["shape"] = (base, small, "model.layers.0.self_attn.q_proj")
    cases["missing module"] = (
        base,
        rewrite_adapter(
            adapter, tmp / "missing", lambda t: rename_key(t, "layers.1.", "layers.7.")
        ),
        "model.layers.7.",
    )
    corrupt = tmp / "corrupt-base"
    shutil.copytree(base, corrupt)
    shard = sorted(glob.glob(str(corrupt / "model-*.safetensors")))[-1]
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 7)
    cases["truncated shard"] = (str(corrupt), adapter, os.path.basename(shard))
    garbage = tmp / "garbage-adapter"
    shutil.copytree(adapter, garbage)
    (garbage / "adapter_model.safetensors").write_bytes(
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json"
    )
    cases["corrupt adapter"] = (base, str(garbage), "adapter_model.safetensors")
    int8 = tmp / "int8-base"
    int8.mkdir()
    shutil.copy(os.path.join(base, "config.json"), int8)
    tensors = load_dir(base)
    tensors["model.layers.0.self_attn.v_proj.weight"] = tensors[
        "model.layers.0.self_attn.v_proj.weight"].to(torch.int8)  # fmt: skip
    save_file(tensors, int8 / "model.safetensors", metadata={"format": "pt"})
    cases["unsupported dtype"] = (str(int8), adapter, "I8")
    cases["no adapter config"] = (base, str(tmp / "small" / "nothing"), "adapter_config.json")
    cases["dora tensor"] = (
        base,
        rewrite_adapter(adapter, tmp / "extra-key", lambda t: {
            **t, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector":
            torch.ones(64)}),
        "lora_magnitude_vector",
    )  # fmt: skip
    return cases


@pytest.fixture(scope="module")
def bad(llama, tmp_path_factory):
    return bad_inputs(llama, tmp_path_factory.mktemp("bad"))


CASES = ["shape", "missing module", "truncated shard", "corrupt adapter", "unsupported dtype",
         "no adapter config", "dora tensor"]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_bad_input_writes_nothing(bad, case, tmp_path, capsys):
    base, adapter, culprit = bad[case]
    out = tmp_path / "out"
    before = snapshot(base)
    with pytest.raises(ValueError, match=culprit.replace(".", r"\.")):
        checkpoint.merge_checkpoint(base, [adapter], out, progress=False)
    assert os.listdir(tmp_path) == []  # no output, no temporary directory
    capsys.readouterr()
    assert run(["merge", str(base), str(adapter), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and culprit in err and err.startswith("lora merge: error:")
    assert os.listdir(tmp_path) == []
    assert snapshot(base) == before


def snapshot(directory):
    return {p: (os.path.getsize(p), os.path.getmtime(p))
            for p in glob.glob(os.path.join(directory, "**"), recursive=True)}  # fmt: skip


def test_existing_output_refused_then_replaced_with_force(llama, tmp_path, capsys):
    base, adapter = llama["bases"]["fp16"], llama["adapter"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        checkpoint.merge_checkpoint(base, adapter, out, progress=False)
    assert run(["merge", base, adapter, "-o", str(out), "-q"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"] and sorted(os.listdir(tmp_path)) == ["out"]
    checkpoint.merge_checkpoint(base, adapter, out, force=True, progress=False)
    assert "keep.txt" not in os.listdir(out) and "config.json" in os.listdir(out)
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_never_writes_into_base_or_over_inputs(llama, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(llama["bases"]["fp32"], base)
    before = snapshot(base)
    with pytest.raises(ValueError, match="or inside it"):
        checkpoint.merge_checkpoint(base, llama["adapter"], base / "merged", progress=False)
    with pytest.raises(ValueError, match="must not be the base"):
        checkpoint.merge_checkpoint(base, llama["adapter"], base, force=True, progress=False)
    with pytest.raises(ValueError, match="replace the input"):
        checkpoint.merge_checkpoint(base, llama["adapter"], tmp_path, force=True, progress=False)
    with pytest.raises(ValueError, match="scales"):
        checkpoint.merge_checkpoint(base, llama["adapter"], tmp_path / "o", scales=[1.0, 2.0])
    assert snapshot(base) == before and sorted(os.listdir(tmp_path)) == ["base"]


# ------------------------------------------------------------------------ bf16 bit patterns


def test_bf16_rounding_matches_torch():
    rng = np.random.default_rng(0)
    special = np.array([0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000, 0x00000001, 0x80000001,
                        0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0x7F7F8000, 0x007FFFFF,
                        0x00008000, 0x00018000, 0x80000000, 0],
                       dtype=np.uint32)  # fmt: skip
    bits = np.concatenate([special, rng.integers(0, 2**32, 1_000_000, dtype=np.uint64)
                           .astype(np.uint32)])  # fmt: skip
    values = bits.view(np.float32)
    ours = f32_to_bf16(values)
    theirs = torch.from_numpy(values.copy()).to(torch.bfloat16).view(torch.int16).numpy()
    nan = np.isnan(values)
    np.testing.assert_array_equal(ours[~nan], theirs.view(np.uint16)[~nan])
    assert np.all(ours[nan] == 0x7FC0)  # c10's scalar NaN; torch's vector path gives 0xFFFF
    every = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    widened = torch.from_numpy(every.view(np.int16).copy()).view(torch.bfloat16).float()
    np.testing.assert_array_equal(bf16_to_f32(every).view(np.uint32),
                                  widened.numpy().view(np.uint32))  # fmt: skip
