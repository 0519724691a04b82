"""The Triton NF4 / FP4 kernels compiled and run on a CUDA GPU against the PyTorch path on the same GPU.

Skipped without a GPU (none has been lent to this project yet: nothing here has run). As tests/test_int8_cuda.py
does, test_cuda_suite re-runs this file in a child process with TRITON_INTERPRET=0 (tests/conftest.py turns the
interpreter on for the session), where the kernels are compiled for the GPU.

What it checks, on the GPU: the tile decoder bit-identical to nf4_reference (the interpreter tests' shapes); the
GEMMs on identity inputs in fp16 / bf16 (every output one weight times 1: exact); every Pythia layer shape at a
decode and a prefill token count in fp16 / bf16 / fp32 against F.linear on the reference's weight; every
autotune config forced in turn; NF4Linear's forward and backward against its PyTorch path. check_layer, the
comparison, also runs here on CPU in the interpreter, with a deliberately wrong kernel it must catch.
"""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from minirlhf.kernels.int8_matmul import INTERPRET

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from test_int8_cuda import PYTHIA_SHAPES, run_without_interpreter, skip_reason  # noqa: E402  (same rule, shapes)
from test_nf4_kernels import SHAPES, quantized, rel_err  # noqa: E402  (the interpreter tests' shapes)

SKIP = skip_reason(torch.cuda.is_available(), INTERPRET)
on_gpu = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")
# outputs against F.linear on the same rounded weight in fp32: the output's rounding plus summation order
# (fp32: tf32x3's ~fp32 products)
TOLERANCE = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5}
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
IDS = ["fp16", "bf16", "fp32"]


def moved(t, device):
    return None if t is None else t.to(device)


def check_layer(M, N, K, dtype, device, blocksize=64, quant_type="nf4", double_quant=True):
    """Run both Triton GEMMs on one random layer; returns (forward rel. error, input-gradient rel. error)
    against F.linear / matmul in fp32 on the reference's weight rounded to `dtype`."""
    from minirlhf.kernels.nf4_matmul import triton_nf4_grad_input, triton_nf4_linear

    packed, state, ref = quantized(N, K, blocksize, quant_type, double_quant)
    packed, state = moved(packed, device), tuple(moved(t, device) for t in state)
    w = ref.to(dtype).float().to(device)  # [N, K], the weight the kernels multiply
    x, b, dy = (torch.randn(M, K).to(dtype).to(device), torch.randn(N).to(dtype).to(device),
                torch.randn(M, N).to(dtype).to(device))
    args = (packed, *state, (N, K), blocksize, quant_type)
    y = triton_nf4_linear(x, *args, bias=b)
    dx = triton_nf4_grad_input(dy, *args)
    assert y.dtype == dx.dtype == dtype and y.shape == (M, N) and dx.shape == (M, K)
    return rel_err(y, F.linear(x.float(), w, b.float())), rel_err(dx, dy.float() @ w)


def test_skip_reason_is_int8s():
    assert skip_reason(False, False) == "no CUDA GPU"


@pytest.mark.skipif(not INTERPRET, reason="the CPU run of the comparison needs Triton's interpreter")
def test_check_layer_runs_and_fails_when_it_should(monkeypatch):
    errors = check_layer(5, 37, 130, torch.float32, "cpu")
    assert max(errors) <= TOLERANCE[torch.float32], errors
    from minirlhf.kernels import nf4_matmul

    real = nf4_matmul._code_books.__wrapped__  # a code book off by 1%: every output moves

    def wrong(quant_type, device):
        code, code8 = real(quant_type, device)
        return code * 1.01, code8

    monkeypatch.setattr(nf4_matmul, "_code_books", wrong)
    assert min(check_layer(5, 37, 130, torch.float32, "cpu")) > 5e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.skipif(not INTERPRET, reason="already the child process")
def test_cuda_suite():
    run_without_interpreter("test_nf4_cuda.py")


# ---------------------------------------------------------------------------------------------
# GPU only (child process)
# ---------------------------------------------------------------------------------------------


