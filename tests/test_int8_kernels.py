"""LLM.int8() kernels: the PyTorch reference against hand-computed values, an independent float64
implementation and bitsandbytes' functional ops; the Triton kernels (interpreter) against the reference.

bitsandbytes casts activations and weights to fp16 before quantizing, so the bit-exact comparisons
feed it fp16-representable values (x.half().float()); our quantization runs in fp32 and agrees with it
exactly on such inputs.
"""
import pytest
import torch

from minirlhf.kernels import reference as R
from minirlhf.kernels.int8_matmul import triton_int8_linear, triton_quantize_rows

import bitsandbytes as bnb  # the oracle: bitsandbytes==0.50.2 from the [test] extra


def rel_err(a, b):
    """||a - b|| / ||b|| in fp32."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def planted(M, K, n_out, scale=30.0, dtype=torch.float32):
    """Standard normal activations with n_out feature columns multiplied by `scale`."""
    x = torch.randn(M, K)
    cols = torch.randperm(K)[:n_out]
    x[:, cols] *= scale
    return x.to(dtype), cols.sort().values


# ---------------------------------------------------------------------------------------------
# reference: hand-computed values
# ---------------------------------------------------------------------------------------------


def test_quantize_weight_by_hand():
    w = torch.tensor([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0], [-4.0, 2.0, 1.0]])
    codes, scale = R.quantize_weight(w)
    # row 0: factor 127 -> 127, -63.5 -> -64 (tie to even), 31.75 -> 32
    # row 1: all zero -> scale 0, codes 0 (not NaN garbage)
    # row 2: factor 127/4 = 31.75 -> -127, 63.5 -> 64 (tie to even), 31.75 -> 32
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32
    assert codes.tolist() == [[127, -64, 32], [0, 0, 0], [-127, 64, 32]]
    assert scale.tolist() == [1.0, 0.0, 4.0]


QUANTIZE_ROWS = {"reference": R.quantize_rows, "triton": triton_quantize_rows}


@pytest.mark.parametrize("impl", list(QUANTIZE_ROWS))
def test_quantize_rows_by_hand(impl):
    x = torch.tensor(
        [
            [1.0, -2.0, 0.5, 8.0],  # 8 >= 6: column 3 is an outlier column
            [0.1, -0.2, 0.0, 0.5],  # 0.5 is not an outlier; it is this row's absmax, but gets code 0
            [3.0, 0.0, -1.0, 0.25],
            [0.0, 0.0, 0.0, 0.0],  # zero row
        ]
    )
    codes, scale, cols = QUANTIZE_ROWS[impl](x, 6.0)
    assert cols.tolist() == [3]
    assert scale.tolist() == pytest.approx([2.0, 0.5, 3.0, 0.0])
    # row 0: factor 63.5: 63.5 -> 64 (tie to even), -127, 31.75 -> 32; row 1: factor 254: 25.4 -> 25, -50.8 -> -51
    assert codes.tolist() == [[64, -127, 32, 0], [25, -51, 0, 0], [127, 0, -42, 0], [0, 0, 0, 0]]


@pytest.mark.parametrize("impl", list(QUANTIZE_ROWS))
def test_round_half_to_even_by_hand(impl):
    # absmax 127 gives factor exactly 1, so the codes are round(x) itself
    x = torch.tensor([[0.5, 1.5, 2.5, -2.5, -0.5, 3.5, 127.0]])
    for threshold in (0.0, 200.0):
        codes, scale, cols = QUANTIZE_ROWS[impl](x, threshold)
        assert codes.tolist() == [[0, 2, 2, -2, 0, 4, 127]]
        assert cols.numel() == 0


def test_threshold_zero_means_no_decomposition():
    x, _ = planted(5, 16, 2)
    codes, scale, cols = R.quantize_rows(x, threshold=0.0)
    assert cols.numel() == 0
    assert torch.equal(scale, x.abs().amax(dim=1))
    assert (codes.abs().amax(dim=1) == 127).all()  # the row max itself always maps to +-127


def naive_llm_int8(x, w, b, threshold):
    """Independent float64 transcription of the paper's formula, one row at a time."""
    x, w = x.double(), w.double()
    w_scale = w.abs().amax(dim=1)
    w_codes = torch.round(w * 127 / w_scale[:, None])
    is_outlier = x.abs() >= threshold if threshold > 0 else torch.zeros_like(x, dtype=torch.bool)
    out_cols = is_outlier.any(dim=0)
    y = torch.zeros(x.shape[0], w.shape[0], dtype=torch.float64)
    for m in range(x.shape[0]):
        s = x[m][~is_outlier[m]].abs().max()
        x_codes = torch.round(x[m] * 127 / s)
        x_codes[out_cols] = 0
        y[m] = (w_codes @ x_codes) * s * w_scale / 127**2
        y[m] += (w_codes[:, out_cols] * w_scale[:, None] / 127) @ x[m, out_cols]
    return y + b.double()


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_int8_linear_matches_naive_formula(threshold):
    x, _ = planted(9, 48, 3)
    w, b = torch.randn(20, 48), torch.randn(20)
    w_int8, w_scale = R.quantize_weight(w)
    y = R.int8_linear(x, w_int8, w_scale, b, threshold)
    # fp32 vs float64 rounding can flip a code at an exact .5 tie, hence not bit-exact
    assert rel_err(y, naive_llm_int8(x, w, b, threshold)) < 1e-5


