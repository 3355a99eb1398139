"""Interoperability with PyTorch, PEFT and transformers (skipped when they are absent).

- A PyTorch MLP (Embedding + Linear layers, modules_to_save, biases) mirrored in lora.nn:
  a PEFT-saved adapter with non-zero B loads here and gives PEFT's outputs; an adapter saved
  here loads in PEFT and gives ours; after one backward every A and B gradient matches torch
  autograd through the PEFT model.
- A tiny BERT from transformers (random weights from a BertConfig, no download): the model
  is mirrored here only as a module tree (its state dict loads by name, strictly). BERT's
  attention is not part of lora.nn, so outputs and gradients are compared per targeted layer:
  the inputs and output gradients of every PEFT LoRA layer are captured with hooks during a
  full forward/backward of the PEFT model, fed to our layer, and our outputs and A/B
  gradients compared with PEFT's. The word-embedding LoRA is compared end to end.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import lora  # noqa: E402
from lora import nn  # noqa: E402

torch.manual_seed(0)


class TorchMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(20, 12, padding_idx=0)
        self.body = torch.nn.Sequential(
            torch.nn.Linear(12, 16), torch.nn.GELU(), torch.nn.Linear(16, 16), torch.nn.Tanh()
        )
        self.norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, 5)

    def forward(self, ids):
        return self.head(self.norm(self.body(self.embed(ids))))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 12, padding_idx=0)
        self.body = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 16), nn.Tanh())
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 5)

    def forward(self, ids):
        return self.head(self.norm(self.body(self.embed(ids))))

    def backward(self, dout):
        return self.embed.backward(self.body.backward(self.norm.backward(self.head.backward(dout))))


CONFIG = {
    "r": 4,
    "lora_alpha": 8,
    "target_modules": ["embed", "body.0", "body.2"],
    "modules_to_save": ["head"],
    "bias": "lora_only",
    "rank_pattern": {"body.2": 2},
    "alpha_pattern": {"embed": 3},
}
IDS = np.array([[1, 4, 0, 19, 7], [3, 3, 12, 0, 5]])


def _models():
    base = TorchMLP()
    ours = MLP()
    ours.load_state_dict({k: v.detach().numpy().copy() for k, v in base.state_dict().items()})
    return base, ours


def _peft_model(base, **overrides):
    config = peft.LoraConfig(**{**CONFIG, "init_lora_weights": False, **overrides})
    model = peft.get_peft_model(base, config)
    with torch.no_grad():  # every B non-zero, every trained part moved off its start
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _run_torch(model):
    return model(torch.from_numpy(IDS)).detach().numpy()


def test_peft_saved_adapter_loads_and_matches(tmp_path):
    base, ours = _models()
    pm = _peft_model(base, use_rslora=True)
    pm.save_pretrained(tmp_path)
    lora.load_adapter(ours, tmp_path)
    assert ours.body[2].r == 2 and ours.embed.scaling == pytest.approx(3 / 2)
    assert np.abs(ours.body[0].lora_B.data).min() > 0
    expect = _run_torch(pm.eval())
    got = ours.eval()(IDS)
    assert np.abs(got - expect).max() < 1e-5
    # disabled adapters give the base model on both sides
    with pm.disable_adapter():
        base_expect = _run_torch(pm)
    with lora.disable_adapters(ours):
        assert np.abs(ours(IDS) - base_expect).max() < 1e-5
    assert np.abs(base_expect - expect).max() > 1e-2  # the adapter does something


def test_peft_bf16_adapter_loads(tmp_path):
    """A PEFT adapter saved from a bfloat16 model (its safetensors file holds BF16 tensors)
    loads, each value widened exactly from its bf16 bits."""
    base, ours = _models()
    pm = _peft_model(base).to(torch.bfloat16)
    pm.save_pretrained(tmp_path)
    with open(tmp_path / "adapter_model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    lora.load_adapter(ours, tmp_path)
    expected = {n.removeprefix("base_model.model.").replace(".default.weight", "")
                .replace(".default", ""): p.detach().float().numpy()
                for n, p in pm.named_parameters() if "lora_" in n}
    got = {n: p.data for n, p in ours.named_parameters() if "lora_" in n}
    assert set(got) == set(expected) and len(got) > 0
    for name, value in got.items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


def test_our_adapter_loads_in_peft_and_matches(tmp_path):
    base, ours = _models()
    lora.wrap(ours, lora.LoraConfig(**CONFIG, init_lora_weights=False), seed=1)
    rng = np.random.default_rng(2)
    for p in lora.trainable_parameters(ours):
        p.data += 0.3 * rng.standard_normal(p.shape).astype(np.float32)
    lora.save_adapter(ours, tmp_path)
    pm = peft.PeftModel.from_pretrained(base, tmp_path)
    assert np.abs(_run_torch(pm.eval()) - ours.eval()(IDS)).max() < 1e-5


def _norm(name):
    """A parameter name on either side, without PEFT's wrapper levels."""
    name = name.removeprefix("base_model.model.").replace(".default", "")
    name = name.replace(".modules_to_save.", ".").replace(".base_layer.", ".")
    return name.removesuffix(".weight") if ".lora_" in name else name


