"""lora.functional.linear_cross_entropy (the fused lm_head + cross-entropy) against its NumPy
float64 twin and finite differences, its argument checks, and LlamaForCausalLM's fused
`model(ids, labels=)` path against logits + causal_lm_loss."""

import numpy as np
import pytest

import lora
from lora import _reference as R
from lora import functional as F
from lora.models.llama import LlamaConfig, LlamaForCausalLM


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("chunk", [None, 1, 7, 1000])
def test_kernel_equals_the_twin(dtype, tol, chunk):
    rng = np.random.default_rng(0)
    h = rng.standard_normal((37, 24)).astype(dtype)
    W = (rng.standard_normal((101, 24)) * 0.5).astype(dtype)
    labels = rng.integers(0, 101, 37)
    labels[::5] = -100
    got = F.linear_cross_entropy(h, W, labels, chunk=chunk, need_dweight=True)
    want = R.linear_cross_entropy(h.astype(float), W.astype(float), labels, need_dweight=True)
    assert abs(got[0] - want[0]) <= tol * abs(want[0])
    for g, w in zip(got[1:], want[1:], strict=True):
        assert g.dtype == dtype
        np.testing.assert_allclose(g, w, atol=tol, rtol=0)
    assert np.all(got[1][::5] == 0)


def test_gradients_equal_finite_differences():
    rng = np.random.default_rng(1)
    h, W = rng.standard_normal((6, 5)), rng.standard_normal((9, 5))
    labels = np.array([1, -100, 8, 0, 3, 3])
    _, dh, dW = F.linear_cross_entropy(h, W, labels, chunk=4, need_dweight=True)
    for arr, grad in ((h, dh), (W, dW)):
        num = np.zeros_like(arr)
        for i in np.ndindex(arr.shape):
            old = arr[i]
            arr[i] = old + 1e-6
            up = F.linear_cross_entropy(h, W, labels, need_dhidden=False)[0]
            arr[i] = old - 1e-6
            down = F.linear_cross_entropy(h, W, labels, need_dhidden=False)[0]
            arr[i] = old
            num[i] = (up - down) / 2e-6
        np.testing.assert_allclose(grad, num, atol=1e-7)


def test_all_ignored_gives_nan_and_zero_gradients():
    h, W = np.ones((3, 4), np.float32), np.ones((5, 4), np.float32)
    loss, dh, _ = F.linear_cross_entropy(h, W, np.full(3, -100))
    assert np.isnan(loss) and not dh.any()


def test_bad_arguments_name_what_is_wrong():
    h, W = np.ones((3, 4), np.float32), np.ones((5, 4), np.float32)
    with pytest.raises(ValueError, match=r"labels\[1\] = 5"):
        F.linear_cross_entropy(h, W, np.array([0, 5, 1]))
    with pytest.raises(TypeError, match="labels"):
        F.linear_cross_entropy(h, W, np.zeros(3))
    with pytest.raises(ValueError, match="labels"):
        F.linear_cross_entropy(h, W, np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="weight"):
        F.linear_cross_entropy(h, np.ones((5, 3), np.float32), np.zeros(3, np.int64))
    with pytest.raises(TypeError, match="dtype|float"):
        F.linear_cross_entropy(h, W.astype(np.float64), np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="chunk"):
        F.linear_cross_entropy(h, W, np.zeros(3, np.int64), chunk=0)


CFG = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
           num_attention_heads=6, num_key_value_heads=2)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_model_loss_and_gradients_equal_the_logits_path(tied, checkpointing):
    cfg = LlamaConfig.from_dict(dict(CFG, tie_word_embeddings=tied))

    def tuned():
        m = LlamaForCausalLM(cfg, seed=0)
        lora.wrap(m, target_modules="all-linear", r=4, seed=1)
        for _, layer in lora.lora_layers(m):
            layer.lora_B.data[...] = 0.1
        if checkpointing:
            m.gradient_checkpointing_enable()
        return m.train()

    ids = np.random.default_rng(0).integers(0, 97, (3, 11))
    labels = ids.copy()
    labels[0, :3] = -100
    plain, fused = tuned(), tuned()
    want, d = lora.nn.causal_lm_loss(plain(ids), labels)
    plain.backward(d)
    got = fused(ids, labels=labels)
    fused.backward()
    assert abs(got - want) < 1e-5 * abs(want)
    pairs = [(a, b) for a, b in zip(plain.parameters(), fused.parameters(), strict=True)
             if a.requires_grad]
    assert len(pairs) == 2 * 7 * 2
    for a, b in pairs:
        np.testing.assert_allclose(b.grad, a.grad, rtol=0, atol=1e-5 * np.abs(a.grad).max())
    with pytest.raises(RuntimeError, match="no loss"):
        fused.backward()
