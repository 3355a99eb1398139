"""Benchmark: `lora.merge_checkpoint` against PEFT (merge_and_unload + save_pretrained).

A random Llama-shaped model of ~100M parameters is built from a config (no download) and
saved sharded in bf16 and fp32 with a rank-16 adapter on every Linear layer. Each merge runs
in its own child process; the parent reads that child's wall time and peak RSS (ru_maxrss
from wait4, so one child's figure never leaks into another's). Runs alternate and the median
is kept; files are in the page cache for both (a warm-up read first). Not a test.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_merge_checkpoint.py
    ... --write-docs     # also replace the "## Checkpoint merge" section of docs/performance.md
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Checkpoint merge"

LORA_CHILD = """
import sys, time
t = time.perf_counter()
from lora import merge_checkpoint
merge_checkpoint(sys.argv[1], [sys.argv[2]], sys.argv[3], progress=False)
print(time.perf_counter() - t)
"""

PEFT_CHILD = """
import sys, time
t = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
dtype = getattr(torch, sys.argv[4])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=dtype)
model = PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload()
model.save_pretrained(sys.argv[3])
print(time.perf_counter() - t)
"""


def build(root: str, dtype_name: str, config_json: str, rank: str) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**json.loads(config_json)))
    rank = int(rank)
    params = sum(p.numel() for p in model.parameters())
    base = os.path.join(root, f"base-{dtype_name}")
    model.to(getattr(torch, dtype_name)).save_pretrained(base, max_shard_size="100MB")
    adapter = os.path.join(root, "adapter")
    if not os.path.isdir(adapter):
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                            init_lora_weights=False)  # fmt: skip
        peft_model = get_peft_model(model.float(), config)
        peft_model.save_pretrained(adapter)
    print(f"model: {params / 1e6:.1f}M parameters, {dtype_name}, "
          f"{len(glob.glob(base + '/*.safetensors'))} shards", file=sys.stderr)  # fmt: skip
    return f"{base} {adapter}"


def helper(*args: str) -> str:
    """Run this script's heavy steps (torch, lora imports) in a child, so that the parent
    stays small: Linux starts a child's ru_maxrss at its parent's RSS (fork copies the
    high-water mark and exec keeps it), which would put a floor under every measurement."""
    proc = subprocess.run([sys.executable, __file__, "--helper", *args], capture_output=True,
                          text=True)  # fmt: skip
    if proc.returncode != 0:
        sys.exit(f"{args[0]} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout.strip().splitlines()[-1]


def run_child(code: str, args: list[str]) -> tuple[float, float, float]:
    """(wall seconds, seconds inside the child after start, peak RSS MiB) of one child."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=os.environ.copy())  # fmt: skip
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"child failed ({proc.returncode}):\n{err.decode()[-3000:]}")
    return wall, float(out.decode().split()[-1]), usage.ru_maxrss / 1024  # ru_maxrss is KiB


def compare(ours_dir: str, peft_dir: str, base_dir: str, adapter_dir: str) -> str:
    """How far the two merged checkpoints are apart: the share of elements identical and
    (16-bit floats) within one ulp, and the largest |ours - PEFT| / (|W| + |s| |B| @ |A|),
    the difference relative to the size of the terms summed (one bf16 ulp is up to 2^-7 of
    it, float32 rounding noise about 1e-7), over all elements and over those more than one
    ulp apart."""
    import torch
    from safetensors.torch import load_file

    def load(d):
        out = {}
        for f in glob.glob(os.path.join(d, "*.safetensors")):
            out.update(load_file(f))
        return out

    a, b, base = load(ours_dir), load(peft_dir), load(base_dir)
    lora = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    config = json.load(open(os.path.join(adapter_dir, "adapter_config.json")))
    assert set(a) == set(b), "different tensor names"
    total = same = one = 0
    worst = beyond = 0.0
    for name, x in a.items():
        y = b[name]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        key = "base_model.model." + name[: -len(".weight")]
        if key + ".lora_A.weight" in lora:
            A, B = lora[key + ".lora_A.weight"].double(), lora[key + ".lora_B.weight"].double()
            s = config["lora_alpha"] / A.shape[0]
            size = base[name].double().abs() + s * (B.abs() @ A.abs())
            rel = (x.double() - y.double()).abs() / size
            worst = max(worst, rel.max().item())
        else:
            assert torch.equal(x, y) and torch.equal(x, base[name]), name
        total += x.numel()
        if x.dtype == torch.float32:
            same += (x == y).sum().item()
            one = same
        else:
            i, j = (t.view(torch.int16).to(torch.int32) for t in (x, y))
            i, j = (torch.where(t < 0, -(t & 0x7FFF), t) for t in (i, j))
            ulps = (i - j).abs()
            if name.endswith(".weight") and key + ".lora_A.weight" in lora and (ulps > 1).any():
                beyond = max(beyond, rel[ulps > 1].max().item())
            same += (ulps == 0).sum().item()
            one += (ulps <= 1).sum().item()
    return f"{len(a)} {same / total:.4%} {one / total:.4%} {worst:.2g} {beyond:.2g}"


