"""LoRARegressor: LoRA fine-tuning with a linear regression head, one or several outputs.
Targets are standardised for training (y_mean_, y_scale_) and predictions mapped back, so
the head starts at the right scale whatever y's units; loss_curve_ is the mean squared error
of the standardised targets."""

from __future__ import annotations

import numpy as np
from sklearn.base import RegressorMixin
from sklearn.metrics import r2_score
from sklearn.utils.validation import check_array

from .base import LoRAEstimator


class LoRARegressor(RegressorMixin, LoRAEstimator):
    """Fine-tune `base` with LoRA and a linear head of n_outputs_ outputs (multi-output for a
    2-D y). Parameters and attributes as LoRAClassifier (no class_weight, no classes_); the
    early-stopping validation score is R^2, as MLPRegressor's. Also n_outputs_, y_mean_,
    y_scale_. predict gives (n,) for a 1-D y (or one column, as MLPRegressor), else
    (n, n_outputs_)."""

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def _targets(self, y, reset: bool, where: str):
        y = check_array(y, ensure_2d=False, dtype=np.float64, input_name="y")
        if y.ndim == 1:
            y = y[:, None]
        if y.ndim != 2:
            raise ValueError(f"{where}: y must be 1-D or 2-D, got shape {y.shape}")
        if reset:
            self.n_outputs_ = y.shape[1]
            self.y_mean_ = y.mean(axis=0)
            scale = y.std(axis=0)
            self.y_scale_ = np.where(scale > 0, scale, 1.0)
        elif y.shape[1] != self.n_outputs_:
            raise ValueError(f"{where}: y has {y.shape[1]} outputs, the estimator was fitted "
                             f"with {self.n_outputs_}")
        return ((y - self.y_mean_) / self.y_scale_), self.n_outputs_

    def _class_weights(self, y):
        return np.ones(len(y))

    def _stratify(self, y):
        return None

    def _loss(self, pred, y, w):
        """Weighted squared error, mean over the batch and outputs; (loss, dpred)."""
        diff = pred.astype(np.float64) - y
        n = diff.size
        loss = float((w[:, None] * diff * diff).sum() / n)
        return loss, (2.0 / n) * w[:, None] * diff

    def _validation_score(self, data, y, w):
        return float(r2_score(y, self._outputs(data).astype(np.float64), sample_weight=w))

    def predict(self, X) -> np.ndarray:
        out = self._forward_all(X, f"{type(self).__name__}.predict").astype(np.float64)
        out = out * self.y_scale_ + self.y_mean_
        return out[:, 0] if self.n_outputs_ == 1 else out