def test_gradients_match_torch_autograd(tmp_path):
    base, ours = _models()
    pm = _peft_model(base)
    pm.save_pretrained(tmp_path)
    lora.load_adapter(ours, tmp_path)
    targets = np.array([[0, 1, 2, 3, 4], [4, 3, 2, 1, 0]])
    pm.train()
    logits = pm(torch.from_numpy(IDS)).reshape(-1, 5)
    torch_loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(targets).reshape(-1))
    torch_loss.backward()
    ours.train()
    loss, dlogits = nn.cross_entropy(ours(IDS), targets)
    assert loss == pytest.approx(torch_loss.item(), rel=1e-5)
    ours.backward(dlogits)
    theirs = {_norm(n): p.grad.numpy() for n, p in pm.named_parameters() if p.requires_grad}
    mine = {_norm(n): p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert sorted(mine) == sorted(theirs)
    assert sum(k.split(".")[-1].startswith("lora_") for k in mine) == 6
    for name, g in mine.items():
        ref = theirs[name]
        rel = np.abs(g - ref).max() / np.abs(ref).max()
        assert rel < 1e-4, (name, rel)


# -- a transformers model built from a config ------------------------------------------------
BERT_TARGETS = ["query", "value", "dense", "word_embeddings"]


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)  # the same weights whichever tests ran before
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
        hidden_act="gelu",
    )
    return transformers.BertModel(config, add_pooling_layer=False).eval(), config


def _mirror_bert(config):
    """lora.nn modules under BertModel's names, enough to load its state dict strictly."""
    h, i = config.hidden_size, config.intermediate_size
    emb = nn.Module()
    emb.word_embeddings = nn.Embedding(config.vocab_size, h, padding_idx=config.pad_token_id)
    emb.position_embeddings = nn.Embedding(config.max_position_embeddings, h)
    emb.token_type_embeddings = nn.Embedding(config.type_vocab_size, h)
    emb.LayerNorm = nn.LayerNorm(h, eps=config.layer_norm_eps)

    def layer():
        block = nn.Module()
        attn = block.attention = nn.Module()
        attn.self = nn.ModuleDict({n: nn.Linear(h, h) for n in ("query", "key", "value")})
        attn.output = nn.ModuleDict({"dense": nn.Linear(h, h), "LayerNorm": nn.LayerNorm(h)})
        block.intermediate = nn.ModuleDict({"dense": nn.Linear(h, i)})
        block.output = nn.ModuleDict({"dense": nn.Linear(i, h), "LayerNorm": nn.LayerNorm(h)})
        return block

    model = nn.Module()
    model.embeddings = emb
    model.encoder = nn.Module()
    model.encoder.layer = nn.ModuleList([layer() for _ in range(config.num_hidden_layers)])
    return model