@on_gpu
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
@pytest.mark.parametrize("N,K,blocksize", SHAPES)
def test_cuda_tiles_and_identity_gemms_are_exact(N, K, blocksize, quant_type, double_quant):
    from minirlhf.kernels.nf4_matmul import triton_dequantize_4bit, triton_nf4_grad_input, triton_nf4_linear

    packed, state, ref = quantized(N, K, blocksize, quant_type, double_quant)
    packed, state, ref = packed.cuda(), tuple(moved(t, "cuda") for t in state), ref.cuda()
    args = (packed, *state, (N, K), blocksize, quant_type)
    assert torch.equal(triton_dequantize_4bit(*args), ref)
    for dtype in (torch.float16, torch.bfloat16):  # products by 1 are exact on f16 / bf16 tensor cores
        assert torch.equal(triton_nf4_linear(torch.eye(K, dtype=dtype, device="cuda"), *args), ref.T.to(dtype))
        assert torch.equal(triton_nf4_grad_input(torch.eye(N, dtype=dtype, device="cuda"), *args), ref.to(dtype))


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("M,K,N,label", PYTHIA_SHAPES, ids=[f"{s[3]} M{s[0]}" for s in PYTHIA_SHAPES])
def test_cuda_matches_pytorch_pythia_shapes(M, K, N, label, dtype):
    errors = check_layer(M, N, K, dtype, "cuda")
    assert max(errors) <= TOLERANCE[dtype], (label, errors)


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("K", [1024, 1000])  # a whole number of blocks per row, and not (the flat decoder)
def test_cuda_every_autotune_config_matches(dtype, K):
    from minirlhf.kernels import nf4_matmul as T

    N, M, blocksize = 3072, 333, 64
    packed, state, ref = quantized(N, K, blocksize, "nf4", True)
    packed, ref = packed.cuda(), ref.cuda()
    code, code8 = T._code_books("nf4", torch.device("cuda"))
    launch_state = T.launch_state(*(moved(t, "cuda") for t in state), code, code8)
    w = ref.to(dtype).float()
    major, minor = torch.cuda.get_device_capability()
    for transposed in (False, True):
        x = torch.randn(M, N if transposed else K, device="cuda").to(dtype)
        want = x.float() @ w if transposed else x.float() @ w.T
        out = torch.empty_like(want, dtype=dtype)
        kernel, grid, args, kwargs = T._gemm_launch(x, packed, launch_state, (N, K), blocksize, None, out, transposed)
        configs = T.nf4_configs_for(kernel.configs, blocksize, 10 * major + minor, dtype, transposed,
                                    ragged=K % blocksize != 0)
        assert configs
        for config in configs:
            out.fill_(float("nan"))
            kernel.fn[grid](*args, **kwargs, **config.all_kwargs())
            assert rel_err(out, want) <= TOLERANCE[dtype], (transposed, config)


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_cuda_nf4linear_forward_and_backward_match_its_pytorch_path(monkeypatch, dtype):
    from minirlhf.nf4 import NF4Linear

    layer = NF4Linear.from_weight(torch.randn(3072, 1024, device="cuda") * 0.02, torch.randn(3072, device="cuda"),
                                  compute_dtype=dtype)
    x = torch.randn(2, 77, 1024, device="cuda")
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("MINIRLHF_NF4_BACKEND", backend)
        xg = x.clone().requires_grad_(True)
        y = layer(xg)
        y.square().sum().backward()
        results[backend] = (y.detach(), xg.grad)
    assert rel_err(results["triton"][0], results["torch"][0]) <= TOLERANCE[dtype]
    assert rel_err(results["triton"][1], results["torch"][1]) <= 2 * TOLERANCE[dtype]


@on_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_launches_on_the_inputs_device():
    with torch.cuda.device(0):
        errors = check_layer(37, 96, 256, torch.float16, "cuda:1")
    assert max(errors) <= TOLERANCE[torch.float16]
