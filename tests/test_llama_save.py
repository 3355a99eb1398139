"""LlamaForCausalLM.save_pretrained: a LoRA-tuned model written with the adapter merged loads
in transformers (and here) with the adapted model's logits, on random small Llama-family
configs (untied, tied, Qwen2 with biases)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import lora  # noqa: E402
from lora.models import LlamaForCausalLM  # noqa: E402
from test_peft_llama_roundtrip import MODELS, batch, build, hf_logits, rel  # noqa: E402


@pytest.mark.parametrize("case", MODELS)
def test_saved_model_loads_in_transformers_with_the_adapted_logits(case, tmp_path):
    build(case, tmp_path / "base")
    ours = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    lora.wrap(ours, target_modules="all-linear", r=4, lora_alpha=8, seed=0)
    rng = np.random.default_rng(5)
    for _, layer in lora.lora_layers(ours):
        layer.lora_B.data[...] = rng.standard_normal(layer.lora_B.data.shape) * 0.05
    ours.eval()
    ids, mask = batch()
    want = ours(ids, mask)
    ours.save_pretrained(tmp_path / "merged")
    assert lora.lora_layers(ours)  # the model itself keeps its adapter
    np.testing.assert_array_equal(ours(ids, mask), want)

    keep = mask.astype(bool)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(hf).__name__ == MODELS[case][1]
    assert rel(hf_logits(hf, ids, mask), want, keep) < 1e-4
    again = LlamaForCausalLM.from_pretrained(tmp_path / "merged")
    assert rel(again(ids, mask), want, keep) < 1e-5
    assert again.config == ours.config
