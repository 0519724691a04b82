"""Microbenchmark: LLM.int8() linear (ours) vs float F.linear vs bitsandbytes, side by side.

    python benchmarks/bench_int8.py                 # CPU always; GPU too when torch.cuda.is_available()
    python benchmarks/bench_int8.py --quick         # fewer shapes and repeats
    python benchmarks/bench_int8.py --shapes 256x1024x4096,1x1024x4096 --threads 2
    python benchmarks/bench_int8.py --gpu               # GPU only; fails without one

A shape MxKxN is x [M, K] (M tokens) times W [N, K]^T. Times are the median of several runs after
warmup (wall clock on CPU; torch.cuda.synchronize around each run on a GPU). Activations are
standard normal with a few planted outlier feature columns (x30, --outliers, default 4), as in real
LLMs, so the mixed-precision decomposition is exercised, not skipped.

CPU: ours = Int8Linear as a run uses it (the module, autograd off). Where the CPU has AVX512-VNNI/AMX int8
its GEMM is oneDNN's prepacked int8 GEMM with the weight scales in its epilogue (kernels/onednn_int8.py);
elsewhere the PyTorch reference's fp32 GEMM on the int8 codes (kernels/reference.py). The reference with
torch._int_mm (MINIRLHF_INT8_BACKEND=torch) is timed beside it. The header names the CPU, its int8 and bf16
instructions, and which GEMM ran. bitsandbytes' CPU int8 always calls torch._int_mm, which without VNNI is
a scalar loop. Two tables:
  forward                 fp32 and bf16 F.linear, raw torch._int_mm on already-quantized codes (the floor
                          for any LLM.int8() layer), ours with fp32 and bf16 activations, the reference,
                          bitsandbytes (eval mode; fp32 activations, which it casts to fp16)
  forward + input grad    what a frozen base under LoRA costs per layer in training: F.linear in fp32 and
                          bf16 against Int8Linear with fp32 and bf16 activations (its backward path, from
                          int8.backward_path, named in the row) GPU: ours = the Triton kernels, fp16 activations, against fp16/bf16 F.linear and bitsandbytes.
Before timing a shape on the GPU, the Triton output is checked against the PyTorch reference on the
same GPU (minirlhf.kernels.verify: codes, scales, outlier columns bit-identical, output within 1e-3);
a shape that fails is reported and not timed, and the run exits with status 1.
"""
import argparse
import logging
import os
import statistics
import time

import torch
import torch.nn.functional as F

from minirlhf import cpu
from minirlhf.int8 import Int8Linear, backward_path, uses_onednn
from minirlhf.kernels import onednn_int8, reference

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

# Pythia layer shapes (K = in, N = out) for hidden size h: qkv [3h, h], dense [h, h], h_to_4h [4h, h], 4h_to_h [h, 4h]
PYTHIA_HIDDEN = {"410m": 1024, "1.4b": 2048, "6.9b": 4096, "20b": 6144}


def pythia_layers(h):
    return {"qkv": (h, 3 * h), "dense": (h, h), "h_to_4h": (h, 4 * h), "4h_to_h": (4 * h, h)}


def try_import_bnb():
    try:
        import bitsandbytes as bnb

        return bnb
    except Exception:  # not installed, or no backend for this machine
        return None


