"""Tied-LoRA (lora/tuners/variants/tied.py): the formula and the tying, gradients against
finite differences (float64, and float32 against float64's), merging, the file format and
`lora merge`, the optimizer on a shared Parameter, training, and what it refuses."""

import json
import warnings

import numpy as np
import pytest

import lora
from lora import nn
from lora.cli.commands import main
from lora.io.safetensors import read_float_tensors, serialize

from gradcheck import numeric_gradient

U, V = "tied_lora_u", "tied_lora_v"
TARGETS = ["0", "2", "4"]  # (16, 12), then two (16, 16) layers sharing one pair
# which parts train (all four: the default)
CONFIGS = {
    "all": {},
    "AB": dict(train_u=False, train_v=False),
    "uv": dict(train_A=False, train_B=False),
    "A": dict(train_B=False, train_u=False, train_v=False),
}
X = np.random.default_rng(11).standard_normal((3, 5, 12))


def _base(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return nn.Sequential(nn.Linear(12, 16, rng=rng), nn.Tanh(), nn.Linear(16, 16, rng=rng),
                         nn.Tanh(), nn.Linear(16, 16, rng=rng), nn.Tanh(),
                         nn.Linear(16, 5, rng=rng)).astype(dtype)


def _parts(model) -> dict:
    """The adapter's Parameters by name, each once (the tied pair under its first layer)."""
    return {n: p for n, p in model.named_parameters() if ".tied_lora_" in "." + n}


def _tied(dtype=np.float64, moved=True, seed=0, **kw):
    """The base with Tied-LoRA (r = 4, alpha = 6) on TARGETS; with `moved`, every part drawn
    anew (also the frozen ones), so that each matters."""
    model = _base(dtype, seed)
    lora.wrap(model, lora.TiedLoraConfig(target_modules=TARGETS, r=4, lora_alpha=6, **kw), seed=1)
    if moved:
        rng = np.random.default_rng(seed + 5)
        for p in _parts(model).values():
            p.data[...] = 0.5 * rng.standard_normal(p.shape)
    return model


def _twin(layer, x):
    """y = x W^T + b + s * v * ((u * (x A^T)) B^T), in NumPy."""
    ad = layer.adapter("default")
    u, v = ad.extra[U].data, ad.extra[V].data
    return (x @ layer.weight.data.T + layer.bias.data
            + ad.scaling * v * ((u * (x @ ad.A.data.T)) @ ad.B.data.T))


# ------------------------------------------------------------------ the formula and the tying


@pytest.mark.parametrize("trained", CONFIGS)
def test_layers_share_one_pair_per_shape_and_start_as_the_base(trained):
    y0 = _base()(X)
    model = _tied(moved=False, **CONFIGS[trained])
    np.testing.assert_array_equal(model(X), y0)  # a fresh adapter is the base model
    l0, l2, l4 = model[0], model[2], model[4]
    assert l2.lora_A is l4.lora_A and l2.lora_B is l4.lora_B  # one Parameter each
    assert l0.lora_A is not l2.lora_A and l0.lora_A.shape == (4, 12)
    assert l2.adapter("default").extra[U] is not l4.adapter("default").extra[U]
    want = {part for part in "ABuv" if CONFIGS[trained].get(f"train_{part}", True)}
    names = {"A": ["0.tied_lora_A", "2.tied_lora_A"], "B": ["0.tied_lora_B", "2.tied_lora_B"],
             "u": [f"{i}.{U}" for i in TARGETS], "v": [f"{i}.{V}" for i in TARGETS]}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for part in want for n in names[part]}
    params = lora.trainable_parameters(model)
    assert len(params) == len({id(p) for p in params}) == sum(len(names[p]) for p in want)
    if "B" not in want:  # a frozen B is drawn (not 0), and another part starts at 0 instead
        assert np.abs(l2.lora_B.data).min() > 0


