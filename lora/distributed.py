"""lora.distributed: data-parallel LoRA training and batch inference on Dask.

The base model is frozen, so each worker builds it once and keeps it; a training step moves
only adapter-sized data: the client sends the adapter's current values to every worker that
holds rows of the step's batch, each computes the gradient of its rows' share of the loss,
the gradients are summed in a tree of tasks on the workers, and the client makes one AdamW
step (lora.optim.AdamW) on the sum. Dask (`dask.distributed`, the extra `lora[dask]`) does the
scheduling, the transport and the recovery from lost workers; this module only says what to
compute where.

    from dask.distributed import Client
    import lora.distributed as ld

    client = Client(...)                        # any Dask deployment
    spec = ld.ModelSpec(build=make_model)       # or ModelSpec(path=..., lora_config=...)
    result = ld.train(client, spec, ddf, features=["x0", "x1"], label="y", loss="cross_entropy",
                      batch_size=256, steps=100, lr=1e-3, checkpoint_dir="ckpt")
    result.save("adapter")                      # a PEFT adapter directory
    scores = ld.score(client, spec, ddf, features=[...], adapter="adapter")  # a dask frame

Equivalence: a step's batch is the same rows whatever the number of workers (each partition
contributes its own fixed share, drawn by the step's seed), and the gradient is the sum over
partitions of count-weighted means divided by the total count, so N workers give the adapter
one process gives on the whole batch, within float32 rounding (dropout off).

Faults: a worker lost during a step loses its tasks; Dask recomputes them (and the data
partitions they need, from the collection's graph) on the remaining workers, and the step
completes. Should a step still fail (every retry of a task lost), it is run again from the
same adapter values. With `checkpoint_dir`, the adapter (PEFT format), the optimizer state
and the step are written atomically every `checkpoint_every` steps, and `train` with the same
directory resumes from the last one after the client itself died.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["ModelSpec", "TrainResult", "global_batch", "score", "train"]


# ---------------------------------------------------------------------------------------------
# the model, built once per worker


@dataclasses.dataclass
class ModelSpec:
    """How a worker builds the model: `build()` returning a lora.nn model with LoRA on it,
    or `path` (a checkpoint lora.models.from_pretrained reads) wrapped with `lora_config` (a
    LoraConfig or its fields as a dict; or loaded from the PEFT adapter directory `adapter`,
    trainable). `num_labels` builds a sequence classifier from a BERT path. The model is
    built once per worker process and kept (keyed by `key`)."""

    build: Callable | None = None
    path: str | None = None
    lora_config: object = None
    adapter: str | None = None
    num_labels: int | None = None
    seed: int = 0
    key: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self):
        if (self.build is None) == (self.path is None):
            raise ValueError("ModelSpec: give exactly one of build= (a function) and path=")
        if self.path is not None and self.lora_config is None and self.adapter is None:
            raise ValueError("ModelSpec: a path needs lora_config= or adapter= to put LoRA on")

    def make(self):
        """Build the model here (what a worker does once)."""
        import lora

        if self.build is not None:
            model = self.build()
        else:
            from lora.models import BertForSequenceClassification, from_pretrained

            if self.num_labels is not None:
                model = BertForSequenceClassification.from_pretrained(
                    self.path, self.num_labels, seed=self.seed)
            else:
                model = from_pretrained(self.path)
            if self.adapter is not None:
                lora.load_adapter(model, self.adapter, seed=self.seed)
            else:
                config = self.lora_config
                if isinstance(config, dict):
                    config = lora.LoraConfig(**config)
                lora.wrap(model, config, seed=self.seed)
        if not lora.lora_layers(model):
            raise ValueError("ModelSpec: the model has no LoRA layers (wrap it in build())")
        return model


_MODELS: dict = {}  # per process: the models this worker has built
_INITIAL: dict = {}  # and their trainable values as built (a run changes the model's)


def _model(spec: ModelSpec):
    model = _MODELS.get(spec.key)
    if model is None:
        model = _MODELS[spec.key] = spec.make()
        _INITIAL[spec.key] = {n: p.data.copy() for n, p in _trainable(model).items()}
    return model


def _trainable(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _initial(spec: ModelSpec) -> tuple[dict, dict, dict]:
    """On a worker: the trainable values, their PEFT keys and the adapter config."""
    from lora.io.adapter import adapter_state_dict

    model = _model(spec)
    _assign(model, _INITIAL[spec.key])  # as built, whatever an earlier run left
    params = _trainable(model)
    by_id = {id(p.data): n for n, p in params.items()}
    keys = {}
    for key, value in adapter_state_dict(model).items():
        name = by_id.get(id(value), by_id.get(id(value.base)))  # a conv's: a view
        if name is not None:
            keys[name] = key
    config = model.__dict__["lora_config"]
    return ({n: p.data.copy() for n, p in params.items()}, keys,
            dataclasses.replace(config, inference_mode=True).to_dict())


def _assign(model, values) -> None:
    """Set the trainable parameters from a {name: array} dict or one flat vector (their
    values one after the other, in the model's order: what travels each step)."""
    params = _trainable(model)
    if isinstance(values, np.ndarray):
        at = 0
        for p in params.values():
            p.data[...] = values[at:at + p.size].reshape(p.shape)
            at += p.size
        return
    for name, value in values.items():
        params[name].data[...] = value


def _flat(arrays) -> np.ndarray:
    """One float32/float64 vector of the arrays, one after the other: one buffer per message
    instead of one per parameter."""
    arrays = list(arrays)
    return np.concatenate([np.ravel(a) for a in arrays]) if arrays else np.zeros(0, np.float32)


# ---------------------------------------------------------------------------------------------
# data: partitions, and the rows of each step


def _part_len(part) -> int:
    return len(part[0]) if isinstance(part, tuple) else len(part)


def global_batch(lengths: Sequence[int], step: int, batch_size: int, seed: int = 0
                 ) -> list[np.ndarray]:
    """The rows of step `step`'s global batch, per partition: partition p gives
    round(batch_size * n_p / N) rows (at least one when it has any), drawn without
    replacement from its own permutation for the epoch, which a seeded generator makes from
    (seed, p, epoch); an epoch ends when the smallest share runs out. The same for any
    number of workers, and for one process (tests, resuming)."""
    total = int(sum(lengths))
    if total == 0:
        raise ValueError("global_batch: the data has no rows")
    shares = [max(1, round(batch_size * n / total)) if n else 0 for n in lengths]
    per_epoch = min(n // s for n, s in zip(lengths, shares, strict=True) if s)
    if per_epoch == 0:
        raise ValueError(f"global_batch: batch_size {batch_size} needs more rows than a "
                         f"partition has ({dict(enumerate(lengths))})")
    epoch, k = divmod(step, per_epoch)
    out = []
    for p, (n, s) in enumerate(zip(lengths, shares, strict=True)):
        if not s:
            out.append(np.zeros(0, np.int64))
            continue
        perm = np.random.default_rng([seed, p, epoch]).permutation(n)
        out.append(np.sort(perm[k * s:(k + 1) * s]))
    return out


def _take(part, rows: np.ndarray, features, label):
    """(X, y) of `rows` of a partition: a pandas frame (feature columns, label column), a
    NumPy array (X only), or an (X, y) tuple."""
    if isinstance(part, tuple):
        X, y = part
        return np.asarray(X)[rows], None if y is None else np.asarray(y)[rows]
    if hasattr(part, "iloc"):
        sub = part.iloc[rows]
        X = sub[list(features)].to_numpy() if features is not None else sub.to_numpy()
        y = None if label is None else sub[label].to_numpy()
        return X, y
    return np.asarray(part)[rows], None


# ---------------------------------------------------------------------------------------------
# losses: (model, X, y) -> (mean loss, count), after model.backward of the mean


def _cross_entropy(model, X, y):
    from lora.nn import cross_entropy

    logits = model(X)
    loss, d = cross_entropy(logits, np.asarray(y).astype(np.int64))
    model.backward(d)
    return loss, len(y)


def _mse(model, X, y):
    from lora.nn import mse_loss

    pred = model(X)
    y = np.asarray(y, pred.dtype).reshape(pred.shape)
    loss, d = mse_loss(pred, y)
    model.backward(d)
    return loss, y.size


def _causal_lm(model, X, y):
    ids = np.asarray(X).astype(np.int64)
    labels = ids if y is None else np.asarray(y).astype(np.int64)
    loss = model(ids, labels=labels)
    model.backward()
    return loss, int((labels[:, 1:] != -100).sum())


LOSSES = {"cross_entropy": _cross_entropy, "mse": _mse, "causal_lm": _causal_lm}


def _gradient(spec, parts, rows, values, loss_fn, features, label):
    """On a worker: the sum over its partitions `parts` of count * the gradient of the mean
    loss over their `rows`, with the adapter at `values`; (grads, loss * count, count,
    seconds of compute)."""
    t0 = time.perf_counter()
    model = _model(spec)
    _assign(model, values)
    model.train()
    total = None
    for part, r in zip(parts, rows, strict=True):
        model.zero_grad()
        X, y = _take(part, r, features, label)
        loss, count = loss_fn(model, X, y)
        grads = _flat(p.grad if p.grad is not None else np.zeros_like(p.data)
                      for p in _trainable(model).values())
        one = (grads * count, float(loss) * count, count, 0.0)
        total = one if total is None else _add(total, one)
    return (*total[:3], time.perf_counter() - t0)


def _add(a, b):
    """Two gradient sums added; the compute time is the longer one's (they ran in parallel)."""
    ga, la, ca, ta = a
    gb, lb, cb, tb = b
    return ga + gb, la + lb, ca + cb, max(ta, tb)


# ---------------------------------------------------------------------------------------------
# checkpoints


def _replace_dir(directory: str, fill: Callable[[str], None]) -> None:
    """`fill(new)` writes the files into a new directory beside `directory`, which then
    replaces it in one atomic rename (lora/io/atomic.py); nothing half-written is left."""
    from lora.io import atomic

    target = os.path.abspath(directory)
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    atomic.remove_leftovers(parent, name, "save")
    new = atomic.new_temp_dir(parent, name, "save")
    try:
        fill(new)
        atomic.fsync_dir(new)
        atomic.replace_dir(new, target)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise


def _write(path: str, data: bytes) -> None:
    from lora.io import atomic

    atomic.write_file(path, data, lambda f, b: f.write(b))


def _adapter_files(new: str, values: dict, keys: dict, config: dict) -> None:
    """PEFT's two files of the adapter: its tensors under their keys, and its config."""
    from lora.io import safetensors

    tensors = {keys[n]: np.ascontiguousarray(v) for n, v in values.items() if n in keys}
    _write(os.path.join(new, "adapter_model.safetensors"),
           safetensors.serialize(tensors, metadata={"format": "pt"}))
    _write(os.path.join(new, "adapter_config.json"),
           (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())


def _write_checkpoint(directory: str, step: int, values: dict, keys: dict, config: dict,
                      optimizer, history: list) -> None:
    """The adapter in PEFT's format (adapter_config.json, adapter_model.safetensors) plus
    trainer_state.json and optimizer.npz, replacing `directory` in one rename."""
    import io

    state = optimizer.state_dict()
    arrays = {f"extra/{n}": v for n, v in values.items() if n not in keys}
    for i, s in state["state"].items():
        for k, v in s.items():
            if isinstance(v, np.ndarray):
                arrays[f"state/{i}/{k}"] = v
    meta = {"step": step, "history": history, "names": list(values),
            "param_groups": state["param_groups"],
            "state_scalars": {str(i): {k: v for k, v in s.items()
                                       if not isinstance(v, np.ndarray)}
                              for i, s in state["state"].items()}}
    buf = io.BytesIO()
    np.savez(buf, **arrays)

    def fill(new: str) -> None:
        _adapter_files(new, values, keys, config)
        _write(os.path.join(new, "optimizer.npz"), buf.getvalue())
        _write(os.path.join(new, "trainer_state.json"), json.dumps(meta, default=float).encode())

    _replace_dir(directory, fill)


def _read_checkpoint(directory: str, values: dict, keys: dict):
    """(step, values, optimizer state dict, history) from a checkpoint, or None."""
    from lora.io.safetensors import read_float_tensors

    meta_path = os.path.join(directory, "trainer_state.json")
    if not os.path.isfile(meta_path):
        return None
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    if sorted(meta["names"]) != sorted(values):
        raise ValueError(f"train: the checkpoint in {directory} is of another adapter "
                         f"(parameters {meta['names'][:3]}...)")
    tensors = read_float_tensors(os.path.join(directory, "adapter_model.safetensors"))
    with np.load(os.path.join(directory, "optimizer.npz")) as z:
        arrays = dict(z)
    out = {}
    for name, value in values.items():
        out[name] = (tensors[keys[name]] if name in keys else arrays[f"extra/{name}"]).astype(
            value.dtype).reshape(value.shape)
    state = {}
    for i, scalars in meta["state_scalars"].items():
        s = dict(scalars)
        for key, arr in arrays.items():
            parts = key.split("/")
            if parts[0] == "state" and parts[1] == i:
                s[parts[2]] = arr
        state[int(i)] = s
    return meta["step"], out, {"state": state, "param_groups": meta["param_groups"]}, \
        meta["history"]


# ---------------------------------------------------------------------------------------------
# training


@dataclasses.dataclass
class TrainResult:
    """What train returns: the trained adapter's values by parameter name, their PEFT keys
    and config (`save` writes the adapter directory), and one dict of metrics per step
    (loss, rows: what the loss averages over, the tokens for "causal_lm", seconds,
    compute_seconds: the slowest worker's gradient, rows_per_s: tokens/s for "causal_lm",
    bytes_moved, bytes_per_worker, adapter_bytes, workers, retries)."""

    values: dict
    keys: dict
    config: dict
    history: list

    def save(self, directory: str) -> None:
        """Write the adapter as a PEFT directory (atomically)."""
        _replace_dir(directory, lambda new: _adapter_files(new, self.values, self.keys,
                                                           self.config))

    def load_into(self, model) -> None:
        """Give a model built like the workers' (same spec) the trained values."""
        _assign(model, self.values)


def _partitions(client, data, features, label):
    """(partition futures, their lengths) of a Dask DataFrame or Array, an (X, y) pair of
    Dask Arrays chunked alike by rows, or a list of partitions (pandas frames, arrays, or
    (X, y) tuples). Collections are persisted, so a lost partition is recomputed from its
    graph; a list is turned into delayed values for the same reason."""
    import dask

    def row_blocks(a):  # a Dask Array's blocks of whole rows (other axes in one chunk)
        if getattr(a, "ndim", 1) > 1:
            a = a.rechunk({axis: -1 for axis in range(1, a.ndim)})
        return list(np.ravel(a.to_delayed()))

    if isinstance(data, (list, tuple)) and not (len(data) == 2 and all(
            hasattr(d, "to_delayed") for d in data)):
        parts = [dask.delayed(p, pure=True) for p in data]
    elif isinstance(data, tuple):
        X, y = data
        if tuple(X.chunks[0]) != tuple(y.chunks[0]):
            raise ValueError(f"train: X and y must be chunked alike along their rows, got "
                             f"{X.chunks[0]} and {y.chunks[0]}")
        parts = [dask.delayed(tuple)([a, b])
                 for a, b in zip(row_blocks(X), row_blocks(y), strict=True)]
    elif hasattr(data, "chunks"):  # a Dask Array
        parts = row_blocks(data)
    elif hasattr(data, "to_delayed"):  # a Dask DataFrame
        parts = list(data.to_delayed())
    else:
        raise TypeError(f"train: data must be a Dask DataFrame or Array, an (X, y) pair of Dask "
                        f"Arrays, or a list of partitions; got {type(data).__name__}")
    futures = client.compute(parts)  # futures of the partitions, kept with their graph
    lengths = client.gather(client.map(_part_len, futures, pure=False))
    return futures, [int(n) for n in lengths]


def train(client, spec: ModelSpec, data, *, loss="cross_entropy", features=None, label=None,
          batch_size: int = 32, steps: int = 100, lr: float = 1e-3, weight_decay: float = 0.0,
          betas=(0.9, 0.999), seed: int = 0, checkpoint_dir: str | None = None,
          checkpoint_every: int = 10, max_step_retries: int = 3, progress: bool = False
          ) -> TrainResult:
    """Train the adapter of `spec` on `data` with `client`'s workers; returns a TrainResult.

    data: a Dask DataFrame (`features` columns in, `label` column as the target), a Dask
    Array of inputs (with the target a second array: pass (X, y)), or a list of partitions.
    loss: "cross_entropy" (class ids), "mse", "causal_lm" (token id rows; labels the ids
    themselves, or y), or a function (model, X, y) -> (mean loss, count) that has called
    model.backward on the mean. Each step draws a global batch of `batch_size` rows
    (global_batch), computes the gradients where the rows are, sums them on the workers and
    makes one AdamW step (lr, betas, weight_decay) on the client. checkpoint_dir: written
    every `checkpoint_every` steps and at the end; an existing checkpoint there is resumed.
    progress shows a bar with the loss, rows/s and bytes moved per step.
    """
    from lora._progress import progress_bar
    from lora.nn import Parameter
    from lora.optim import AdamW

    loss_fn = LOSSES[loss] if isinstance(loss, str) else loss
    if not callable(loss_fn):
        raise ValueError(f"train: loss must be one of {sorted(LOSSES)} or a function")
    parts, lengths = _partitions(client, data, features, label)
    [spec_f] = client.scatter([spec], broadcast=True, hash=False)
    values, keys, config = client.submit(_initial, spec_f, pure=False).result()
    params = {n: Parameter(np.array(v)) for n, v in values.items()}  # own, aligned copies
    optimizer = AdamW(list(params.values()), lr=lr, betas=betas, weight_decay=weight_decay)
    start, history = 0, []
    if checkpoint_dir and (found := _read_checkpoint(checkpoint_dir, values, keys)):
        start, restored, opt_state, history = found
        for n, v in restored.items():
            params[n].data[...] = v
        optimizer.load_state_dict(opt_state)
    bar = progress_bar(progress, total=steps, initial=start, desc="lora.distributed")
    for step in range(start, steps):
        rows = global_batch(lengths, step, batch_size, seed)
        t0 = time.perf_counter()
        for attempt in range(max_step_retries + 1):
            try:
                current = _flat(p.data for p in params.values())
                workers = len(client.scheduler_info()["workers"])
                [values_f] = client.scatter([current], broadcast=True, hash=False)
                # one task per worker, over the partitions it holds (another may take it)
                who = client.who_has(parts)
                groups: dict = {}
                for part, r in zip(parts, rows, strict=True):
                    if len(r):
                        holders = who.get(part.key) or ("",)
                        groups.setdefault(holders[0], []).append((part, r))
                tasks = [client.submit(_gradient, spec_f, [p for p, _ in g], [r for _, r in g],
                                       values_f, loss_fn, features, label, pure=False,
                                       workers=[addr] if addr else None,
                                       allow_other_workers=True)
                         for addr, g in groups.items()]
                n_tasks = len(tasks)
                while len(tasks) > 1:  # a tree of sums, on the workers
                    tasks = [client.submit(_add, tasks[i], tasks[i + 1], pure=False)
                             if i + 1 < len(tasks) else tasks[i]
                             for i in range(0, len(tasks), 2)]
                grads, loss_sum, count, compute = tasks[0].result()
                break
            except Exception:
                if attempt == max_step_retries:
                    raise
        at = 0
        for p in params.values():
            p.grad = (grads[at:at + p.size] / count).astype(p.data.dtype).reshape(p.shape)
            at += p.size
        optimizer.step()
        seconds = time.perf_counter() - t0
        adapter_bytes = current.nbytes
        # the values to every worker; each worker's gradient to the one it is summed on, the
        # sum to the client: one adapter's bytes per transfer
        moved = adapter_bytes * (workers + n_tasks)
        history.append({"step": step + 1, "loss": loss_sum / count, "rows": int(count),
                        "seconds": seconds, "compute_seconds": compute,
                        "rows_per_s": count / seconds,
                        "bytes_moved": moved, "bytes_per_worker": moved / max(workers, 1),
                        "adapter_bytes": adapter_bytes, "workers": workers,
                        "retries": attempt})
        bar.update(1)
        bar.set_postfix(loss=f"{history[-1]['loss']:.4g}", rows_s=f"{count / seconds:.0f}",
                        MB=f"{moved / 1e6:.2f}")
        if checkpoint_dir and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
            _write_checkpoint(checkpoint_dir, step + 1, {n: p.data for n, p in params.items()},
                              keys, config, optimizer, history)
    bar.close()
    return TrainResult({n: p.data.copy() for n, p in params.items()}, keys, config, history)


# ---------------------------------------------------------------------------------------------
# inference


def _tokenizer(model):
    for owner in (model, getattr(model, "bert", None)):
        try:
            return owner.tokenizer
        except (AttributeError, ValueError):
            continue
    raise ValueError("score: text= needs a model loaded from a checkpoint directory with a "
                     "tokenizer (a lora.models BERT or Llama)")


def _score_partition(part, spec, adapter_values, features, text, output, merged, batch_size):
    import pandas as pd

    import lora

    if merged:  # a plain model with the adapter merged in, built once per adapter
        key = (spec.key, id(adapter_values))
        model = _MODELS.get(key)
        if model is None:
            model = spec.make()
            if adapter_values is not None:
                _assign(model, adapter_values)
            model = _MODELS[key] = lora.merge_and_unload(model)
    else:  # the worker's model, the adapter's values set for this partition
        model = _model(spec)
        _assign(model, adapter_values if adapter_values is not None else _INITIAL[spec.key])
    model.eval()
    outs = []
    for start in range(0, len(part), batch_size):  # bounded memory on any partition size
        chunk = part.iloc[start:start + batch_size]
        if text is not None:
            batch = _tokenizer(model)([str(t) for t in chunk[text]])
            out = model(batch["input_ids"], batch["attention_mask"])
        else:
            X = chunk[list(features)].to_numpy() if features is not None else chunk.to_numpy()
            out = model(X)
        outs.append(np.asarray(out).reshape(len(chunk), -1))
    out = np.concatenate(outs) if outs else np.zeros((0, 1), np.float32)
    if output == "predict":
        return pd.Series(out.argmax(axis=1), index=part.index, name="prediction")
    if output == "proba":
        z = np.exp(out - out.max(axis=1, keepdims=True))
        out = z / z.sum(axis=1, keepdims=True)
    return pd.DataFrame(out, index=part.index, columns=[f"{output}_{i}" for i in
                                                        range(out.shape[1])])


def score(client, spec: ModelSpec, ddf, *, features=None, text=None, adapter=None,
          output="logits", merged: bool = False, batch_size: int = 64):
    """Score a Dask DataFrame partition by partition on the workers: a Dask DataFrame of the
    model's outputs ("logits", "proba": their softmax, or a "predict" Series of argmax),
    aligned with ddf's index. Inputs: the `features` columns, or the strings of the column
    `text`, tokenized on the worker by the model's own tokenizer (a classifier loaded from a
    path); `batch_size` rows at a time. The base is built once per worker; `adapter` is a
    TrainResult, a dict of values or a PEFT adapter directory (None: the spec's own
    adapter); merged=True merges it into the weights first (a plain model, the same
    outputs). Lazy: call .compute() or .persist()."""

    if output not in ("logits", "proba", "predict"):
        raise ValueError(f"score: output must be 'logits', 'proba' or 'predict', got {output!r}")
    if isinstance(adapter, TrainResult):
        values = adapter.values
    elif isinstance(adapter, (str, os.PathLike)):
        spec = dataclasses.replace(spec, adapter=os.fspath(adapter), build=spec.build,
                                   key=uuid.uuid4().hex) if spec.path else spec
        values = None if spec.path else _values_from_dir(client, spec, os.fspath(adapter))
    else:
        values = adapter
    [spec_f] = client.scatter([spec], broadcast=True, hash=False)
    values_f = (client.scatter([values], broadcast=True, hash=False)[0]
                if values is not None else None)
    head = ddf.get_partition(0).head(1)  # one row, to learn the output's columns
    sample = client.submit(_score_partition, head, spec_f, values_f, features, text, output,
                           merged, batch_size, pure=False).result()
    return ddf.map_partitions(_score_partition, spec_f, values_f, features, text, output,
                              merged, batch_size, meta=sample.iloc[:0])


def _values_from_dir(client, spec, directory):
    """The trainable values of `spec`'s model with the PEFT adapter in `directory` loaded
    (on a worker)."""

    def load(spec, directory):
        import lora

        model = spec.make()
        lora.load_adapter(model, directory)
        return {n: p.data.copy() for n, p in _trainable(model).items()}

    return client.submit(load, spec, directory, pure=False).result()
