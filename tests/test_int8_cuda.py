"""The Triton kernels compiled and run on a CUDA GPU against the PyTorch reference on the same GPU.

Skipped without a GPU (no GPU has been lent to this project yet). On a GPU machine plain
`python -m pytest` runs it: tests/conftest.py turns on Triton's interpreter for the whole session
(the interpreter tests need it), so test_cuda_suite re-runs this file in a child process with
TRITON_INTERPRET=0, where the kernels are compiled for the GPU; that child runs the tests below.

Shapes: the interpreter tests' (tests/test_int8_kernels.py CASES) plus every Pythia layer shape
(410m ... 20b: qkv, dense, h_to_4h, 4h_to_h) at a decode and a prefill token count, and every
autotune config forced in turn (autotuning alone would test only the winner). The bar is
minirlhf.kernels.verify's: codes, scales, outlier columns bit-identical, outputs within 1e-3.
"""
import os
import subprocess
import sys

import pytest
import torch

from minirlhf.kernels import reference as R
from minirlhf.kernels.int8_matmul import INTERPRET
from minirlhf.kernels.verify import compare_with_reference

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from test_int8_kernels import CASES, planted  # noqa: E402  (the interpreter tests' shapes)


def skip_reason(cuda_available: bool, interpret: bool) -> str | None:
    """Why the GPU tests below cannot run in this process, or None when they can."""
    if not cuda_available:
        return "no CUDA GPU"
    if interpret:
        return "TRITON_INTERPRET=1 in this process: test_cuda_suite runs these in a child process without it"
    return None


SKIP = skip_reason(torch.cuda.is_available(), INTERPRET)
on_gpu = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")

PYTHIA_HIDDEN = {"410m": 1024, "1.4b": 2048, "6.9b": 4096, "20b": 6144}
PYTHIA_SHAPES = [
    (M, K, N, f"{model} {layer}")
    for model, h in PYTHIA_HIDDEN.items()
    for layer, (K, N) in {"qkv": (h, 3 * h), "dense": (h, h), "h_to_4h": (h, 4 * h), "4h_to_h": (4 * h, h)}.items()
    for M in (1, 333)  # a decode step; a prefill that is no multiple of any tile
]


