"""LoRAClassifier: LoRA fine-tuning of a pretrained model (texts) or a lora.nn module
(numbers) with a softmax head, as a scikit-learn classifier. Labels may be strings,
integers or booleans (classes_ keeps them sorted, as np.unique does)."""

from __future__ import annotations

import numpy as np
from sklearn.base import ClassifierMixin
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import column_or_1d

from .base import LoRAEstimator


class LoRAClassifier(ClassifierMixin, LoRAEstimator):
    """Fine-tune `base` with LoRA and a linear classification head.

    base: a path to a pretrained model directory (or a GGUF file) that lora.models loads,
    for texts (a list, array or Series of strings, or a one-column frame), tokenized with the
    model's own tokenizer; or a lora.nn Module (copied, never changed) for numeric X (2-D
    arrays, frames); or a callable n_features -> Module. The head is a Linear on the base's
    (pooled) output; LoRA goes on `target_modules` (default: query/value for BERT, q_proj/v_proj
    for Llama, every Linear of a module base).
    r, lora_alpha, lora_dropout, target_modules, use_rslora, init_lora_weights: as LoraConfig.
    pooling: "auto" (mean for encoders, last non-pad token for decoders), "mean", "cls",
    "pooler", "last". max_length: token limit (default: the model's own).
    lr, weight_decay: AdamW's; epochs: passes over the data (MLP's max_iter); batch_size;
    lr_schedule: "constant", "linear" or "cosine" decay over the fit, after warmup_fraction
    of its steps of linear warmup.
    early_stopping, validation_fraction, n_iter_no_change, tol: as MLPClassifier (a
    stratified validation split scored by accuracy; the best epoch's weights are kept);
    without early_stopping, training stops when the epoch loss has not improved by tol for
    more than n_iter_no_change epochs.
    warm_start: fit continues from the fitted state. verbose: a progress bar and a line per
    epoch. class_weight: None, "balanced" or {label: weight}. random_state: seeds the head,
    LoRA's init, dropout, shuffling and the validation split.

    Attributes: classes_, n_features_in_, feature_names_in_ (frames), n_iter_, loss_curve_,
    best_loss_, validation_scores_, best_validation_score_, t_ (samples seen), n_embedding_
    (width of transform's output), model_ (the lora.nn model), optimizer_.
    """

    def __init__(self, base=None, *, r=8, lora_alpha=16, lora_dropout=0.0, target_modules=None,
                 use_rslora=False, init_lora_weights=True, pooling="auto", max_length=None,
                 lr=1e-3, weight_decay=0.01, epochs=3, batch_size=32, lr_schedule="constant",
                 warmup_fraction=0.0, early_stopping=False, validation_fraction=0.1,
                 n_iter_no_change=10, tol=1e-4, warm_start=False, verbose=0,
                 random_state=None, class_weight=None):
        super().__init__(
            base, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
            target_modules=target_modules, use_rslora=use_rslora,
            init_lora_weights=init_lora_weights, pooling=pooling, max_length=max_length, lr=lr,
            weight_decay=weight_decay, epochs=epochs, batch_size=batch_size,
            lr_schedule=lr_schedule, warmup_fraction=warmup_fraction,
            early_stopping=early_stopping, validation_fraction=validation_fraction,
            n_iter_no_change=n_iter_no_change, tol=tol, warm_start=warm_start, verbose=verbose,
            random_state=random_state)
        self.class_weight = class_weight

    def _targets(self, y, reset: bool, where: str):
        y = column_or_1d(np.asarray(y) if not hasattr(y, "to_numpy") else y.to_numpy(),
                         warn=True)
        check_classification_targets(y)
        if reset:
            classes = np.unique(y)
            if len(classes) < 2:
                raise ValueError(f"{where}: y has only one class ({classes[0]!r}); a classifier "
                                 "needs at least 2 classes")
            self.classes_ = classes
        else:
            unseen = np.setdiff1d(np.unique(y), self.classes_)
            if len(unseen):
                raise ValueError(f"{where}: warm_start can only be used where `y` has the same "
                                 f"classes as in the previous call to fit; new: {unseen[:5]}")
        return np.searchsorted(self.classes_, y), len(self.classes_)

    def _class_weights(self, codes: np.ndarray) -> np.ndarray:
        if self.class_weight is None:
            return np.ones(len(codes))
        if isinstance(self.class_weight, dict):
            unknown = set(self.class_weight) - set(self.classes_.tolist())
            if unknown:
                raise ValueError(f"class_weight: labels {sorted(map(str, unknown))} are not in "
                                 f"the classes {self.classes_.tolist()}")
        elif self.class_weight != "balanced":
            raise ValueError(f"class_weight must be None, 'balanced' or a dict, got "
                             f"{self.class_weight!r}")
        present = np.unique(codes)
        per_class = np.ones(len(self.classes_))
        per_class[present] = compute_class_weight(self.class_weight,
                                                  classes=self.classes_[present],
                                                  y=self.classes_[codes])
        return per_class[codes]

    def _stratify(self, codes):
        return codes if np.bincount(codes).min() >= 2 else None

    def _loss(self, logits, codes, w):
        """Weighted softmax cross-entropy, mean over the batch; (loss, dlogits)."""
        z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        rows = np.arange(len(codes))
        loss = float(-(w * logp[rows, codes]).sum() / len(codes))
        d = np.exp(logp)
        d[rows, codes] -= 1.0
        return loss, d * (w / len(codes))[:, None]

    def _validation_score(self, data, codes, w):
        return float(np.average(self._outputs(data).argmax(axis=1) == codes, weights=w))

    def _logits(self, X, where="predict"):
        return self._forward_all(X, f"{type(self).__name__}.{where}").astype(np.float64)

    def decision_function(self, X) -> np.ndarray:
        """The logits, (n, n_classes); for two classes the logit of classes_[1] minus that of
        classes_[0], (n,), as scikit-learn's binary classifiers give it."""
        z = self._logits(X, "decision_function")
        return z[:, 1] - z[:, 0] if z.shape[1] == 2 else z

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (n, n_classes), columns in the order of classes_."""
        z = self._logits(X, "predict_proba")
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def predict_log_proba(self, X) -> np.ndarray:
        return np.log(self.predict_proba(X))

    def predict(self, X) -> np.ndarray:
        """The most probable class of each sample, as a label of classes_."""
        codes = self._logits(X).argmax(axis=1)
        return self.classes_[codes]
