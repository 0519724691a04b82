"""Int8Linear: same numbers as bitsandbytes 0.50's Linear8bitLt (CPU, eval, has_fp16_weights=False,
threshold=6.0), the accuracy win of the outlier decomposition, autograd, state_dict, dtype handling,
bad inputs, NaN/inf, backends, and the memory report.

Comparisons with bitsandbytes use fp32 inputs and weights that are exactly representable in fp16,
because bitsandbytes casts both to fp16 before quantizing (we quantize in fp32). On such inputs the
two agree within 2e-5 relative (measured 1.86e-5): the whole difference is its dequant constant
6.200124e-05, which is 1/127^2 = 6.2000124e-05 with a digit slip (1.8e-5 relative); with the int8 part
rescaled by that constant they agree to fp32 rounding (measured 9e-8). On arbitrary fp32 inputs they
legitimately differ by ~2e-3 (its fp16 cast; measured 1.9e-3 to 2.3e-3 without outliers).

All three CPU paths run here whatever the CPU: reference.CPU_FAST_INT_MM (read from /proc/cpuinfo's
avx512_vnni / amx_int8 flags at import) says whether the CPU has int8 units; with them Int8Linear runs
oneDNN's prepacked GEMM (kernels/onednn_int8.py; MINIRLHF_INT8_BACKEND=torch: the reference's torch._int_mm),
without them an fp32 GEMM on the integer codes. The tests monkeypatch the flag and pin the backend for each
path (torch._int_mm and oneDNN's int8 GEMM are exact on any x86 CPU, only slow without VNNI).
"""
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from minirlhf.int8 import Int8Linear, format_memory_report, memory_report, uses_onednn
from minirlhf.kernels import onednn_int8
from minirlhf.kernels import reference as R

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


# bitsandbytes 0.50's dequant constant (backends/default/ops.py: A * (row_stats * col_stats) * 6.200124e-05);
# 1/127^2 is 6.2000124e-05: its digit slip is a 1.8e-5 relative offset on the whole int8 part of the output
BNB_DEQUANT = 6.200124e-05
# README: "outputs equal bnb.nn.Linear8bitLt within 2e-5 relative". Measured 1.81e-5 (norm) and 1.86e-5
# (largest element / largest output) over 20 seeds x these shapes: the 1.8e-5 offset plus fp32 rounding.
BNB_TOL = 2e-5


needs_onednn = pytest.mark.skipif(not onednn_int8.available(), reason="this torch build has no oneDNN int8 ops")


@pytest.fixture(params=[pytest.param("onednn", marks=needs_onednn), "int_mm", "fp32_gemm"])
def cpu_path(request, monkeypatch):
    """Run on one CPU int8 GEMM path, whichever this CPU would pick: oneDNN's prepacked GEMM (VNNI/AMX CPUs,
    the default there), the reference's torch._int_mm (the same CPUs, MINIRLHF_INT8_BACKEND=torch) or the fp32
    GEMM on the integer codes (elsewhere). Production reads the flag once, from /proc/cpuinfo."""
    monkeypatch.setattr(R, "CPU_FAST_INT_MM", request.param != "fp32_gemm")
    monkeypatch.setenv("MINIRLHF_INT8_BACKEND", "onednn" if request.param == "onednn" else "torch")
    return request.param


@pytest.mark.parametrize("n_out", [0, 8])
@pytest.mark.parametrize("shape", [(64,), (3, 21)])
def test_matches_bitsandbytes(n_out, shape, cpu_path):
    K, N = 256, 96
    lin = fp16_exact_linear(K, N)
    ours = Int8Linear.from_linear(lin, threshold=6.0).eval()
    theirs = bnb_int8(lin)
    assert torch.equal(ours.weight, theirs.weight.data)
    assert torch.equal(ours.weight_scale, theirs.weight.SCB)

    x = planted(*shape, K, n_out=n_out).half().float()  # x [*shape, 256], fp16-representable
    with torch.no_grad():
        y_bnb = theirs(x)
        y = ours(x)
    assert theirs.state.CB is not None  # it ran MatMul8bitLt with the int8 weight
    if n_out:
        assert theirs.state.idx is not None and theirs.state.idx.numel() == n_out
    assert y.shape == y_bnb.shape == (*shape, N)
    assert rel_err(y, y_bnb) <= BNB_TOL
    assert (y - y_bnb).abs().max() <= BNB_TOL * y_bnb.abs().max()
    assert rel_err(y_bnb, lin(x)) > 1e-4  # really quantized, not a float matmul in disguise


