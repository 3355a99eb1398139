"""Benchmark of the C kernels against their floors and against PyTorch on the CPU.

Not a test: it measures ratios side by side in one run and prints them, with the machine
and the OpenBLAS kernel that ran. Run it with OpenBLAS free to pick its kernel:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_kernels.py

Options: --quick (fewer shapes), --markdown FILE (write the tables as the "## Kernels"
section of that Markdown file, e.g. docs/performance.md, keeping its other sections).
Timings are medians of repetitions. The forward against the base GEMM: interleaved, the
ratio the median of each round's ratio. The training step against full fine-tuning, and the
layer against PyTorch: rounds of blocks (one side's calls, then the other's), the order
rotated between rounds, the ratio the median of the rounds' ratios (rotated_rounds): a
training loop runs one step after another, and PyTorch's idle OpenMP threads spin after its
calls just as OpenBLAS's do after lora's. The rest: blocked.
"""

import argparse
import ctypes
import os
import platform
import statistics
import sys
import time

import numpy as np

import lora
from lora import functional as F

THREADS = 2


def median_times(fns, reps, min_time=0.3, interleave=True):
    """Median wall time of each callable over `reps` calls (and at least min_time seconds),
    after one warm-up call. Interleaved (the callables take turns) for sides that share one
    BLAS, so drift hits both alike; blocked (all calls of one, then the next) for lora
    against PyTorch: each library's idle threads keep spinning for a while after its calls
    (OpenBLAS's workers, torch's OpenMP team) and would steal the other side's second core."""
    if not interleave:
        return [median_times([f], reps, min_time)[0] for f in fns]
    return [statistics.median(t) for t in interleaved_times(fns, reps, min_time)]


def paired_ratio(fa, fb, reps, min_time=1.0):
    """Median times of fa and fb, interleaved, and the median over the rounds of fb's time
    over fa's in the same round: a round's two calls see the machine alike, so on a shared
    machine this ratio drifts less than the ratio of the medians."""
    ta, tb = interleaved_times([fa, fb], reps, min_time)
    return (statistics.median(ta), statistics.median(tb),
            statistics.median(b / a for a, b in zip(ta, tb, strict=True)))


def interleaved_times(fns, reps, min_time, warmup=True):
    """Each callable's wall times, the callables taking turns, after one warm-up call each:
    `reps` rounds and at least min_time seconds (200 rounds at most). The order turns round
    by round, so that none always runs after another: a call leaves the caches, the freed
    pages and the threads in a state the next one pays for (measured at n = 2048, d = 4096:
    the step ratio 0.64 with full fine-tuning always first, 0.70 always second)."""
    for f in fns if warmup else ():
        f()
    times = [[] for _ in fns]
    start = time.perf_counter()
    k = 0
    while k < reps or time.perf_counter() - start < min_time:
        for i in range(len(fns)):
            j = (i + k) % len(fns)
            t0 = time.perf_counter()
            fns[j]()
            times[j].append(time.perf_counter() - t0)
        k += 1
        if k >= 200:
            break
    return times


