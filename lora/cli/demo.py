"""`lora demo`: LoRA's claim, shown offline in under a minute on a CPU.

The base is a small MLP (64-512-512-10) that ships in lora/data/, trained on upright
handwritten digits. The new task: the same digits scanned sideways (rotated 90 degrees),
where the base is near chance. We fine-tune it with LoRA on every Linear layer at several
ranks, and with full fine-tuning, and print one table: trainable parameters (LoRA trains
r (d_in + d_out) numbers per layer where full fine-tuning trains d_in x d_out), accuracy and
training time. Then we save the best adapter in PEFT's format, check it reloads and merges
to the same predictions, and plot the loss curves.

Everything is `lora`'s public API (lora.data, lora.nn, lora.LoraConfig, lora.wrap,
lora.optim, lora.save_adapter / load_adapter, lora.merge_and_unload); the demo adds no
machinery of its own beyond a training loop. It does not tune hyper-parameters per rank:
one recipe for all LoRA runs, one for full fine-tuning, both stated in the output.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

__all__ = ["run", "RunResult", "DEFAULT_RANKS", "DEFAULT_EPOCHS", "DEFAULT_OUTPUT_DIR"]

DEFAULT_RANKS = (1, 4, 8, 16)
DEFAULT_EPOCHS = 20
DEFAULT_OUTPUT_DIR = "lora-demo-output"

TARGETS = ["0", "2", "4"]  # the three Linear layers of lora.data.digits_mlp()
LORA_ALPHA = 16
LORA_LR = 3e-3  # LoRA takes a larger learning rate than full fine-tuning (LoRA paper, Sec. 5)
FULL_LR = 1e-3
BATCH_SIZE = 32


@dataclass
class RunResult:
    """One row of the table: a method, what it trained and how well it did."""

    name: str
    rank: int | None  # None for the base and for full fine-tuning
    trainable: int
    val_acc: float
    test_acc: float
    seconds: float
    train_loss: list[float] = field(default_factory=list)  # mean per epoch
    val_loss: list[float] = field(default_factory=list)  # before training, then per epoch


def _evaluate(model, X, y) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) with the model in eval mode."""
    from .. import nn

    model.eval()
    logits = model(X)
    loss, _ = nn.cross_entropy(logits, y)
    return loss, float((logits.argmax(axis=1) == y).mean())


