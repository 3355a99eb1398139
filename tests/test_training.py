"""End to end: LoRA fine-tuning teaches a frozen random MLP a task it cannot do.

Task: 10-d Gaussian inputs labelled by the quadrant of two fixed random projections (4
classes, chance 25%). The frozen base MLP scores about chance; LoRA (r=4 on every Linear,
dropout 0.1, AdamW + warmup/cosine) must reach 90% on held-out data. The trained adapter then
survives save -> load into a fresh base, and merge_and_unload, with identical predictions.
"""

import numpy as np

import lora
from lora import nn

D, CLASSES = 10, 4


def _data(n, rng):
    x = rng.standard_normal((n, D)).astype(np.float32)
    z = x @ np.random.default_rng(42).standard_normal((D, 2))
    return x, (z[:, 0] > 0) * 2 + (z[:, 1] > 0)


def _base():
    rng = np.random.default_rng(7)
    return nn.Sequential(
        nn.Linear(D, 64, rng=rng),
        nn.ReLU(),
        nn.Linear(64, 64, rng=rng),
        nn.ReLU(),
        nn.Linear(64, CLASSES, rng=rng),
    )


def _accuracy(model, x, y):
    return float((model.eval()(x).argmax(-1) == y).mean())


def test_lora_learns_what_the_frozen_base_cannot(tmp_path):
    rng = np.random.default_rng(0)
    x_train, y_train = _data(2000, rng)
    x_test, y_test = _data(1000, rng)
    model = _base()
    base_acc = _accuracy(model, x_test, y_test)
    assert base_acc < 0.40

    config = lora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear")
    lora.wrap(model, config, seed=0)
    base_weights = {k: v.copy() for k, v in model.state_dict().items() if "lora_" not in k}
    params = lora.trainable_parameters(model)
    assert sum(p.size for p in params) == 4 * (D + 64) + 4 * (64 + 64) + 4 * (64 + CLASSES)
    opt = lora.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    steps = 300
    sched = lora.optim.cosine_schedule_with_warmup(opt, 20, steps)
    for _ in range(steps):
        idx = rng.integers(0, len(x_train), 128)
        model.train()
        _, dlogits = nn.cross_entropy(model(x_train[idx]), y_train[idx])
        model.backward(dlogits)
        lora.optim.clip_grad_norm(params, 5.0)
        opt.step()
        opt.zero_grad()
        sched.step()

    acc = _accuracy(model, x_test, y_test)
    print(f"frozen base {base_acc:.3f} -> LoRA {acc:.3f}")
    assert acc >= 0.90
    for k, v in model.state_dict().items():  # the base never moved
        if k in base_weights:
            np.testing.assert_array_equal(v, base_weights[k])

    logits = model.eval()(x_test)
    lora.save_adapter(model, tmp_path)
    fresh = lora.load_adapter(_base(), tmp_path)
    np.testing.assert_array_equal(fresh.eval()(x_test), logits)

    merged = lora.merge_and_unload(fresh)
    assert not lora.lora_layers(merged)
    # float32 rounding of W + s*B*A and of the sums: a few ulps of the largest logit
    assert np.abs(merged.eval()(x_test) - logits).max() < 4e-6 * max(1.0, np.abs(logits).max())
    assert _accuracy(merged, x_test, y_test) == acc