def test_difference_from_bitsandbytes_is_its_dequant_constant(cpu_path):
    # no bias and no outliers: the output is the int8 part alone, y = acc * s_x * s_w * const, so ours
    # rescaled by bitsandbytes' constant must equal its output to fp32 rounding (measured 9e-8 relative)
    lin = fp16_exact_linear(256, 96, bias=False)
    x = planted(64, 256, n_out=0).half().float()  # [64, 256]; |randn| < 6 here, so no outlier column
    with torch.no_grad():
        theirs = bnb_int8(lin)
        y_bnb = theirs(x)
        y = Int8Linear.from_linear(lin)(x)
    assert theirs.state.idx is None or theirs.state.idx.numel() == 0
    rescaled = y.double() * (BNB_DEQUANT * 127**2)
    assert rel_err(rescaled, y_bnb) <= 1e-6
    assert rel_err(y, y_bnb) > 1e-5  # without the rescaling the offset is there (1.8e-5)


def test_matches_bitsandbytes_fp16_input(cpu_path):
    # fp16 in and out: both round the output to fp16 (half an ulp is 2^-11 = 4.9e-4 relative), and
    # bitsandbytes adds the outlier part in fp16, a second rounding; measured 3.2e-4 over 20 seeds
    lin = fp16_exact_linear(256, 96)
    x = planted(48, 256).half()
    with torch.no_grad():
        y_bnb = bnb_int8(lin)(x)
        y = Int8Linear.from_linear(lin)(x)
    assert y.dtype == y_bnb.dtype == torch.float16
    assert rel_err(y, y_bnb) <= 2**-11


def fp64_llm_int8(x, w, b, threshold=6.0):
    """LLM.int8() (arXiv:2208.07339, with bitsandbytes' outlier rules) transcribed in float64, one formula a
    line: x [M, K], w [N, K], b [N] -> y [M, N]. The oracle for both CPU paths; shares no code with ours."""
    x, w = x.double(), w.double()
    s_w = w.abs().amax(dim=1)  # [N] row absmax of W
    w8 = torch.round(w * 127 / s_w[:, None])  # [N, K] integer codes
    big = x.abs() >= threshold  # [M, K] outlier elements
    outlier = big.any(dim=0)  # [K] outlier columns
    s_x = x.abs().masked_fill(big, 0).amax(dim=1)  # [M] row absmax without the outlier elements
    x8 = torch.round(x * 127 / s_x[:, None])  # [M, K]
    x8[:, outlier] = 0  # outlier columns leave the int8 product ...
    y = (x8 @ w8.t()) * s_x[:, None] * s_w[None, :] / 127**2  # [M, N]
    y += x[:, outlier] @ (w8[:, outlier] * s_w[:, None] / 127).t()  # ... and are multiplied in float
    return y + b.double()


@pytest.mark.parametrize("n_out", [0, 8])
def test_both_cpu_paths_match_an_fp64_transcription(n_out, cpu_path):
    # measured ~6e-8 (fp32 rounding of the scales and the dequant); 1e-6 leaves room for an fp32-vs-fp64
    # flip of one code at an exact .5 tie, which would move its output row by ~1e-5 (none at this seed)
    lin = nn.Linear(256, 96)
    x = planted(40, 256, n_out=n_out)  # [40, 256]
    with torch.no_grad():
        y = Int8Linear.from_linear(lin)(x)
    assert rel_err(y, fp64_llm_int8(x, lin.weight, lin.bias)) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_out", [0, 8])
