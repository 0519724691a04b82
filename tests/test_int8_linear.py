"""Int8Linear: same numbers as bitsandbytes 0.50's Linear8bitLt (CPU, eval, has_fp16_weights=False,
threshold=6.0), the accuracy win of the outlier decomposition, autograd, state_dict, dtype handling,
bad inputs, NaN/inf, backends, and the memory report.

Comparisons with bitsandbytes use fp32 inputs and weights that are exactly representable in fp16,
because bitsandbytes casts both to fp16 before quantizing (we quantize in fp32). On such inputs the
two agree to ~2e-5 (the remaining difference is its dequant constant 6.200124e-05 vs 1/127^2).
"""
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from minirlhf.int8 import Int8Linear, format_memory_report, memory_report

import bitsandbytes as bnb  # the oracle: bitsandbytes==0.50.2 from the [test] extra
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "inputs will be cast to float16" on every call


def rel_err(a, b):
    """||a - b|| / ||b|| in fp32."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def planted(*shape, n_out=8, scale=30.0):
    """Standard normal activations [..., K] with n_out feature columns multiplied by `scale`."""
    x = torch.randn(*shape)
    x[..., torch.randperm(shape[-1])[:n_out]] *= scale
    return x


def fp16_exact_linear(K, N, bias=True):
    lin = nn.Linear(K, N, bias=bias)
    with torch.no_grad():
        for p in lin.parameters():
            p.copy_(p.half().float())
    return lin


def bnb_int8(lin, threshold=6.0):
    """bitsandbytes' LLM.int8() layer holding lin's weights, quantized, in eval mode (the int8 path)."""
    m = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                            has_fp16_weights=False, threshold=threshold)
    m.load_state_dict(lin.state_dict())
    m = m.to("cpu")  # Int8Params quantizes on .to(device)
    assert m.weight.dtype == torch.int8 and m.weight.SCB is not None
    return m.eval()


# ---------------------------------------------------------------------------------------------
# bitsandbytes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_out", [0, 8])
@pytest.mark.parametrize("shape", [(64,), (3, 21)])
def test_matches_bitsandbytes(n_out, shape):
    K, N = 256, 96
    lin = fp16_exact_linear(K, N)
    ours = Int8Linear.from_linear(lin, threshold=6.0).eval()
    theirs = bnb_int8(lin)
    assert torch.equal(ours.weight, theirs.weight.data)
    assert torch.equal(ours.weight_scale, theirs.weight.SCB)

    x = planted(*shape, K, n_out=n_out).half().float()
    with torch.no_grad():
        y_bnb = theirs(x)
        y = ours(x)
    assert theirs.state.CB is not None  # it ran MatMul8bitLt with the int8 weight
    if n_out:
        assert theirs.state.idx is not None and theirs.state.idx.numel() == n_out
    assert y.shape == y_bnb.shape == (*shape, N)
    assert rel_err(y, y_bnb) <= 1e-3
    assert (y - y_bnb).abs().max() <= 1e-3 * y_bnb.abs().max()
    assert rel_err(y_bnb, lin(x)) > 1e-4  # really quantized, not a float matmul in disguise


def test_matches_bitsandbytes_fp16_input():
    lin = fp16_exact_linear(256, 96)
    x = planted(48, 256).half()
    with torch.no_grad():
        y_bnb = bnb_int8(lin)(x)
        y = Int8Linear.from_linear(lin)(x)
    assert y.dtype == y_bnb.dtype == torch.float16
    assert rel_err(y, y_bnb) <= 1e-3


@pytest.mark.parametrize("n_out", [0, 8])
def test_as_accurate_as_bitsandbytes_on_any_fp32_input(n_out):
    # arbitrary fp32 input: bitsandbytes rounds it to fp16 first, we don't, so the results differ a
    # little (~2e-3); both must be equally close to the unquantized layer
    lin = fp16_exact_linear(256, 96)
    x = planted(64, 256, n_out=n_out)
    with torch.no_grad():
        exact = lin(x)
        err_bnb = rel_err(bnb_int8(lin)(x), exact)
        err_ours = rel_err(Int8Linear.from_linear(lin)(x), exact)
    assert err_ours <= 1.05 * err_bnb


# ---------------------------------------------------------------------------------------------
# accuracy of the decomposition
# ---------------------------------------------------------------------------------------------


def test_outlier_decomposition_cuts_error():
    lin = nn.Linear(512, 256)
    x = planted(64, 512, n_out=8, scale=30.0)
    with torch.no_grad():
        exact = lin(x)
        err_mixed = rel_err(Int8Linear.from_linear(lin, threshold=6.0)(x), exact)
        err_int8_only = rel_err(Int8Linear.from_linear(lin, threshold=0.0)(x), exact)
    assert err_mixed * 3 <= err_int8_only
    assert err_mixed < 0.01


# ---------------------------------------------------------------------------------------------
# module behaviour
# ---------------------------------------------------------------------------------------------


def test_from_linear_and_dequantize():
    lin = nn.Linear(40, 24)
    layer = Int8Linear.from_linear(lin, threshold=5.0)
    assert (layer.in_features, layer.out_features, layer.threshold) == (40, 24, 5.0)
    assert layer.weight.dtype == torch.int8 and not layer.weight.requires_grad
    assert layer.weight_scale.dtype == torch.float32 and layer.weight_scale.shape == (24,)
    assert torch.equal(layer.bias, lin.bias.detach()) and not layer.bias.requires_grad
    w = layer.dequantize()
    assert w.dtype == torch.float32 and w.shape == (24, 40)
    # round-to-nearest: every weight within half a quantization step of its row
    step = lin.weight.abs().amax(dim=1, keepdim=True) / 127
    assert ((w - lin.weight).abs() <= step / 2 + 1e-7).all()
    assert sum(isinstance(p, nn.Parameter) for p in layer.parameters()) == 2  # weight + bias counted


def test_from_weight_bf16_and_fp16_agree_with_fp32():
    w = torch.randn(16, 32).bfloat16()
    a = Int8Linear.from_weight(w)
    b = Int8Linear.from_weight(w.float())
    assert torch.equal(a.weight, b.weight) and torch.equal(a.weight_scale, b.weight_scale)
    assert a.bias is None
    c = Int8Linear.from_weight(torch.randn(16, 32).half(), bias=torch.randn(16).half())
    assert c.bias.dtype == torch.float16 and c.weight_scale.dtype == torch.float32


def test_same_output_in_train_and_eval():
    layer = Int8Linear.from_linear(nn.Linear(64, 48))
    x = planted(2, 9, 64)
    y_train = layer.train()(x)
    y_eval = layer.eval()(x)
    assert torch.equal(y_train, y_eval)


@pytest.mark.parametrize("shape", [(10, 64), (2, 5, 64)])
def test_input_gradient_is_grad_out_times_dequantized_weight(shape):
    layer = Int8Linear.from_linear(nn.Linear(64, 48))
    x = planted(*shape, n_out=4).requires_grad_()
    g = torch.randn(*shape[:-1], 48)
    (layer(x) * g).sum().backward()

    x_ref = x.detach().clone().requires_grad_()
    (F.linear(x_ref, layer.dequantize(), layer.bias) * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    assert layer.weight.grad is None and layer.bias.grad is None


def test_gradient_reaches_trainable_layer_before_it():
    first = nn.Linear(16, 32)
    frozen = Int8Linear.from_linear(nn.Linear(32, 8))
    frozen(first(torch.randn(4, 16))).pow(2).sum().backward()
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0
    assert frozen.weight.grad is None and frozen.bias.grad is None


def test_state_dict_round_trip_through_safetensors(tmp_path):
    layer = Int8Linear.from_linear(nn.Linear(64, 40), threshold=6.0)
    sd = layer.state_dict()
    assert set(sd) == {"weight", "weight_scale", "bias"}
    assert sd["weight"].dtype == torch.int8 and sd["weight_scale"].dtype == torch.float32
    save_file(sd, str(tmp_path / "layer.safetensors"))

    fresh = Int8Linear(64, 40, threshold=6.0)
    fresh.load_state_dict(load_file(str(tmp_path / "layer.safetensors")))
    x = planted(7, 64, n_out=3)
    assert torch.equal(fresh(x), layer(x))


def test_load_state_dict_refuses_float_weight():
    layer = Int8Linear(8, 4)
    with pytest.raises(TypeError, match="from_weight"):
        layer.load_state_dict(nn.Linear(8, 4).state_dict(), strict=False)


def test_to_bf16_and_half_keep_int8_weight_and_fp32_scales():
    layer = Int8Linear.from_linear(nn.Linear(64, 32))
    x = planted(6, 64, n_out=2)
    y32 = layer(x)
    weight, scale = layer.weight.clone(), layer.weight_scale.clone()
    for cast, dtype in [(lambda m: m.to(torch.bfloat16), torch.bfloat16), (lambda m: m.half(), torch.float16)]:
        cast(layer)
        assert torch.equal(layer.weight, weight)
        assert layer.weight_scale.dtype == torch.float32 and torch.equal(layer.weight_scale, scale)
        assert layer.bias.dtype == dtype
        y = layer(x.to(dtype))
        assert y.dtype == dtype
        assert rel_err(y, y32) < 1e-2
    layer.float()
    assert layer.bias.dtype == torch.float32 and torch.equal(layer.weight_scale, scale)


def test_empty_input():
    layer = Int8Linear.from_linear(nn.Linear(8, 4))
    assert layer(torch.zeros(0, 8)).shape == (0, 4)
    assert layer(torch.zeros(2, 0, 8)).shape == (2, 0, 4)


@pytest.mark.parametrize(
    "x, error, match",
    [
        (torch.zeros(8), ValueError, r"\(8,\)"),
        (torch.zeros(1, 2, 3, 8), ValueError, r"\(1, 2, 3, 8\)"),
        (torch.zeros(2, 7), ValueError, r"\(2, 7\)"),
        (torch.zeros(2, 8, dtype=torch.int32), TypeError, "torch.int32"),
        (torch.zeros(2, 8, dtype=torch.float64), TypeError, "torch.float64"),
    ],
)
def test_bad_inputs(x, error, match):
    layer = Int8Linear.from_linear(nn.Linear(8, 4))
    with pytest.raises(error, match=match):
        layer(x)


def test_bad_construction():
    with pytest.raises(ValueError, match="threshold"):
        Int8Linear(8, 4, threshold=-1.0)


def test_repr_and_env_validation(monkeypatch):
    layer = Int8Linear(8, 4, bias=False, threshold=6.0)
    assert "in_features=8, out_features=4, bias=False, threshold=6.0" in repr(layer)
    monkeypatch.setenv("MINIRLHF_INT8_BACKEND", "cuda")
    with pytest.raises(ValueError, match="MINIRLHF_INT8_BACKEND"):
        layer(torch.zeros(2, 8))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_nan_and_inf_stay_in_their_rows(monkeypatch, backend):
    monkeypatch.setenv("MINIRLHF_INT8_BACKEND", backend)
    layer = Int8Linear.from_linear(nn.Linear(64, 32), threshold=6.0)
    x = planted(12, 64, n_out=3)
    others = [i for i in range(12) if i not in (2, 5)]

    # NaN: row 2 all NaN; the other rows exactly as if row 2 were zeros
    x_nan = x.clone()
    x_nan[2, 10] = float("nan")
    x_zero = x.clone()
    x_zero[2] = 0
    y = layer(x_nan)
    assert torch.isnan(y[2]).all()
    assert torch.equal(y[others], layer(x_zero)[others])

    # inf: an outlier column; row 5 non-finite, the others exactly as with a large finite outlier there
    for value in (float("inf"), float("-inf")):
        x_inf, x_big = x.clone(), x.clone()
        x_inf[5, 11] = value
        x_big[5, 11] = 100.0
        y = layer(x_inf)
        assert (~torch.isfinite(y[5])).all()
        assert torch.equal(y[others], layer(x_big)[others])

    # threshold 0 (no decomposition): an inf row is non-finite, the rest untouched
    layer.threshold = 0.0
    x_inf = x.clone()
    x_inf[5, 11] = float("inf")
    y = layer(x_inf)
    assert (~torch.isfinite(y[5])).all()
    keep = [i for i in range(12) if i != 5]
    assert torch.equal(y[keep], layer(x)[keep])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backend_equals_torch_backend(monkeypatch, dtype):
    layer = Int8Linear.from_linear(nn.Linear(96, 72)).to(dtype)
    x = planted(2, 11, 96, n_out=5).to(dtype)
    monkeypatch.setenv("MINIRLHF_INT8_BACKEND", "torch")
    y_torch = layer(x)
    monkeypatch.setenv("MINIRLHF_INT8_BACKEND", "triton")
    y_triton = layer(x)
    assert y_triton.dtype == dtype and y_triton.shape == (2, 11, 72)
    assert rel_err(y_triton, y_torch) <= 1e-3


def test_memory_report():
    model = nn.Sequential(Int8Linear(64, 32), nn.Linear(32, 16), nn.LayerNorm(16))
    model[2].requires_grad_(False)
    model.register_buffer("position_ids", torch.arange(10))
    r = memory_report(model)
    assert r["int8_weights"] == 64 * 32  # one byte per parameter
    assert r["int8_params"] == 64 * 32
    assert r["int8_scales"] == 32 * 4
    assert r["float_params_trainable"] == (32 * 16 + 16) * 4
    assert r["float_params_frozen"] == 32 * 4 + 2 * 16 * 4  # Int8Linear bias + LayerNorm
    assert r["float_params"] == r["float_params_trainable"] + r["float_params_frozen"]
    assert r["other_buffers"] == 10 * 8
    assert r["total"] == 2048 + 128 + 2112 + 256 + 80
    table = format_memory_report(r)
    assert "int8_weights" in table and "total" in table and "2,048" in table
