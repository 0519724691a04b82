"""Microbenchmark: our 4-bit NF4Linear vs bitsandbytes' Linear4bit vs float F.linear, side by side in one run.

    python benchmarks/bench_nf4.py --threads 1          # CPU: the table in the README
    python benchmarks/bench_nf4.py --quick              # fewer shapes and repeats
    python benchmarks/bench_nf4.py --shapes 256x1024x4096,1x512x1536
    python benchmarks/bench_nf4.py --device cuda        # the same rows on a GPU: ours = NF4Linear on CUDA tensors

A shape MxKxN is x [M, K] (M tokens) times W [N, K]^T, a frozen 4-bit base layer under LoRA: W is NF4 with
blocks of 64 and double quantization (QLoRA's setting) on both sides, x is standard normal in the compute dtype
(fp32, or bf16 as a bf16 run feeds it). Two timings per layer: the forward alone (no autograd), and forward +
backward for the input only (what training a LoRA through a frozen base costs: x.requires_grad, W none). Each
is the median wall time of several calls after warmup (bench_int8.median_ms; torch.cuda.synchronize around
each call on a GPU). Ours holds bitsandbytes' own stored tensors (packed codes, uint8 absmax, nested state), and
before timing a layer it is checked against bitsandbytes on the same inputs (fp32: outputs and input gradients
within 1e-5 relative, bf16 within 1e-2); a mismatch is reported, not timed, and the run exits with status 1.
--threads N also sets OMP_NUM_THREADS (bitsandbytes' CPU kernels are OpenMP loops of their own).

Both 4-bit layers rebuild W in the compute dtype and call a float GEMM, forward and backward (the 4 bits are a
storage format): the float F.linear columns are the floor, the 4-bit columns that floor plus two
dequantizations. The header names the CPU and its int8 / bf16 instructions (minirlhf/cpu.py): bf16
GEMMs are fast only with avx512_bf16 or AMX.

GPU section (--device cuda): the same rows with CUDA tensors, ours through whatever NF4Linear dispatches to on
CUDA (the Triton kernels once nf4.py routes CUDA tensors to them), bitsandbytes' CUDA Linear4bit. Written for
the first GPU run; not run here (no GPU on this project's machines so far).
"""
import argparse
import logging
import os
import sys

if "--threads" in sys.argv[:-1]:  # bitsandbytes' CPU kernels run OpenMP threads of their own: bind them too,
    os.environ["OMP_NUM_THREADS"] = sys.argv[sys.argv.index("--threads") + 1]  # before either library loads

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_int8 import fmt, median_ms, parse_shapes, try_import_bnb  # noqa: E402  (same timing, same table)

from minirlhf import cpu  # noqa: E402
from minirlhf.nf4 import NF4Linear  # noqa: E402

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

# Pythia layer shapes (K = in, N = out): 70m's qkv and h_to_4h, 410m's h_to_4h, 1b's h_to_4h
LAYERS = {"70m qkv": (512, 1536), "70m h_to_4h": (512, 2048), "410m h_to_4h": (1024, 4096),
          "1b h_to_4h": (2048, 8192)}
TOKENS = (1, 16, 64, 256)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
def bnb_4bit(bnb, lin: nn.Linear, dtype, device):
    """bitsandbytes Linear4bit holding lin's weight: NF4, blocks of 64, double quantization."""
    m = bnb.nn.Linear4bit(lin.in_features, lin.out_features, compute_dtype=dtype, compress_statistics=True,
                          quant_type="nf4")
    m.load_state_dict(lin.state_dict())
    m = m.to(device)  # Params4bit quantizes on .to(device)
    m.bias.data = m.bias.data.to(dtype)
    return m


def ours_4bit(theirs, dtype, device):
    """An NF4Linear holding bitsandbytes' stored tensors exactly (its 8-bit absmax codes can differ from ours next
    to a midpoint: tests/test_nf4_reference.py), so both compute from the same bits."""
    qs = theirs.weight.quant_state
    layer = NF4Linear(theirs.in_features, theirs.out_features, blocksize=64, double_quant=True, quant_type="nf4",
                      compute_dtype=dtype, device=device, dtype=dtype)
    layer.load_state_dict({"weight": theirs.weight.data, "absmax": qs.absmax, "nested_absmax": qs.state2.absmax,
                           "offset": qs.offset, "bias": theirs.bias.data})
    return layer


def ours_alone(lin: nn.Linear, dtype, device):
    """Without bitsandbytes (--no-bnb): quantized by ours."""
    layer = NF4Linear.from_linear(lin.to(device), blocksize=64, double_quant=True, quant_type="nf4",
                                  compute_dtype=dtype)
    return layer.to(dtype=dtype)  # the bias in the compute dtype; the 4-bit state as stored