def steady_heap():
    """Pins glibc's malloc thresholds for this process (trim the heap only beyond 1 GB free,
    map separately only from 32 MB), where the C library allows: glibc adjusts both as a
    program frees memory, and from the history of earlier cells the same step then did 0 or
    ~1000 page faults per call (~5 ms at n = 2048, d = 1024) on one side and not the other,
    moving a ratio by up to 0.1. Pinned, neither side pages in its arrays anew per call.
    Returns whether they were pinned."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return (libc.mallopt(m_trim_threshold, 1 << 30) == 1
            and libc.mallopt(m_mmap_threshold, 32 << 20) == 1)


def machine():
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def bandwidth(nbytes=256 << 20):
    """GB/s of one in-place read+write pass over a large float32 array (one core, NumPy)."""
    a = np.ones(nbytes // 4, dtype=np.float32)
    (t,) = median_times([lambda: np.multiply(a, np.float32(1.0000001), out=a)], 5)
    return 2 * a.nbytes / t / 1e9


def rand(rng, shape):
    return rng.standard_normal(shape, dtype=np.float32)


def bench_layer(rows, ns, ds, rs, rng):
    for d in ds:
        W = rand(rng, (d, d)) * 0.02
        b = rand(rng, (d,))
        for n in ns:
            x = rand(rng, (n, d))
            dy = rand(rng, (n, d))
            for r in rs:
                A, B = rand(rng, (r, d)) * 0.02, rand(rng, (d, r)) * 0.02
                # A call's time varies by ~5% on a shared machine and the targets sit 1-2
                # points above the measured overheads: 30 rounds put the median within ~1
                # point. The steps: 8 rounds of blocks (rotated_rounds).
                reps = 30

                def base():
                    F.dense_forward(x, W, b)

                def fwd():
                    F.linear_forward(x, W, A, B, 2.0, b)

                def lora_step():
                    y, xa = F.linear_forward(x, W, A, B, 2.0, b)
                    return y, F.linear_backward(dy, x, xa, W, A, B, 2.0)

                def full_step():  # y kept through the backward, as a loss keeps it
                    y = F.dense_forward(x, W, b)
                    return y, F.dense_backward(dy, x, W), dy.sum(axis=0)

                t_base, t_fwd, fwd_ratio = paired_ratio(base, fwd, reps)
                share = r * (2 * d) / (d * d)
                if n == 1 and d < 4096:
                    target, ok_fwd = "(none below d = 4096)", True
                elif n == 1:
                    target, ok_fwd = "<= 1.10x base", fwd_ratio <= 1.10
                else:
                    lim = 1 + 2 * share + 0.02
                    target, ok_fwd = f"<= {lim:.3f}x base", fwd_ratio <= lim
                t_lora = t_full = step_ratio = None
                if n >= 64:
                    ms, ratios = rotated_rounds({"lora": lora_step, "full": full_step}, "full",
                                                8, reps=5 if n * d * d < 1e9 else 3,
                                                settle=0.1)
                    t_lora, t_full = ms["lora"] / 1e3, ms["full"] / 1e3
                    step_ratio = statistics.median(ratios["lora"])
                rows.append(dict(d=d, n=n, r=r, base_ms=t_base * 1e3, fwd_ms=t_fwd * 1e3,
                                 fwd_ratio=fwd_ratio, fwd_target=target, fwd_ok=ok_fwd,
                                 gflops=2 * n * d * d / t_base / 1e9, step_ratio=step_ratio,
                                 lora_step_ms=None if t_lora is None else t_lora * 1e3,
                                 full_step_ms=None if t_full is None else t_full * 1e3))
                row = rows[-1]
                step = "" if t_lora is None else f" step {row['step_ratio']:.3f}x full"
                print(f"  d={d:5d} n={n:5d} r={r:3d}: base {row['base_ms']:9.3f} ms "
                      f"({row['gflops']:6.1f} GFLOP/s), fwd {row['fwd_ratio']:.3f}x base "
                      f"[{target}: {'ok' if ok_fwd else 'MISS'}]{step}", flush=True)


def bench_merge(rows, ds, rs, rng, gemm_gflops, bw):
    for d in ds:
        W = rand(rng, (d, d))
        for r in rs:
            A, B = rand(rng, (r, d)), rand(rng, (d, r))
            (t,) = median_times([lambda: F.merge(W, A, B, 1e-3)], 10)
            floor_bw = 2 * W.nbytes / (bw * 1e9)
            floor_flop = 2 * d * d * r / (gemm_gflops * 1e9)
            floor = max(floor_bw, floor_flop)
            rows.append(dict(d=d, r=r, ms=t * 1e3, floor_bw_ms=floor_bw * 1e3,
                             floor_flop_ms=floor_flop * 1e3, ratio=t / floor,
                             gbs=2 * W.nbytes / t / 1e9))
            print(f"  merge d={d} r={r}: {t * 1e3:.3f} ms, {rows[-1]['gbs']:.1f} GB/s, "
                  f"{t / floor:.2f}x floor (bw {floor_bw * 1e3:.3f} ms, flop "
                  f"{floor_flop * 1e3:.3f} ms) [<= 1.5: {'ok' if t / floor <= 1.5 else 'MISS'}]",
                  flush=True)


def bench_adam(numel, bw, torch):
    rng = np.random.default_rng(0)
    p = rand(rng, numel)
    g = rand(rng, numel)
    m, v = np.zeros_like(p), np.zeros_like(p)
    step = [0]

    def ours():
        step[0] += 1
        F.adam_step(p, g, m, v, step=step[0], lr=1e-4, weight_decay=0.01)

    fns = [ours]
    if torch is not None:
        tp = torch.nn.Parameter(torch.from_numpy(p.copy()))
        tp.grad = torch.from_numpy(g.copy())
        opt = torch.optim.AdamW([tp], lr=1e-4, weight_decay=0.01, fused=True)
        fns.append(opt.step)
    times = median_times(fns, 10, interleave=False)
    gbs = 28 * numel / times[0] / 1e9
    out = dict(numel=numel, ms=times[0] * 1e3, gbs=gbs, frac_bw=gbs / bw,
               torch_ms=times[1] * 1e3 if torch is not None else None)
    print(f"  adam_step {numel / 1e6:.0f}M params: {out['ms']:.2f} ms, {gbs:.1f} GB/s = "
          f"{gbs / bw:.0%} of {bw:.1f} GB/s [>= 70%: {'ok' if gbs / bw >= 0.7 else 'MISS'}]"
          + ("" if torch is None else f"; torch AdamW(fused) {out['torch_ms']:.2f} ms, "
             f"lora/torch {times[0] / times[1]:.2f}x"), flush=True)
    return out


def bench_vs_torch(rows, torch, shapes, rng):
    """A LoRA layer's forward + backward (with dx): lora against a PEFT-style torch layer
    (frozen nn.Linear plus lora_A/lora_B Linear without bias, scaling, no dropout)."""
    nn = torch.nn
    for n, d, r in shapes:
        x = rand(rng, (n, d))
        W, b = rand(rng, (d, d)) * 0.02, rand(rng, (d,))
        A, B = rand(rng, (r, d)) * 0.02, rand(rng, (d, r)) * 0.02
        dy = rand(rng, (n, d))
        base = nn.Linear(d, d)
        la, lb = nn.Linear(d, r, bias=False), nn.Linear(r, d, bias=False)
        with torch.no_grad():
            base.weight.copy_(torch.from_numpy(W))
            base.bias.copy_(torch.from_numpy(b))
            la.weight.copy_(torch.from_numpy(A))
            lb.weight.copy_(torch.from_numpy(B))
        base.weight.requires_grad_(False)
        base.bias.requires_grad_(False)
        tx = torch.from_numpy(x).requires_grad_(True)
        tdy = torch.from_numpy(dy)

        def torch_step():
            la.weight.grad = lb.weight.grad = tx.grad = None
            y = base(tx) + lb(la(tx)) * 2.0
            y.backward(tdy)

        def lora_step(w=W):
            y, xa = F.linear_forward(x, w, A, B, 2.0, b)
            F.linear_backward(dy, x, xa, w, A, B, 2.0)

        packed = F.PackedWeight(W)  # once, as a frozen layer does (LoRALinear.pack)
        sides = {"lora": lora_step, "packed": lambda: lora_step(packed), "torch": torch_step}
        ms, ratios = rotated_rounds(sides, "torch", VS_TORCH_ROUNDS)
        row = dict(n=n, d=d, r=r, lora_ms=ms["lora"], packed_ms=ms["packed"],
                   torch_ms=ms["torch"])
        for side, key in (("lora", "ratio"), ("packed", "packed_ratio")):
            row[key] = statistics.median(ratios[side])
            row[key + "_range"] = (min(ratios[side]), max(ratios[side]))
        rows.append(row)
        print(f"  fwd+bwd n={n} d={d} r={r}: lora {ms['lora']:.2f} ms, packed "
              f"{ms['packed']:.2f} ms, torch {ms['torch']:.2f} ms, lora/torch "
              f"{row['ratio']:.2f}x ({span(row['ratio_range'])}), packed/torch "
              f"{row['packed_ratio']:.2f}x ({span(row['packed_ratio_range'])})", flush=True)


VS_TORCH_ROUNDS = 7


def rotated_rounds(sides, ref, rounds, reps=5, settle=0.25):
    """Rounds of blocked timings, the sides' order rotated each round so that none always
    follows another (each side's idle threads spin for a while after its calls). In a block,
    calls first run untimed for `settle` seconds (at least one: the other side's threads go
    quiet, this side's operands come into the cache), then `reps` timed calls (and 0.1 s at
    least) give the block's median. Returns each side's median block time in ms and, per
    side, the list of its per-round ratios to side `ref` (the machine drifts between rounds,
    less within one). The training step is timed so too: a training loop runs one step after
    another, and a call after one of the other side's is not one of them."""
    names = list(sides)
    blocks = {k: [] for k in names}
    for i in range(rounds):
        for k in names[i % len(names):] + names[:i % len(names)]:
            f = sides[k]
            start = time.perf_counter()
            f()
            while time.perf_counter() - start < settle:
                f()
            blocks[k].append(statistics.median(interleaved_times([f], reps, 0.1, False)[0]))
    ratios = {k: [a / b for a, b in zip(blocks[k], blocks[ref], strict=True)] for k in names}
    return {k: statistics.median(v) * 1e3 for k, v in blocks.items()}, ratios


def span(lo_hi):
    return f"{lo_hi[0]:.2f}-{lo_hi[1]:.2f}"


def bench_packed(rows, torch, ns, d, rng):
    """GFLOP/s of x W^T (forward) and dy W (dx) at d x d: OpenBLAS on W, lora's packed GEMM
    on a PackedWeight, and torch (if installed) on W. Blocked, not interleaved: each side's
    operand stays in the cache as a layer's does when called again and again; interleaved,
    the PackedWeight's two copies (2 x 64 MB at d = 4096) would be evicted by W and come from
    memory while W stays cached. (Both from memory, measured apart: 1 row 13 against OpenBLAS's
    15 GFLOP/s, 8 rows 89 against 31-45, 64 rows 238-243 against 154-188.)"""
    W = rand(rng, (d, d)) * 0.02
    t0 = time.perf_counter()
    packed = F.PackedWeight(W)
    pack_ms = (time.perf_counter() - t0) * 1e3
    tW = torch.from_numpy(W) if torch else None
    for n in ns:
        x = rand(rng, (n, d))
        flop = 2.0 * n * d * d
        fns = [lambda: F.dense_forward(x, W), lambda: F.dense_forward(x, packed),
               lambda: F.dense_backward(x, x, W, need_dweight=False),
               lambda: F.dense_backward(x, x, packed, need_dweight=False)]
        times = median_times(fns, 10, interleave=False)
        if torch:
            tx = torch.from_numpy(x)
            times += median_times([lambda: tx @ tW.T, lambda: tx @ tW], 10, interleave=False)
        g = [flop / t / 1e9 for t in times] + [None] * (6 - len(times))
        rows.append(dict(n=n, d=d, blas_fwd=g[0], packed_fwd=g[1], blas_bwd=g[2],
                         packed_bwd=g[3], torch_fwd=g[4], torch_bwd=g[5], pack_ms=pack_ms))
        print(f"  n={n} d={d}: x W^T GFLOP/s OpenBLAS {g[0]:.0f}, packed {g[1]:.0f}"
              + (f", torch {g[4]:.0f}" if torch else "")
              + f" | dy W OpenBLAS {g[2]:.0f}, packed {g[3]:.0f}"
              + (f", torch {g[5]:.0f}" if torch else ""), flush=True)


def markdown(info, layer, merges, adam, vs_torch, packed):
    out = ["## Kernels", "", f"Machine: {info['machine']}. OpenBLAS {info['config']}, "
           f"kernel **{info['corename']}**, {THREADS} threads. Measured bandwidth (in-place "
           f"pass, one core): {info['bw']:.1f} GB/s; base sgemm peak in this run: "
           f"{info['gemm']:.0f} GFLOP/s. glibc's malloc thresholds "
           + ("pinned (steady_heap)." if info["heap"] else "left as they were.") + "", "",
           "Forward: LoRA forward time over the base GEMM + bias alone (same BLAS); target "
           "1 + 2 r(d_in+d_out)/(d_in d_out) + 2% for n >= 64, 1.10 for n = 1 at d = 4096. "
           "Training step: LoRA forward + backward (with dx) over a full fine-tuning step "
           "(forward + dx + dW + db); target <= 0.72 for n >= 512, r <= 16.", "",
           "| d | n | r | base ms | GFLOP/s | fwd / base | target | step / full |",
           "|---|---|---|---|---|---|---|---|"]
    for row in layer:
        step = "" if row["step_ratio"] is None else f"{row['step_ratio']:.3f}"
        mark = "" if row["fwd_ok"] else " (miss)"
        out.append(f"| {row['d']} | {row['n']} | {row['r']} | {row['base_ms']:.3f} | "
                   f"{row['gflops']:.0f} | {row['fwd_ratio']:.3f}{mark} | "
                   f"{row['fwd_target']} | {step} |")
    out += ["", "Merge `W += s B A` (float32, in place) against the larger of its floors: one "
            "read+write pass over W at the measured bandwidth, and 2 d^2 r FLOPs at the base "
            "GEMM's rate; target <= 1.5x.", "",
            "| d | r | ms | GB/s | bandwidth floor ms | FLOP floor ms | x floor |",
            "|---|---|---|---|---|---|---|"]
    for m in merges:
        out.append(f"| {m['d']} | {m['r']} | {m['ms']:.3f} | {m['gbs']:.1f} | "
                   f"{m['floor_bw_ms']:.3f} | {m['floor_flop_ms']:.3f} | {m['ratio']:.2f} |")
    out += ["", f"adam_step (AdamW, float32, {adam['numel'] / 1e6:.0f}M parameters, 28 bytes "
            f"each): {adam['ms']:.2f} ms = {adam['gbs']:.1f} GB/s = {adam['frac_bw']:.0%} of "
            f"the measured bandwidth (target >= 70%)."]
    if adam["torch_ms"] is not None:
        out[-1] += (f" torch.optim.AdamW(fused=True): {adam['torch_ms']:.2f} ms "
                    f"(lora/torch {adam['ms'] / adam['torch_ms']:.2f}x).")
    if vs_torch:
        out += ["", "LoRA layer forward + backward (with dx), lora against a PEFT-style "
                f"PyTorch {info['torch']} layer, {THREADS} threads each; \"packed\" passes a "
                "PackedWeight (packed once, as `LoRALinear.pack()` does) for the frozen "
                "weight:", "",
                f"Each side timed in {VS_TORCH_ROUNDS} rounds, the order rotated between "
                "rounds; times are the medians of the rounds, ratios the medians (and ranges) "
                "of the rounds' ratios.", "",
                "| n | d | r | lora ms | packed ms | torch ms | lora / torch | packed / torch |",
                "|---|---|---|---|---|---|---|---|"]
        for t in vs_torch:
            out.append(f"| {t['n']} | {t['d']} | {t['r']} | {t['lora_ms']:.2f} | "
                       f"{t['packed_ms']:.2f} | {t['torch_ms']:.2f} | {t['ratio']:.2f} "
                       f"({span(t['ratio_range'])}) | {t['packed_ratio']:.2f} "
                       f"({span(t['packed_ratio_range'])}) |")
    if packed:
        has_torch = packed[0]["torch_fwd"] is not None
        out += ["", f"Packed weights: GFLOP/s of the base products at d = {packed[0]['d']}, "
                "OpenBLAS on the weight against lora's packed GEMM on a PackedWeight"
                + (" and torch on the weight" if has_torch else "")
                + f" (packing both directions took {packed[0]['pack_ms']:.0f} ms, once):", "",
                "| n | x W^T OpenBLAS | x W^T packed |" + (" x W^T torch |" if has_torch else "")
                + " dy W OpenBLAS | dy W packed |" + (" dy W torch |" if has_torch else ""),
                "|---|---|---|---|---|" + ("---|---|" if has_torch else "")]
        for p in packed:
            cells = [p["blas_fwd"], p["packed_fwd"]] + ([p["torch_fwd"]] if has_torch else [])
            cells += [p["blas_bwd"], p["packed_bwd"]] + ([p["torch_bwd"]] if has_torch else [])
            out.append(f"| {p['n']} | " + " | ".join(f"{c:.0f}" for c in cells) + " |")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--markdown", help="also write the tables to this file")
    args = ap.parse_args()
    forced = [k for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ]
    if forced:
        print(f"warning: {forced} set; OpenBLAS kernels are forced (unset them for figures)",
              file=sys.stderr)
    lora.set_num_threads(THREADS)
    try:
        import torch

        torch.set_num_threads(THREADS)
    except ImportError:
        torch = None
    info = lora.blas_info()
    info.update(machine=machine(), torch=torch.__version__ if torch else None,
                heap=steady_heap())
    print(f"{info['machine']}\nOpenBLAS: {info['config']}\nkernel: {info['corename']}, "
          f"threads: {info['num_threads']}\nmalloc thresholds pinned: {info['heap']}")
    rng = np.random.default_rng(0)
    info["bw"] = bandwidth()
    print(f"bandwidth (in-place pass, one core): {info['bw']:.1f} GB/s")

    ns = [1, 64, 512] if args.quick else [1, 64, 512, 2048]
    ds = [1024] if args.quick else [1024, 4096]
    rs = [8, 16] if args.quick else [8, 16, 64]
    layer = []
    print("LoRA layer:")
    bench_layer(layer, ns, ds, rs, rng)
    info["gemm"] = max(row["gflops"] for row in layer)
    merges = []
    print("merge:")
    bench_merge(merges, ds, rs, rng, info["gemm"], info["bw"])
    print("adam:")
    adam = bench_adam(4_000_000 if args.quick else 20_000_000, info["bw"], torch)
    vs_torch = []
    if torch is not None:
        print("against PyTorch:")
        shapes = [(512, 1024, 16), (2048, 1024, 16), (512, 4096, 16), (64, 4096, 8),
                  (8, 4096, 8)]
        bench_vs_torch(vs_torch, torch, shapes[:2] if args.quick else shapes, rng)
    packed = []
    print("packed weights:")
    bench_packed(packed, torch, [1, 8, 64, 512] if args.quick else [1, 8, 16, 64, 128, 256, 512,
                                                                    2048],
                 1024 if args.quick else 4096, rng)
    text = markdown(info, layer, merges, adam, vs_torch, packed)
    if args.markdown:
        replace_section(args.markdown, text)
        print(f"wrote the '## Kernels' section of {args.markdown}")


def replace_section(path, section):
    """Put `section` (starting with its '## ' title) into the Markdown file at path,
    replacing the section of the same title, so other benchmarks' sections stay."""
    title = section.split("\n", 1)[0]
    text = open(path).read() if os.path.exists(path) else "# Performance\n\n"
    start = text.find(title + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(title))
        text = text[:start] + section + ("" if end < 0 else text[end:])
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
