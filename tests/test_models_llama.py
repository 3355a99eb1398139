"""lora.models.LlamaForCausalLM against transformers on random small checkpoints saved with
save_pretrained: logits (GQA, tied and untied heads, q/k/v biases, Qwen2 and Mistral, llama3
and linear rope scaling, padding masks, position_ids), the causal-LM loss, every parameter's
gradient under full fine-tuning, and LoRA A/B gradients against PEFT + torch autograd."""

import numpy as np
import pytest

import lora
from lora import nn
from lora.models import LlamaConfig, LlamaForCausalLM
from lora.models.llama import rope_inv_freq

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 97
BASE = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
            num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8}
CASES = {
    "gqa-untied": ("llama", dict(BASE)),
    "tied-bias-llama3": ("llama", dict(BASE, tie_word_embeddings=True, attention_bias=True,
                                       rope_scaling=LLAMA3, rope_theta=500.0)),
    "mha-linear": ("llama", dict(BASE, num_key_value_heads=6,
                                 rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "gqa3-headdim": ("llama", dict(BASE, num_attention_heads=3, num_key_value_heads=1,
                                   head_dim=10)),
    "qwen2": ("qwen2", dict(BASE, tie_word_embeddings=True)),
    "mistral": ("mistral", dict(BASE, sliding_window=None)),
}
HF_CLASS = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
            "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
            "mistral": ("MistralConfig", "MistralForCausalLM")}


def build(kind, cfg, path, seed=0):
    torch.manual_seed(seed)
    config_cls, model_cls = (getattr(transformers, n) for n in HF_CLASS[kind])
    hf = model_cls(config_cls(**cfg)).eval()
    with torch.no_grad():  # norms away from 1 so their weights matter
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(path, safe_serialization=True)
    return hf


def batch(b=3, s=13, seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (b, s))
    mask = np.ones((b, s), np.int64)
    mask[1, :4] = 0   # left padding
    mask[2, 9:] = 0   # right padding
    return ids, mask


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def hf_logits(hf, ids, mask=None, position_ids=None):
    kw = {} if mask is None else {"attention_mask": torch.from_numpy(mask)}
    if position_ids is not None:
        kw["position_ids"] = torch.from_numpy(position_ids)
    with torch.no_grad():
        return hf(torch.from_numpy(ids), **kw).logits.numpy()


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case, tmp_path):
    kind, cfg = CASES[case]
    hf = build(kind, cfg, tmp_path)
    ours = LlamaForCausalLM.from_pretrained(tmp_path)
    assert not ours.training
    assert ours.config.model_type == kind
    ids, mask = batch()
    keep = mask.astype(bool)
    got, want = ours(ids), hf_logits(hf, ids)
    assert got.shape == (3, 13, VOCAB) and got.dtype == np.float32
    assert rel(got, want) < 1e-4
    got, want = ours(ids, mask), hf_logits(hf, ids, mask)
    assert rel(got[keep], want[keep]) < 1e-4
    assert np.isfinite(got).all()
    # left-padded items with their own positions (what generation passes)
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    got, want = ours(ids, mask, position_ids=pos), hf_logits(hf, ids, mask, pos)
    assert rel(got[keep], want[keep]) < 1e-4
    assert rel(ours(ids[:, :1]), hf_logits(hf, ids[:, :1])) < 1e-4  # seq 1
    # lora.models.from_pretrained dispatches on config.json (llama, mistral, qwen2)
    again = lora.models.from_pretrained(tmp_path)
    assert type(again) is LlamaForCausalLM
    np.testing.assert_array_equal(again(ids), ours(ids))


def test_tied_head_shares_the_embedding(tmp_path):
    kind, cfg = CASES["tied-bias-llama3"]
    build(kind, cfg, tmp_path)
    ours = LlamaForCausalLM.from_pretrained(tmp_path)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert "lm_head.weight" not in dict(ours.named_parameters())
    attn = ours.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.o_proj.bias is not None


def test_rope_inv_freq_matches_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    for scaling in (LLAMA3, {"rope_type": "linear", "factor": 4.0}):
        hf_cfg = transformers.LlamaConfig(**dict(BASE, rope_scaling=dict(scaling),
                                                 rope_theta=500.0))
        want, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf_cfg, "cpu")
        got = rope_inv_freq(LlamaConfig(**dict(BASE, rope_scaling=scaling, rope_theta=500.0)))
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)
        assert not np.allclose(got, rope_inv_freq(LlamaConfig(**dict(BASE, rope_theta=500.0))))


