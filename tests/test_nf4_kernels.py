"""The Triton NF4 / FP4 kernels (kernels/nf4_matmul.py, in Triton's interpreter) against the PyTorch spec
(kernels/nf4_reference.py, itself bit-identical to bitsandbytes 0.50.2: tests/test_nf4_reference.py).

Shapes: odd N and K, M = 1 (one decoding token), K a whole number of blocks per row (the contiguous decoder) and
not (K = 130 and 67: blocks span two rows, odd K starts rows on a low nibble: the flat-index decoder),
blocksize 64 and 32 (BLOCK_K 64 and 32), with and without double quantization, NF4 and FP4.

"Exactly on dequantized tiles" is checked two ways: the tile decoder alone (triton_dequantize_4bit), and the GEMMs
themselves on identity inputs: eye(K) @ W^T = W^T and eye(N) @ W = W, where every output is one weight times 1
plus exact zeros, so any difference would be the tile's.
"""
import pytest
import torch
import torch.nn.functional as F

from minirlhf.kernels import nf4_reference as R
from minirlhf.kernels.nf4_matmul import triton_dequantize_4bit, triton_nf4_grad_input, triton_nf4_linear
from minirlhf.nf4 import NF4Linear

# (N, K, blocksize): aligned rows; a block spanning two rows (K = 130 = 2*64 + 2); odd K with blocksize 32
SHAPES = [(37, 128, 64), (37, 130, 64), (13, 67, 32)]
FORMATS = [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)]


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def quantized(N, K, blocksize, quant_type, double_quant, seed=0):
    """(packed, (absmax, nested_absmax, offset) as stored, the reference's fp32 dequantized weight [N, K])."""
    torch.manual_seed(seed)
    w = torch.randn(N, K)
    w[0, :5] = 0.0  # zeros and one all-zero stretch (codes for 0: NF4 7, FP4 0/8)
    packed, absmax = R.quantize_4bit(w, blocksize, quant_type)
    if double_quant:
        codes, nested, offset = R.double_quantize(absmax)
        state = (codes, nested, offset)
        absmax = R.dequantize_absmax(codes, nested, offset)
    else:
        state = (absmax, None, None)
    return packed, state, R.dequantize_4bit(packed, absmax, (N, K), blocksize, quant_type)


@pytest.mark.parametrize("quant_type,double_quant", FORMATS)
@pytest.mark.parametrize("N,K,blocksize", SHAPES)
def test_tile_decoder_is_bit_identical(N, K, blocksize, quant_type, double_quant):
    packed, state, ref = quantized(N, K, blocksize, quant_type, double_quant)
    got = triton_dequantize_4bit(packed, *state, (N, K), blocksize, quant_type)
    assert got.dtype == torch.float32 and torch.equal(got, ref)


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
@pytest.mark.parametrize("N,K,blocksize", SHAPES)
def test_gemms_multiply_exactly_the_reference_tiles(N, K, blocksize, quant_type, double_quant):
    packed, state, ref = quantized(N, K, blocksize, quant_type, double_quant)
    args = (packed, *state, (N, K), blocksize, quant_type)
    assert torch.equal(triton_nf4_linear(torch.eye(K), *args), ref.T)  # [K, N]: column n is W[n]
    assert torch.equal(triton_nf4_grad_input(torch.eye(N), *args), ref)  # [N, K]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_tiles_are_rounded_once_to_nearest_even(dtype):
    # the reference rounds the fp32 weight to the compute dtype once (torch: nearest, ties to even); the
    # interpreter's bf16 path rounds by integer arithmetic on the bits (_round_to_bf16), so this checks it too
    N, K, blocksize = 37, 130, 64
    packed, state, ref = quantized(N, K, blocksize, "nf4", True)
    args = (packed, *state, (N, K), blocksize, "nf4")
    y = triton_nf4_linear(torch.eye(K, dtype=dtype), *args)
    assert y.dtype == dtype and torch.equal(y, ref.T.to(dtype))
    dx = triton_nf4_grad_input(torch.eye(N, dtype=dtype), *args)
    assert dx.dtype == dtype and torch.equal(dx, ref.to(dtype))


