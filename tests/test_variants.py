"""LoRA variants (lora/tuners/variants): the registry, and DoRA against its NumPy twin,
finite differences and PEFT (use_dora=True) on the same torch model."""

import numpy as np
import pytest

import lora
from lora import _reference as ref
from lora import functional as F
from lora import nn
from lora.cli import describe_adapter
from lora.tuners.variants import VARIANTS, variant_for

from gradcheck import numeric_gradient
from test_adapters import IDS, MLP, _torch_mlp

DORA = "lora_magnitude_vector"


# ------------------------------------------------------------------ the norm kernel


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d_out,d_in,r", [(1, 1, 1), (70, 33, 5), (257, 130, 16), (8, 600, 40)])
def test_dora_norm_matches_twin(dtype, d_out, d_in, r):
    rng = np.random.default_rng(d_out + r)
    W = rng.standard_normal((d_out, d_in)).astype(dtype)
    A = (rng.standard_normal((r, d_in)) / np.sqrt(d_in)).astype(dtype)
    B = rng.standard_normal((d_out, r)).astype(dtype)
    want = ref.dora_norm(W.astype(np.float64), A.astype(np.float64), B.astype(np.float64), 0.7)
    tol = 2e-6 if dtype == np.float32 else 1e-12
    for got in (F.dora_norm(W, A, B, 0.7),
                F.dora_norm(np.ascontiguousarray(W.T), A, B, 0.7, fan_in_fan_out=True),
                F.dora_norm(W, A, B, 0.7, weight_sqnorm=np.einsum("ij,ij->i", W, W)),
                F.dora_norm(F.PackedWeight(W), A, B, 0.7,
                            weight_sqnorm=np.einsum("ij,ij->i", W, W))):
        assert got.dtype == dtype and got.shape == (d_out,)
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * want.max())


def test_dora_norm_over_quantized_blocks():
    rng = np.random.default_rng(3)
    W = rng.standard_normal((48, 64)).astype(np.float32)
    q = lora.quant.quantize(W, "Q8_0")
    Wq = q.dequantize()
    A = rng.standard_normal((4, 64)).astype(np.float32)
    B = rng.standard_normal((48, 4)).astype(np.float32)
    got = F.dora_norm(q.kernel_weight(), A, B, 0.5, weight_sqnorm=np.einsum("ij,ij->i", Wq, Wq))
    np.testing.assert_allclose(got, ref.dora_norm(Wq.astype(float), A, B, 0.5), rtol=1e-5)


def test_dora_norm_refuses_bad_arguments():
    W, A, B = np.ones((6, 5)), np.ones((2, 5)), np.ones((6, 2))
    with pytest.raises(ValueError, match="'B' must have shape"):
        F.dora_norm(W, A, np.ones((5, 2)), 1.0)
    with pytest.raises(ValueError, match="'A' must have shape"):
        F.dora_norm(W, np.ones((2, 4)), B, 1.0)
    with pytest.raises(TypeError, match="float64"):
        F.dora_norm(W, A, B.astype(np.float32), 1.0)
    with pytest.raises(ValueError, match="weight_sqnorm"):
        F.dora_norm(W, A, B, 1.0, weight_sqnorm=np.ones(5))
    with pytest.raises(ValueError, match="'weight_sqnorm' is required"):
        F.dora_norm(F.PackedWeight(W), A, B, 1.0)
    with pytest.raises(ValueError, match="scale"):
        F.dora_norm(W, A, B, float("nan"))
    assert np.array_equal(W, np.ones((6, 5)))  # inputs untouched


# ------------------------------------------------------------------ the registry


def test_registry_selects_by_config_field():
    assert set(VARIANTS) >= {"lora", "dora"}
    assert variant_for(lora.LoraConfig(target_modules=["fc1"])).name == "lora"
    assert variant_for(lora.LoraConfig(target_modules=["fc1"], use_dora=True)).name == "dora"
    assert variant_for({"use_dora": True}).name == "dora"
    with pytest.raises(ValueError, match="use_dora must be true or false"):
        lora.LoraConfig(target_modules=["fc1"], use_dora="yes")


# ------------------------------------------------------------------ DoRA in lora.nn


def _dora_model(dtype=np.float64, seed=0, **kw):
    model = MLP(np.random.default_rng(seed))
    for _, p in model.named_parameters():
        p.data = p.data.astype(dtype)
    lora.wrap(model, target_modules=["embed", "fc1", "fc2"], r=3, lora_alpha=6,
              use_dora=True, init_lora_weights=False, seed=1, **kw)
    rng = np.random.default_rng(seed + 7)
    for _, layer in lora.lora_layers(model):  # a magnitude that is not the norm
        m = layer.adapter("default").extra[DORA]
        m.data *= rng.uniform(0.5, 1.5, m.shape)
    return model


