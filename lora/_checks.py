"""Argument checks shared across lora whose messages say what went wrong: an unknown keyword
named with the closest valid one, a dtype the kernels do not have.

Only checks live here; nothing is converted or computed.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

import numpy as np

KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_fields(where: str, given: Iterable[str], valid: Iterable[str]) -> None:
    """TypeError naming the first of `given` that is not in `valid`, and the closest valid
    name (a typo such as `hidden_dropout` for `hidden_dropout_prob`)."""
    valid = sorted(valid)
    for name in given:
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"valid names: {', '.join(valid)}"
            raise TypeError(f"{where}: unknown field {name!r}; {hint}")


def kernel_dtype(dtype, where: str) -> np.dtype:
    """`dtype` as a NumPy dtype when it is one the C kernels compute in (float32, float64);
    TypeError otherwise, before any array is made or converted."""
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"{where}: {dtype!r} is not a NumPy dtype ({e}); "
                        "use float32 or float64") from None
    if dt not in KERNEL_DTYPES:
        raise TypeError(
            f"{where}: dtype must be float32 or float64 (the C kernels' types), got {dt}; "
            "float16 and bfloat16 checkpoints are widened to float32 when they are loaded"
        )
    return dt