@pytest.mark.parametrize("quant_type,double_quant", FORMATS)
@pytest.mark.parametrize("N,K,blocksize", SHAPES)
@pytest.mark.parametrize("M", [1, 9])
def test_outputs_and_input_gradient_match_pytorch(M, N, K, blocksize, quant_type, double_quant):
    packed, state, ref = quantized(N, K, blocksize, quant_type, double_quant)
    args = (packed, *state, (N, K), blocksize, quant_type)
    x, b, dy = torch.randn(M, K), torch.randn(N), torch.randn(M, N)
    assert rel_err(triton_nf4_linear(x, *args, bias=b), F.linear(x, ref, b)) <= 1e-5
    assert rel_err(triton_nf4_grad_input(dy, *args), dy @ ref) <= 1e-5


def test_nf4linear_runs_on_triton_forward_and_backward(monkeypatch):
    # the module's autograd function: Triton (forced, as CUDA tensors would pick it) against its PyTorch path;
    # 3-D input, odd sizes, a 1-token batch, and a second in_features / out_features pair
    torch.manual_seed(0)
    for K, N, shape in [(130, 37, (2, 3, 130)), (64, 96, (1, 64))]:
        layer = NF4Linear.from_weight(torch.randn(N, K), torch.randn(N), double_quant=True)
        x = torch.randn(*shape)
        results = {}
        for backend in ("torch", "triton"):
            monkeypatch.setenv("MINIRLHF_NF4_BACKEND", backend)
            xg = x.clone().requires_grad_(True)
            y = layer(xg)
            y.backward(torch.ones_like(y) + torch.arange(N) / N)
            results[backend] = (y.detach(), xg.grad)
        assert results["triton"][0].shape == (*shape[:-1], N)
        assert rel_err(results["triton"][0], results["torch"][0]) <= 1e-5
        assert rel_err(results["triton"][1], results["torch"][1]) <= 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 4.9e-4), (torch.bfloat16, 3.9e-3)])
def test_half_precision_compute_matches_pytorch(monkeypatch, dtype, tol):
    # compute_dtype fp16 / bf16: the same rounded weights and fp32 accumulation on both paths, so they may differ
    # by the summation order and the output's final rounding: at most the dtype's unit roundoff (bound)
    torch.manual_seed(0)
    layer = NF4Linear.from_weight(torch.randn(37, 130), torch.randn(37), compute_dtype=dtype)
    x = torch.randn(5, 130)
    outputs = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("MINIRLHF_NF4_BACKEND", backend)
        outputs[backend] = layer(x)
    assert outputs["triton"].dtype == torch.float32  # the input's dtype, computed in `dtype`
    assert rel_err(outputs["triton"], outputs["torch"]) <= tol


def test_bad_arguments_are_one_line_errors():
    packed, state, _ = quantized(37, 128, 64, "nf4", True)
    args = (packed, *state, (37, 128), 64, "nf4")
    with pytest.raises(ValueError, match="x has 100 features but the 4-bit weight is"):
        triton_nf4_linear(torch.randn(2, 100), *args)
    with pytest.raises(TypeError, match="fp32/fp16/bf16"):
        triton_nf4_linear(torch.randn(2, 128).double(), *args)
    with pytest.raises(ValueError, match="absmax must be torch.uint8 with 74 blocks"):
        triton_nf4_linear(torch.randn(2, 128), packed, state[0][:10], *state[1:], (37, 128), 64, "nf4")
    with pytest.raises(ValueError, match="weight must be packed uint8 with 2368 bytes"):
        triton_nf4_linear(torch.randn(2, 128), packed[:-1], *state, (37, 128), 64, "nf4")
    with pytest.raises(ValueError, match="blocksize must be one of"):
        triton_nf4_linear(torch.randn(2, 128), packed, *state, (37, 128), 48, "nf4")
    with pytest.raises(ValueError, match="bias must be a float tensor of shape"):
        triton_nf4_linear(torch.randn(2, 128), *args, bias=torch.randn(36))


def test_backend_override_is_checked(monkeypatch):
    layer = NF4Linear.from_weight(torch.randn(8, 64))
    monkeypatch.setenv("MINIRLHF_NF4_BACKEND", "cuda")
    with pytest.raises(ValueError, match="MINIRLHF_NF4_BACKEND must be 'triton' or 'torch', got 'cuda'"):
        layer(torch.randn(2, 64))
