"""Train the demo's base model and write lora/data/digits_mlp.safetensors.

    python -m lora.data.make_base [--epochs 30] [--seed 1] [--output PATH]

The base is `lora.data.digits_mlp()` (64-512-512-10, ReLU) trained on the upright training
split of the shipped digits with plain Adam (lr 1e-3, batch 32) and cross-entropy. It runs in
a few seconds on a CPU and is deterministic for a seed and a BLAS thread count. It is kept in
the repository so anyone can check where the shipped weights came from; the demo never runs it.
It uses only lora.nn and the fused Adam kernel, so it needs nothing beyond the package.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from .. import functional as F
from .. import nn
from ..io.safetensors import serialize
from . import BASE_MODEL_PATH, digits_mlp, digits_splits


def accuracy(model, X: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    return float((model(X).argmax(axis=1) == y).mean())


def train_base(epochs: int = 30, seed: int = 1, batch_size: int = 32, lr: float = 1e-3):
    """The trained base model and {"upright": acc, "rotated": acc} on the test split."""
    splits = digits_splits(0)
    X, y = splits["train"]
    rng = np.random.default_rng(seed)
    model = digits_mlp(rng)
    params = list(model.parameters())
    moments = [(np.zeros_like(p.data), np.zeros_like(p.data)) for p in params]
    step = 0
    for _ in range(epochs):
        model.train()
        order = rng.permutation(len(y))
        for start in range(0, len(y), batch_size):
            batch = order[start:start + batch_size]
            model.zero_grad()
            _, dlogits = nn.cross_entropy(model(X[batch]), y[batch])
            model.backward(dlogits)
            step += 1
            for p, (m, v) in zip(params, moments, strict=True):
                F.adam_step(p.data, p.grad, m, v, step=step, lr=lr, decoupled=False)
    scores = {"upright": accuracy(model, *splits["test"]),
              "rotated": accuracy(model, *digits_splits(1)["test"])}
    return model, scores


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora.data.make_base", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output", default=BASE_MODEL_PATH)
    args = parser.parse_args(argv)

    F.set_num_threads(1)  # small matrices: one BLAS thread is fastest, and the run deterministic
    start = time.perf_counter()
    model, scores = train_base(args.epochs, args.seed)
    seconds = time.perf_counter() - start
    metadata = {
        "format": "pt",
        "architecture": "Sequential(Linear(64,512), ReLU, Linear(512,512), ReLU, Linear(512,10))",
        "trained_on": "lora/data/digits.csv.gz, upright training split (1197 images)",
        "recipe": f"python -m lora.data.make_base --epochs {args.epochs} --seed {args.seed}",
        "test_accuracy_upright": f"{scores['upright']:.4f}",
        "test_accuracy_rotated_90": f"{scores['rotated']:.4f}",
    }
    state = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in model.state_dict().items()}
    with open(args.output, "wb") as f:
        f.write(serialize(state, metadata=metadata))
    print(f"trained in {seconds:.1f} s: test accuracy {scores['upright']:.1%} upright, "
          f"{scores['rotated']:.1%} rotated 90 degrees; wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