def test_forward_matches_the_formula():
    model = _tied()
    x = np.random.default_rng(2).standard_normal((7, 16))
    for layer in (model[2], model[4]):
        np.testing.assert_allclose(layer(x), _twin(layer, x), rtol=1e-12, atol=1e-12)
    rs = _base()
    lora.wrap(rs, lora.TiedLoraConfig(target_modules=["2"], r=4, lora_alpha=6, use_rslora=True))
    assert rs[2].scaling == pytest.approx(6 / 2)  # rsLoRA: alpha / sqrt(r)
    assert model[2].scaling == pytest.approx(6 / 4)


def test_parameter_counts_against_plain_lora():
    model = _tied(moved=False)
    trained, _ = lora.print_trainable_parameters(model)
    # one pair per shape, r (d_in + d_out) each, and r + d_out per layer
    assert trained == 4 * (12 + 16) + 4 * (16 + 16) + 3 * (4 + 16) == 300
    plain = lora.wrap(_base(), target_modules=TARGETS, r=4)
    assert lora.print_trainable_parameters(plain)[0] == 4 * (12 + 16) + 2 * 4 * (16 + 16)


# ------------------------------------------------------------------ gradients


def _gradcheck(model, x, rtol=1e-6, atol=1e-8, oracle=None):
    """Every part's gradient and the input's, of sum(model(x) * g), against central
    differences of `oracle` (default: the model itself) with the same dropout masks in every
    call; a frozen part gets no gradient. Returns the largest relative error seen."""
    oracle = model if oracle is None else oracle
    g = np.random.default_rng(5).standard_normal(x.shape[:-1] + (5,))

    def reseed(m):
        for i, (_, layer) in enumerate(lora.lora_layers(m)):
            layer.rng = np.random.default_rng(100 + i)

    def loss():
        reseed(oracle)
        return float((oracle(x64) * g).sum())

    x64 = x.astype(np.float64)
    model.train()
    oracle.train()
    model.zero_grad()
    reseed(model)
    model(x.astype(model[0].weight.dtype))
    dx = model.backward(g.astype(x.dtype))
    worst = 0.0
    checks = [(n, p.grad, oracle_p) for (n, p), oracle_p in
              zip(_parts(model).items(), _parts(oracle).values(), strict=True)]
    for name, grad, p in checks + [("x", dx, None)]:
        if p is not None and not p.requires_grad:
            assert grad is None, name
            continue
        want = numeric_gradient(loss, x64 if p is None else p.data)
        np.testing.assert_allclose(grad, want, rtol=rtol, atol=atol * np.abs(want).max(),
                                   err_msg=name)
        worst = max(worst, float(np.abs(grad - want).max() / np.abs(want).max()))
    return worst


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("trained", CONFIGS)
def test_float64_gradients_match_finite_differences(trained, dropout):
    _gradcheck(_tied(lora_dropout=dropout, **CONFIGS[trained]), X)


@pytest.mark.parametrize("trained", ["all", "uv"])
def test_float32_gradients_match_float64_finite_differences(trained):
    m32 = _tied(np.float32, **CONFIGS[trained])
    m64 = _tied(np.float64, moved=False, **CONFIGS[trained])
    for p64, p32 in zip(m64.parameters(), m32.parameters(), strict=True):
        p64.data[...] = p32.data  # the same values, widened exactly
    _gradcheck(m32, X.astype(np.float32), rtol=2e-4, atol=2e-5, oracle=m64)