def forward_backward(layer, x, g):
    """One training-style call: y = layer(x), then dL/dx for dL/dy = g (the base's weight gets no gradient)."""
    x = x.detach().requires_grad_(True)
    layer(x).backward(g)
    return x.grad


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def check(ours, theirs, x, g, dtype):
    """Ours vs bitsandbytes on the same x: forward outputs and input gradients, relative error."""
    with torch.no_grad():
        e_out = rel(ours(x), theirs(x))
    e_grad = rel(forward_backward(ours, x, g), forward_backward(theirs, x, g))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    return max(e_out, e_grad) <= tol, e_out, e_grad


def bench(device, dtypes, layers, tokens, quick, bnb):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    repeats = 5 if quick else 10
    if device == "cuda":
        print(f"## GPU: {torch.cuda.get_device_name()}\n")
    else:
        print(f"## CPU: {cpu.describe()}; {torch.get_num_threads()} threads, "
              f"capability {torch.backends.cpu.get_cpu_capability()}\n")
    print("NF4, blocksize 64, double quantization; ms per call, median; fwd = forward only, "
          "f+b = forward + input-gradient backward\n")
    print("| layer | M x K -> N | dtype | F.linear fwd | F.linear f+b | ours fwd | ours f+b | bnb fwd | bnb f+b "
          "| ours f+b vs bnb | ours f+b vs F.linear |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    failures = []
    for label, (K, N) in layers.items():
        torch.manual_seed(0)
        lin = nn.Linear(K, N)
        nn.init.normal_(lin.weight, std=0.02)
        for dname in dtypes:
            dtype = DTYPES[dname]
            w, b = lin.weight.detach().to(device, dtype), lin.bias.detach().to(device, dtype)
            theirs = None if bnb is None else bnb_4bit(bnb, lin, dtype, device)
            ours = ours_alone(lin, dtype, device) if theirs is None else ours_4bit(theirs, dtype, device)
            for M in tokens:
                x = torch.randn(M, K, device=device, dtype=dtype)
                g = torch.randn(M, N, device=device, dtype=dtype)
                if theirs is not None:
                    ok, e_out, e_grad = check(ours, theirs, x, g, dtype)
                    if not ok:
                        failures.append((label, M, dname, e_out, e_grad))
                        print(f"| {label} | {M} x {K} -> {N} | {dname} | ours differs from bnb: output "
                              f"{e_out:.1e}, input grad {e_grad:.1e}; not timed |||||||")
                        continue

                def time_pair(fwd):
                    with torch.no_grad():
                        t_f = median_ms(lambda: fwd(x), sync, repeats=repeats)
                    return t_f, median_ms(lambda: forward_backward(fwd, x, g), sync, repeats=repeats)

                t_lin = time_pair(lambda v: F.linear(v, w, b))
                t_ours = time_pair(ours)
                t_bnb = (None, None) if theirs is None else time_pair(theirs)
                vs_bnb = None if t_bnb[1] is None else t_bnb[1] / t_ours[1]
                print(f"| {label} | {M} x {K} -> {N} | {dname} | {t_lin[0]:.3f} | {t_lin[1]:.3f} | "
                      f"{t_ours[0]:.3f} | {t_ours[1]:.3f} | {fmt(t_bnb[0], 3)} | {fmt(t_bnb[1], 3)} | "
                      f"{fmt(vs_bnb)}{'x' if vs_bnb else ''} | {t_lin[1] / t_ours[1]:.2f}x |")
    print()
    if failures:
        print(f"{len(failures)} row(s) where ours and bitsandbytes disagree (not timed): {failures}")
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--quick", action="store_true", help="two layers, M = 1 and 256, fewer repeats")
    parser.add_argument("--shapes", type=str, default=None, help="comma-separated MxKxN list instead of the "
                        "Pythia layers x M = 1, 16, 64, 256")
    parser.add_argument("--dtypes", type=str, default="fp32,bf16", help="compute dtypes: fp32, bf16 or both")
    parser.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes")
    args = parser.parse_args()

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the benchmark times compiled kernels, not the interpreter")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU visible to torch")
    dtypes = args.dtypes.split(",")
    if not set(dtypes) <= set(DTYPES):
        raise SystemExit(f"--dtypes: choose from {', '.join(DTYPES)}, got {args.dtypes}")
    if args.threads:
        torch.set_num_threads(args.threads)
    bnb = None if args.no_bnb else try_import_bnb()
    print(f"torch {torch.__version__}, bitsandbytes {getattr(bnb, '__version__', 'not used')}\n")
    if args.shapes:
        groups = [({f"{K}->{N}": (K, N)}, (M,)) for M, K, N in parse_shapes(args.shapes)]
    elif args.quick:
        groups = [({k: LAYERS[k] for k in ("70m h_to_4h", "410m h_to_4h")}, (1, 256))]
    else:
        groups = [(LAYERS, TOKENS)]
    failures = []
    for layers, tokens in groups:
        failures += bench(args.device, dtypes, layers, tokens, args.quick, bnb)
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