def test_both_cpu_paths_give_identical_codes_and_outputs(monkeypatch, dtype, n_out):
    """torch._int_mm and the fp32 GEMM on the codes compute the same exact integers (K = 256: every partial
    sum < 127^2 * 256 < 2^24), so every value after them is the same: outputs are bit-identical."""
    monkeypatch.setenv("MINIRLHF_INT8_BACKEND", "torch")  # the reference's two GEMMs (oneDNN: the test below)
    layer = Int8Linear.from_linear(nn.Linear(256, 96)).to(dtype)
    x = planted(2, 17, 256, n_out=n_out).to(dtype)  # 34 token rows
    calls = []
    int_mm = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append(tuple(a.shape)) or int_mm(a, b))
    codes, _, cols = R.quantize_rows(x.reshape(34, 256), 6.0)  # [34, 256] int8: the GEMM's input, either path
    assert cols.numel() == n_out
    exact = codes.long() @ layer.weight.long().t()  # [34, 96] the int8 product in int64
    out = {}
    for fast in (True, False):
        monkeypatch.setattr(R, "CPU_FAST_INT_MM", fast)
        calls.clear()
        acc = R.int8_matmul(codes, layer.weight)
        with torch.no_grad():
            y = layer(x)
        out[fast] = (acc, y, list(calls))
    assert out[True][2] == [(34, 256), (34, 256)]  # torch._int_mm ran: int8_matmul, then the layer
    assert out[False][2] == []  # the fp32 GEMM path never calls it
    for fast in (True, False):
        assert out[fast][0].dtype == torch.int32 and torch.equal(out[fast][0].long(), exact)
    assert out[True][1].dtype == dtype and torch.equal(out[True][1], out[False][1])


# one ulp of an output dtype, relative: oneDNN and the reference round the same fp32 scale products in
# another order, and a result that lands on the other side of a bf16/fp16 rounding boundary moves one ulp
ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_out", [0, 8])
def test_onednn_equals_the_reference(monkeypatch, dtype, n_out):
    """oneDNN's GEMM is the same exact integer product; only the order of the fp32 scale multiplications
    differs, so each output is within a few fp32 roundings of the reference's (at the output's scale: the bias
    and the product can cancel; measured 6e-8 of the largest output) or one ulp of its dtype."""
    layer = Int8Linear.from_linear(nn.Linear(256, 96)).to(dtype)
    x = planted(2, 17, 256, n_out=n_out).to(dtype)
    monkeypatch.setenv("MINIRLHF_INT8_BACKEND", "torch")
    with torch.no_grad():
        ref = layer(x)
    monkeypatch.setenv("MINIRLHF_INT8_BACKEND", "onednn")
    with torch.no_grad():
        y = layer(x)
    assert layer._packed is not None and y.dtype == dtype and y.shape == (2, 17, 96)
    a = ref.float().abs()  # [2, 17, 96]
    tol = ULP[dtype] * a + 2.0**-22 * a.max()  # one ulp of the dtype, or four fp32 roundings at the output scale
    assert ((y.float() - ref.float()).abs() <= tol).all()
    assert rel_err(y, ref) <= (1e-6 if dtype == torch.float32 else ULP[dtype])


@needs_onednn
def test_onednn_is_the_default_only_with_int8_units(monkeypatch):
    x = torch.zeros(2, 8)
    monkeypatch.delenv("MINIRLHF_INT8_BACKEND", raising=False)
    for fast in (True, False):
        monkeypatch.setattr(R, "CPU_FAST_INT_MM", fast)
        assert uses_onednn(x) is fast
    monkeypatch.setenv("MINIRLHF_INT8_BACKEND", "torch")
    monkeypatch.setattr(R, "CPU_FAST_INT_MM", True)
    assert not uses_onednn(x)
    monkeypatch.setenv("MINIRLHF_INT8_BACKEND", "onednn")
    monkeypatch.setattr(R, "CPU_FAST_INT_MM", False)
    assert uses_onednn(x)  # forced: any x86 CPU computes it (slowly without VNNI)


