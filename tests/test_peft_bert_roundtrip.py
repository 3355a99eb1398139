"""Adapters moving between PEFT and lora on a whole transformers model built from a config
(random weights, no download): the model's outputs, not a layer's, must agree."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import lora  # noqa: E402
from lora.models import BertModel  # noqa: E402

CONFIG = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=48, max_position_embeddings=16, hidden_dropout_prob=0.0,
              attention_probs_dropout_prob=0.0)
TARGETS = ["query", "value", "dense"]


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    hf = transformers.BertModel(transformers.BertConfig(**CONFIG), add_pooling_layer=False)
    hf.save_pretrained(tmp_path / "base")  # config.json + model.safetensors
    return hf.eval(), tmp_path


def batch():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, CONFIG["vocab_size"], (3, 9))
    mask = np.ones((3, 9), np.int64)
    mask[1, 5:] = 0
    return ids, mask


def hf_output(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    return out.last_hidden_state.numpy()


def test_peft_adapter_loads_here_with_peft_outputs(checkpoint):
    hf, tmp = checkpoint
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    pm = peft.get_peft_model(hf, cfg).eval()  # random A and non-zero B
    pm.save_pretrained(tmp / "adapter")
    ids, mask = batch()
    want = hf_output(pm, ids, mask)

    ours = BertModel.from_pretrained(tmp / "base").eval()
    base_out = ours(ids, mask)
    lora.load_adapter(ours, tmp / "adapter")
    got = ours(ids, mask)
    keep = mask.astype(bool)
    assert np.abs(got - base_out)[keep].max() > 1e-3  # the adapter changes the outputs
    assert np.abs(got - want)[keep].max() < 1e-5


def test_adapter_saved_here_loads_in_peft_with_our_outputs(checkpoint):
    hf, tmp = checkpoint
    ours = BertModel.from_pretrained(tmp / "base")
    lora.wrap(ours, lora.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    rng = np.random.default_rng(2)
    for _, layer in lora.lora_layers(ours):
        layer.lora_B.data[...] = rng.standard_normal(layer.lora_B.data.shape) * 0.1
    ours.eval()
    ids, mask = batch()
    got = ours(ids, mask)
    lora.save_adapter(ours, tmp / "ours")

    base_out = hf_output(hf, ids, mask)
    pm = peft.PeftModel.from_pretrained(hf, tmp / "ours").eval()
    want = hf_output(pm, ids, mask)
    keep = mask.astype(bool)
    assert np.abs(want - base_out)[keep].max() > 1e-3  # the adapter changes the outputs
    assert np.abs(got - want)[keep].max() < 1e-5
