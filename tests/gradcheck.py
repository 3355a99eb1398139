"""Central finite differences, the gradient oracle the layer and kernel tests share."""

import numpy as np


def numeric_gradient(f, arr, eps=1e-6):
    """d f() / d arr by central differences, element by element. `arr` is changed in place
    and restored; f must read it. Use float64 arrays."""
    grad = np.zeros_like(arr)
    flat, gflat = arr.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        up = f()
        flat[i] = old - eps
        down = f()
        flat[i] = old
        gflat[i] = (up - down) / (2 * eps)
    return grad