def test_conv1d_layers_share_the_pair_of_their_shape():
    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Linear(12, 16, rng=rng), nn.Tanh(), nn.Linear(16, 16, rng=rng),
                          nn.Tanh(), nn.Conv1D(16, 16, rng=rng), nn.Tanh(),
                          nn.Linear(16, 5, rng=rng)).astype(np.float64)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="wrap: '4' is a Conv1D")
        lora.wrap(model, lora.TiedLoraConfig(target_modules=TARGETS, r=3), seed=1)
    assert model[4].fan_in_fan_out and model[4].lora_A is model[2].lora_A
    for p in _parts(model).values():
        p.data[...] = np.random.default_rng(p.size).standard_normal(p.shape)
    x = np.random.default_rng(3).standard_normal((4, 16))
    W = model[4].weight.data.T  # (out, in)
    ad = model[4].adapter("default")
    want = (x @ W.T + model[4].bias.data + ad.scaling * ad.extra[V].data
            * ((ad.extra[U].data * (x @ ad.A.data.T)) @ ad.B.data.T))
    np.testing.assert_allclose(model[4](x), want, rtol=1e-12, atol=1e-12)
    _gradcheck(model, X)
    y = model.eval()(X)
    lora.merge_adapter(model)
    np.testing.assert_allclose(model(X), y, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ merging


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-5), (np.float64, 1e-12)])
def test_merged_outputs_equal_unmerged(dtype, tol):
    model = _tied(dtype).eval()
    x = X.astype(dtype)
    y = model(x)
    sd = lora.tuners.merged_state_dict(model)
    before = {n: p.data.copy() for n, p in model.named_parameters()}
    lora.merge_adapter(model)
    np.testing.assert_allclose(model(x), y, rtol=tol, atol=tol)
    for i in TARGETS:
        np.testing.assert_allclose(model[int(i)].weight.data, sd[f"{i}.weight"], rtol=tol,
                                   atol=tol)
    assert not np.allclose(sd["2.weight"], before["2.weight"])  # the update is not nothing
    lora.unmerge_adapter(model)
    for n, p in model.named_parameters():
        np.testing.assert_allclose(p.data, before[n], rtol=tol, atol=tol, err_msg=n)
    plain = lora.merge_and_unload(model)
    assert not lora.lora_layers(plain) and set(plain.state_dict()) == set(sd)
    np.testing.assert_allclose(plain(x), y, rtol=tol, atol=tol)


# ------------------------------------------------------------------ the file format


@pytest.mark.parametrize("trained,dtype", [("all", np.float32), ("A", np.float64)])
def test_save_load_round_trip_is_exact(tmp_path, trained, dtype):
    model = _tied(dtype, **CONFIGS[trained]).eval()
    x = X.astype(dtype)
    y = model(x)
    lora.save_adapter(model, tmp_path / "t")
    config = json.loads((tmp_path / "t" / "adapter_config.json").read_text())
    assert config["peft_type"] == "TIED_LORA" and config["r"] == 4
    assert {k: config[f"train_{k}"] for k in "ABuv"} == {
        k: CONFIGS[trained].get(f"train_{k}", True) for k in "ABuv"}
    tensors = read_float_tensors(tmp_path / "t" / "adapter_model.safetensors")
    assert set(tensors) == {f"base_model.tied_lora_{p}.{s}" for p in "AB"
                            for s in ("16x12", "16x16")} | {
        f"base_model.model.{i}.{f}" for i in TARGETS for f in (U, V)}
    assert tensors["base_model.tied_lora_B.16x16"].shape == (16, 4)
    back = lora.load_adapter(_base(dtype), tmp_path / "t").eval()
    np.testing.assert_array_equal(back(x), y)
    assert back[2].lora_A is back[4].lora_A
    for (n, p), (m, q) in zip(_parts(model).items(), _parts(back).items(), strict=True):
        assert n == m and p.requires_grad == q.requires_grad
        np.testing.assert_array_equal(p.data, q.data, err_msg=n)
    lora.save_adapter(back, tmp_path / "again")
    assert ((tmp_path / "again" / "adapter_model.safetensors").read_bytes()
            == (tmp_path / "t" / "adapter_model.safetensors").read_bytes())
    assert "linear tied_lora" in lora.cli.describe_adapter(tmp_path / "t")


