"""lora.wrap and friends: which layers get LoRA, what trains, LoraConfig, merge_and_unload,
unload and disable_adapters."""

import json
import warnings

import numpy as np
import pytest

import lora
from lora import nn
from lora.tuners import ModulesToSaveWrapper, lora_layers


class Block(nn.Module):
    def __init__(self, rng):
        super().__init__()
        self.q_proj = nn.Linear(8, 8, rng=rng)
        self.v_proj = nn.Linear(8, 8, rng=rng)
        self.mlp = nn.Sequential(nn.Linear(8, 16, rng=rng), nn.GELU(), nn.Linear(16, 8, rng=rng))
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(x + self.mlp(self.q_proj(x) + self.v_proj(x)))


class Net(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.embed = nn.Embedding(30, 8, rng=rng)
        self.layers = nn.ModuleList([Block(rng), Block(rng)])
        self.lm_head = nn.Linear(8, 30, rng=rng)

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.layers:
            h = block(h)
        return self.lm_head(h)


IDS = np.array([[1, 5, 7, 29], [0, 2, 2, 3]])


def _paths(model):
    return [p for p, _ in lora_layers(model)]


def test_list_targets_match_by_suffix():
    model = lora.wrap(Net(), target_modules=["q_proj", "mlp.2"])
    assert _paths(model) == [
        "layers.0.q_proj",
        "layers.0.mlp.2",
        "layers.1.q_proj",
        "layers.1.mlp.2",
    ]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{p}.lora_{m}" for p in _paths(model) for m in "AB"}
    assert isinstance(model.lora_config, lora.LoraConfig)


def test_regex_targets_must_match_the_whole_path():
    model = lora.wrap(Net(), target_modules=r"layers\.1\.(q|v)_proj")
    assert _paths(model) == ["layers.1.q_proj", "layers.1.v_proj"]
    with pytest.raises(ValueError, match="match no module"):
        lora.wrap(Net(), target_modules=r"q_proj")


def test_all_linear_skips_the_output_layer_and_exclusions():
    model = lora.wrap(Net(), target_modules="all-linear", exclude_modules=["v_proj"])
    assert _paths(model) == [
        f"layers.{i}.{n}" for i in (0, 1) for n in ("q_proj", "mlp.0", "mlp.2")
    ]


def test_unsupported_target_and_double_wrap():
    with pytest.raises(ValueError, match="LayerNorm"):
        lora.wrap(Net(), target_modules=["norm"])
    model = lora.wrap(Net(), target_modules=["q_proj"])
    with pytest.raises(ValueError, match="already"):
        lora.wrap(model, target_modules=["v_proj"])
    with pytest.raises(ValueError, match="target_modules"):
        lora.wrap(Net())


def test_rank_and_alpha_patterns():
    config = lora.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={r"layers\.1\.q_proj": 2},
        alpha_pattern={"v_proj": 32},
    )
    model = lora.wrap(Net(), config)
    layers = dict(lora_layers(model))
    assert layers["layers.1.q_proj"].r == 2 and layers["layers.1.q_proj"].scaling == 4.0
    assert layers["layers.0.q_proj"].r == 4 and layers["layers.0.q_proj"].scaling == 2.0
    assert layers["layers.0.v_proj"].scaling == 8.0


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_bias_modes(bias):
    model = lora.wrap(Net(), target_modules=["q_proj"], bias=bias)
    trainable_biases = {
        n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")
    }
    lora_biases = {"layers.0.q_proj.bias", "layers.1.q_proj.bias"}
    all_biases = {n for n, _ in Net().named_parameters() if n.endswith("bias")}
    assert trainable_biases == {"none": set(), "lora_only": lora_biases, "all": all_biases}[bias]


def test_modules_to_save_trains_a_copy():
    model = Net()
    head = model.lm_head.weight.data.copy()
    lora.wrap(model, target_modules=["q_proj"], modules_to_save=["lm_head"])
    wrapper = model.lm_head
    assert isinstance(wrapper, ModulesToSaveWrapper)
    assert wrapper.modules_to_save.weight.requires_grad
    assert not wrapper.original_module.weight.requires_grad
    model.train()
    out = model(IDS)
    _, d = nn.cross_entropy(out, IDS)
    wrapper.backward(d)
    assert (
        wrapper.modules_to_save.weight.grad is not None
        and wrapper.original_module.weight.grad is None
    )
    wrapper.modules_to_save.weight.data += 1
    with lora.disable_adapters(model):
        np.testing.assert_array_equal(model.eval()(IDS), Net().eval()(IDS))
    np.testing.assert_array_equal(wrapper.original_module.weight.data, head)
    # A name the model does not have is absent, as in PEFT (task_type="SEQ_CLS" lists
    # "classifier" and "score"); a list of which nothing matches is said out loud.
    with pytest.warns(UserWarning, match="nothead"):
        lora.wrap(Net(), target_modules=["q_proj"], modules_to_save=["nothead"])
    wrapped = lora.wrap(Net(), target_modules=["q_proj"], modules_to_save=["lm_head", "score"])
    assert isinstance(wrapped.lm_head, ModulesToSaveWrapper)