def _twin_linear(x, W, b, A, B, s, m):
    V = W + s * (B @ A)
    return x @ (m[:, None] * V / np.linalg.norm(V, axis=1, keepdims=True)).T + b


def test_dora_layers_match_the_formula_and_start_as_the_base():
    model = _dora_model()
    fc1 = model.fc1
    ad = fc1.adapter("default")
    x = np.random.default_rng(1).standard_normal((4, 5, 12))
    want = _twin_linear(x, fc1.weight.data, fc1.bias.data, ad.A.data, ad.B.data, ad.scaling,
                        ad.extra[DORA].data)
    np.testing.assert_allclose(fc1(x), want, rtol=1e-12, atol=1e-12)
    emb = model.embed
    ae = emb.adapter("default")
    V = emb.weight.data.T + ae.scaling * (ae.B.data @ ae.A.data)  # (dim, num)
    table = (ae.extra[DORA].data[:, None] * V / np.linalg.norm(V, axis=1, keepdims=True)).T
    np.testing.assert_allclose(emb(IDS), table[IDS], rtol=1e-12, atol=1e-12)
    fresh = MLP(np.random.default_rng(0))
    y0 = fresh(IDS)
    lora.wrap(fresh, target_modules=["embed", "fc1", "fc2"], r=3, use_dora=True, seed=2)
    np.testing.assert_allclose(fresh(IDS), y0, rtol=1e-12, atol=1e-12)  # m = ||W||, B = 0


def _check_finite_differences(model, hold_norms=False):
    """Every trainable parameter's gradient of sum(model(IDS) * g) against central
    differences, with the same dropout masks in every call (the layers' generators
    reseeded) and, for DoRA, its norms held."""
    model.train()
    g = np.random.default_rng(5).standard_normal((4, 5, 5))
    layers = [layer for _, layer in lora.lora_layers(model)]

    def reseed():
        for i, layer in enumerate(layers):
            layer.rng = np.random.default_rng(100 + i)

    def loss():
        reseed()
        return float((model(IDS) * g).sum())

    if hold_norms:
        _hold_norms(layers)
    loss()
    model.zero_grad()
    reseed()
    model.backward(g)
    for name, p in model.named_parameters():
        if p.requires_grad:
            want = numeric_gradient(loss, p.data)
            np.testing.assert_allclose(p.grad, want, rtol=1e-6, atol=1e-8, err_msg=name)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_dora_gradients_match_finite_differences(dropout):
    _check_finite_differences(_dora_model(lora_dropout=dropout), hold_norms=True)


def _hold_norms(layers):
    """DoRA's norm is a constant in backward (as in the paper and PEFT): finite differences
    must hold it at its value too."""
    for layer in layers:
        fixed = {id(ad): layer.dora_norm(ad) for ad in layer.adapters.values()}
        object.__setattr__(layer, "dora_norm", lambda ad, fixed=fixed: fixed[id(ad)])


def test_dora_input_gradient_matches_finite_differences():
    model = _dora_model(lora_dropout=0.25).train()
    fc = model.fc1
    fc.need_input_grad = True
    x = np.random.default_rng(2).standard_normal((3, 12))
    g = np.random.default_rng(3).standard_normal((3, 16))
    _hold_norms([fc])

    def loss():
        fc.rng = np.random.default_rng(9)
        return float((fc(x) * g).sum())

    loss()
    fc.rng = np.random.default_rng(9)
    fc(x)
    dx = fc.backward(g)
    np.testing.assert_allclose(dx, numeric_gradient(loss, x), rtol=1e-6, atol=1e-8)