@needs_onednn
def test_onednn_packs_once_and_again_after_the_weight_changes(monkeypatch):
    monkeypatch.setenv("MINIRLHF_INT8_BACKEND", "onednn")
    layer = Int8Linear.from_linear(nn.Linear(64, 40))
    x = planted(7, 64, n_out=2)
    packs = []
    pack = onednn_int8.pack
    monkeypatch.setattr(onednn_int8, "pack", lambda w, s: packs.append(1) or pack(w, s))
    with torch.no_grad():
        layer(x), layer(x)
    assert len(packs) == 1  # made on the first forward, reused

    other = Int8Linear.from_linear(nn.Linear(64, 40))
    layer.load_state_dict(other.state_dict())  # in-place copies: the version counters move
    with torch.no_grad():
        y = layer(x)
        y_other = other(x)
    assert len(packs) == 3 and torch.equal(y, y_other)  # repacked (layer), and other's first pack

    with torch.no_grad():
        layer.weight_scale.mul_(2)  # the scales alone change: repacked too (they live in the packed epilogue)
        y2 = layer(x)
    assert len(packs) == 4 and rel_err(y2 - layer.bias, 2 * (y - layer.bias)) <= 1e-6

    layer.to(torch.bfloat16)  # _apply drops the pack
    assert layer._packed is None


@needs_onednn
def test_a_layer_made_under_inference_mode_runs_the_reference(monkeypatch):
    """Inference tensors keep no version counter (a packed copy could not tell it went stale): the reference."""
    monkeypatch.setenv("MINIRLHF_INT8_BACKEND", "onednn")  # oneDNN asked for, and still not used for these weights
    x = planted(5, 64, n_out=2)
    with torch.inference_mode():
        layer = Int8Linear.from_linear(nn.Linear(64, 32))
        y = layer(x)
    assert layer._packed is None
    assert torch.equal(y, R.int8_linear(x, layer.weight, layer.weight_scale, layer.bias, layer.threshold))


@needs_onednn
def test_onednn_layer_deep_copies_and_reports_its_packed_bytes(monkeypatch):
    import copy

    monkeypatch.setenv("MINIRLHF_INT8_BACKEND", "onednn")
    layer = Int8Linear.from_linear(nn.Linear(64, 32))
    x = planted(5, 64, n_out=2)
    assert memory_report(layer)["int8_packed"] == 0  # nothing packed before a forward
    with torch.no_grad():
        y = layer(x)
    r = memory_report(layer)
    assert r["int8_packed"] == 64 * 32 and r["total"] == 2 * 64 * 32 + 32 * 4 + 32 * 4
    twin = copy.deepcopy(layer)  # an opaque oneDNN tensor cannot be copied: the copy packs anew
    assert twin._packed is None
    with torch.no_grad():
        assert torch.equal(twin(x), y)


@pytest.mark.parametrize("n_out", [0, 8])
def test_as_accurate_as_bitsandbytes_on_any_fp32_input(n_out):
    # arbitrary fp32 input: bitsandbytes rounds it to fp16 first, we don't, so the results differ by
    # ~2e-3 without outliers (measured 1.9e-3 to 2.3e-3 over 10 seeds; 4e-4 to 6e-4 with 8 outlier
    # columns, whose float part dominates); both must be equally close to the unquantized layer
    lin = fp16_exact_linear(256, 96)
    x = planted(64, 256, n_out=n_out)
    with torch.no_grad():
        exact = lin(x)
        y_bnb = bnb_int8(lin)(x)
        y = Int8Linear.from_linear(lin)(x)
    assert rel_err(y, exact) <= 1.05 * rel_err(y_bnb, exact)
    if n_out == 0:
        assert 1e-3 <= rel_err(y, y_bnb) <= 4e-3  # the fp16 cast, 100x the 2e-5 on fp16-representable inputs


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
def test_input_gradient_is_grad_out_times_dequantized_weight(shape, monkeypatch):
    monkeypatch.setattr(R, "CPU_FAST_INT_MM", False)  # the "fp32" backward: no int8 units
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


@pytest.mark.parametrize("backend", ["torch", "triton", pytest.param("onednn", marks=needs_onednn)])
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
    assert r["int8_packed"] == 0  # no forward yet: nothing packed for oneDNN
    assert r["int8_params"] == 64 * 32
    assert r["int8_scales"] == 32 * 4
    assert r["float_params_trainable"] == (32 * 16 + 16) * 4
    assert r["float_params_frozen"] == 32 * 4 + 2 * 16 * 4  # Int8Linear bias + LayerNorm
    assert r["float_params"] == r["float_params_trainable"] + r["float_params_frozen"]
    assert r["other_buffers"] == 10 * 8
    assert r["total"] == 2048 + 128 + 2112 + 256 + 80
    table = format_memory_report(r)
    assert "int8_weights" in table and "total" in table and "2,048" in table
