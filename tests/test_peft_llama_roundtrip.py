"""Causal-LM adapters moving between PEFT and lora on whole transformers Llama-family models
(random small configs, no download): adapters saved here load with `PeftModel.from_pretrained`
on transformers' model and give our logits; PEFT's load here and give PEFT's; `lora merge` of
a CAUSAL_LM adapter gives transformers a checkpoint with the adapted model's logits."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import lora  # noqa: E402
from lora.models import LlamaForCausalLM  # noqa: E402

VOCAB = 89
BASE = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
            num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64)
MODELS = {
    "llama-untied": ("LlamaConfig", "LlamaForCausalLM", dict(BASE)),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", dict(BASE, tie_word_embeddings=True)),
    "qwen2-bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(BASE, tie_word_embeddings=True)),
}


def build(case, path):
    config_cls, model_cls, cfg = MODELS[case]
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**cfg)).eval()
    hf.save_pretrained(path, safe_serialization=True)
    return hf


def batch():
    rng = np.random.default_rng(3)
    ids = rng.integers(0, VOCAB, (2, 11))
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding, as a batched prompt has it
    return ids, mask


def hf_logits(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    return out.logits.numpy()


def rel(a, b, keep):
    return float(np.abs(a - b)[keep].max() / np.abs(b)[keep].max())


@pytest.mark.parametrize("case", MODELS)
@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_adapter_saved_here_loads_in_peft_with_our_logits(case, targets, tmp_path):
    hf = build(case, tmp_path / "base")
    ours = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    lora.wrap(ours, lora.LoraConfig(r=4, lora_alpha=16, target_modules=targets,
                                    task_type="CAUSAL_LM"))
    rng = np.random.default_rng(4)
    for _, layer in lora.lora_layers(ours):
        layer.lora_B.data[...] = rng.standard_normal(layer.lora_B.data.shape) * 0.05
    ours.eval()
    ids, mask = batch()
    got = ours(ids, mask)
    lora.save_adapter(ours, tmp_path / "adapter")

    keep = mask.astype(bool)
    base = hf_logits(hf, ids, mask)
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    assert type(pm).__name__ == "PeftModelForCausalLM"
    want = hf_logits(pm, ids, mask)
    assert rel(want, base, keep) > 1e-3  # the adapter changes the logits
    assert rel(got, want, keep) < 1e-4
    loaded = {n for n, _ in pm.named_parameters() if ".lora_" in n}
    assert len(loaded) == 2 * len(lora.lora_layers(ours))
    assert not any("lm_head" in n for n in loaded)


@pytest.mark.parametrize("case", MODELS)
def test_peft_adapter_loads_here_with_peft_logits(case, tmp_path):
    hf = build(case, tmp_path / "base")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                          init_lora_weights=False, task_type="CAUSAL_LM")
    pm = peft.get_peft_model(hf, cfg).eval()  # random A and non-zero B
    pm.save_pretrained(tmp_path / "adapter")
    ids, mask = batch()
    want = hf_logits(pm, ids, mask)

    ours = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    lora.load_adapter(ours, tmp_path / "adapter")
    got = ours.eval()(ids, mask)
    assert rel(got, want, mask.astype(bool)) < 1e-4


def test_lora_merge_of_a_causal_lm_adapter_gives_peft_logits(tmp_path):
    hf = build("llama-tied", tmp_path / "base")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                          init_lora_weights=False, task_type="CAUSAL_LM")
    pm = peft.get_peft_model(hf, cfg).eval()
    pm.save_pretrained(tmp_path / "adapter")
    ids, mask = batch()
    want = hf_logits(pm, ids, mask)

    from lora.cli.commands import main
    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"),
                 "-o", str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    keep = mask.astype(bool)
    assert rel(hf_logits(merged, ids, mask), want, keep) < 1e-4
    ours = LlamaForCausalLM.from_pretrained(tmp_path / "merged")
    assert rel(ours(ids, mask), want, keep) < 1e-4
