"""The part LoRAClassifier and LoRARegressor share: parameters, building the task model
(base + LoRA + head), the training loop (AdamW, a schedule, MLP-style early stopping,
warm_start, a progress bar), batched inference, transform, save_adapter and pickling.

Conventions are scikit-learn's: __init__ stores its arguments as given and checks nothing
(fit does), learned state ends in `_`, fit returns self. Pickling leaves out the frozen base
when it can be rebuilt (a path: reloaded from it; a lora.nn Module: it is a parameter and is
pickled once, as such) and keeps the trained parameters and the optimizer state. Not here:
the loss and the meaning of y (classifier.py, regressor.py), input forms (data.py).
"""

from __future__ import annotations

import copy
import math
import numbers
import sys
import time
import warnings

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.utils import check_random_state
from sklearn.utils.validation import _check_sample_weight, check_consistent_length, \
    check_is_fitted, validate_data

from .. import nn
from .._progress import progress_bar
from ..io.adapter import save_adapter as _save_adapter
from ..optim import AdamW, LRScheduler
from ..tuners import LoraConfig, lora_layers, trainable_parameters, wrap
from .data import base_kind, text_input
from .heads import POOLINGS, NumericModel, TextModel, load_backbone

SCHEDULES = ("constant", "linear", "cosine")


def _check_number(value, name, where, low, high=None, integer=False, low_open=False):
    kinds = (numbers.Integral,) if integer else (numbers.Real,)
    ok = isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        what = "an integer" if integer else "a number"
        bound = f"{'>' if low_open else '>='} {low}" + ("" if high is None else f" and <= {high}")
        raise ValueError(f"{where}: {name} must be {what} {bound}, got {value!r}")


