"""lora.optim: Adam/AdamW against the NumPy twin and torch.optim, exact resumption from
state_dict, LoRA+ groups, gradient clipping and the learning-rate schedules."""

import copy
import math

import numpy as np
import pytest

import lora
from lora import _reference, nn
from lora.optim import (
    Adam,
    AdamW,
    clip_grad_norm,
    cosine_schedule_with_warmup,
    linear_schedule_with_warmup,
    lora_plus_param_groups,
)


def _params(seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return [nn.Parameter(rng.standard_normal(s).astype(dtype)) for s in [(3, 4), (5,), (2, 2)]]


def _grad(step, i, p):
    rng = np.random.default_rng(1000 * step + i)
    return (rng.standard_normal(p.shape) + 0.1 * p.data).astype(p.dtype)


def _run(opt, params, steps, start=0):
    for step in range(start, start + steps):
        for i, p in enumerate(params):
            p.grad = _grad(step, i, p)
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("cls", [Adam, AdamW])
def test_matches_numpy_twin(cls):
    params = _params()
    ref = [p.data.copy() for p in params]
    m = [np.zeros_like(r) for r in ref]
    v = [np.zeros_like(r) for r in ref]
    opt = cls(params, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    for step in range(10):
        for i, p in enumerate(params):
            g = _grad(step, i, p)
            p.grad = g
            _reference.adam_step(
                ref[i],
                g,
                m[i],
                v[i],
                step=step + 1,
                lr=0.01,
                beta1=0.8,
                beta2=0.99,
                eps=1e-6,
                weight_decay=0.1,
                decoupled=cls is AdamW,
            )
        opt.step()
        for p, r in zip(params, ref, strict=True):
            np.testing.assert_allclose(p.data, r, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls_name", ["Adam", "AdamW"])
def test_trajectory_matches_torch_over_50_steps(cls_name):
    torch = pytest.importorskip("torch")
    params = _params(dtype=np.float32)
    tparams = [torch.nn.Parameter(torch.from_numpy(p.data.copy())) for p in params]
    groups = [{"params": params[:2], "lr": 3e-3}, {"params": params[2:], "weight_decay": 0.05}]
    tgroups = [{"params": tparams[:2], "lr": 3e-3}, {"params": tparams[2:], "weight_decay": 0.05}]
    kw = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.02}
    opt = getattr(lora.optim, cls_name)(groups, **kw)
    topt = getattr(torch.optim, cls_name)(tgroups, **kw, foreach=False)
    worst = 0.0
    for step in range(50):
        for i, (p, tp) in enumerate(zip(params, tparams, strict=True)):
            p.grad = _grad(step, i, p)
            tp.grad = torch.from_numpy(p.grad.copy())
        opt.step()
        topt.step()
        for p, tp in zip(params, tparams, strict=True):
            worst = max(worst, float(np.abs(p.data - tp.detach().numpy()).max()))
    assert worst < 1e-6, worst


def test_state_dict_resumes_exactly():
    params = _params()
    opt = AdamW(params, lr=0.02)
    _run(opt, params, 7)
    saved_params = [p.data.copy() for p in params]
    saved = copy.deepcopy(opt.state_dict())
    _run(opt, params, 8, start=7)
    straight = [p.data.copy() for p in params]

    resumed = _params(seed=99)
    for p, s in zip(resumed, saved_params, strict=True):
        p.data[...] = s
    opt2 = AdamW(resumed, lr=0.5)  # hyperparameters come from the state dict
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["lr"] == 0.02
    _run(opt2, resumed, 8, start=7)
    for a, b in zip(resumed, straight, strict=True):
        np.testing.assert_array_equal(a.data, b)
    assert saved["state"][0]["step"] == 7


def test_load_state_dict_checks_before_changing():
    params = _params()
    opt = Adam(params)
    _run(opt, params, 2)
    sd = opt.state_dict()
    other = Adam(_params()[:2])
    with pytest.raises(ValueError, match="groups"):
        other.load_state_dict(sd)
    bad = copy.deepcopy(sd)
    bad["state"][2]["exp_avg"] = np.zeros((3, 3))
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="parameter 2"):
        opt.load_state_dict(bad)
    np.testing.assert_array_equal(
        opt.state_dict()["state"][2]["exp_avg"], before["state"][2]["exp_avg"]
    )


def test_parameters_without_grad_are_skipped():
    params = _params()
    opt = Adam(params, lr=0.1)
    before = params[1].data.copy()
    params[0].grad = np.ones((3, 4))
    opt.step()
    np.testing.assert_array_equal(params[1].data, before)
    assert opt.state_dict()["state"].keys() == {0}
    # the first step of Adam moves every element by lr (m_hat / sqrt(v_hat) = 1)
    np.testing.assert_allclose(params[0].data, _params()[0].data - 0.1, atol=1e-8)


def test_bad_arguments():
    with pytest.raises(ValueError, match="empty"):
        Adam([])
    p = _params()[0]
    with pytest.raises(ValueError, match="two groups"):
        Adam([{"params": [p]}, {"params": [p]}])
    with pytest.raises(ValueError, match="unknown"):
        Adam([{"params": [p], "momentum": 0.9}])
    with pytest.raises(TypeError):
        Adam([np.zeros(3)])


def test_lora_plus_groups():
    model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    lora.wrap(model, target_modules=["0", "1"], modules_to_save=["3"])
    groups = lora_plus_param_groups(model, 1e-3, loraplus_lr_ratio=8, weight_decay=0.1)
    by_lr = {(g["lr"], g["weight_decay"]): {id(p) for p in g["params"]} for g in groups}
    assert by_lr[(8e-3, 0.1)] == {id(model[1].lora_B)}
    assert by_lr[(1e-6, 0.1)] == {id(model[0].lora_embedding_A), id(model[0].lora_embedding_B)}
    assert by_lr[(1e-3, 0.1)] == {id(model[1].lora_A), id(model[3].modules_to_save.weight)}
    assert by_lr[(1e-3, 0.0)] == {id(model[3].modules_to_save.bias)}
    assert sum(len(g["params"]) for g in groups) == len(lora.trainable_parameters(model))
    AdamW(groups)  # accepted as param groups


def test_clip_grad_norm():
    params = _params()
    for p in params:
        p.grad = np.full(p.shape, 2.0)
    n = sum(p.size for p in params)
    total = clip_grad_norm(params, 1.0)
    assert total == pytest.approx(2.0 * math.sqrt(n))
    new_norm = math.sqrt(sum((p.grad**2).sum() for p in params))
    assert new_norm == pytest.approx(1.0, rel=1e-5)
    assert clip_grad_norm(params, 10.0) == pytest.approx(new_norm)
    assert math.sqrt(sum((p.grad**2).sum() for p in params)) == pytest.approx(new_norm)
    params[0].grad[0, 0] = -7.0
    assert clip_grad_norm(params, 100.0, norm_type=math.inf) == 7.0


def test_clip_grad_norm_matches_torch():
    torch = pytest.importorskip("torch")
    params = _params(dtype=np.float32)
    tparams = []
    for i, p in enumerate(params):
        p.grad = _grad(0, i, p) * 5
        tp = torch.nn.Parameter(torch.from_numpy(p.data.copy()))
        tp.grad = torch.from_numpy(p.grad.copy())
        tparams.append(tp)
    ours = clip_grad_norm(params, 1.5)
    theirs = float(torch.nn.utils.clip_grad_norm_(tparams, 1.5))
    assert ours == pytest.approx(theirs, rel=1e-6)
    for p, tp in zip(params, tparams, strict=True):
        np.testing.assert_allclose(p.grad, tp.grad.numpy(), rtol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedules(kind):
    opt = AdamW(_params(), lr=0.1)
    make = linear_schedule_with_warmup if kind == "linear" else cosine_schedule_with_warmup
    sched = make(opt, 4, 20)
    lrs = [sched.get_last_lr()[0]]
    for _ in range(22):
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(0.05) and lrs[4] == pytest.approx(0.1)
    mid = 0.05 if kind == "linear" else 0.1 * 0.5 * (1 + math.cos(math.pi * 0.5))
    assert lrs[12] == pytest.approx(mid)
    assert lrs[20] == pytest.approx(0.0, abs=1e-12)
    if kind == "linear":  # the cosine rises again after the end, as in transformers
        assert lrs[22] == 0.0
    assert all(a >= b for a, b in zip(lrs[4:21], lrs[5:21], strict=False))
    state = sched.state_dict()
    opt2 = AdamW(_params(), lr=0.1)
    sched2 = make(opt2, 4, 20)
    sched2.load_state_dict(state)
    assert opt2.param_groups[0]["lr"] == lrs[-1]


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedules_match_transformers(kind):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    topt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
    opt = AdamW(_params(), lr=0.3)
    if kind == "linear":
        ts = transformers.get_linear_schedule_with_warmup(topt, 5, 30)
        ours = linear_schedule_with_warmup(opt, 5, 30)
    else:
        ts = transformers.get_cosine_schedule_with_warmup(topt, 5, 30)
        ours = cosine_schedule_with_warmup(opt, 5, 30)
    for _ in range(32):
        assert ours.get_last_lr()[0] == pytest.approx(ts.get_last_lr()[0], abs=1e-12)
        topt.step()
        ts.step()
        ours.step()
