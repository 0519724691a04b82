"""The Triton NF4 / FP4 GEMMs (kernels/nf4_matmul.py) compiled for sm_80 / sm_89 / sm_90 as a launch would.

No GPU needed (Triton's bundled ptxas); the compiling runs in a child process without TRITON_INTERPRET=1
(tests/test_int8_compile.py's run_matrix). A build must compile with 0 spill bytes, fit the arch's shared
memory, run its K loop's product on tensor cores in the compute dtype (f16 / bf16 MMA, tf32 for fp32 inputs's
tf32x3; wgmma on sm_90 with BLOCK_M >= 64), load with cp.async and contain no fp32 FMA (the nested absmax must
be rounded as the reference rounds it): minirlhf/kernels/compile_check.py.

    python -m pytest tests/test_nf4_compile.py                        # the CI subset, 13 builds
    python benchmarks/compile_matrix.py --family nf4                  # every NF4 build
"""
from test_int8_compile import run_matrix


def test_nf4_ci_subset_compiles_clean(tmp_path):
    data = run_matrix(tmp_path, "--subset", "nf4-ci", timeout=600)
    builds = data["builds"]
    by = {(b["kernel"], b["arch"], b["dtype"], b["config"]): b for b in builds}
    fwd, bwd = "_nf4_matmul_kernel", "_nf4_matmul_t_kernel"
    # what the subset promises to cover (benchmarks/compile_matrix.py NF4_CI_SUBSET)
    assert by[(fwd, 90, "fp16", "128x128x64 double-quant w8 s3")]["outlier_mma"].startswith(
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16")
    assert by[(bwd, 90, "fp16", "16x64x64 double-quant w4 s4")]["outlier_mma"].startswith(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32")  # BLOCK_M < 64: no wgmma
    assert (bwd, 80, "bf16", "64x64x32 double-quant ragged-K w4 s4") in by
    assert any(k[0] == fwd and k[1] == 89 and k[2] == "fp32" and "fp32-absmax" in k[3] for k in by)
    assert any(b["offsets_64"] and b["kernel"] == bwd for b in builds)
    assert {b["kernel"] for b in builds} == {fwd, bwd}
    assert all(b["spill_stores"] == 0 and b["spill_loads"] == 0 and b["regs"] > 0 for b in builds)
    assert data["summary"]["nf4_builds"] == data["summary"]["nf4_float_mma"] == len(builds) >= 10
