"""Gradient checkpointing of LlamaForCausalLM: the same loss and the same gradients (LoRA
with dropout, so the recomputed forward must draw the same masks), and no layer's
activations held between the forward and the backward."""

import numpy as np

import lora
from lora.models.llama import LlamaConfig, LlamaForCausalLM

CFG = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
           num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True)


def tuned(checkpointing):
    model = LlamaForCausalLM(LlamaConfig.from_dict(CFG), seed=0)
    lora.wrap(model, target_modules="all-linear", r=4, lora_alpha=8, lora_dropout=0.2, seed=1)
    rng = np.random.default_rng(2)
    for _, layer in lora.lora_layers(model):
        layer.lora_B.data[...] = rng.standard_normal(layer.lora_B.data.shape) * 0.1
    if checkpointing:
        model.gradient_checkpointing_enable()
    return model.train()


def step(model, ids, mask, labels):
    model.zero_grad()
    loss, dlogits = lora.nn.causal_lm_loss(model(ids, mask), labels)
    model.backward(dlogits)
    return loss, {n: p.grad.copy() for n, p in model.named_parameters() if p.requires_grad}


def test_checkpointed_gradients_equal_the_plain_ones():
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 97, (3, 17))
    mask = np.ones_like(ids)
    mask[0, :4] = 0
    labels = np.where(mask == 1, ids, -100)
    plain, ck = tuned(False), tuned(True)
    assert ck.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    for _ in range(2):  # twice: the generators move on identically
        loss_p, grads_p = step(plain, ids, mask, labels)
        loss_c, grads_c = step(ck, ids, mask, labels)
        assert loss_p == loss_c
        assert grads_p.keys() == grads_c.keys() and len(grads_p) == 2 * 7 * 3
        for name in grads_p:
            np.testing.assert_array_equal(grads_c[name], grads_p[name], err_msg=name)


def test_checkpointed_layers_hold_only_their_input():
    model = tuned(True)
    ids = np.random.default_rng(4).integers(0, 97, (2, 9))
    model(ids)
    for layer in model.model.layers:
        assert layer.__dict__.get("_cache") is not None
        held = [m for m in layer.modules() if m is not layer and m.__dict__.get("_cache")]
        assert held == []
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing
    model(ids)
    assert model.model.layers[0].self_attn.__dict__.get("_cache") is not None