def _capture(pm):
    """Hooks recording each PEFT LoRA layer's input and output gradient."""
    seen = {}

    def make(path):
        def fwd(module, inputs, output):
            seen.setdefault(path, {})["x"] = inputs[0].detach().numpy().copy()
            seen[path]["y"] = output.detach().numpy().copy()

        def bwd(module, grad_in, grad_out):
            seen[path]["dy"] = grad_out[0].detach().numpy().copy()

        return fwd, bwd

    for name, module in pm.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            path = name.removeprefix("base_model.model.")
            fwd, bwd = make(path)
            module.register_forward_hook(fwd)
            module.register_full_backward_hook(bwd)
    return seen


def _bert_peft(bert):
    config = peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=BERT_TARGETS, init_lora_weights=False
    )
    pm = peft.get_peft_model(bert, config)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    return pm


def test_transformers_bert_adapter_per_layer(tmp_path):
    bert, config = _tiny_bert()
    ours = _mirror_bert(config)
    ours.load_state_dict({k: v.numpy().copy() for k, v in bert.state_dict().items()})  # strict
    pm = _bert_peft(bert)
    pm.save_pretrained(tmp_path)
    lora.load_adapter(ours, tmp_path)
    paths = [p for p, _ in lora.lora_layers(ours)]
    assert len(paths) == 1 + 2 * 5  # word_embeddings + (query, value, 3 dense) per layer

    seen = _capture(pm)
    ids = torch.tensor([[2, 7, 11, 49, 0, 3], [5, 5, 9, 1, 30, 2]])
    out = pm(input_ids=ids).last_hidden_state
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    grads = {
        n.removeprefix("base_model.model."): p.grad.numpy()
        for n, p in pm.named_parameters()
        if p.requires_grad
    }
    assert set(seen) == set(paths)
    worst_y = worst_g = 0.0
    ours.train()
    for path in paths:
        layer = ours.get_submodule(path)
        x = seen[path]["x"]
        x = x if np.issubdtype(x.dtype, np.integer) else x.astype(np.float32)
        y = layer(x)
        worst_y = max(worst_y, np.abs(y - seen[path]["y"]).max())
        layer.backward(seen[path]["dy"])
        if isinstance(layer, lora.LoRAEmbedding):
            pairs = [
                (layer.lora_embedding_A, f"{path}.lora_embedding_A.default"),
                (layer.lora_embedding_B, f"{path}.lora_embedding_B.default"),
            ]
        else:
            pairs = [
                (layer.lora_A, f"{path}.lora_A.default.weight"),
                (layer.lora_B, f"{path}.lora_B.default.weight"),
            ]
        for p, key in pairs:
            ref = grads[key]
            worst_g = max(worst_g, np.abs(p.grad - ref).max() / np.abs(ref).max())
    print(f"BERT per-layer: max |dy| {worst_y:.2e}, max rel grad error {worst_g:.2e}")
    assert worst_y < 1e-5, worst_y
    assert worst_g < 1e-4, worst_g


def test_transformers_bert_our_adapter_loads_in_peft(tmp_path):
    bert, config = _tiny_bert()
    ours = _mirror_bert(config)
    ours.load_state_dict({k: v.numpy().copy() for k, v in bert.state_dict().items()})
    lora.wrap(
        ours,
        lora.LoraConfig(r=4, lora_alpha=16, target_modules=BERT_TARGETS, init_lora_weights=False),
    )
    lora.save_adapter(ours, tmp_path)
    pm = peft.PeftModel.from_pretrained(bert, tmp_path)
    seen = _capture(pm)
    pm(input_ids=torch.tensor([[2, 7, 11, 49, 0, 3]]))
    ours.eval()
    worst = 0.0
    for path, layer in lora.lora_layers(ours):
        x = seen[path]["x"]
        worst = max(worst, np.abs(layer(x) - seen[path]["y"]).max())
    assert worst < 1e-5