def test_lora_merge_cli_equals_merge_and_unload(tmp_path):
    model = _tied(np.float32).eval()
    lora.save_adapter(model, tmp_path / "adapter")
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "model.safetensors").write_bytes(
        serialize(_base(np.float32).state_dict(), metadata={"format": "pt"}))
    assert main(["merge", str(base), str(tmp_path / "adapter"), "-o", str(tmp_path / "out"),
                 "-q"]) == 0
    got = read_float_tensors(tmp_path / "out" / "model.safetensors")
    want = lora.merge_and_unload(model).state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-6, atol=1e-6, err_msg=k)
    assert not np.allclose(got["4.weight"], _base(np.float32)[4].weight.data)


def _hostile(tmp_path, name, tensors=None, config=None):
    """A copy of a good Tied-LoRA save with `tensors(dict)` / `config(dict)` applied."""
    good = tmp_path / "good"
    if not good.exists():
        lora.save_adapter(_tied(np.float32), good)
    out = tmp_path / name
    out.mkdir()
    t = read_float_tensors(good / "adapter_model.safetensors")
    c = json.loads((good / "adapter_config.json").read_text())
    (out / "adapter_model.safetensors").write_bytes(serialize(tensors(t) if tensors else t))
    (out / "adapter_config.json").write_text(json.dumps(config(c) if config else c))
    return out


def _without(key):
    return lambda t: {k: v for k, v in t.items() if k != key}


def _with(key, value):
    return lambda t: {**t, key: value}