def test_dora_merge_unmerge_and_merged_state_dict():
    model = _dora_model().eval()
    y = model(IDS)
    sd = lora.tuners.merged_state_dict(model)
    before = {k: p.data.copy() for k, p in model.named_parameters()}
    lora.merge_adapter(model)
    np.testing.assert_allclose(model(IDS), y, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(model.fc1.weight.data, sd["fc1.weight"], rtol=1e-12)
    lora.unmerge_adapter(model)
    for k, p in model.named_parameters():
        np.testing.assert_allclose(p.data, before[k], rtol=1e-10, atol=1e-12)
    plain = lora.merge_and_unload(model)
    assert not lora.lora_layers(plain)
    np.testing.assert_allclose(plain(IDS), y, rtol=1e-10, atol=1e-12)


def test_dora_float32_and_trainable_parameters():
    model = _dora_model(np.float32)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {f"{m}.{f}" for m in ("fc1", "fc2") for f in ("lora_A", "lora_B", DORA)} | {
        "embed.lora_embedding_A", "embed.lora_embedding_B", f"embed.{DORA}"}
    assert model(IDS).dtype == np.float32
    assert model.fc1.adapter("default").extra[DORA].dtype == np.float32


def test_dora_refuses_what_it_cannot_do():
    model = _dora_model()
    lora.add_adapter(model, "d2", target_modules=["fc1"], r=3, use_dora=True, seed=4)
    with pytest.raises(ValueError, match="combines plain LoRA"):
        lora.add_weighted_adapter(model, ["default", "d2"], [0.5, 0.5], "mix")
    lora.add_adapter(model, "plain", target_modules=["fc1"], r=2, seed=3)
    lora.set_adapter(model, ["default", "plain"])
    with pytest.raises(ValueError, match="dora adapter among them"):
        model(IDS)
    lora.set_adapter(model, "default")
    with pytest.raises(ValueError, match="mixed-adapter batches"):
        with lora.adapter_names(model, ["default", "plain", "__base__", "default"]):
            model(IDS)
    with pytest.raises(ValueError, match="frozen base weight"):
        model.train()
        model.fc2.weight.requires_grad = True
        model.backward(np.ones_like(model(IDS)))


def test_dora_save_load_roundtrip_and_mismatch(tmp_path):
    model = _dora_model().eval()
    y = model(IDS)
    lora.save_adapter(model, tmp_path / "a")
    back = lora.load_adapter(MLP(np.random.default_rng(0)), tmp_path / "a").eval()
    np.testing.assert_allclose(back(IDS), y, rtol=1e-5, atol=1e-6)  # float32 on disk
    info = describe_adapter(tmp_path / "a")
    assert "use_dora                 True" in info
    assert "linear dora" in info and "embedding dora" in info
    # fc1: A (3, 12) + B (16, 3) + 16 magnitudes
    assert any(line.split()[:2] == ["fc1", "linear"] and "100" in line
               for line in info.splitlines())
    plain = MLP(np.random.default_rng(0))
    lora.wrap(plain, target_modules=["embed", "fc1", "fc2"], r=3)
    with pytest.raises(lora.AdapterFormatError, match="lora_magnitude_vector"):
        lora.load_adapter(plain, tmp_path / "a")


# ------------------------------------------------------------------ against PEFT


def _peft_model(tmp_path, config_of, move):
    """A PEFT model of the torch MLP with the adapter config_of(peft) gives, its trained
    tensors changed in place by move(name, p) so that they matter, saved to tmp_path, and
    our MLP with the same base weights and, from that save, the same adapter."""
    t = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    t.manual_seed(0)
    pm = peft.get_peft_model(_torch_mlp(t)(), config_of(peft))
    with t.no_grad():
        for name, p in pm.named_parameters():
            move(t, name, p)
    pm.save_pretrained(tmp_path)
    ours = MLP(np.random.default_rng(0))
    ours.load_state_dict(_base_state(pm))
    lora.load_adapter(ours, tmp_path)
    return t, peft, pm, ours


def _peft_dora(tmp_path):
    def move(t, name, p):  # magnitudes away from the norms
        if "lora_magnitude_vector" in name:
            p.mul_(t.rand_like(p) + 0.5)

    return _peft_model(tmp_path, lambda peft: peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["embed", "fc1", "fc2"], use_dora=True,
        init_lora_weights=False), move)


def _peft_vera(tmp_path):
    def move(t, name, p):  # lambda_b is 0 at init
        if "vera_lambda" in name:
            p.copy_(t.randn_like(p))

    return _peft_model(tmp_path, lambda peft: peft.VeraConfig(r=4, target_modules=["fc1", "fc2"]),
                       move)