@pytest.mark.parametrize("fast_int_mm", [True, False])
def test_int8_matmul_exact_on_both_cpu_paths(monkeypatch, fast_int_mm):
    # worst case for the fp32 emulation: K = 1040 products of 127 * 127 sum to 16,774,160 < 2^24
    monkeypatch.setattr(R, "CPU_FAST_INT_MM", fast_int_mm)
    a = torch.randint(-127, 128, (5, 1040), dtype=torch.int8)
    w = torch.randint(-127, 128, (7, 1040), dtype=torch.int8)
    a[0] = 127
    w[0] = 127
    w[1] = -127
    out = R.int8_matmul(a, w)
    expected = a.long() @ w.long().t()
    assert out.dtype == torch.int32
    assert torch.equal(out.long(), expected)
    assert out[0, 0].item() == 127 * 127 * 1040


def test_outlier_columns_see_past_nan():
    x = torch.zeros(4, 5)
    x[0, 1] = float("nan")
    x[2, 1] = 7.0  # same column as the NaN: still an outlier column
    x[3, 4] = float("-inf")  # inf is an outlier
    x[1, 2] = 5.99  # below the threshold
    assert R.outlier_columns(x, 6.0).tolist() == [1, 4]


# ---------------------------------------------------------------------------------------------
# reference against bitsandbytes' functional ops (fp16-representable inputs, see module docstring)
# ---------------------------------------------------------------------------------------------


def test_quantize_weight_matches_bnb():
    w = torch.randn(70, 130).half().float()
    w[3, 5] = 40.0  # a large weight only coarsens its own row
    codes, scale = R.quantize_weight(w)
    bnb_codes, bnb_scale, _ = bnb.functional.int8_vectorwise_quant(w.half())
    assert torch.equal(codes, bnb_codes)
    assert torch.equal(scale, bnb_scale)


@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("M", [1, 37])
def test_quantize_rows_matches_bnb(threshold, M):
    x, _ = planted(M, 130, 4)
    x = x.half().float()
    x[0, 7] = 0.3  # make sure some small values share a column with outliers
    codes, scale, cols = R.quantize_rows(x, threshold)
    bnb_codes, bnb_scale, bnb_cols = bnb.functional.int8_vectorwise_quant(x.half(), threshold)
    assert torch.equal(codes, bnb_codes)
    assert torch.equal(scale, bnb_scale)
    if threshold > 0:
        assert cols.numel() > 0 and torch.equal(cols, bnb_cols)
    else:
        assert cols.numel() == 0 and bnb_cols is None


# ---------------------------------------------------------------------------------------------
# Triton (interpreter) against the reference
# ---------------------------------------------------------------------------------------------

