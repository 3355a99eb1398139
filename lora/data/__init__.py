"""lora.data: the small dataset and pretrained base model that ship inside the package.

- `digits.csv.gz`: the UCI "Optical Recognition of Handwritten Digits" test set (1,797 images
  of 8x8 pixels, values 0..16, labels 0..9), by E. Alpaydin and C. Kaynak, licensed CC BY 4.0
  (https://archive.ics.uci.edu/dataset/80); the copy is the one scikit-learn ships as
  sklearn/datasets/data/digits.csv.gz, unchanged. Each row is 64 pixels then the label.
- `digits_mlp.safetensors`: an MLP 64-512-512-10 (`digits_mlp()`) trained on the *upright*
  training split by `python -m lora.data.make_base` (a few seconds on a CPU; the file's
  metadata records the seed, epochs and accuracy). Keys are the PyTorch state-dict names
  ("0.weight", "0.bias", "2.weight", ...).

Everything here works offline: nothing is downloaded. What this module does not do: augment,
batch or shuffle (the demo and the notebook do that in a few lines of NumPy).
"""

from __future__ import annotations

import gzip
import os

import numpy as np

__all__ = [
    "DATA_DIR", "DIGITS_PATH", "BASE_MODEL_PATH", "load_digits", "digits_splits", "rotate",
    "digits_mlp", "load_base_model",
]

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
DIGITS_PATH = os.path.join(DATA_DIR, "digits.csv.gz")
BASE_MODEL_PATH = os.path.join(DATA_DIR, "digits_mlp.safetensors")

#: Sizes of the train / validation / test splits of the 1,797 images (fixed, see digits_splits).
SPLIT_SIZES = (1197, 300, 300)
HIDDEN = 512


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits: images X (1797, 64) float32 scaled to [0, 1] (row-major 8x8 pixels)
    and labels y (1797,) int64 in 0..9, in the file's order."""
    with gzip.open(DIGITS_PATH, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    return table[:, :64] / np.float32(16.0), table[:, 64].astype(np.int64)


def rotate(X: np.ndarray, quarter_turns: int = 1) -> np.ndarray:
    """Images X (n, 64) turned counter-clockwise by `quarter_turns` x 90 degrees (exact on the
    8x8 grid: a permutation of the pixels). Returns a new C-contiguous array."""
    images = np.asarray(X).reshape(-1, 8, 8)
    return np.ascontiguousarray(np.rot90(images, quarter_turns, axes=(1, 2)).reshape(-1, 64))


def digits_splits(quarter_turns: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train", "val", "test"} -> (X, y) with 1197 / 300 / 300 images, the images rotated by
    `quarter_turns` x 90 degrees. The split is a fixed shuffle (seed 0), the same one the base
    model was trained on, so its "test" images were never seen by the base in any rotation."""
    X, y = load_digits()
    order = np.random.default_rng(0).permutation(len(y))
    if quarter_turns % 4:
        X = rotate(X, quarter_turns)
    n_train, n_val, _ = SPLIT_SIZES
    parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val],
             "test": order[n_train + n_val:]}
    return {name: (X[idx], y[idx]) for name, idx in parts.items()}


def digits_mlp(rng: np.random.Generator | None = None):
    """The base architecture, freshly initialised: Sequential(Linear(64, 512), ReLU(),
    Linear(512, 512), ReLU(), Linear(512, 10)); module paths "0", "2", "4"."""
    from .. import nn

    rng = rng if rng is not None else np.random.default_rng()
    return nn.Sequential(
        nn.Linear(64, HIDDEN, rng=rng), nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN, rng=rng), nn.ReLU(),
        nn.Linear(HIDDEN, 10, rng=rng),
    )


def load_base_model():
    """The pretrained base: `digits_mlp()` with the weights of digits_mlp.safetensors, in eval
    mode. About 98% accurate on upright digits and near chance on rotated ones. Each call
    returns a new, independent model."""
    from ..io.safetensors import read_float_tensors

    if not os.path.isfile(BASE_MODEL_PATH):
        raise FileNotFoundError(
            f"{BASE_MODEL_PATH}: the shipped base model is missing; recreate it with "
            "'python -m lora.data.make_base'"
        )
    model = digits_mlp(np.random.default_rng(0))
    model.load_state_dict(read_float_tensors(BASE_MODEL_PATH))
    return model.eval()
