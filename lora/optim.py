"""lora.optim: Adam and AdamW over Parameters, LoRA+ parameter groups, gradient clipping and
learning-rate schedules.

Each step makes one call to the C kernel lora.functional.adam_step per parameter array (no
per-element Python); the update is exactly torch.optim.Adam / torch.optim.AdamW's. The step
count is kept per parameter, as torch does, so state_dict()/load_state_dict() resume a run
exactly. Not here: AMSGrad, maximize, other optimizers.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable

import numpy as np

from . import functional as F
from .nn import Module, Parameter

__all__ = [
    "Adam",
    "AdamW",
    "LRScheduler",
    "clip_grad_norm",
    "cosine_schedule_with_warmup",
    "linear_schedule_with_warmup",
    "lora_plus_param_groups",
]

_HYPER = ("lr", "betas", "eps", "weight_decay")


def _check_hyper(group: dict, name: str) -> None:
    """torch.optim's checks on a param group's hyper-parameters, plus finiteness: ValueError
    naming the value."""
    def bad(what: str, value) -> ValueError:
        return ValueError(f"{name}: invalid {what}: {value!r}")

    def real(value) -> bool:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) \
            and math.isfinite(value)

    if not real(group["lr"]) or group["lr"] < 0:
        raise bad("learning rate lr (a finite number >= 0)", group["lr"])
    if not real(group["eps"]) or group["eps"] < 0:
        raise bad("eps (a finite number >= 0)", group["eps"])
    if not real(group["weight_decay"]) or group["weight_decay"] < 0:
        raise bad("weight_decay (a finite number >= 0)", group["weight_decay"])
    betas = group["betas"]
    if (not isinstance(betas, (tuple, list)) or len(betas) != 2
            or not all(real(b) and 0.0 <= b < 1.0 for b in betas)):
        raise bad("betas (two numbers in [0, 1))", betas)


class Adam:
    """Adam with L2 weight decay (grad + weight_decay * param), as torch.optim.Adam.

    `params` is an iterable of Parameters, or of param groups: dicts with "params" and any of
    "lr", "betas", "eps", "weight_decay" overriding the defaults. Parameters whose grad is None
    are skipped (their step count does not advance).
    """

    decoupled = False

    def __init__(
        self,
        params: Iterable[Parameter] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        self.defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        params = list(params)
        if not params:
            raise ValueError(f"{type(self).__name__}: got an empty parameter list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.param_groups: list[dict] = []
        seen: set[int] = set()
        for group in groups:
            group = {**self.defaults, **group, "params": list(group["params"])}
            unknown = set(group) - {"params", *_HYPER}
            if unknown:
                raise ValueError(
                    f"{type(self).__name__}: unknown param group keys {sorted(unknown)}"
                )
            for p in group["params"]:
                if not isinstance(p, Parameter):
                    raise TypeError(
                        f"{type(self).__name__}: expected Parameters, got {type(p).__name__}"
                    )
                if id(p) in seen:
                    raise ValueError(f"{type(self).__name__}: a parameter appears twice (in "
                                     "two groups, or twice in one: a tied Parameter is one)")
                seen.add(id(p))
            _check_hyper(group, type(self).__name__)
            self.param_groups.append(group)
        self.state: dict[int, dict] = {}  # id(param) -> {"step", "exp_avg", "exp_avg_sq"}

    def _params(self) -> Iterable[Parameter]:
        for group in self.param_groups:
            yield from group["params"]

    def zero_grad(self) -> None:
        """Set every parameter's grad to None."""
        for p in self._params():
            p.grad = None

    def step(self) -> None:
        """One update of every parameter that has a gradient. All or nothing: every group's
        hyper-parameters (which a schedule may have changed) and every gradient's shape are
        checked before the first parameter moves."""
        name = type(self).__name__
        work = []
        for group in self.param_groups:
            _check_hyper(group, name)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if np.shape(p.grad) != p.shape:
                    raise ValueError(f"{name}.step: a gradient has shape {np.shape(p.grad)}, "
                                     f"its parameter {p.shape}")
                work.append((group, p, np.ascontiguousarray(p.grad, dtype=p.data.dtype)))
        for group, p, grad in work:
            st = self.state.get(id(p))
            if st is None:
                st = self.state[id(p)] = {
                    "step": 0,
                    "exp_avg": np.zeros_like(p.data),
                    "exp_avg_sq": np.zeros_like(p.data),
                }
            beta1, beta2 = group["betas"]
            F.adam_step(
                p.data,
                grad,
                st["exp_avg"],
                st["exp_avg_sq"],
                step=st["step"] + 1,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                decoupled=self.decoupled,
            )
            st["step"] += 1

    def state_dict(self) -> dict:
        """torch's layout: {"state": {index: {"step", "exp_avg", "exp_avg_sq"}},
        "param_groups": [{hyperparameters..., "params": [indices]}]}; arrays are copies and
        indices count parameters across groups in order."""
        index = {id(p): i for i, p in enumerate(self._params())}
        state = {
            index[pid]: {
                "step": s["step"],
                "exp_avg": s["exp_avg"].copy(),
                "exp_avg_sq": s["exp_avg_sq"].copy(),
            }
            for pid, s in self.state.items()
        }
        groups = [
            {**{k: g[k] for k in _HYPER}, "params": [index[id(p)] for p in g["params"]]}
            for g in self.param_groups
        ]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore hyperparameters and moments from state_dict(); the groups must have the
        same sizes and the moments the parameters' shapes. Checked before anything changes."""
        groups = state_dict["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("load_state_dict: parameter groups do not match this optimizer's")
        params = list(self._params())
        new_state = {}
        for i, s in state_dict["state"].items():
            i = int(i)
            if not 0 <= i < len(params):
                raise ValueError(f"load_state_dict: state for parameter {i}, which does not exist")
            p = params[i]
            for key in ("exp_avg", "exp_avg_sq"):
                if np.shape(s[key]) != p.shape:
                    raise ValueError(
                        f"load_state_dict: parameter {i} {key} has shape {np.shape(s[key])}, "
                        f"the parameter {p.shape}"
                    )
            new_state[id(p)] = {
                "step": int(s["step"]),
                "exp_avg": np.array(s["exp_avg"], dtype=p.dtype, order="C"),
                "exp_avg_sq": np.array(s["exp_avg_sq"], dtype=p.dtype, order="C"),
            }
        for mine, saved in zip(self.param_groups, groups, strict=True):
            mine.update({k: (tuple(saved[k]) if k == "betas" else saved[k]) for k in _HYPER})
        self.state = new_state


class AdamW(Adam):
    """Adam with decoupled weight decay (param *= 1 - lr * weight_decay), as
    torch.optim.AdamW; weight_decay defaults to 0.01 as there."""

    decoupled = True

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def lora_plus_param_groups(
    model: Module,
    lr: float,
    *,
    loraplus_lr_ratio: float = 16.0,
    loraplus_lr_embedding: float = 1e-6,
    weight_decay: float = 0.0,
) -> list[dict]:
    """LoRA+ groups (Hayou et al. 2024, as PEFT's create_loraplus_optimizer): lora_B at
    lr * loraplus_lr_ratio, LoRA embedding matrices at loraplus_lr_embedding, other trainable
    matrices at lr; 1-D trainable parameters (biases, norms) at lr without weight decay.
    Pass the result to Adam/AdamW."""
    groups = {"A": [], "B": [], "embedding": [], "no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        last = name.rsplit(".", 1)[-1]
        if last.startswith("lora_embedding_"):
            groups["embedding"].append(p)
        elif last == "lora_B":
            groups["B"].append(p)
        elif p.data.ndim < 2:
            groups["no_decay"].append(p)
        else:
            groups["A"].append(p)
    settings = {
        "A": {"lr": lr, "weight_decay": weight_decay},
        "B": {"lr": lr * loraplus_lr_ratio, "weight_decay": weight_decay},
        "embedding": {"lr": loraplus_lr_embedding, "weight_decay": weight_decay},
        "no_decay": {"lr": lr, "weight_decay": 0.0},
    }
    return [{"params": ps, **settings[k]} for k, ps in groups.items() if ps]


def clip_grad_norm(params: Iterable[Parameter], max_norm: float, norm_type: float = 2.0) -> float:
    """Scale the gradients in place so their global norm is at most max_norm, as
    torch.nn.utils.clip_grad_norm_ (coefficient max_norm / (norm + 1e-6), capped at 1).
    Returns the norm before clipping. norm_type is 2.0 or math.inf."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if norm_type == math.inf:
        total = max(float(np.abs(g).max()) if g.size else 0.0 for g in grads)
    elif norm_type == 2.0:
        total = math.sqrt(sum(float(np.vdot(g, g)) for g in grads))
    else:
        raise ValueError(f"clip_grad_norm: norm_type must be 2.0 or inf, got {norm_type}")
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in grads:
            g *= coef
    return total


class LRScheduler:
    """Sets each group's lr to base_lr * lr_lambda(step) (torch's LambdaLR): at construction
    for step 0, then after every step(). state_dict() holds the step and the base lrs."""

    def __init__(self, optimizer: Adam, lr_lambda: Callable[[int], float]):
        self.optimizer, self.lr_lambda = optimizer, lr_lambda
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.last_epoch = 0
        self._apply()

    def _apply(self) -> None:
        factor = self.lr_lambda(self.last_epoch)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor

    def step(self) -> None:
        self.last_epoch += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_epoch = int(state_dict["last_epoch"])
        self.base_lrs = list(state_dict["base_lrs"])
        self._apply()


def linear_schedule_with_warmup(
    optimizer: Adam, num_warmup_steps: int, num_training_steps: int
) -> LRScheduler:
    """lr rises linearly from 0 over num_warmup_steps, then falls linearly to 0 at
    num_training_steps (transformers' get_linear_schedule_with_warmup)."""

    def factor(step: int) -> float:
        if step < num_warmup_steps:
            return step / max(1, num_warmup_steps)
        return max(0.0, (num_training_steps - step) / max(1, num_training_steps - num_warmup_steps))

    return LRScheduler(optimizer, factor)


def cosine_schedule_with_warmup(
    optimizer: Adam, num_warmup_steps: int, num_training_steps: int, num_cycles: float = 0.5
) -> LRScheduler:
    """Linear warmup, then cosine decay to 0 (num_cycles=0.5: one half
    cosine), as transformers' get_cosine_schedule_with_warmup."""

    def factor(step: int) -> float:
        if step < num_warmup_steps:
            return step / max(1, num_warmup_steps)
        progress = (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress)))

    return LRScheduler(optimizer, factor)
