"""Plain LoRA (Hu et al. 2021) as a variant: the interface every variant implements, with
plain LoRA's answers.

    Linear:    y = x W^T + b + scaling * (drop(x) A^T) B^T
    Embedding: y = W[ids] + scaling * A^T[ids] B^T
    Conv2d:    the Linear update on the patches of x (lora/tuners/conv.py)
    merge:     W += scaling * B A

A variant's methods take the LoRA layer (lora/tuners/lora.py) and its `Adapter`s; the layer
decides which adapters are live and dispatches here, and keeps its base-weight and bias
gradients itself. Several active plain adapters run as one branch of their stacked pairs
(`stacks = True`); a variant that cannot be stacked or mixed with others says
`stacks = False`, and the layer refuses several active adapters and mixed batches with it.
"""

from __future__ import annotations

import numpy as np

from ... import functional as F
from ...nn.layers import _rows, _scatter_rows


class Variant:
    """Plain LoRA; subclass and override to make a variant (lora/tuners/variants/dora.py is
    one), then add an instance to VARIANTS."""

    name = "lora"
    # PEFT's peft_type of its adapters, and the config class that reads and writes them
    peft_type = "LORA"
    config_class = None  # None: LoraConfig
    # the config field (PEFT's name) whose true value selects the variant among those of its
    # peft_type; None: the default of its peft_type
    config_field: str | None = None
    stacks = True  # several active adapters as one stacked branch, and mixed batches
    pair_in_file = True  # lora_A/lora_B per layer in the file (VeRA: shared projections)
    rank_field: str | None = None  # without a pair: the further tensor whose length is r
    # the names a pair of Parameters shared by the adapter's layers (pair() returning
    # Parameters: Tied-LoRA's) is registered under on each layer; None: not registered
    pair_names: tuple[str, str] | None = None
    scaled = True  # the update is scaled by lora_alpha / r (VeRA's is not)
    kinds = ("linear", "embedding", "conv2d")  # the layers it adapts (conv2d: lora/tuners/conv.py)

    def options(self, config, dims: list[tuple[int, int]], dtype,
                tensors: dict | None = None) -> dict:
        """What every layer of one adapter shares, built once by wrap/add_adapter/load for
        layers of `dims` ((d_out, d_in) each) and kept on each Adapter (`ad.options`);
        `tensors` are a file's model-level tensors (model_tensors' keys) when loading."""
        return {}

    def pair(self, options: dict, d_out: int, d_in: int):
        """The adapter's A and B for a layer when they are not its own: frozen arrays (VeRA's
        slices of the shared projections) or Parameters its layers share (Tied-LoRA's tied
        pair, registered under pair_names); None: new trainable Parameters."""
        return None

    def model_tensors(self, options: dict) -> dict:
        """The adapter's model-level tensors by file key (VeRA's projections)."""
        return {}

    def model_tensors_keys(self) -> tuple[str, ...]:
        """The file keys model_tensors writes (and a load needs) whatever the layers are."""
        return ()

    def is_model_tensor(self, key: str) -> bool:
        """Whether a file key names one of the adapter's model-level tensors (a load hands
        all of them to options, which checks they fit the layers)."""
        return key in self.model_tensors_keys()

    def trainable(self, ad) -> list:
        """The adapter's trainable Parameters: A, B and the further ones (requires_grad
        follows set_adapter for these; the others stay frozen)."""
        return [ad.A, ad.B, *ad.extra.values()]

    # ---- parameters beyond A and B
    def extra_shapes(self, kind: str, d_out: int, d_in: int, r: int) -> dict[str, tuple]:
        """{field: shape} of the further trainable parameters of an adapter of rank r on a
        "linear" layer (d_in -> d_out) or an "embedding" (d_in = num_embeddings, d_out =
        embedding_dim). `field` is PEFT's
        name: the parameter is `<field>` (`<field>.<adapter>` for a non-default adapter) on
        the layer and `base_model.model.<path>.<field>` in adapter_model.safetensors."""
        return {}

    def init(self, layer, ad) -> None:
        """Give the further parameters their initial values, once A and B have theirs."""

    # ---- Linear
    def linear_forward(self, layer, live: list, x, W, fifo, bias, residual):
        """y for the live adapters (one, or several stacked); saves what backward needs with
        layer._save("variant", self, ...)."""
        p = live[0].lora_dropout if layer.training else 0.0
        if len(live) == 1:
            A, B, scale = live[0].A.data, live[0].B.data, live[0].scaling
        else:  # several active adapters: one branch of the stacked pairs, B scaled
            if layer.training and any(ad.lora_dropout != p for ad in live):
                raise ValueError("LoRALinear: training several active adapters needs one "
                                 "lora_dropout for all of them (their branches share one "
                                 f"mask); got {[ad.lora_dropout for ad in live]}")
            A = np.concatenate([ad.A.data for ad in live])
            B = np.concatenate([ad.scaling * ad.B.data for ad in live], axis=1).astype(A.dtype)
            scale = 1.0
        seed = int(layer.rng.integers(0, 2**63)) if p > 0 else None
        y, xa = F.linear_forward(x, W, A, B, scale, bias, dropout=p, seed=seed,
                                 fan_in_fan_out=fifo, residual=residual)
        layer._save("variant", self, x, (xa, p, seed, live, A, B, scale))
        return y

    def linear_backward(self, layer, saved, x, dout, W, fifo, add_dx_to):
        """dx (None without layer.need_input_grad), accumulating the adapters' gradients."""
        xa, p, seed, live, A, B, scale = saved
        dx, dA, dB = F.linear_backward(dout, x, xa, W, A, B, scale,
                                       need_dx=layer.need_input_grad, dropout=p, seed=seed,
                                       fan_in_fan_out=fifo, add_dx_to=add_dx_to)
        at = 0
        for ad in live:  # one adapter, or the slices of the stacked pairs
            if len(live) > 1:
                da, db = dA[at:at + ad.r], ad.scaling * dB[:, at:at + ad.r]
                at += ad.r
            else:
                da, db = dA, dB
            if ad.A.requires_grad:
                ad.A.accumulate(da)
            if ad.B.requires_grad:
                ad.B.accumulate(db)
        return dx

    # ---- Embedding
    def embedding_forward(self, layer, live: list, ids, y):
        """y = the base rows `y` plus the live adapters' updates; saves for backward."""
        after = [ad.A.data.T[ids] for ad in live]  # ids.shape + (r,) each
        layer._save("variant", self, ids, (after, live))
        for ad, a in zip(live, after, strict=True):
            y = y + ad.scaling * (a @ ad.B.data.T)
        return y

    def embedding_backward(self, layer, saved, ids, dout):
        """Accumulate the adapters' gradients; returns the gradient of the base rows."""
        after, live = saved
        dy = _rows(dout)
        for ad, after_a in zip(live, after, strict=True):
            if ad.B.requires_grad:
                ad.B.accumulate(ad.scaling * (dy.T @ _rows(after_a)))
            if ad.A.requires_grad:  # torch's embedding gives the padding row no gradient
                d_after = ad.scaling * (dy @ ad.B.data)
                ad.A.accumulate(_scatter_rows(ids, d_after, ad.A.shape[::-1], layer.padding_idx).T)
        return dout

    # ---- the update of the weight
    def merge_into(self, weight, A, B, scaling, extra: dict, transposed: bool):
        """Add the adapter's update to `weight` in place: (d_out, d_in), or (d_in, d_out)
        when `transposed` (fan_in_fan_out; an embedding's (num, dim)). `extra` holds the
        further parameters' arrays. Returns what unmerge_from needs (None here)."""
        F.merge(weight, A, B, scaling, fan_in_fan_out=transposed)

    def unmerge_from(self, weight, A, B, scaling, extra: dict, transposed: bool, state) -> None:
        """Undo merge_into in place; `state` is what it returned."""
        F.unmerge(weight, A, B, scaling, fan_in_fan_out=transposed)


LoRA = Variant
