"""Losses that return (loss, dloss/dinput), for loops with hand-written backward passes."""

from __future__ import annotations

import numpy as np

__all__ = ["causal_lm_loss", "cross_entropy", "mse_loss"]


def _rows(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1, a.shape[-1])


def _float_array(a, name: str) -> np.ndarray:
    """`a` as a float array (a list or an integer array as float32), keeping float64."""
    a = np.asarray(a)
    if np.issubdtype(a.dtype, np.floating):
        return a
    if a.dtype.kind in "iub":
        return a.astype(np.float32)
    raise TypeError(f"{name} must be numbers, got dtype {a.dtype}")


def cross_entropy(
    logits: np.ndarray, targets: np.ndarray, *, ignore_index: int = -100, reduction: str = "mean"
) -> tuple[float, np.ndarray]:
    """Softmax cross-entropy as torch.nn.functional.cross_entropy.

    logits (..., C), targets integer class indices (...) in [0, C); targets equal to
    ignore_index contribute nothing. reduction "mean" (over the non-ignored targets) or "sum".
    Returns (loss, dlogits) with dlogits the gradient of the loss, shaped like logits. Lists
    are taken as arrays; ValueError for targets that are not integers (float labels) or out
    of range.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    logits = _float_array(logits, "logits")
    targets = np.asarray(targets)
    if targets.size and not (np.issubdtype(targets.dtype, np.integer)
                             or targets.dtype == np.bool_):
        raise ValueError(
            f"cross_entropy: targets must be integer class indices, got dtype {targets.dtype}"
            + (" (cast integral float labels with .astype(int))"
               if np.issubdtype(targets.dtype, np.floating) else "")
        )
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"cross_entropy: logits {logits.shape} and targets {targets.shape} "
            "must agree on all but the last dim"
        )
    z = _rows(logits)
    t = targets.reshape(-1)
    keep = t != ignore_index
    tk = np.where(keep, t, 0)
    if np.any((tk < 0) | (tk >= z.shape[1])):
        bad = t[keep][(t[keep] < 0) | (t[keep] >= z.shape[1])]
        raise ValueError(
            f"cross_entropy: targets must be in [0, {z.shape[1]}) (logits have {z.shape[1]} "
            f"classes) or ignore_index={ignore_index}, got {int(bad[0])}"
        )
    shifted = z - z.max(axis=1, keepdims=True)
    logsumexp = np.log(np.exp(shifted).sum(axis=1))
    logp_t = shifted[np.arange(len(t)), tk] - logsumexp
    count = int(keep.sum())
    denom = max(count, 1) if reduction == "mean" else 1
    loss = float(-(logp_t * keep).sum() / denom) if reduction == "sum" or count else float("nan")
    dz = np.exp(shifted - logsumexp[:, None])
    dz[np.arange(len(t)), tk] -= 1.0
    dz *= (keep / denom)[:, None]
    return loss, dz.astype(logits.dtype, copy=False).reshape(logits.shape)


def mse_loss(
    pred: np.ndarray, target: np.ndarray, *, reduction: str = "mean"
) -> tuple[float, np.ndarray]:
    """Squared error, "mean" over all elements or "sum". Returns (loss, dpred). Lists are taken
    as arrays; `target` must have pred's shape."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"mse_loss: reduction must be 'mean' or 'sum', got {reduction!r}")
    pred = _float_array(pred, "pred")
    if np.shape(target) != pred.shape:
        raise ValueError(f"mse_loss: target {np.shape(target)} must have pred's shape "
                         f"{pred.shape}")
    diff = pred - np.asarray(target, dtype=pred.dtype)
    n = diff.size if reduction == "mean" else 1
    return float((diff * diff).sum() / n), (2.0 / n) * diff


def causal_lm_loss(logits: np.ndarray, labels: np.ndarray, *, ignore_index: int = -100
                   ) -> tuple[float, np.ndarray]:
    """The causal-LM loss as transformers computes it: position t predicts labels[:, t + 1]
    (the last position predicts nothing), labels equal to ignore_index count for nothing, and
    the mean is over the counted tokens. logits (batch, seq, vocab), labels (batch, seq).
    Returns (loss, dlogits), dlogits shaped like logits (zero at the last position)."""
    labels = np.asarray(labels)
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"causal_lm_loss: logits {logits.shape} must be (batch, seq, vocab) "
                         f"and labels {labels.shape} (batch, seq)")
    dlogits = np.zeros_like(logits)
    if logits.shape[1] < 2:
        return float("nan"), dlogits
    loss, d = cross_entropy(logits[:, :-1], labels[:, 1:], ignore_index=ignore_index)
    dlogits[:, :-1] = d
    return loss, dlogits