class LoRAEstimator(TransformerMixin, BaseEstimator):
    """Shared base of LoRAClassifier and LoRARegressor (see their docstrings)."""

    def __init__(self, base=None, *, r=8, lora_alpha=16, lora_dropout=0.0, target_modules=None,
                 use_rslora=False, init_lora_weights=True, pooling="auto", max_length=None,
                 lr=1e-3, weight_decay=0.01, epochs=3, batch_size=32, lr_schedule="constant",
                 warmup_fraction=0.0, early_stopping=False, validation_fraction=0.1,
                 n_iter_no_change=10, tol=1e-4, warm_start=False, verbose=0,
                 random_state=None):
        self.base = base
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = lora_dropout
        self.target_modules = target_modules
        self.use_rslora = use_rslora
        self.init_lora_weights = init_lora_weights
        self.pooling = pooling
        self.max_length = max_length
        self.lr = lr
        self.weight_decay = weight_decay
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr_schedule = lr_schedule
        self.warmup_fraction = warmup_fraction
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.tol = tol
        self.warm_start = warm_start
        self.verbose = verbose
        self.random_state = random_state

    # -- scikit-learn protocol ---------------------------------------------------------------
    def __sklearn_is_fitted__(self) -> bool:
        return "model_" in self.__dict__

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False
        if isinstance(self.base, str) or hasattr(self.base, "__fspath__"):
            tags.input_tags.string = True
            tags.input_tags.two_d_array = False
            tags.input_tags.one_d_array = True
        tags.transformer_tags.preserves_dtype = []
        return tags

    def _check_params(self, where: str) -> None:
        _check_number(self.lr, "lr", where, 0)
        _check_number(self.weight_decay, "weight_decay", where, 0)
        _check_number(self.epochs, "epochs", where, 1, integer=True)
        _check_number(self.batch_size, "batch_size", where, 1, integer=True)
        _check_number(self.warmup_fraction, "warmup_fraction", where, 0, 1)
        _check_number(self.validation_fraction, "validation_fraction", where, 0, 1,
                      low_open=True)
        if self.validation_fraction >= 1:
            raise ValueError(f"{where}: validation_fraction must be < 1, got "
                             f"{self.validation_fraction!r}")
        _check_number(self.n_iter_no_change, "n_iter_no_change", where, 1, integer=True)
        _check_number(self.tol, "tol", where, 0)
        _check_number(self.verbose, "verbose", where, 0, integer=True)
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"{where}: lr_schedule must be one of {SCHEDULES}, got "
                             f"{self.lr_schedule!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"{where}: pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.max_length is not None:
            _check_number(self.max_length, "max_length", where, 1, integer=True)
        for name in ("early_stopping", "warm_start", "use_rslora"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{where}: {name} must be True or False, got "
                                 f"{getattr(self, name)!r}")

    # -- inputs ------------------------------------------------------------------------------
    def _inputs(self, X, kind: str, reset: bool, where: str):
        """Texts as a list of str, or numbers as a C-contiguous float array."""
        if kind == "path":
            texts, names = text_input(X, where)
            if reset:
                self.n_features_in_ = 1
                if names is not None:
                    self.feature_names_in_ = np.asarray(names, dtype=object)
                else:
                    self.__dict__.pop("feature_names_in_", None)
            else:
                fitted = getattr(self, "feature_names_in_", None)
                if names is not None and fitted is not None and list(fitted) != names:
                    raise ValueError(f"{where}: X has column {names}, the estimator was fitted "
                                     f"on {list(fitted)}")
            return texts
        dtype = [np.float32, np.float64]
        X = validate_data(self, X, reset=reset, dtype=dtype, order="C")
        return X

    @staticmethod
    def _take(data, idx):
        return [data[i] for i in idx] if isinstance(data, list) else data[idx]

    def _batch(self, data):
        """What the model's forward takes for these samples: a tokenized dict for texts."""
        if isinstance(data, list):
            return self.tokenizer_(data)
        return data.astype(self.dtype_, copy=False)

    # -- the model ---------------------------------------------------------------------------
    def _build(self, kind: str, n_outputs: int, seed: int, data=None, n_features=None):
        """(model, tokenizer or None, n_features): base + head, wrapped with LoRA."""
        rng = np.random.default_rng(seed)
        tokenizer = None
        if kind == "path":
            from ..models.data import Tokenizer

            backbone, family = load_backbone(self.base)
            for m in backbone.modules():  # the checkpoint's dropout, seeded from random_state
                if isinstance(m, nn.Dropout):
                    m.rng = np.random.default_rng(rng.integers(2**63))
            model = TextModel(backbone, family, n_outputs, self.pooling, rng)
            default = ["query", "value"] if family == "encoder" else ["q_proj", "v_proj"]
            tokenizer = Tokenizer(self.base, max_length=self.max_length)
            n_features = backbone.config.hidden_size
            self.dtype_ = np.float32
        else:
            base = copy.deepcopy(self.base) if kind == "module" else self.base(self.n_features_in_)
            if not isinstance(base, nn.Module):
                raise ValueError(f"base: the callable returned {type(base).__name__}, not a "
                                 "lora.nn Module")
            params = list(base.parameters())
            self.dtype_ = params[0].dtype if params else np.dtype(np.float32)
            if n_features is None:
                base.eval()
                try:
                    n_features = int(np.prod(base(data[:1].astype(self.dtype_)).shape[1:]))
                except (TypeError, ValueError) as e:
                    raise ValueError(f"base: the module does not take X of shape (n, "
                                     f"{data.shape[1]}): {e}") from e
            model = NumericModel(base, n_features, n_outputs, rng, self.dtype_)
            default = "all-linear"
        config = LoraConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                            target_modules=self.target_modules or default,
                            use_rslora=self.use_rslora, init_lora_weights=self.init_lora_weights,
                            task_type="SEQ_CLS",
                            base_model_name_or_path=str(self.base) if kind == "path" else None)
        wrap(model, config, seed=int(rng.integers(2**63)))
        return model, tokenizer, n_features

    def _optimizer(self, model):
        return AdamW(trainable_parameters(model), lr=self.lr, weight_decay=self.weight_decay)

    # -- fitting -----------------------------------------------------------------------------
    def fit(self, X, y, sample_weight=None):
        """Fine-tune on (X, y) for `epochs` epochs (fewer with early stopping); with
        warm_start and a fitted estimator, continue from where the last fit stopped.
        sample_weight (n,) weights each sample's loss. Returns self. Warns ConvergenceWarning,
        as MLPClassifier does, when the epochs run out while the loss (the validation score
        with early_stopping) still improved by more than tol in the last epoch."""
        where = f"{type(self).__name__}.fit"
        self._check_params(where)
        kind = base_kind(self.base, where)
        reset = not (self.warm_start and self.__sklearn_is_fitted__())
        data = self._inputs(X, kind, reset, where)
        if y is None:
            raise ValueError(f"{where}: requires y to be passed, but the target y is None")
        check_consistent_length(data, y)
        targets, n_outputs = self._targets(y, reset, where)
        n = len(targets)
        weights = _check_sample_weight(sample_weight, np.empty((n, 0)), dtype=np.float64)
        weights = weights * self._class_weights(targets)
        if np.any(weights < 0) or weights.sum() <= 0:
            raise ValueError(f"{where}: sample_weight must be >= 0 with a positive sum")
        random = check_random_state(self.random_state)
        if reset:
            self._seed_ = int(random.randint(0, 2**31 - 1))
            self.model_, self.tokenizer_, self.n_embedding_ = self._build(
                kind, n_outputs, self._seed_, data)
            self.optimizer_ = self._optimizer(self.model_)
            self.loss_curve_, self.n_iter_, self.t_ = [], 0, 0
            self.best_loss_ = None if self.early_stopping else np.inf
            self.validation_scores_ = [] if self.early_stopping else None
            self.best_validation_score_ = -np.inf if self.early_stopping else None
        self._train(data, targets, weights, random, where)
        return self

    def _train(self, data, targets, weights, random, where):
        n = len(targets)
        train_idx = np.arange(n)
        if self.early_stopping:
            train_idx, val_idx = train_test_split(
                train_idx, test_size=self.validation_fraction, random_state=random,
                stratify=self._stratify(targets))
            val = (self._take(data, val_idx), val_idx)
            if self.validation_scores_ is None:  # warm start after a fit without it
                self.validation_scores_, self.best_validation_score_ = [], -np.inf
        w = weights / weights[train_idx].mean()
        rng = np.random.default_rng(random.randint(0, 2**31 - 1))
        model, opt = self.model_, self.optimizer_
        steps = self.epochs * math.ceil(len(train_idx) / self.batch_size)
        warmup = int(round(self.warmup_fraction * steps))
        for group in opt.param_groups:
            group["lr"], group["weight_decay"] = self.lr, self.weight_decay
        sched = LRScheduler(opt, _schedule(self.lr_schedule, warmup, steps))
        no_improvement, best = 0, None
        for _ in range(self.epochs):
            start = time.perf_counter()
            model.train()
            order = rng.permutation(train_idx)
            bar = progress_bar(bool(self.verbose), iterable=range(0, len(order), self.batch_size),
                               desc=f"epoch {self.n_iter_ + 1}", leave=False, file=sys.stderr,
                               mininterval=1)
            total = 0.0
            for i in bar:
                idx = order[i:i + self.batch_size]
                out = model(self._batch(self._take(data, idx)))
                loss, dout = self._loss(out, targets[idx], w[idx])
                if not math.isfinite(loss):
                    raise FloatingPointError(f"{where}: the training loss is {loss} at epoch "
                                             f"{self.n_iter_ + 1}; lower lr")
                model.zero_grad()
                model.backward(dout.astype(out.dtype, copy=False))
                opt.step()
                sched.step()
                total += loss * len(idx)
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.close()
            model.eval()
            self.n_iter_ += 1
            self.t_ += len(order)
            self.loss_curve_.append(total / len(order))
            message = f"epoch {self.n_iter_}: loss {self.loss_curve_[-1]:.5f}"
            if self.early_stopping:
                score = self._validation_score(val[0], targets[val[1]], weights[val[1]])
                self.validation_scores_.append(score)
                message += f", validation score {score:.5f}"
                no_improvement = no_improvement + 1 \
                    if score < self.best_validation_score_ + self.tol else 0
                if score > self.best_validation_score_:
                    self.best_validation_score_ = score
                    best = {id(p): p.data.copy() for p in trainable_parameters(model)}
            else:
                last = self.loss_curve_[-1]
                no_improvement = no_improvement + 1 if last > self.best_loss_ - self.tol else 0
                self.best_loss_ = min(self.best_loss_, last)
            if self.verbose:
                print(f"{message}, {time.perf_counter() - start:.1f} s", flush=True)
            if no_improvement > self.n_iter_no_change:
                if self.verbose:
                    print(f"no improvement over {self.n_iter_no_change} epochs: stopping",
                          flush=True)
                break
        else:  # the epochs ran out (epochs >= 1, checked)
            if no_improvement == 0:
                # as MLP's "Maximum iterations reached" warning, when the last epoch still
                # improved on the best by more than tol
                what = "validation score" if self.early_stopping else "training loss"
                warnings.warn(
                    f"{type(self).__name__}: {self.epochs} epochs ran and the {what} was still "
                    f"improving by more than tol={self.tol} in the last one; raise epochs to "
                    "train to convergence", ConvergenceWarning, stacklevel=3)
        if self.early_stopping and best is not None:  # as MLP: keep the best epoch's weights
            for p in trainable_parameters(model):
                p.data[...] = best[id(p)]

    # -- inference ---------------------------------------------------------------------------
    def _outputs(self, data, features: bool = False) -> np.ndarray:
        """The model's outputs (or pooled features) for checked inputs, in eval mode."""
        model = self.model_.eval()
        out = []
        for i in range(0, len(data), self.batch_size):
            batch = self._batch(data[i:i + self.batch_size])
            out.append(model.features(batch) if features else model(batch))
        width = self.n_embedding_ if features else self.model_.head_width
        if not out:
            return np.zeros((0, width), np.float32)
        return np.ascontiguousarray(np.concatenate(out))

    def _forward_all(self, X, where: str, features: bool = False) -> np.ndarray:
        check_is_fitted(self)
        kind = "path" if self.tokenizer_ is not None else "numbers"
        return self._outputs(self._inputs(X, kind, False, where), features)

    def transform(self, X) -> np.ndarray:
        """The adapted embeddings of X, (n_samples, n_embedding_): the pooled output of the
        fine-tuned base, the head's input. For feeding another estimator."""
        return self._forward_all(X, f"{type(self).__name__}.transform", features=True)

    def fit_transform(self, X, y=None, **fit_params):
        return self.fit(X, y, **fit_params).transform(X)

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        check_is_fitted(self)
        prefix = type(self).__name__.lower()
        return np.asarray([f"{prefix}{i}" for i in range(self.n_embedding_)], dtype=object)

    def save_adapter(self, directory) -> None:
        """Write the LoRA adapter with the trained head in PEFT's format (adapter_config.json
        with task_type SEQ_CLS, adapter_model.safetensors)."""
        check_is_fitted(self)
        _save_adapter(self.model_, directory)

    # -- pickling ----------------------------------------------------------------------------
    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else dict(
            self.__dict__)
        state = dict(state)
        model = state.pop("model_", None)
        state.pop("tokenizer_", None)
        optimizer = state.pop("optimizer_", None)
        if model is None:
            return state
        rebuildable = not callable(self.base) or isinstance(self.base, nn.Module)
        if rebuildable:
            keep = {name: p.data for name, p in model.named_parameters() if p.requires_grad}
            if self.init_lora_weights in ("pissa", "olora"):  # they changed the frozen weight
                for path, layer in lora_layers(model):
                    keep.update({f"{path}.{k}": v for k, v in layer.state_dict().items()})
            state["_pickled_model"] = ("parameters", keep, model.head_width,
                                       "path" if self.__dict__.get("tokenizer_") else "module")
        else:
            state["_pickled_model"] = ("whole", model)
        state["_pickled_optimizer"] = optimizer.state_dict()
        return state

    def __setstate__(self, state):
        pickled = state.pop("_pickled_model", None)
        opt_state = state.pop("_pickled_optimizer", None)
        super().__setstate__(state) if hasattr(super(), "__setstate__") else \
            self.__dict__.update(state)
        if pickled is None:
            return
        if pickled[0] == "whole":
            model, tokenizer = pickled[1], None
        else:
            _, keep, n_outputs, kind = pickled
            model, tokenizer, _ = self._build(kind, n_outputs, self._seed_,
                                              n_features=self.n_embedding_)
            own = dict(model.named_parameters())
            for name, value in keep.items():
                own[name].data[...] = value
            for m in model.modules():
                m._weight_changed()
        self.model_, self.tokenizer_ = model, tokenizer
        self.optimizer_ = self._optimizer(model)
        self.optimizer_.load_state_dict(opt_state)


def _schedule(kind: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