HOSTILE = {
    "no tied A": (_without("base_model.tied_lora_A.16x16"), None,
                  r"'base_model.tied_lora_A.16x16'.*\(4, 16\), the file has none"),
    "tied B of a wrong shape": (_with("base_model.tied_lora_B.16x12", np.ones((16, 3), "f4")), None,
                                r"'base_model.tied_lora_B.16x12'.*\(16, 4\), got \(16, 3\)"),
    "a pair of no layer's shape": (_with("base_model.tied_lora_A.5x16", np.ones((4, 16), "f4")),
                                   None, r"'base_model.tied_lora_A.5x16' is no tied pair"),
    "u of another rank": (_with(f"base_model.model.2.{U}", np.ones(3, "f4")), None,
                          r"'2' has rank 3 in the file, its config says 4"),
    "no v": (_without(f"base_model.model.4.{V}"), None, r"'4'.*tied_lora_v"),
    "train_u not a bool": (None, lambda c: {**c, "train_u": "no"}, "train_u must be True or False"),
    "rank_pattern": (None, lambda c: {**c, "rank_pattern": {"2": 2}}, "rank_pattern"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_files_are_refused_naming_the_key(tmp_path, case):
    tensors, config, message = HOSTILE[case]
    bad = _hostile(tmp_path, "bad", tensors, config)
    plain = _base(np.float32)
    before = {n: p.data.copy() for n, p in plain.named_parameters()}
    with pytest.raises(lora.AdapterFormatError, match=message):
        lora.load_adapter(plain, bad)
    assert not lora.lora_layers(plain)  # left as it was
    for n, p in plain.named_parameters():
        np.testing.assert_array_equal(p.data, before[n])


def test_lora_merge_refuses_a_hostile_file(tmp_path):
    bad = _hostile(tmp_path, "bad", _without("base_model.tied_lora_B.16x16"))
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "model.safetensors").write_bytes(serialize(_base(np.float32).state_dict()))
    with pytest.raises(ValueError, match="'base_model.tied_lora_B.16x16'"):
        lora.merge_checkpoint(base, bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ training


def test_adam_steps_a_tied_parameter_once_and_frozen_parts_never():
    model = _tied(train_u=False).train()
    params = lora.trainable_parameters(model)
    tied_A = model[2].lora_A
    assert sum(p is tied_A for p in params) == 1
    lr, eps = 1e-2, 1e-8
    opt = lora.optim.Adam(params, lr=lr, eps=eps)
    frozen = {n: p.data.copy() for n, p in model.named_parameters() if not p.requires_grad}
    before = [p.data.copy() for p in params]
    model(X)
    model.backward(np.ones(X.shape[:-1] + (5,)))
    grads = [p.grad.copy() for p in params]
    opt.step()
    for p, p0, g in zip(params, before, grads, strict=True):  # Adam's first step: m^ = g, v^ = g^2
        np.testing.assert_allclose(p.data, p0 - lr * g / (np.abs(g) + eps), rtol=1e-12,
                                   atol=1e-15)
    assert opt.state[id(tied_A)]["step"] == 1
    for n, p in model.named_parameters():
        if n in frozen:
            np.testing.assert_array_equal(p.data, frozen[n], err_msg=n)
    assert set(frozen) >= {f"{i}.{U}" for i in TARGETS}
    per_layer = [p for _, layer in lora.lora_layers(model)
                 for p in layer.adapter("default").params()]
    with pytest.raises(ValueError, match="appears twice"):  # the tied pair, once per layer
        lora.optim.Adam(per_layer)


@pytest.mark.parametrize("trained,factor", [("all", 0.2), ("uv", 0.5)])
def test_training_a_tiny_model_lowers_the_loss(trained, factor):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((64, 12)).astype(np.float32)
    teacher = _base(np.float32)
    for i in (2, 4):  # the task: a low-rank change of the two (16, 16) layers
        teacher[i].weight.data += 0.5 * rng.standard_normal((16, 2)) @ rng.standard_normal((2, 16))
    target = teacher(x)
    model = _tied(np.float32, moved=False, **CONFIGS[trained]).train()
    opt = lora.optim.Adam(lora.trainable_parameters(model), lr=3e-2)
    losses = []
    for _ in range(60):
        y = model(x)
        losses.append(float(((y - target) ** 2).mean()))
        model.backward(2 * (y - target) / y.size)
        opt.step()
        model.zero_grad()
    assert losses[-1] < factor * losses[0], losses[::10]


# ------------------------------------------------------------------ refusals


def test_bad_config_values_are_refused():
    make = lambda **kw: lora.TiedLoraConfig(target_modules=TARGETS, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="train_A must be True or False"):
        make(train_A="yes")
    with pytest.raises(ValueError, match="nothing would train"):
        make(train_A=False, train_B=False, train_u=False, train_v=False)
    with pytest.raises(ValueError, match="rank_pattern"):
        make(rank_pattern={"2": 2})
    with pytest.raises(ValueError, match="use_dora"):
        make(use_dora=True)
    with pytest.raises(ValueError, match="init_lora_weights"):
        make(init_lora_weights="gaussian")
    with pytest.raises(ValueError, match="r must be"):
        make(r=0)


def test_what_it_cannot_do_is_refused():
    emb = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
    with pytest.raises(ValueError, match="does not adapt embedding"):
        lora.wrap(emb, lora.TiedLoraConfig(target_modules=["0"]))
    assert not lora.lora_layers(emb)
    model = _tied()
    lora.add_adapter(model, "plain", target_modules=["2"], r=2, seed=3)
    lora.set_adapter(model, ["default", "plain"])
    with pytest.raises(ValueError, match="tied_lora adapter among them"):
        model(X)
    lora.set_adapter(model, "default")
    with pytest.raises(ValueError, match="mixed-adapter batches"):
        with lora.adapter_names(model, ["default", "plain", "__base__"]):
            model(X)
    lora.add_adapter(model, "t2", lora.TiedLoraConfig(target_modules=TARGETS, r=4), seed=4)
    with pytest.raises(ValueError, match="combines plain LoRA"):
        lora.add_weighted_adapter(model, ["default", "t2"], [0.5, 0.5], "mix")
    assert model[2].adapter("t2").A is not model[2].lora_A  # its own tied pairs
    lora.set_adapter(model, "t2")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "0.tied_lora_A.t2", "0.tied_lora_B.t2", "2.tied_lora_A.t2", "2.tied_lora_B.t2"} | {
        f"{i}.tied_lora_{f}.t2" for i in TARGETS for f in "uv"}
