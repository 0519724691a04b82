"""Compile every Triton kernel x autotune config x dtype for sm_80 / sm_89 / sm_90, as a launch would.

    python benchmarks/compile_matrix.py                      # the full matrix (one process: int8 ~4-5 min, NF4 ~10)
    python benchmarks/compile_matrix.py --arch 90 --dtype fp16 --kernel _int8_matmul_kernel
    python benchmarks/compile_matrix.py --subset ci          # what tests/test_int8_compile.py runs
    python benchmarks/compile_matrix.py --family nf4         # only the NF4 / FP4 GEMMs (nf4_matmul.py)
    python benchmarks/compile_matrix.py --subset nf4-ci      # what tests/test_nf4_compile.py runs
    python benchmarks/compile_matrix.py --json out.json      # also write every build as JSON

No GPU needed: Triton compiles for CUDA targets on any Linux machine with its bundled ptxas. Prints
one row per build (registers, spill bytes, shared memory, the int8 and outlier MMA instructions
found; for NF4 builds the outlier column shows the K loop's float MMA) and the counts; exits 1 if any
build fails a check. What is checked and how the launch's specialization is reproduced:
minirlhf/kernels/compile_check.py.
"""
import argparse
import json
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("unset TRITON_INTERPRET: the interpreter replaces triton.jit, so nothing would be compiled")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minirlhf.kernels import compile_check as C  # noqa: E402

# The CI subset: the largest tile of each arch (most registers; on sm_80 the worst spiller of the
# old two-tile epilogue), the decode tiles, each arch and dtype at least once, wgmma and mma.sync on
# sm_90, the int64-offset variant once, and the three small kernels. A config pruned on an arch is
# simply not built (128x256x128 on sm_89 below), as the autotuner would never launch it.
CI_SUBSET = [
    # (arch, dtype, kernels, GEMM configs, offset widths)
    (90, "fp16", ["_int8_matmul_kernel"], ["128x256x128"], ("32",)),
    (90, "fp32", ["_int8_matmul_kernel"], ["128x256x128", "16x64x256"], ("32",)),
    (80, "fp32", ["_int8_matmul_kernel"], ["128x128x128"], ("32",)),
    (89, "bf16", ["_int8_matmul_kernel"], ["128x256x128", "64x64x256"], ("32",)),
    (80, "fp16", ["_int8_matmul_kernel"], ["16x128x128"], ("64",)),
    (90, "bf16", ["_outlier_columns_kernel", "_compact_columns_kernel", "_quantize_rows_kernel"], None, ("32",)),
]

# The NF4 CI subset: each GEMM on each arch once, the largest tile (most registers) and a decode tile, wgmma
# and mma.sync on sm_90, each dtype, and each variant of the decoder once.
NF4_CI_SUBSET = [
    # (arch, dtype, kernels, configs, variants)
    (90, "fp16", C.NF4_KERNELS, ["128x128x64", "16x64x64"], ("double-quant",)),
    (80, "bf16", C.NF4_KERNELS, ["64x64x32"], ("double-quant", "ragged-K")),
    (89, "fp32", ["_nf4_matmul_kernel"], None, ("fp32-absmax",)),
    (90, "bf16", ["_nf4_matmul_t_kernel"], None, ("offsets-64",)),
]


def print_row(b):
    mma = b.s8_mma.replace("mma_async.sync.aligned.", "").replace("mma.sync.aligned.", "")
    out = b.outlier_mma.replace("mma_async.sync.aligned.", "").replace("mma.sync.aligned.", "")
    status = "ok" if b.ok else "FAIL: " + "; ".join(b.problems) + (f" ({b.error})" if b.error else "")
    print(f"| {b.kernel} | sm_{b.arch} | {b.dtype} | {b.config} | {64 if b.offsets_64 else 32} | {b.regs} | "
          f"{b.spill_stores}/{b.spill_loads} | {b.smem} | {mma or '-'} | {out or '-'} | {b.seconds:.1f} | {status} |",
          flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, action="append", help="80, 89, 90 (repeatable; default all)")
    parser.add_argument("--dtype", action="append", choices=list(C.DTYPES), help="input dtype (default all)")
    parser.add_argument("--kernel", action="append", help="kernel name (default all)")
    parser.add_argument("--config", action="append", help="GEMM tile BMxBNxBK (default all)")
    parser.add_argument("--offsets", choices=["32", "64", "both"], default="both", help="offset width variants")
    parser.add_argument("--family", choices=["int8", "nf4", "all"], default="all", help="which kernels (default all)")
    parser.add_argument("--subset", choices=["ci", "nf4-ci"], help="the representative subset run in CI")
    parser.add_argument("--json", help="write every build to this JSON file")
    args = parser.parse_args()

    print(f"shape {C.SHAPE} (int64-offset variants at {C.SHAPE_64})\n")
    print("| kernel | arch | dtype | config | offsets | regs | spill B st/ld | smem B | int8 MMA | outlier MMA "
          "| s | result |")
    print("|---|---|---|---|---:|---:|---:|---:|---|---|---:|---|")
    if args.subset == "ci":
        builds = []
        for arch, dtype, kernels, configs, offsets in CI_SUBSET:
            builds += C.matrix(archs=(arch,), dtypes=(dtype,), kernels=kernels, configs=configs, offsets=offsets,
                               on_build=print_row)
    elif args.subset == "nf4-ci":
        builds = []
        for arch, dtype, kernels, configs, variants in NF4_CI_SUBSET:
            builds += C.nf4_matrix(archs=(arch,), dtypes=(dtype,), kernels=kernels, configs=configs,
                                   variants=variants, on_build=print_row)
    else:
        offsets = ("32", "64") if args.offsets == "both" else (args.offsets,)
        archs, dtypes = tuple(args.arch or C.ARCHS), tuple(args.dtype or C.DTYPES)
        builds = []
        if args.family in ("int8", "all"):
            builds += C.matrix(archs=archs, dtypes=dtypes, kernels=args.kernel, configs=args.config, offsets=offsets,
                               on_build=print_row)
        if args.family in ("nf4", "all"):
            builds += C.nf4_matrix(archs=archs, dtypes=dtypes, kernels=args.kernel or C.NF4_KERNELS,
                                   configs=args.config, on_build=print_row)
    counts = C.summary(builds)
    print("\n" + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": counts, "builds": [b.as_dict() for b in builds]}, f, indent=1)
    sys.exit(0 if counts["failing"] == 0 and counts["builds"] > 0 else 1)


if __name__ == "__main__":
    main()