def test_print_trainable_parameters(capsys):
    model = lora.wrap(Net(), r=2, target_modules=["q_proj"])
    trainable, total = lora.print_trainable_parameters(model)
    assert trainable == 2 * (2 * 8 + 8 * 2)  # two q_proj layers, A (2, 8) and B (8, 2)
    assert total == sum(p.size for p in Net().parameters()) + trainable
    out = capsys.readouterr().out
    assert f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: " in out
    assert f"{100 * trainable / total:.4f}" in out
    assert len(lora.trainable_parameters(model)) == 4


def _trained(seed=0, **kw):
    model = Net(seed)
    lora.wrap(
        model, lora.LoraConfig(target_modules=["q_proj", "v_proj", "embed", "mlp.0"], **kw), seed=1
    )
    rng = np.random.default_rng(2)
    for p in lora.trainable_parameters(model):
        p.data += 0.1 * rng.standard_normal(p.shape).astype(p.dtype)
    return model.eval()


def test_merge_and_unload_within_float32_rounding():
    model = _trained(modules_to_save=["lm_head"])
    y = model(IDS)
    trained_head = model.lm_head.modules_to_save
    plain = lora.merge_and_unload(model)
    assert not lora_layers(plain) and "lora_config" not in plain.__dict__
    assert plain.lm_head is trained_head
    assert isinstance(plain.layers[0].q_proj, nn.Linear)
    assert sorted(plain.state_dict()) == sorted(Net().state_dict())
    assert np.abs(plain(IDS) - y).max() < 1e-5
    assert np.abs(Net()(IDS) - y).max() > 1e-2


def test_unload_gives_back_the_base_exactly():
    base_out = Net().eval()(IDS)
    model = _trained()
    lora_layers(model)[1][1].merge()
    plain = lora.unload(model)
    np.testing.assert_allclose(plain(IDS), base_out, atol=1e-6)


def test_disable_adapters_restores_state():
    model = _trained()
    y = model(IDS)
    base_out = Net().eval()(IDS)
    layer = lora_layers(model)[0][1]
    with lora.disable_adapters(model):
        np.testing.assert_array_equal(model(IDS), base_out)
    assert not layer.disabled
    np.testing.assert_array_equal(model(IDS), y)
    with pytest.raises(KeyError), lora.disable_adapters(model):
        raise KeyError
    assert not layer.disabled


def test_config_names_defaults_and_round_trip():
    c = lora.LoraConfig()
    assert (c.r, c.lora_alpha, c.lora_dropout, c.bias, c.use_rslora, c.init_lora_weights) == (
        8,
        8,
        0.0,
        "none",
        False,
        True,
    )
    c = lora.LoraConfig(r=4, target_modules={"v", "q"}, rank_pattern={"q": 2})
    d = c.to_dict()
    assert d["peft_type"] == "LORA" and d["target_modules"] == ["q", "v"]
    assert lora.LoraConfig.from_dict(d) == c
    for bad in [
        {"r": 0},
        {"bias": "some"},
        {"init_lora_weights": "eva"},
        {"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 2}},
        {"lora_dropout": 1.0},
        {"use_dora": 1},
        {"init_lora_weights": 1},
    ]:
        with pytest.raises(ValueError):
            lora.LoraConfig(**bad)


def test_config_from_peft_keys():
    d = {
        **lora.LoraConfig(r=4).to_dict(),
        "peft_version": "0.21.2",
        "layers_to_transform": None,
        "loftq_config": {},
        "megatron_core": "megatron.core",
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lora.LoraConfig.from_dict(d).r == 4
    with pytest.warns(UserWarning, match="from_the_future"):
        lora.LoraConfig.from_dict({**d, "from_the_future": 1})
    with pytest.raises(ValueError, match="layers_to_transform"):
        lora.LoraConfig.from_dict({**d, "layers_to_transform": [0]})


def test_config_reads_what_the_installed_peft_writes(tmp_path):
    """Every key of the installed PEFT's adapter_config.json is known here (read without a
    warning at its default), so a new PEFT release's keys are noticed; a PEFT feature set to
    a value is refused by name (astra_config, new in PEFT 0.22)."""
    peft = pytest.importorskip("peft")
    peft.LoraConfig(r=4, target_modules=["q"]).save_pretrained(tmp_path)
    d = json.loads((tmp_path / "adapter_config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lora.LoraConfig.from_dict(d).r == 4
    with pytest.raises(ValueError, match="astra_config"):
        lora.LoraConfig.from_dict({**d, "astra_config": {"rank": 4}})