def _layer(M, K, N, n_out, dtype, has_bias, device="cuda"):
    x, _ = planted(M, K, n_out, dtype=dtype)
    if M > 1:
        x[M // 2] = 0
    w_int8, w_scale = R.quantize_weight(torch.randn(N, K) * 0.02)
    b = torch.randn(N).to(dtype) if has_bias else None
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return move(x), move(w_int8), move(w_scale), move(b)


# ---------------------------------------------------------------------------------------------
# runs everywhere: the skip logic, and the comparison itself (in the interpreter, on CPU)
# ---------------------------------------------------------------------------------------------


def test_skip_logic():
    assert skip_reason(False, False) == "no CUDA GPU"
    assert skip_reason(False, True) == "no CUDA GPU"
    assert "child process" in skip_reason(True, True)
    assert skip_reason(True, False) is None
    assert len(PYTHIA_SHAPES) == 4 * 4 * 2


@pytest.mark.skipif(not INTERPRET, reason="the CPU run of the comparison needs Triton's interpreter")
def test_comparison_runs_and_fails_when_it_should(monkeypatch):
    M, K, N, n_out, threshold, dtype, has_bias = CASES["odd_shapes"]
    x, w_int8, w_scale, b = _layer(M, K, N, n_out, dtype, has_bias, device="cpu")
    result = compare_with_reference(x, w_int8, w_scale, b, threshold)
    assert result["ok"], result
    # a wrong output must be caught: shift the weight scales the Triton side sees by 1%
    from minirlhf.kernels import int8_matmul

    real = int8_matmul.triton_int8_linear
    monkeypatch.setattr(int8_matmul, "triton_int8_linear", lambda x, w, s, *a: real(x, w, s * 1.01, *a))
    bad = compare_with_reference(x, w_int8, w_scale, b, threshold)
    assert not bad["ok"] and bad["codes"] and bad["rel_err"] > 5e-3


def run_without_interpreter(test_file):
    """Run tests/<test_file> in a child pytest with TRITON_INTERPRET=0, so its kernels compile for the GPU."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", os.path.join(HERE, test_file)],
                          env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0 and " passed" in proc.stdout, (proc.stdout + proc.stderr)[-6000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.skipif(not INTERPRET, reason="already the child process")
def test_cuda_suite():
    run_without_interpreter("test_int8_cuda.py")


# ---------------------------------------------------------------------------------------------
# GPU only (child process)
# ---------------------------------------------------------------------------------------------


@on_gpu
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_matches_reference_interpreter_shapes(name):
    M, K, N, n_out, threshold, dtype, has_bias = CASES[name]
    x, w_int8, w_scale, b = _layer(M, K, N, n_out, dtype, has_bias)
    result = compare_with_reference(x, w_int8, w_scale, b, threshold)
    assert result["ok"], result


@on_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("M,K,N,label", PYTHIA_SHAPES, ids=[f"{s[3]} M{s[0]}" for s in PYTHIA_SHAPES])
def test_cuda_matches_reference_pythia_shapes(M, K, N, label, dtype):
    x, w_int8, w_scale, b = _layer(M, K, N, 4, dtype, True)
    result = compare_with_reference(x, w_int8, w_scale, b, 6.0)
    assert result["ok"], (label, result)


@on_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_cuda_every_autotune_config_matches(dtype):
    from minirlhf.kernels import int8_matmul as T

    x, w_int8, w_scale, b = _layer(333, 1024, 3072, 20, dtype, True)  # 20 outlier columns: two BLOCK_O steps
    ref = R.int8_linear(x, w_int8, w_scale, b, 6.0)
    x_int8, row_scale, cols, count = T._quantize_rows_async(x, 6.0)
    kernel, grid, args, kwargs = T._gemm_launch(x, x_int8, row_scale, w_int8, w_scale.float(), b, cols, count,
                                                torch.empty_like(ref))
    major, minor = torch.cuda.get_device_capability()
    configs = T.gemm_configs_for(kernel.configs, 10 * major + minor)
    assert configs
    for config in configs:
        out = args[8]
        out.fill_(float("nan"))
        kernel.fn[grid](*args, **kwargs, **config.all_kwargs())
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        assert err <= 1e-3, (config, err)


@on_gpu
def test_cuda_nan_inf_and_zero_rows():
    x, _ = planted(20, 64, 2)
    x[3, 10] = float("nan")
    x[5, 11] = float("inf")
    w_int8, w_scale = R.quantize_weight(torch.randn(40, 64))
    x, w_int8, w_scale = x.cuda(), w_int8.cuda(), w_scale.cuda()
    from minirlhf.kernels.int8_matmul import triton_int8_linear

    y = triton_int8_linear(x, w_int8, w_scale, None, 6.0)
    assert torch.isnan(y[3]).all() and (~torch.isfinite(y[5])).all()
    good = [i for i in range(20) if i not in (3, 5)]
    assert torch.isfinite(y[good]).all()


@on_gpu
def test_cuda_linear_call_never_syncs_the_host():
    from minirlhf.kernels.int8_matmul import triton_int8_linear

    x, w_int8, w_scale, b = _layer(64, 1024, 3072, 4, torch.float16, True)
    triton_int8_linear(x, w_int8, w_scale, b, 6.0)  # autotuning (it times kernels) happens here
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        triton_int8_linear(x, w_int8, w_scale, b, 6.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@on_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_launches_on_the_inputs_device():
    from minirlhf.kernels.int8_matmul import triton_int8_linear

    x, w_int8, w_scale, b = _layer(37, 256, 96, 3, torch.float16, True, device="cuda:1")
    with torch.cuda.device(0):
        y = triton_int8_linear(x, w_int8, w_scale, b, 6.0)
    assert y.device == x.device
    torch.testing.assert_close(y, R.int8_linear(x, w_int8, w_scale, b, 6.0), rtol=2e-3, atol=2e-3)


@on_gpu
@pytest.mark.parametrize("M", [1, 16, 17, 64])
def test_cuda_torch_path_int8_gemm_exact_for_decode_rows(M):
    a = torch.randint(-127, 128, (M, 1024), dtype=torch.int8, device="cuda")
    w = torch.randint(-127, 128, (3072, 1024), dtype=torch.int8, device="cuda")
    assert torch.equal(R.int8_matmul(a, w).double(), a.double() @ w.double().t())  # exact: < 2^53


# ---------------------------------------------------------------------------------------------
# benchmarks/bench_int8.py --gpu: checks every shape before timing it (exercised on CPU here)
# ---------------------------------------------------------------------------------------------


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_int8", os.path.join(HERE, "..", "benchmarks", "bench_int8.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not INTERPRET, reason="the CPU run of the GPU section needs Triton's interpreter")
def test_bench_gpu_section_checks_before_timing(monkeypatch, capsys):
    bench = _bench_module()
    assert bench.bench_gpu(2, True, None, shapes=[(5, 64, 48)], dev="cpu") == []
    assert "| 5 x 64 -> 48 |" in capsys.readouterr().out
    # a wrong output is reported, not timed, and returned
    monkeypatch.setattr(bench, "check_outputs", lambda *a, **k: {"ok": False, "rel_err": 0.5})
    monkeypatch.setattr(bench, "median_ms", lambda *a, **k: pytest.fail("timed a shape that failed its check"))
    failures = bench.bench_gpu(2, True, None, shapes=[(5, 64, 48)], dev="cpu")
    assert len(failures) == 1 and "WRONG OUTPUT, not timed" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the refusal without a GPU")
def test_bench_gpu_flag_refuses_without_a_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.path.dirname(HERE) + os.pathsep + env.get("PYTHONPATH", "")
    bench = os.path.join(HERE, "..", "benchmarks", "bench_int8.py")
    proc = subprocess.run([sys.executable, bench, "--gpu", "--no-bnb"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "no CUDA GPU" in proc.stderr
