"""The Triton kernels compiled for sm_80 / sm_89 / sm_90 exactly as a launch would compile them.

No GPU needed (Triton compiles for CUDA targets with its bundled ptxas), but the compiling must
happen in a process without TRITON_INTERPRET=1, so each test runs benchmarks/compile_matrix.py
in a child process and reads its JSON. What a build must satisfy (no spills, shared memory within
the arch's limit, int8 tensor-core MMA in the main loop, outlier product on tensor cores,
cp.async, no approximate division): minirlhf/kernels/compile_check.py.

    python -m pytest tests/test_int8_compile.py                  # the CI subset (default suite)
    python -m pytest tests/test_int8_compile.py -m compile_matrix  # every build, NF4's too (~15 min)
"""
import json
import os
import subprocess
import sys

import pytest

import triton.backends.nvidia  # noqa: F401  (ships in every Linux triton wheel, with ptxas)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "compile_matrix.py")


def run_matrix(tmp_path, *args, timeout=3000):
    out = tmp_path / "builds.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, SCRIPT, "--json", str(out), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert out.exists(), (proc.stdout + proc.stderr)[-4000:]
    data = json.loads(out.read_text())
    failing = [b for b in data["builds"] if not b["ok"]]
    assert not failing, "\n".join(
        f"{b['kernel']} sm_{b['arch']} {b['dtype']} {b['config']}: {b['problems']} {b['error']}" for b in failing)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return data


def test_ci_subset_compiles_clean(tmp_path):
    data = run_matrix(tmp_path, "--subset", "ci", timeout=600)
    builds = data["builds"]
    seen = {(b["kernel"], b["arch"], b["dtype"], b["config"].split()[0], b["offsets_64"]) for b in builds}
    # what the subset promises to cover (benchmarks/compile_matrix.py CI_SUBSET)
    assert ("_int8_matmul_kernel", 90, "fp16", "128x256x128", False) in seen
    assert ("_int8_matmul_kernel", 90, "fp32", "16x64x256", False) in seen
    assert ("_int8_matmul_kernel", 80, "fp32", "128x128x128", False) in seen
    assert ("_int8_matmul_kernel", 89, "bf16", "64x64x256", False) in seen
    assert ("_int8_matmul_kernel", 89, "bf16", "128x256x128", False) not in seen  # pruned on sm_89
    assert ("_int8_matmul_kernel", 80, "fp16", "16x128x128", True) in seen
    assert {b["kernel"] for b in builds} == {"_int8_matmul_kernel", "_outlier_columns_kernel",
                                            "_compact_columns_kernel", "_quantize_rows_kernel"}
    gemm = [b for b in builds if b["kernel"] == "_int8_matmul_kernel"]
    by = {(b["arch"], b["config"].split()[0]): b for b in gemm}
    assert by[(90, "128x256x128")]["s8_mma"].startswith("wgmma.mma_async.sync.aligned.m64n")
    assert by[(90, "16x64x256")]["s8_mma"].startswith("mma.sync.aligned.m16n8k32")  # BLOCK_M < 64: no wgmma
    assert all(b["spill_stores"] == 0 and b["spill_loads"] == 0 and b["regs"] > 0 for b in builds)
    assert data["summary"]["failing"] == 0


def test_pruning_per_arch():
    # runs in this (interpreted) process: the pruning is plain Python on the config list
    from types import SimpleNamespace

    from minirlhf.kernels.int8_matmul import _GEMM_TILES, gemm_configs_for

    configs = [SimpleNamespace(kwargs=dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_stages=s, num_warps=w)
               for bm, bn, bk, s, w in _GEMM_TILES]
    label = lambda cs: {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in cs}  # noqa: E731
    assert label(gemm_configs_for(configs, 90)) == label(configs)  # sm_90 keeps every config
    for arch in (80, 86, 89):
        kept = label(gemm_configs_for(configs, arch))  # 128 fp32 accumulators per thread spill there
        assert kept == label(configs) - {(128, 256, 128), (128, 128, 64)}


@pytest.mark.compile_matrix
def test_full_matrix_compiles_clean(tmp_path):
    data = run_matrix(tmp_path)
    s = data["summary"]
    assert s["builds"] == s["compiled"] == s["spill_free"] == s["smem_within_limit"]
    assert s["gemm_builds"] == s["gemm_int8_mma"] == s["gemm_outlier_mma"]
    archs = {b["arch"] for b in data["builds"]}
    dtypes = {b["dtype"] for b in data["builds"] if b["kernel"] == "_int8_matmul_kernel"}
    assert archs == {80, 89, 90} and dtypes == {"fp16", "bf16", "fp32"}