def median_ms(fn, sync=lambda: None, warmup=2, repeats=10, budget_s=3.0):
    """Median wall time of fn() in ms: `warmup` untimed calls, then up to `repeats` timed calls,
    stopping early (after at least 3) once `budget_s` seconds are spent, so slow paths stay bounded."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    start = time.perf_counter()
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def activations(M, K, n_outliers, dtype, device):
    x = torch.randn(M, K, device=device)
    x[:, torch.randperm(K)[:n_outliers]] *= 30.0
    return x.to(dtype)


def bnb_layer(bnb, w, bias, device):
    """bitsandbytes Linear8bitLt holding w (quantized on .to(device)), eval mode = its LLM.int8() path."""
    N, K = w.shape
    m = bnb.nn.Linear8bitLt(K, N, bias=True, has_fp16_weights=False, threshold=6.0)
    m.load_state_dict({"weight": w.half().float().cpu(), "bias": bias.float().cpu()})
    m = m.to(device).eval()
    assert m.weight.dtype == torch.int8
    return m


def fmt(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"


def parse_shapes(text):
    shapes = []
    for item in text.split(","):
        M, K, N = (int(v) for v in item.lower().split("x"))
        shapes.append((M, K, N))
    return shapes


# ---------------------------------------------------------------------------------------------
# CPU
# ---------------------------------------------------------------------------------------------


def cpu_default_shapes(quick):
    main = (256, 1024, 4096)
    if quick:
        return [main, (1, 1024, 4096)]
    return [
        main,
        (96, 512, 1536),  # Pythia-70m qkv at one PPO minibatch (4 rows x 24 tokens): bench_ppo's layer
        (96, 2048, 512),  # Pythia-70m 4h_to_h
        (256, 1024, 3072),  # 410m qkv
        (256, 4096, 1024),  # 410m 4h_to_h
        (256, 2048, 8192),  # 1.4b h_to_4h
        (1, 1024, 4096),
        (16, 1024, 4096),
        (64, 1024, 4096),
    ]


def bench_cpu(shapes, n_outliers, quick, bnb):
    probe = torch.empty(0)
    if uses_onednn(probe):
        gemm = "oneDNN's prepacked int8 GEMM (kernels/onednn_int8.py)"
    elif reference.CPU_FAST_INT_MM:
        gemm = "torch._int_mm (MINIRLHF_INT8_BACKEND=torch)"
    else:
        gemm = "fp32 GEMM on int8 codes (no AVX512-VNNI/AMX)"
    print(f"## CPU: {cpu.describe()}\n\n{torch.get_num_threads()} threads, capability "
          f"{torch.backends.cpu.get_cpu_capability()}, our int8 GEMM = {gemm}, {n_outliers} planted outlier columns\n")
    print("### Forward\n")
    print("| M x K -> N | fp32 F.linear ms | bf16 F.linear ms | raw torch._int_mm ms | ours, fp32 x ms | ours, bf16 x ms "
          "| reference (torch backend), fp32 x ms | bnb int8 ms | ours bf16 x / raw _int_mm | ours bf16 x vs bf16 F.linear "
          "| ours fp32 x vs bnb |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    repeats = 5 if quick else 10
    layers, backward_rows = {}, []
    for M, K, N in shapes:
        w, b = torch.randn(N, K) * 0.02, torch.randn(N) * 0.02
        x = activations(M, K, n_outliers, torch.float32, "cpu")
        w_int8, w_scale = reference.quantize_weight(w)
        wb, xb = w.bfloat16(), x.bfloat16()
        x_int8 = reference.quantize_rows(x, 6.0)[0]
        t_fp32 = median_ms(lambda: F.linear(x, w, b), repeats=repeats)
        t_bf16 = median_ms(lambda: F.linear(xb, wb, b.bfloat16()), repeats=repeats)
        t_raw = median_ms(lambda: torch._int_mm(x_int8, w_int8.t()), repeats=repeats) if M > 16 else None
        ours, ours_bf16 = Int8Linear.from_weight(w, b), Int8Linear.from_weight(w, b).to(torch.bfloat16)
        with torch.no_grad():
            t_ours = median_ms(lambda: ours(x), repeats=repeats)
            t_ours_bf16 = median_ms(lambda: ours_bf16(xb), repeats=repeats)
        t_ref = median_ms(lambda: reference.int8_linear(x, w_int8, w_scale, b, 6.0), repeats=repeats)
        t_bnb = None
        if bnb is not None:
            if (K, N) not in layers:
                layers[(K, N)] = bnb_layer(bnb, w, b, "cpu")
            layer = layers[(K, N)]
            with torch.no_grad():
                t_bnb = median_ms(lambda: layer(x), warmup=1, repeats=repeats)
        vs_bnb = None if t_bnb is None else t_bnb / t_ours
        vs_raw = None if t_raw is None else t_ours_bf16 / t_raw
        print(f"| {M} x {K} -> {N} | {t_fp32:.2f} | {t_bf16:.2f} | {fmt(t_raw)} | {t_ours:.2f} | {t_ours_bf16:.2f} "
              f"| {t_ref:.2f} | {fmt(t_bnb)} | {fmt(vs_raw)}{'x' if vs_raw else ''} | {t_bf16 / t_ours_bf16:.2f}x "
              f"| {fmt(vs_bnb)}{'x' if vs_bnb else ''} |")
        if M > 1:
            backward_rows.append(forward_backward_row(M, K, N, w, b, x, repeats))
    print()
    print("### Forward + input-gradient backward (the frozen base under LoRA: no weight gradient)\n")
    print("| M x K -> N | fp32 F.linear ms | bf16 F.linear ms | ours int8, fp32 x ms | ours int8, bf16 x ms "
          "| ours fp32 x backward | ours bf16 x vs bf16 F.linear |")
    print("|---|---:|---:|---:|---:|---|---:|")
    for row in backward_rows:
        print(row)
    print()


def forward_backward_row(M, K, N, w, b, x, repeats):
    """One table row: forward + dL/dx for float F.linear and for Int8Linear, fp32 and bf16 activations."""
    layer = Int8Linear.from_weight(w, b)
    g = torch.randn(M, N)

    def fwd_bwd(fn, x0, g0):
        x1 = x0.detach().requires_grad_()
        fn(x1).backward(g0)

    wb, bb = w.bfloat16(), b.bfloat16()
    t_fp32 = median_ms(lambda: fwd_bwd(lambda v: F.linear(v, w, b), x, g), repeats=repeats)
    t_bf16 = median_ms(lambda: fwd_bwd(lambda v: F.linear(v, wb, bb), x.bfloat16(), g.bfloat16()), repeats=repeats)
    t_ours = median_ms(lambda: fwd_bwd(layer, x, g), repeats=repeats)
    layer_bf16 = Int8Linear.from_weight(w, b).to(torch.bfloat16)
    t_ours_bf16 = median_ms(lambda: fwd_bwd(layer_bf16, x.bfloat16(), g.bfloat16()), repeats=repeats)
    return (f"| {M} x {K} -> {N} | {t_fp32:.2f} | {t_bf16:.2f} | {t_ours:.2f} | {t_ours_bf16:.2f} "
            f"| {backward_path(g)} | {t_bf16 / t_ours_bf16:.2f}x |")


def bench_cpu_breakdown(M, K, N, n_outliers, dtype, repeats=20):
    """Where our CPU forward's time goes at one shape (the oneDNN path): quantize the activations / oneDNN's int8
    GEMM with the weight scales / the rest (token scales, bias, outlier columns, the cast to x's dtype), each part
    timed inside the same call sequence as a forward runs it (a GEMM timed alone, back to back, is faster than
    after other ops), and F.linear in x's dtype timed in the same loop: the GEMM against what it replaces."""
    x = activations(M, K, n_outliers, dtype, "cpu")
    w, b = torch.randn(N, K), torch.randn(N)
    layer = Int8Linear.from_weight(w, b).to(dtype)
    w_float, b_float = w.to(dtype), b.to(dtype)
    if not uses_onednn(x):
        print(f"(no breakdown: the oneDNN path does not run on this CPU)\n")
        return
    packed = layer.packed_weight()
    parts = {"quantize": [], "gemm": [], "rest": [], "F.linear": []}
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        codes, row_scale, cols = reference.quantize_rows(x, 6.0)
        t1 = time.perf_counter()
        y = onednn_int8.gemm(codes, packed)
        t2 = time.perf_counter()
        onednn_int8.finish(y, row_scale, x, cols, layer.weight, layer.weight_scale, layer.bias).to(dtype)
        t3 = time.perf_counter()
        F.linear(x, w_float, b_float)
        t4 = time.perf_counter()
        if i >= 2:  # two warmup calls
            for name, t in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                parts[name].append(1e3 * t)
    ms = {name: statistics.median(v) for name, v in parts.items()}
    name = str(dtype).removeprefix("torch.")
    print(f"Breakdown of ours at {M} x {K} -> {N} ({name} x, {cols.numel()} outlier columns, medians of {repeats} "
          f"forwards): quantize {ms['quantize']:.2f} ms, oneDNN int8 GEMM + weight scales {ms['gemm']:.2f} ms, "
          f"token scales + bias + outlier columns + cast {ms['rest']:.2f} ms; {name} F.linear in the same loop "
          f"{ms['F.linear']:.2f} ms\n")


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------


def bench_gpu(n_outliers, quick, bnb, shapes=None, dev="cuda"):
    """The GPU table; returns the shapes whose outputs failed the check (they are not timed).
    dev="cpu" runs the same code on the Triton interpreter (how the tests exercise it without a GPU)."""
    from minirlhf.kernels.int8_matmul import triton_int8_linear

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    if shapes is None:
        models = ["410m", "6.9b"] if quick else list(PYTHIA_HIDDEN)
        tokens = [1, 256, 4096] if quick else [1, 16, 128, 512, 2048, 4096]
        shapes = []
        for model in models:
            for name, (K, N) in pythia_layers(PYTHIA_HIDDEN[model]).items():
                shapes += [(M, K, N, f"{model} {name}") for M in tokens]
    else:
        shapes = [(M, K, N, "") for M, K, N in shapes]
    name = torch.cuda.get_device_name() if dev == "cuda" else f"{dev} (Triton interpreter)"
    print(f"## GPU: {name}, fp16 activations, {n_outliers} planted outlier columns\n")
    print("| layer | M x K -> N | fp16 F.linear ms (TFLOP/s) | bf16 F.linear ms (TFLOP/s) "
          "| ours Triton int8 ms (TFLOP/s) | bnb int8 ms | ours speedup vs fp16 | ours speedup vs bnb |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    repeats = 10 if quick else 30
    failures = []
    for M, K, N, label in shapes:
        w, b = torch.randn(N, K, device=dev) * 0.02, torch.randn(N, device=dev) * 0.02
        x = activations(M, K, n_outliers, torch.float16, dev)
        w16, b16 = w.half(), b.half()
        wb, xb, bb = w.bfloat16(), x.bfloat16(), b.bfloat16()
        w_int8, w_scale = reference.quantize_weight(w)
        flops = 2 * M * N * K
        check = check_outputs(x, w_int8, w_scale, b16)
        if not check["ok"]:
            failures.append((M, K, N, label, check))
            print(f"| {label} | {M} x {K} -> {N} | WRONG OUTPUT, not timed: {check} |||||||")
            continue

        def tf(ms):
            return f"{ms:.3f} ({flops / ms / 1e9:.1f})"

        t16 = median_ms(lambda: F.linear(x, w16, b16), sync, repeats=repeats)
        tb16 = median_ms(lambda: F.linear(xb, wb, bb), sync, repeats=repeats)
        t_ours = median_ms(lambda: triton_int8_linear(x, w_int8, w_scale, b16, 6.0), sync, warmup=3, repeats=repeats)
        t_bnb = None
        if bnb is not None:
            layer = bnb_layer(bnb, w, b, dev)
            with torch.no_grad():
                t_bnb = median_ms(lambda: layer(x), sync, repeats=repeats)
        vs_bnb = None if t_bnb is None else t_bnb / t_ours
        print(f"| {label} | {M} x {K} -> {N} | {tf(t16)} | {tf(tb16)} | {tf(t_ours)} | {fmt(t_bnb, 3)} | "
              f"{t16 / t_ours:.2f}x | {fmt(vs_bnb)}{'x' if vs_bnb else ''} |")
    print()
    if failures:
        print(f"{len(failures)} shape(s) gave outputs that differ from the reference: the timings above "
              "exclude them")
    return failures


def check_outputs(x, w_int8, w_scale, bias, threshold=6.0):
    """Triton vs the PyTorch reference on these inputs (minirlhf.kernels.verify), before any timing."""
    from minirlhf.kernels.verify import compare_with_reference

    return compare_with_reference(x, w_int8, w_scale, bias, threshold)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    parser.add_argument("--shapes", type=str, default=None,
                        help="comma-separated MxKxN list, e.g. 256x1024x4096,1x1024x4096")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the CPU runs")
    parser.add_argument("--outliers", type=int, default=4, help="planted outlier feature columns (x30)")
    parser.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes")
    parser.add_argument("--cpu-only", action="store_true", help="skip the GPU section")
    parser.add_argument("--gpu", action="store_true", help="only the GPU section (checked, then timed); "
                        "exits 1 without a GPU or if an output is wrong")
    args = parser.parse_args()

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the benchmark times compiled kernels, not the interpreter")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bnb = None if args.no_bnb else try_import_bnb()
    shapes = parse_shapes(args.shapes) if args.shapes else None

    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu: no CUDA GPU visible to torch")
    print(f"torch {torch.__version__}, bitsandbytes {getattr(bnb, '__version__', 'not used')}\n")
    if not args.gpu:
        bench_cpu(shapes or cpu_default_shapes(args.quick), args.outliers, args.quick, bnb)
        bench_cpu_breakdown(256, 1024, 4096, args.outliers, torch.float32)
        bench_cpu_breakdown(96, 512, 1536, 0, torch.bfloat16)  # a default-run layer: bf16, rarely an outlier
    if torch.cuda.is_available() and not args.cpu_only:
        if bench_gpu(args.outliers, args.quick, bnb, shapes):
            raise SystemExit(1)


if __name__ == "__main__":
    main()