def machine() -> str:
    import numpy as np

    import lora

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = lora.blas_info()
    env = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ}
    import peft
    import torch
    import transformers

    return (f"{cpu}, {os.cpu_count()} CPUs; Python {platform.python_version()}, NumPy "
            f"{np.__version__}; OpenBLAS core `{info['corename']}` ({info['num_threads']} "
            f"threads){', env ' + str(env) if env else ''}; torch {torch.__version__}, "
            f"transformers {transformers.__version__}, peft {peft.__version__}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--helper", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    config = dict(vocab_size=8192, hidden_size=768, intermediate_size=2048,
                  num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                  tie_word_embeddings=False)  # fmt: skip
    if args.helper:
        print(HELPERS[args.helper[0]](*args.helper[1:]))
        return
    print(f"Machine: {helper('machine')}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-merge-") as root:
        for dtype in args.dtypes:
            base, adapter = helper("build", root, dtype, json.dumps(config), str(args.rank)).split()
            for path in glob.glob(base + "/*.safetensors"):  # into the page cache for both
                with open(path, "rb") as f:
                    while f.read(64 << 20):
                        pass
            out_lora, out_peft = os.path.join(root, "out-lora"), os.path.join(root, "out-peft")
            results = {"lora": [], "peft": []}
            for _ in range(args.repeats):
                for name, code, out in (("lora", LORA_CHILD, out_lora),
                                        ("peft", PEFT_CHILD, out_peft)):  # fmt: skip
                    shutil.rmtree(out, ignore_errors=True)
                    results[name].append(run_child(code, [base, adapter, out, dtype]))
                    wall, inner, rss = results[name][-1]
                    print(f"  {dtype:8s} {name}: {wall:6.2f} s wall ({inner:5.2f} s after "
                          f"start), peak RSS {rss:7.0f} MiB", flush=True)  # fmt: skip
            agreement = helper("compare", out_lora, out_peft, base, adapter)
            med = {k: [statistics.median(r[i] for r in v) for i in range(3)]
                   for k, v in results.items()}  # fmt: skip
            size = sum(os.path.getsize(p) for p in glob.glob(base + "/*.safetensors")) / 2**20
            rows.append((dtype, size, med["lora"], med["peft"], agreement))
            shutil.rmtree(base)

    lines = [SECTION, "",
             "`lora.merge_checkpoint` (`lora merge`) against PEFT `merge_and_unload()` + "
             "`save_pretrained()` on a random Llama-shaped model built from a config (hidden "
             "768, MLP 2048, 12 layers, vocab 8192: ~98M parameters, 100 MB shards), rank-"
             f"{args.rank} adapter on all seven Linear projections. Each merge in its own "
             "process; wall time of the whole process (imports included) and its peak RSS "
             f"(`ru_maxrss`), median of {args.repeats}, files in the page cache. "
             "`benchmarks/bench_merge_checkpoint.py`.", "",
             f"Machine: {machine()}.", "",
             "| dtype | checkpoint | lora wall | PEFT wall | speed-up | lora peak RSS | "
             "PEFT peak RSS | memory ratio | vs PEFT: identical / within 1 ulp / max rel. diff / "
             "max rel. diff beyond 1 ulp |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for dtype, size, ours, theirs, agreement in rows:
        n, same, one, worst, beyond = agreement.split()
        lines.append(
            f"| {dtype} | {size:.0f} MiB | {ours[0]:.2f} s ({ours[1]:.2f}) | "
            f"{theirs[0]:.2f} s ({theirs[1]:.2f}) | {theirs[0] / ours[0]:.1f}x | "
            f"{ours[2]:.0f} MiB | {theirs[2]:.0f} MiB | {ours[2] / theirs[2]:.2f} | "
            f"{same} / {one} / {worst} / {beyond if dtype != 'float32' else '-'} |"
        )
    lines += ["", "In parentheses: seconds from the child's start (after interpreter start-up, "
              "imports included). A memory ratio of 0.33 or less is the goal, as is a "
              "speed-up of 3x or more. Agreement with PEFT's output over all elements: the share "
              "identical, the share within one unit in the last place, and the largest "
              "|ours - PEFT| / (|W| + |s| |B| @ |A|) over all elements and over those more than "
              "one ulp apart (one bf16 ulp is up to 2^-7 of a value). The few differences "
              "beyond one ulp sit "
              "where W and delta W nearly cancel, so float32 rounding noise in delta W (PEFT's "
              "and ours, each about 1e-7 of the terms) exceeds a 16-bit ulp of the small "
              "result; neither side is more exact there.", ""]  # fmt: skip
    text = "\n".join(lines)
    print()
    print(text)
    if args.write_docs:
        write_section(os.path.join(ROOT, "docs", "performance.md"), text)


def write_section(path: str, text: str) -> None:
    """Replace (or append) only the SECTION of the file, leaving other sections alone."""
    old = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Performance\n"
    lines = old.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == SECTION), None)
    if start is None:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = next((i for i in range(start + 1, len(lines))
                    if lines[i].startswith("## ")), len(lines))  # fmt: skip
        tail = "".join(lines[end:])
        new = "".join(lines[:start]) + text + ("\n" + tail if tail else "")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(new.rstrip("\n") + "\n")


HELPERS = {"build": build, "compare": compare, "machine": machine}

if __name__ == "__main__":
    main()