def _check_gradients_against_peft(t, pm, ours):
    """Outputs, and the trained tensors' gradients of sum(y * g), ours against PEFT's in
    the modes the two models are in."""
    y_ref = pm(t.from_numpy(IDS))
    np.testing.assert_allclose(ours(IDS), y_ref.detach().numpy(), rtol=1e-5, atol=1e-6)
    g = np.random.default_rng(4).standard_normal(y_ref.shape).astype(np.float32)
    (y_ref * t.from_numpy(g)).sum().backward()
    ours.zero_grad()
    ours.train()
    ours(IDS)
    ours.backward(g)
    theirs = {n.replace("base_model.model.", "").replace(".default", "").replace(".weight", ""):
              p.grad.numpy() for n, p in pm.named_parameters() if p.requires_grad}
    mine = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(mine) == set(theirs)
    for name, grad in mine.items():
        np.testing.assert_allclose(grad, theirs[name], rtol=1e-4,
                                   atol=1e-4 * np.abs(theirs[name]).max(), err_msg=name)


def _check_peft_loads_ours(t, peft, ours, directory):
    """Our adapter saved to `directory` and loaded by PEFT on the same base gives our outputs."""
    lora.save_adapter(ours, directory)
    base = _torch_mlp(t)()
    base.load_state_dict({k: t.from_numpy(p.data.copy()) for k, p in ours.named_parameters()
                          if "lora_" not in k and "vera_" not in k})
    pm2 = peft.PeftModel.from_pretrained(base, directory).eval()
    with t.no_grad():
        np.testing.assert_allclose(pm2(t.from_numpy(IDS)).numpy(), ours.eval()(IDS), rtol=1e-5,
                                   atol=1e-6)


def _base_state(pm):
    """The base weights of a PEFT model under the plain model's names."""
    out = {}
    for k, v in pm.get_base_model().state_dict().items():
        if "lora_" in k or "vera_" in k:
            continue
        out[k.replace(".base_layer", "")] = v.detach().numpy().copy()
    return out


def test_peft_dora_outputs_and_gradients(tmp_path):
    t, peft, pm, ours = _peft_dora(tmp_path)
    pm.eval()
    ours.eval()
    _check_gradients_against_peft(t, pm, ours)


def test_peft_dora_merged_weights_and_reverse_load(tmp_path):
    t, peft, pm, ours = _peft_dora(tmp_path / "peft")
    pm.eval()
    ours.eval()
    sd = lora.tuners.merged_state_dict(ours)
    merged = pm.merge_and_unload()
    for k, v in merged.state_dict().items():
        np.testing.assert_allclose(sd[k], v.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=k)
    _check_peft_loads_ours(t, peft, ours, tmp_path / "ours")


def _conv1d(W, b):
    """A GPT-2 Conv1D holding W (out, in) as its (in, out) weight."""
    layer = nn.Conv1D(W.shape[0], W.shape[1], dtype=W.dtype)
    layer.weight.data = np.ascontiguousarray(W.T)
    layer.bias.data = b.copy()
    return layer


def test_dora_on_conv1d_and_quantized_bases_equals_the_float_linear():
    rng = np.random.default_rng(11)
    W = rng.standard_normal((24, 64)).astype(np.float32)
    b = rng.standard_normal(24).astype(np.float32)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    g = rng.standard_normal((5, 24)).astype(np.float32)
    q = lora.quant.quantize(W, "Q8_0")
    bases = {
        "linear": nn.Linear.from_arrays(q.dequantize(), b.copy()),
        "conv1d": _conv1d(q.dequantize(), b),
        "quant": nn.QuantLinear(q, b.copy()),
    }
    results = {}
    for kind, base in bases.items():
        layer = lora.LoRALinear(base, r=4, lora_alpha=8, init_lora_weights=False,
                                rng=np.random.default_rng(0), variant="dora")
        layer.adapter("default").extra[DORA].data *= np.linspace(0.5, 1.5, 24, dtype=np.float32)
        layer.train()
        y = layer(x)
        layer.need_input_grad = True
        dx = layer.backward(g)
        results[kind] = (y, dx) + tuple(p.grad for p in layer.adapter("default").params())
    for kind, got in results.items():
        for a, b_ in zip(got, results["linear"], strict=True):
            np.testing.assert_allclose(a, b_, rtol=2e-4, atol=2e-4, err_msg=kind)


# ------------------------------------------------------------------ VeRA


def _vera_model(seed=0, dtype=np.float64, **kw):
    model = MLP(np.random.default_rng(seed))
    for _, p in model.named_parameters():
        p.data = p.data.astype(dtype)
    config = lora.VeraConfig(r=4, target_modules=["fc1", "fc2"], **kw)
    lora.wrap(model, config, seed=1)
    rng = np.random.default_rng(seed + 3)
    for _, layer in lora.lora_layers(model):  # non-zero vectors, so that they matter
        for p in layer.adapter("default").params():
            p.data[...] = rng.standard_normal(p.shape)
    return model