def test_causal_lm_loss_matches_transformers(tmp_path):
    kind, cfg = CASES["gqa-untied"]
    hf = build(kind, cfg, tmp_path)
    ids, mask = batch()
    labels = np.where(mask > 0, ids, -100)
    labels[0, 5] = -100
    with torch.no_grad():
        want = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                  labels=torch.from_numpy(labels)).loss.item()
    logits = hf_logits(hf, ids, mask)
    loss, dlogits = nn.causal_lm_loss(logits, labels)
    assert abs(loss - want) < 1e-5 * abs(want)
    t = torch.from_numpy(logits).requires_grad_()
    torch.nn.functional.cross_entropy(t[:, :-1].reshape(-1, VOCAB),
                                      torch.from_numpy(labels[:, 1:]).reshape(-1)).backward()
    np.testing.assert_allclose(dlogits, t.grad.numpy(), atol=1e-7)
    assert (dlogits[:, -1] == 0).all()


def torch_grads(hf, ids, mask, labels, names=None):
    out = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
             labels=torch.from_numpy(labels))
    out.loss.backward()
    return {n: p.grad.numpy() for n, p in hf.named_parameters()
            if p.grad is not None and (names is None or n in names)}


@pytest.mark.parametrize("case", ["tied-bias-llama3", "gqa3-headdim"])
def test_full_fine_tuning_gradients_match_torch(case, tmp_path):
    """Every parameter trainable: embeddings (tied with the head or not), norms, biases and
    projections all get torch autograd's gradient."""
    kind, cfg = CASES[case]
    hf = build(kind, cfg, tmp_path).train()
    ids, mask = batch()
    labels = np.where(mask > 0, ids, -100)
    want = torch_grads(hf, ids, mask, labels)
    ours = LlamaForCausalLM.from_pretrained(tmp_path).train()
    loss, dlogits = nn.causal_lm_loss(ours(ids, mask), labels)
    ours.backward(dlogits)
    got = {n: p.grad for n, p in ours.named_parameters()}
    assert set(got) == set(want) - ({"lm_head.weight"} if cfg.get("tie_word_embeddings") else set())
    for name, g in got.items():
        assert g is not None, name
        assert rel(g, want[name]) < 1e-4, name


def peft_name(name):
    """lora's model.layers.0.self_attn.q_proj.lora_A -> PEFT's parameter name."""
    return "base_model.model." + name + ".default.weight"


@pytest.mark.parametrize("targets,path", [(["q_proj", "v_proj"], "logits"),
                                          ("all-linear", "logits"),
                                          ("all-linear", "fused"),
                                          ("all-linear", "fused-checkpointing")])
def test_lora_gradients_match_peft(targets, path, tmp_path):
    """The LoRA A/B gradients of the causal-LM loss against PEFT + torch autograd, through
    logits + causal_lm_loss, the fused labels= path, and the fused path with checkpointing."""
    peft = pytest.importorskip("peft")
    kind, cfg = CASES["tied-bias-llama3"]
    hf = build(kind, cfg, tmp_path / "base")
    pcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
                           init_lora_weights=False, task_type="CAUSAL_LM")
    pm = peft.get_peft_model(hf, pcfg).train()  # random A and non-zero B
    pm.save_pretrained(tmp_path / "adapter")
    ids, mask = batch()
    labels = np.where(mask > 0, ids, -100)
    want = torch_grads(pm, ids, mask, labels)

    ours = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    lora.load_adapter(ours, tmp_path / "adapter")
    ours.train()
    if path == "logits":
        loss, dlogits = nn.causal_lm_loss(ours(ids, mask), labels)
        ours.backward(dlogits)
    else:
        if path == "fused-checkpointing":
            ours.gradient_checkpointing_enable()
        loss = ours(ids, mask, labels=labels)
        ours.backward()
    trained = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n for n in trained)
    assert not any(n.startswith("lm_head") for n in trained)  # all-linear leaves the head
    assert {peft_name(n) for n in trained} == set(want)
    for name, p in trained.items():
        assert rel(p.grad, want[peft_name(name)]) < 1e-4, name
    with torch.no_grad():
        want_loss = pm(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                       labels=torch.from_numpy(labels)).loss.item()
    assert abs(loss - want_loss) < 1e-5 * abs(want_loss)


def test_lora_training_lowers_the_loss(tmp_path):
    kind, cfg = CASES["gqa-untied"]
    build(kind, cfg, tmp_path)
    model = lora.wrap(LlamaForCausalLM.from_pretrained(tmp_path),
                      target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = lora.optim.AdamW(params, lr=1e-2)
    ids, _ = batch()
    losses = []
    for _ in range(8):
        model.zero_grad()
        loss, dlogits = nn.causal_lm_loss(model(ids), ids)
        model.backward(dlogits)
        opt.step()
        losses.append(loss)
    assert losses[-1] < losses[0] - 0.05


def test_from_pretrained_refuses_other_models(tmp_path):
    import json
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert'"):
        LlamaForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
        LlamaConfig(**dict(BASE, rope_scaling={"rope_type": "yarn", "factor": 2.0}))
    with pytest.raises(ValueError, match="num_key_value_heads"):
        LlamaConfig(**dict(BASE, num_key_value_heads=4))
