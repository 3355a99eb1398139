"""add_weighted_adapter: a new adapter made from several, with PEFT's combination types and
results (peft.LoraModel.add_weighted_adapter and peft.utils.merge_utils).

- "cat": the pairs stacked, rank the sum of theirs: A = [w_i s_i A_i], B = [B_i]. Exact.
- "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune": A and B each combined on
  their own (same rank needed), A_i weighted by sign(w_i s_i) sqrt(|w_i s_i|) and B_i by
  sqrt(|w_i s_i|); an approximation of the weighted sum of the updates.
- "svd" and the "*_svd" forms: the updates themselves, delta_i = s_i B_i A_i, combined (a
  weighted sum, or TIES / DARE / magnitude pruning of them), then cut to rank svd_rank (the
  largest rank by default) by an SVD: B = U S, A = V^T, optionally clamped at the svd_clamp
  quantile of their entries.
The new adapter has lora_alpha = r (scaling 1 without rsLoRA), the first adapter's other
settings and the union of their target modules; like any added adapter it is not active.
TIES (Yadav et al. 2023): keep each tensor's top `density` fraction by magnitude, elect a
sign per entry ("total": of the weighted sum, "frequency": of the sign count), and average
the entries that agree. DARE (Yu et al. 2023): drop entries at random with probability
1 - density and rescale the rest by 1/density; random, seeded by `seed`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from ..nn import Module
from .adapters import add_adapter, configs
from .lora import check_adapter_name
from .variants import variant_for
from .wrap import lora_layers

COMBINATIONS = ("svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear",
                "dare_ties_svd", "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd")

__all__ = ["COMBINATIONS", "add_weighted_adapter"]


def add_weighted_adapter(model: Module, adapters: Sequence[str], weights: Sequence[float],
                         adapter_name: str, combination_type: str = "svd", *,
                         svd_rank: int | None = None, svd_clamp: float | None = None,
                         density: float | None = None,
                         majority_sign_method: str = "total",
                         seed: int | None = None) -> Module:
    """Add adapter `adapter_name` combining `adapters` with `weights` (see the module
    docstring for each combination_type); as PEFT, nothing happens when the name exists
    already. Returns the model."""
    known = configs(model, "add_weighted_adapter")
    check_adapter_name(adapter_name, "add_weighted_adapter")
    if adapter_name in known:
        return model
    adapters, weights = list(adapters), [float(w) for w in weights]
    if not adapters or len(adapters) != len(weights):
        raise ValueError(f"add_weighted_adapter: give one weight per adapter, got "
                         f"{len(adapters)} adapters and {len(weights)} weights")
    for a in adapters:
        if a not in known:
            raise ValueError(f"add_weighted_adapter: adapter {a!r} does not exist; the model "
                             f"has {list(known)}")
    if combination_type not in COMBINATIONS:
        raise ValueError(f"add_weighted_adapter: combination_type must be one of "
                         f"{COMBINATIONS}, got {combination_type!r}")
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError("add_weighted_adapter: majority_sign_method must be 'total' or "
                         f"'frequency', got {majority_sign_method!r}")
    needs_density = combination_type not in ("svd", "linear", "cat")
    if needs_density and (density is None or not 0 <= density <= 1):
        raise ValueError(f"add_weighted_adapter: combination_type {combination_type!r} needs "
                         f"density in [0, 1], got {density!r}")
    if len(adapters) == 1:
        combination_type = "linear"  # as PEFT: one adapter is only ever rescaled
    cfgs = [known[a] for a in adapters]
    odd = sorted({variant_for(c).name for c in cfgs} - {"lora"})
    if odd:
        raise ValueError(f"add_weighted_adapter: combines plain LoRA adapters; "
                         f"{'/'.join(odd)} adapters carry parameters (DoRA's magnitudes) that "
                         "no combination type defines")
    ranks = [max([c.r, *c.rank_pattern.values()]) for c in cfgs]
    if combination_type in ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune"):
        if len(set(ranks)) != 1:
            raise ValueError(f"add_weighted_adapter: combination_type {combination_type!r} "
                             f"needs adapters of one rank, got {ranks}")
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = svd_rank or max(ranks)
    targets = [c.target_modules for c in cfgs]
    if all(isinstance(t, list) for t in targets):
        union = sorted(set().union(*targets))
    elif all(isinstance(t, str) for t in targets):
        union = "|".join(f"({t})" for t in targets)
    else:
        raise ValueError("add_weighted_adapter: the adapters' target_modules mix lists and "
                         "regexes (PEFT refuses this too)")
    config = dataclasses.replace(cfgs[0], r=new_rank, lora_alpha=new_rank, target_modules=union,
                                 rank_pattern={}, alpha_pattern={}, modules_to_save=None,
                                 bias="none", init_lora_weights=True)
    add_adapter(model, adapter_name, config)
    rng = np.random.default_rng(seed)
    for _, layer in lora_layers(model):
        if adapter_name not in layer.adapters:
            continue
        present = [(a, w) for a, w in zip(adapters, weights, strict=True) if a in layer.adapters]
        if not present:
            raise ValueError(f"add_weighted_adapter: no adapter of {adapters} covers a layer "
                             f"{adapter_name!r} targets")
        new = layer.adapter(adapter_name)
        a, b = _combine(layer, present, combination_type, new_rank, density,
                        majority_sign_method, svd_clamp, rng)
        new.A.data[...] = 0
        new.B.data[...] = 0
        new.A.data[: a.shape[0]] = a
        new.B.data[:, : b.shape[1]] = b
    return model


def _combine(layer, present, kind, new_rank, density, sign_method, clamp, rng):
    ads = [(layer.adapter(a), w) for a, w in present]
    if kind == "cat":
        A = np.concatenate([w * ad.scaling * ad.A.data for ad, w in ads])
        B = np.concatenate([ad.B.data for ad, _ in ads], axis=1)
        return A, B
    if not kind.endswith("svd"):
        wa = np.array([np.sign(w * ad.scaling or 1.0) * np.sqrt(abs(w * ad.scaling))
                       for ad, w in ads])
        wb = np.array([np.sqrt(abs(w * ad.scaling)) for ad, w in ads])
        A = _merge_tensors(kind, [ad.A.data for ad, _ in ads], wa, density, sign_method, rng)
        B = _merge_tensors(kind, [ad.B.data for ad, _ in ads], wb, density, sign_method, rng)
        return A, B
    deltas = [ad.scaling * (ad.B.data.astype(np.float64) @ ad.A.data) for ad, _ in ads]
    weights = np.array([w for _, w in ads])
    delta = _merge_tensors(kind[:-4] if kind != "svd" else "linear", deltas, weights, density,
                           sign_method, rng)
    U, S, Vh = np.linalg.svd(delta, full_matrices=False)
    U = U[:, :new_rank] * S[:new_rank]
    Vh = Vh[:new_rank]
    if clamp is not None:
        hi = np.quantile(np.concatenate([U.ravel(), Vh.ravel()]), clamp)
        U, Vh = np.clip(U, -hi, hi), np.clip(Vh, -hi, hi)
    return Vh, U


def _merge_tensors(kind, tensors, weights, density, sign_method, rng):
    """PEFT's merge_utils on a list of same-shaped arrays: task_arithmetic ("linear"),
    magnitude_prune, ties, dare_linear, dare_ties."""
    if kind in ("ties", "magnitude_prune"):
        tensors = [_magnitude_prune(t, density) for t in tensors]
    elif kind in ("dare_linear", "dare_ties"):
        tensors = [_random_prune(t, density, rng) for t in tensors]
    stacked = np.stack(tensors).astype(np.float64)
    weighted = stacked * np.asarray(weights, np.float64).reshape(-1, *([1] * (stacked.ndim - 1)))
    if kind in ("ties", "dare_ties"):
        sign = np.sign(stacked)
        magnitude = stacked.sum(axis=0) if sign_method == "total" else sign.sum(axis=0)
        keep = sign == np.where(magnitude >= 0, 1.0, -1.0)
        return (weighted * keep).sum(axis=0) / np.maximum(keep.sum(axis=0), 1)
    return weighted.sum(axis=0)


def _magnitude_prune(t, density):
    """The top int(density * size) entries by magnitude kept, the rest zeroed (PEFT's
    magnitude_based_pruning; density >= 1 keeps everything)."""
    if density >= 1:
        return t
    k = int(density * t.size)
    out = np.zeros(t.size, t.dtype)
    if k:
        flat = t.ravel()
        top = np.argpartition(np.abs(flat), t.size - k)[t.size - k:]
        out[top] = flat[top]
    return out.reshape(t.shape)


def _random_prune(t, density, rng):
    """Each entry kept with probability density and rescaled by 1/density (DARE)."""
    if density >= 1:
        return t
    if density <= 0:
        return np.zeros_like(t)
    return t * (rng.random(t.shape) < density) / density