def test_vera_layers_match_the_formula_and_share_projections():
    model = _vera_model()
    fc1, fc2 = model.fc1, model.fc2
    a1, a2 = fc1.adapter("default"), fc2.adapter("default")
    shared = a1.options["projections"]
    assert shared is a2.options["projections"] and shared.A.shape == (4, 16)
    assert np.shares_memory(a1.A.data, shared.A) and np.shares_memory(a2.B.data, shared.B)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{m}.vera_lambda_{v}" for m in ("fc1", "fc2") for v in "bd"}
    x = np.random.default_rng(1).standard_normal((7, 12))
    lb, ld = a1.extra["vera_lambda_b"].data, a1.extra["vera_lambda_d"].data
    A_s, B_s = shared.A[:, :12], shared.B[:16]
    want = x @ fc1.weight.data.T + fc1.bias.data + lb * ((ld * (x @ A_s.T)) @ B_s.T)
    np.testing.assert_allclose(fc1(x), want, rtol=1e-12, atol=1e-12)
    fresh = MLP(np.random.default_rng(0))
    y0 = fresh(IDS)
    lora.wrap(fresh, lora.VeraConfig(r=4, target_modules=["fc1", "fc2"]), seed=2)
    np.testing.assert_array_equal(fresh(IDS), y0)  # lambda_b = 0
    assert fresh.fc1.adapter("default").extra["vera_lambda_d"].data[0] == np.float32(0.1)
    assert fresh.fc1.adapter("default").options["projections"].A.dtype == np.float32


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_vera_gradients_match_finite_differences(dropout):
    _check_finite_differences(_vera_model(vera_dropout=dropout))


def test_vera_merge_save_load_and_refusals(tmp_path):
    model = _vera_model().eval()
    y = model(IDS)
    sd = lora.tuners.merged_state_dict(model)
    lora.merge_adapter(model)
    np.testing.assert_allclose(model(IDS), y, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(model.fc2.weight.data, sd["fc2.weight"], rtol=1e-12)
    lora.unmerge_adapter(model)
    lora.save_adapter(model, tmp_path / "v")
    back = lora.load_adapter(MLP(np.random.default_rng(0)), tmp_path / "v").eval()
    np.testing.assert_allclose(back(IDS), y, rtol=1e-5, atol=1e-6)
    info = describe_adapter(tmp_path / "v")
    assert "'VERA'" in info and "linear vera" in info and "base_model.vera_A" in info
    with pytest.raises(ValueError, match="save_projection=False"):
        lora.VeraConfig(target_modules=["fc1"], save_projection=False)
    with pytest.raises(ValueError, match="does not adapt embedding"):
        lora.wrap(MLP(np.random.default_rng(0)), lora.VeraConfig(r=2, target_modules=["embed"]))
    import json
    cfg = json.loads((tmp_path / "v" / "adapter_config.json").read_text())
    (tmp_path / "v" / "adapter_config.json").write_text(
        json.dumps({**cfg, "save_projection": False}))
    with pytest.raises(lora.AdapterFormatError, match="without its projections"):
        lora.load_adapter(MLP(np.random.default_rng(0)), tmp_path / "v")


def test_peft_vera_outputs_gradients_and_merge(tmp_path):
    t, peft, pm, ours = _peft_vera(tmp_path / "peft")
    pm.train()
    ours.train()
    _check_gradients_against_peft(t, pm, ours)
    ours.eval()
    pm.eval()
    sd = lora.tuners.merged_state_dict(ours)
    _check_peft_loads_ours(t, peft, ours, tmp_path / "ours")
    for k, v in pm.merge_and_unload().state_dict().items():
        np.testing.assert_allclose(sd[k], v.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("make,targets", [(_peft_dora, 3), (_peft_vera, 2)],
                         ids=["dora", "vera"])
def test_peft_adapter_merged_by_lora_merge(tmp_path, make, targets):
    """`lora merge` (merge_checkpoint) on a PEFT DoRA or VeRA adapter writes PEFT's merged
    weights."""
    from safetensors.numpy import load_file, save_file

    t, peft, pm, ours = make(tmp_path / "adapter")
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    save_file({k: np.ascontiguousarray(v) for k, v in _base_state(pm).items()},
              str(base / "model.safetensors"), metadata={"format": "pt"})
    stats = lora.merge_checkpoint(base, tmp_path / "adapter", tmp_path / "out", progress=False)
    assert stats["tensors_merged"] == targets
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    for k, v in pm.merge_and_unload().state_dict().items():
        np.testing.assert_allclose(got[k], v.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=k)
