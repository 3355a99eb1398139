"""Input handling for the estimators: what a text X and a numeric X may be, and what kind of
base `base=` is. Texts: a list, tuple or 1-D array of strings, a pandas Series, or a frame
(or 2-D array) with one column of strings. Numbers: what scikit-learn's validate_data takes
(2-D arrays, frames), as float32 or float64 (the base's dtype). Every refusal names the
argument. Not here: tokenizing (lora.models.data.Tokenizer), batching (base.py).
"""

from __future__ import annotations

import os

import numpy as np

from ..nn import Module


def base_kind(base, where: str) -> str:
    """"path" for a pretrained model directory or file, "module" for a lora.nn Module,
    "factory" for a callable that takes n_features_in_ and returns one."""
    if isinstance(base, (str, os.PathLike)):
        if not os.path.exists(base):
            raise ValueError(f"{where}: base={os.fspath(base)!r} does not exist (a pretrained "
                             "model directory or file that lora.models loads)")
        return "path"
    if isinstance(base, Module):
        return "module"
    if callable(base):
        return "factory"
    raise ValueError(f"{where}: base must be a path to a pretrained model, a lora.nn Module or "
                     f"a callable n_features -> Module, got {base!r}")


def text_input(X, where: str) -> tuple[list[str], list[str] | None]:
    """(texts, feature_names): X as a list of str, and the column's name when X is a
    one-column DataFrame. ValueError naming X for anything else."""
    names = None
    columns = getattr(X, "columns", None)
    if columns is not None and hasattr(X, "iloc"):  # a DataFrame
        if X.shape[1] != 1:
            raise ValueError(f"{where}: X is a frame with {X.shape[1]} columns; a text model "
                             "takes one column of strings (use a ColumnTransformer to pick it)")
        names = [str(c) for c in columns]
        X = X.iloc[:, 0]
    if isinstance(X, str):
        raise ValueError(f"{where}: X must be a list of strings, got one string; wrap it in "
                         "a list")
    if hasattr(X, "to_numpy"):
        X = X.to_numpy()
    if not isinstance(X, np.ndarray):
        try:
            X = np.asarray(list(X), dtype=object)
        except TypeError:
            raise ValueError(f"{where}: X must be a list of strings, got {type(X).__name__}") \
                from None
    if X.ndim == 2 and X.shape[1] == 1:
        X = X[:, 0]
    if X.ndim != 1:
        raise ValueError(f"{where}: X must be 1-D (one string per sample), got shape {X.shape}")
    bad = [i for i, t in enumerate(X) if not isinstance(t, str)]
    if bad:
        raise ValueError(f"{where}: X must hold strings; X[{bad[0]}] is {X[bad[0]]!r}")
    return [str(t) for t in X], names
