"""The progress bars of lora's long loops (fit, `lora demo`, `lora merge`): tqdm, shown when
the caller asked for one. tqdm's own environment variables still apply to a shown bar
(TQDM_DISABLE=1 silences it in a log or CI job; TQDM_NCOLS, TQDM_MININTERVAL, ...), because
tqdm reads them as defaults for the arguments a caller leaves out, and `disable` is left out
here unless the bar is off (tqdm 4.66 and later read them)."""

from __future__ import annotations


def progress_bar(show: bool, *, auto: bool = False, **kwargs):
    """tqdm(**kwargs), disabled unless `show`; tqdm.auto's (a notebook widget in Jupyter)
    with `auto`."""
    if auto:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm
    if not show:
        kwargs["disable"] = True
    return tqdm(**kwargs)