CASES = {
    # name: (M, K, N, n_outlier_cols, threshold, dtype, bias)
    "odd_shapes": (37, 130, 70, 3, 6.0, torch.float32, True),
    "one_token": (1, 130, 70, 2, 6.0, torch.float32, True),
    "many_tokens_many_outliers": (130, 100, 90, 20, 6.0, torch.float32, False),  # 20 > BLOCK_O = 16
    "no_outliers": (37, 130, 70, 0, 6.0, torch.float32, True),
    "threshold_zero": (37, 130, 70, 3, 0.0, torch.float32, True),
    "bf16": (37, 130, 70, 3, 6.0, torch.bfloat16, True),
    "fp16": (37, 130, 70, 3, 6.0, torch.float16, False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_reference(name):
    M, K, N, n_out, threshold, dtype, has_bias = CASES[name]
    x, _ = planted(M, K, n_out, dtype=dtype)
    if M > 1:
        x[M // 2] = 0  # an all-zero row
    w = torch.randn(N, K)
    b = torch.randn(N) if has_bias else None
    w_int8, w_scale = R.quantize_weight(w)

    codes, scale, cols = triton_quantize_rows(x, threshold)
    ref_codes, ref_scale, ref_cols = R.quantize_rows(x, threshold)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(scale, ref_scale)
    assert torch.equal(cols, ref_cols)
    assert cols.numel() == (n_out if threshold > 0 else 0)
    if M > 1:
        assert scale[M // 2] == 0 and (codes[M // 2] == 0).all()

    y = triton_int8_linear(x, w_int8, w_scale, b, threshold)
    ref = R.int8_linear(x, w_int8, w_scale, b, threshold)
    assert y.dtype == dtype and y.shape == (M, N)
    assert torch.isfinite(y).all()
    assert rel_err(y, ref) <= 1e-3
    if M > 1 and b is not None:  # an all-zero row outputs exactly the bias, no NaN from 0/0
        assert torch.equal(y[M // 2], b.to(dtype))


def test_triton_3d_input_and_all_zero_input():
    w_int8, w_scale = R.quantize_weight(torch.randn(33, 70))
    x, _ = planted(2 * 19, 70, 5)
    x = x.reshape(2, 19, 70)
    y = triton_int8_linear(x, w_int8, w_scale, None, 6.0)
    assert y.shape == (2, 19, 33)
    assert rel_err(y, R.int8_linear(x, w_int8, w_scale, None, 6.0)) <= 1e-3
    zeros = torch.zeros(3, 70)
    assert torch.equal(triton_int8_linear(zeros, w_int8, w_scale, None, 6.0), torch.zeros(3, 33))


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # inf * 0 in the interpreter's dot
def test_triton_matches_reference_with_nan_and_inf():
    x, _ = planted(20, 64, 2)
    x[3, 10] = float("nan")
    x[5, 11] = float("inf")  # an outlier: its row goes non-finite through the float part
    w_int8, w_scale = R.quantize_weight(torch.randn(40, 64))
    codes, scale, cols = triton_quantize_rows(x, 6.0)
    ref_codes, ref_scale, ref_cols = R.quantize_rows(x, 6.0)
    assert torch.equal(codes, ref_codes)
    torch.testing.assert_close(scale, ref_scale, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(cols, ref_cols) and 11 in cols.tolist()
    assert torch.isnan(scale[3]) and torch.isfinite(scale[5])

    y = triton_int8_linear(x, w_int8, w_scale, None, 6.0)
    ref = R.int8_linear(x, w_int8, w_scale, None, 6.0)
    good = torch.tensor([i for i in range(20) if i not in (3, 5)])
    assert torch.isnan(y[3]).all() and torch.isnan(ref[3]).all()
    assert (~torch.isfinite(y[5])).all() and (~torch.isfinite(ref[5])).all()
    assert torch.isfinite(y[good]).all()
    assert rel_err(y[good], ref[good]) <= 1e-3


@pytest.mark.parametrize("offsets_64", [False, True])
def test_triton_int64_offsets_give_the_same_numbers(monkeypatch, offsets_64):
    # the OFFSETS_64 variant is what a launch gets once a tensor spans 2^31 elements; force it here
    import minirlhf.kernels.int8_matmul as T

    monkeypatch.setattr(T, "_needs_int64_offsets", lambda *tensors: offsets_64)
    x, _ = planted(37, 130, 3)
    w_int8, w_scale = R.quantize_weight(torch.randn(70, 130))
    b = torch.randn(70)
    codes, scale, cols = triton_quantize_rows(x, 6.0)
    ref_codes, ref_scale, ref_cols = R.quantize_rows(x, 6.0)
    assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale) and torch.equal(cols, ref_cols)
    assert rel_err(triton_int8_linear(x, w_int8, w_scale, b, 6.0), R.int8_linear(x, w_int8, w_scale, b, 6.0)) <= 1e-3


def test_needs_int64_offsets():
    from minirlhf.kernels.int8_matmul import _needs_int64_offsets

    meta = lambda *shape: torch.empty(*shape, dtype=torch.int8, device="meta")  # noqa: E731
    assert not _needs_int64_offsets(meta(6144, 24576), None)  # the 20B layer at 6144 tokens: 1.5e8
    assert _needs_int64_offsets(meta(131072, 24576))  # 3.2e9 elements
    assert not _needs_int64_offsets(meta(2**31 - 1))  # last offset 2^31 - 2
    assert _needs_int64_offsets(meta(2, 2**30 + 1))  # last offset (2^30 + 1) + 2^30 = 2^31
    assert not _needs_int64_offsets(meta(0, 2**40))


def test_triton_linear_takes_a_strided_bias_and_names_bad_arguments():
    x, _ = planted(9, 64, 2)
    w_int8, w_scale = R.quantize_weight(torch.randn(40, 64))
    b = torch.randn(80)[::2]  # stride 2: the kernel reads bias_ptr + n, so it must be made contiguous
    assert rel_err(triton_int8_linear(x, w_int8, w_scale, b), R.int8_linear(x, w_int8, w_scale, b)) <= 1e-3
    bad = [
        (dict(x=x.long()), TypeError, "input x"),
        (dict(w_int8=w_int8.float()), TypeError, "w_int8 must be a 2-D int8"),
        (dict(w_int8=w_int8[:, :32]), ValueError, "x has 64 features"),
        (dict(w_scale=w_scale[:39]), ValueError, r"w_scale must be a float tensor of shape \(40,\)"),
        (dict(bias=b[:3]), ValueError, "bias must be"),
        (dict(w_int8=w_int8.to("meta")), ValueError, "w_int8 is on meta but x is on cpu"),
        (dict(w_scale=w_scale.to("meta")), ValueError, "w_scale is on meta"),
        (dict(bias=b.to("meta")), ValueError, "bias is on meta"),
    ]
    for change, error, match in bad:
        args = dict(x=x, w_int8=w_int8, w_scale=w_scale, bias=b) | change
        with pytest.raises(error, match=match):
            triton_int8_linear(**args)


def test_cuda_int_mm_pads_decode_rows(monkeypatch):
    # torch._int_mm on CUDA refuses M <= 16; the reference pads instead of copying W to fp32. Run the
    # CUDA helper on CPU with a _int_mm that enforces the CUDA rule (CPU _int_mm is exact for M > 16).
    real = torch._int_mm
    calls = []

    def cuda_rules(a, b):
        assert a.shape[0] > 16, "cuBLASLt would refuse this"
        calls.append(a.shape[0])
        return real(a, b)

    monkeypatch.setattr(torch, "_int_mm", cuda_rules)
    w = torch.randint(-127, 128, (24, 64), dtype=torch.int8)
    for M in (1, 5, 16, 17, 40):
        a = torch.randint(-127, 128, (M, 64), dtype=torch.int8)
        out = R._cuda_int_mm(a, w)
        assert out.shape == (M, 24) and torch.equal(out.long(), a.long() @ w.long().t())
    assert calls == [32, 32, 32, 17, 40]


# The kernels compiled for sm_80/89/90 as a launch compiles them: tests/test_int8_compile.py.
