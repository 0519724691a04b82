"""The pieces of a CPU PPO step that the README quotes, each timed on its own (one process, one thread by default).

    python benchmarks/bench_cpu_parts.py              # --threads 1
    python benchmarks/bench_cpu_parts.py --threads 2

1. The output head in bf16, [rows, 512] x [50304, 512]^T (Pythia-70m's): F.linear, which lets torch's bf16 CPU
   matmul reorder the weight into oneDNN's layout inside every call, against PackedHead, which packs it once
   (kernels/onednn_linear.py); at a minibatch's 64 response rows and a decode step's 16.
2. ppo.token_logprobs forward + backward on [4, 16, 50304] bf16 logits (one minibatch of the bench_ppo step).
3. One GEMM of the 70m qkv shape, 96 x 512 -> 1536, timed back to back and timed right after one elementwise
   op on a [96, 1536] tensor: oneDNN's prepacked int8 GEMM (kernels/onednn_int8.gemm), raw torch._int_mm, bf16
   F.linear. (On the shared host this was written on, a GEMM after other work was 2-3x slower than back to back:
   what separates a microbenchmark from the same GEMM inside a layer.)
4. generate.sample of one token for 16 rows at vocabulary 50304.

Times are medians of several calls after warmup (bench_int8.median_ms). The header names the CPU and its int8 /
bf16 instructions.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_int8 import median_ms  # noqa: E402  (same timing)

from minirlhf import cpu  # noqa: E402
from minirlhf.generate import sample  # noqa: E402
from minirlhf.int8 import Int8Linear  # noqa: E402
from minirlhf.kernels import onednn_int8, onednn_linear  # noqa: E402
from minirlhf.ppo import token_logprobs  # noqa: E402

V, C = 50304, 512


def head_rows():
    head = onednn_linear.PackedHead(C, V, bias=False).to(torch.bfloat16).requires_grad_(False)
    for rows in (64, 16):
        x = torch.randn(rows, C).bfloat16()
        plain = median_ms(lambda: F.linear(x, head.weight))
        packed = median_ms(lambda: head(x))
        print(f"| output head [{rows}, {C}] x [{V}, {C}]^T, bf16 | F.linear {plain:.2f} ms | PackedHead {packed:.2f} ms |")


def logprob_row():
    logits = (torch.randn(4, 16, V) * 3).bfloat16().requires_grad_()
    labels = torch.randint(0, V, (4, 16))

    def forward_backward():
        logprobs, _ = token_logprobs(logits, labels)
        logprobs.sum().backward()

    ms = median_ms(forward_backward)
    print(f"| token_logprobs forward + backward, [4, 16, {V}] bf16 | {ms:.2f} ms | |")


def after_other_work_ms(fn, other, repeats=40):
    """Median of fn() timed right after other() each time, in ms."""
    fn(), other()
    times = []
    for _ in range(repeats):
        other()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def gemm_rows():
    M, K, N = 96, 512, 1536
    w = torch.randn(N, K) * 0.02
    layer = Int8Linear.from_weight(w)
    codes = torch.randint(-127, 128, (M, K), dtype=torch.int8)
    xb, wb = torch.randn(M, K).bfloat16(), w.bfloat16()
    other = torch.zeros(M, N)
    gemms = {"raw torch._int_mm": lambda: torch._int_mm(codes, layer.weight.t()),
             "bf16 F.linear": lambda: F.linear(xb, wb)}
    if onednn_int8.available():
        packed = layer.packed_weight()
        gemms = {"oneDNN int8 GEMM (packed)": lambda: onednn_int8.gemm(codes, packed), **gemms}
    for name, fn in gemms.items():
        alone = median_ms(fn, repeats=40)
        after = after_other_work_ms(fn, lambda: other.add_(1.0))
        print(f"| {name}, {M} x {K} -> {N} | back to back {alone:.3f} ms | after one elementwise op {after:.3f} ms |")


def sample_row():
    logits = (torch.randn(16, V) * 3).float()
    u = torch.rand(16)
    print(f"| generate.sample, 16 rows x {V} | {median_ms(lambda: sample(logits, u=u), repeats=40):.2f} ms | |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"CPU: {cpu.describe()}; torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| what | time | time |")
    print("|---|---|---|")
    head_rows()
    logprob_row()
    gemm_rows()
    sample_row()


if __name__ == "__main__":
    main()