def _train(model, params, lr, splits, epochs, rng, desc, progress) -> tuple[list, list, float]:
    """Adam on `params` over the training split; returns (train losses per epoch, validation
    losses per epoch, seconds spent training, evaluation excluded)."""
    from .. import nn
    from .._progress import progress_bar
    from ..optim import Adam

    X, y = splits["train"]
    optimizer = Adam(params, lr=lr)
    steps_per_epoch = -(-len(y) // BATCH_SIZE)
    train_losses, seconds = [], 0.0
    val_losses = [_evaluate(model, *splits["val"])[0]]  # epoch 0: where training starts
    with progress_bar(progress, total=epochs * steps_per_epoch, desc=desc, unit="step",
                      leave=False, file=sys.stderr, dynamic_ncols=True) as bar:
        for _ in range(epochs):
            start = time.perf_counter()
            model.train()
            order = rng.permutation(len(y))
            total = 0.0
            for s in range(0, len(y), BATCH_SIZE):
                batch = order[s:s + BATCH_SIZE]
                optimizer.zero_grad()
                loss, dlogits = nn.cross_entropy(model(X[batch]), y[batch])
                model.backward(dlogits)
                optimizer.step()
                total += loss * len(batch)
                bar.update(1)
            seconds += time.perf_counter() - start
            train_losses.append(total / len(y))
            val_loss, val_acc = _evaluate(model, *splits["val"])
            val_losses.append(val_loss)
            bar.set_postfix(loss=f"{train_losses[-1]:.3f}", val_acc=f"{val_acc:.1%}")
    return train_losses, val_losses, seconds


def _lora_run(rank, splits, epochs, seed, progress):
    from .. import data
    from ..tuners import LoraConfig
    from ..tuners import trainable_parameters, wrap

    rng = np.random.default_rng([seed, rank])
    model = data.load_base_model()
    config = LoraConfig(r=rank, lora_alpha=LORA_ALPHA, target_modules=TARGETS)
    model = wrap(model, config, seed=int(rng.integers(2**63)))
    params = list(trainable_parameters(model))
    losses, val_losses, seconds = _train(model, params, LORA_LR, splits, epochs, rng,
                                         f"LoRA r={rank}", progress)
    result = RunResult(f"LoRA r={rank}", rank, sum(p.size for p in params),
                       _evaluate(model, *splits["val"])[1], _evaluate(model, *splits["test"])[1],
                       seconds, losses, val_losses)
    return result, model


def _full_run(splits, epochs, seed, progress):
    from .. import data

    rng = np.random.default_rng([seed, 0])
    model = data.load_base_model()
    params = list(model.parameters())
    losses, val_losses, seconds = _train(model, params, FULL_LR, splits, epochs, rng,
                                         "full fine-tuning", progress)
    return RunResult("full fine-tuning", None, sum(p.size for p in params),
                     _evaluate(model, *splits["val"])[1], _evaluate(model, *splits["test"])[1],
                     seconds, losses, val_losses)


def format_table(results: list[RunResult], full_params: int) -> str:
    """The results as an aligned text table (what `lora demo` prints)."""
    header = ("method", "trainable params", "% of full", "Adam state", "val acc", "test acc",
              "train time")
    rows = []
    for r in results:
        rows.append((
            r.name,
            f"{r.trainable:,}",
            f"{100.0 * r.trainable / full_params:.1f}%",
            f"{2 * 4 * r.trainable / 1024:.0f} KiB",  # two float32 moments per parameter
            f"{r.val_acc:.1%}",
            f"{r.test_acc:.1%}",
            "-" if r.seconds == 0 else f"{r.seconds:.1f} s",
        ))
    widths = [max(len(c) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def _layer_shapes(model) -> list[tuple[str, int, int]]:
    from .. import nn

    return [(name, m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(m, nn.Linear)]


# What the demo says instead of the loss-curve PNG when matplotlib is missing: the extra that
# brings it (README and docs/getting-started.md list the extras).
PLOT_SKIPPED = ("loss curves: not drawn, matplotlib is not installed; for loss_curves.png "
                "install the plot extra: pip install 'lora[plot]' (or pip install matplotlib)")


def plot_losses(results: list[RunResult], path: str) -> bool:
    """Write a PNG of the training and validation loss curves; False when matplotlib is not
    installed. Uses the Agg canvas directly, so it never changes a notebook's backend."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return False
    fig = Figure(figsize=(10, 4.2), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax_train, ax_val = fig.subplots(1, 2, sharey=True)
    trained = [r for r in results if r.train_loss]
    colors = {r.name: f"C{i}" for i, r in enumerate(trained)}
    for r in trained:
        style = dict(color=colors[r.name], lw=2 if r.rank is None else 1.6,
                     ls="--" if r.rank is None else "-")
        ax_train.plot(np.arange(1, len(r.train_loss) + 1), r.train_loss,
                      label=f"{r.name} ({r.trainable:,} params)", **style)
        ax_val.plot(np.arange(len(r.val_loss)), r.val_loss,
                    label=f"{r.name}: test {r.test_acc:.1%}", **style)
    base = next((r for r in results if not r.train_loss), None)
    for ax, title in ((ax_train, "training loss (mean per epoch)"),
                      (ax_val, "validation loss (epoch 0: the base, untouched)")):
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(0, max(len(r.train_loss) for r in trained) if trained else 1)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax_train.set_ylabel("cross-entropy")
    subtitle = f"base untouched: test {base.test_acc:.1%}" if base else ""
    fig.suptitle("LoRA vs full fine-tuning: digits MLP adapted to digits rotated 90°"
                 + (f" ({subtitle})" if subtitle else ""))
    fig.savefig(path)
    return True


def run(ranks=DEFAULT_RANKS, epochs: int = DEFAULT_EPOCHS, seed: int = 0,
        output_dir: str = DEFAULT_OUTPUT_DIR, threads: int | None = None,
        progress: bool = True, out=None) -> list[RunResult]:
    """Run the demo and print its report to `out` (default sys.stdout); returns the table's
    rows (base, one per rank, full fine-tuning). Writes into `output_dir`: `best-adapter/`
    (PEFT format), `loss_curves.png` (when matplotlib is installed) and `results.json`."""
    from .. import functional

    out = out if out is not None else sys.stdout
    ranks = [int(r) for r in ranks]
    if not ranks or any(r < 1 for r in ranks):
        raise ValueError(f"ranks must be positive integers, got {ranks}")
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    os.makedirs(output_dir, exist_ok=True)  # fail now, not after a minute of training
    threads_before = functional.blas_info()["num_threads"]
    # The demo's matrices are tiny (a batch of 32 x 512 features): one BLAS thread beats
    # several, whose start-up costs more than the work. Restored on the way out.
    functional.set_num_threads(threads if threads is not None else 1)
    try:
        return _run(ranks, epochs, seed, output_dir, progress, out)
    finally:
        functional.set_num_threads(threads_before)


def _run(ranks, epochs, seed, output_dir, progress, out) -> list[RunResult]:
    from .. import data
    from ..io.adapter import load_adapter, save_adapter
    from ..tuners import merge_and_unload


    def say(text=""):
        print(text, file=out, flush=True)

    wall = time.perf_counter()
    splits = data.digits_splits(quarter_turns=1)
    base = data.load_base_model()
    shapes = _layer_shapes(base)
    full_params = sum(p.size for p in base.parameters())
    n_train, n_val, n_test = (len(splits[k][1]) for k in ("train", "val", "test"))
    say("LoRA demo: an MLP trained on upright handwritten digits, adapted to digits rotated 90°")
    say(f"  base      {' -> '.join([str(shapes[0][1])] + [str(s[2]) for s in shapes])} MLP, "
        f"{full_params:,} parameters (lora/data/digits_mlp.safetensors)")
    say(f"  data      UCI optdigits 8x8, rotated: {n_train} train / {n_val} val / {n_test} test")
    say(f"  LoRA      on layers {', '.join(TARGETS)}; alpha={LORA_ALPHA}; Adam lr={LORA_LR:g} "
        f"(full fine-tuning: lr={FULL_LR:g}); batch {BATCH_SIZE}; {epochs} epochs; seed {seed}")
    say()

    results = [RunResult("base (untouched)", None, 0, _evaluate(base, *splits["val"])[1],
                         _evaluate(base, *splits["test"])[1], 0.0)]
    models = {}
    for rank in ranks:
        result, model = _lora_run(rank, splits, epochs, seed, progress)
        results.append(result)
        models[rank] = model
    results.append(_full_run(splits, epochs, seed, progress))

    say(format_table(results, full_params))
    say()
    widest = max(shapes, key=lambda s: s[1] * s[2])
    _, d_in, d_out = widest
    say(f"LoRA trains r (d_in + d_out) numbers per layer instead of d_in x d_out: for the "
        f"{d_in}x{d_out} layer, r={ranks[0]} is {ranks[0] * (d_in + d_out):,} vs {d_in * d_out:,}.")

    lora_results = [r for r in results if r.rank is not None]
    best = max(lora_results, key=lambda r: (r.val_acc, -r.rank))  # ties: the smaller rank
    adapter_dir = os.path.join(output_dir, "best-adapter")
    save_adapter(models[best.rank], adapter_dir)

    # The adapter on disk must give the same predictions, attached or merged into the weights.
    X_test, y_test = splits["test"]
    reloaded = load_adapter(data.load_base_model(), adapter_dir).eval()
    same = np.array_equal(reloaded(X_test).argmax(1), models[best.rank].eval()(X_test).argmax(1))
    merged = merge_and_unload(reloaded)
    merged_acc = _evaluate(merged, X_test, y_test)[1]
    say(f"best adapter (highest validation accuracy): {best.name}, test accuracy "
        f"{best.test_acc:.1%}; saved in PEFT format to {adapter_dir}")
    say(f"  reloaded from disk: {'same predictions' if same else 'PREDICTIONS DIFFER'}; "
        f"merged into the base weights: test accuracy {merged_acc:.1%}")
    say(f"  inspect it with: lora info {adapter_dir}")

    png = os.path.join(output_dir, "loss_curves.png")
    if plot_losses(results, png):
        say(f"loss curves: {png}")
    else:
        say(PLOT_SKIPPED)

    with open(os.path.join(output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"epochs": epochs, "seed": seed, "ranks": ranks, "best": best.name,
                   "rows": [r.__dict__ for r in results]}, f, indent=2)
    say(f"results: {os.path.join(output_dir, 'results.json')}; "
        f"total time {time.perf_counter() - wall:.1f} s")
    if not same:
        raise RuntimeError("the reloaded adapter does not reproduce the trained model")
    return results
