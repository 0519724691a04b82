"""LLM.int8() in plain PyTorch: the readable specification, and the CPU path.

Paper: Dettmers, Lewis, Belkada, Zettlemoyer, "LLM.int8(): 8-bit Matrix Multiplication for
Transformers at Scale", NeurIPS 2022, arXiv:2208.07339.

The idea
--------
A linear layer y = x W^T + b spends its memory on W. Store W in int8 (1 byte per parameter instead
of 2 or 4) and also run the matmul in int8, but do it so that a 6.7B+ model loses no perplexity.
Two tricks make that work:

1. *Vector-wise quantization.* Every row of W (one output feature) and every row of x (one token)
   gets its own absmax scale, so one large value only coarsens its own row, not the whole matrix.
   A matmul of two int8 matrices accumulates exactly in int32, and because each output element
   y[m, n] is the dot product of token row m with weight row n, the two scales factor out of the
   sum and are applied once, after the integer matmul ("dequantization").

2. *Mixed-precision decomposition.* From ~6.7B parameters on, a handful of hidden features
   (columns of x) carry values up to 20x larger than the rest, in almost every token. Absmax-
   quantizing a row that contains such a value crushes all the other values of the row into a few
   int8 levels. LLM.int8() pulls every column that holds any |x| >= threshold (6.0) out of the int8
   matmul and multiplies those few columns in floating point instead. They are <1% of the columns,
   so the float part costs almost nothing.

The math (shapes: x [M, K] tokens x features, W [N, K] out x in, b [N])
----------------------------------------------------------------------
    weights      s_w[n]    = max_k |W[n, k]|                                           [N] fp32
                 W8[n, k]  = round(127 * W[n, k] / s_w[n])                              [N, K] int8
    outliers     O         = { k : |x[m, k]| >= threshold for some m }                 [n_out] cols
    activations  s_x[m]    = max over k with |x[m, k]| < threshold of |x[m, k]|         [M] fp32
                 X8[m, k]  = round(127 * x[m, k] / s_x[m])  for k not in O, 0 for k in O  [M, K] int8
    output       y[m, n]   = s_x[m] * s_w[n] / 127^2 * sum_k X8[m, k] W8[n, k]   (int32 accumulate)
                           + sum_{k in O} x[m, k] * (W8[n, k] * s_w[n] / 127)  (float, dequantized W)
                           + b[n]

round() is round-half-to-even (torch.round), and a scale of 0 (an all-zero row) gives codes 0,
never 0/0 = NaN. threshold <= 0 switches the decomposition off (everything goes through int8).

Matching bitsandbytes 0.50 (backends/default/ops.py, autograd/_functions.py MatMul8bitLt)
-----------------------------------------------------------------------------------------
We follow its semantics where it has them:
  * outlier test is |x| >= threshold (NaN is never an outlier), threshold 0.0 means "off";
  * the row absmax skips only the outlier *elements* (|x| >= threshold); the small values that
    share a column with an outlier still count toward the absmax, then get code 0 like the rest of
    their column (bitsandbytes zeroes the outliers, takes the absmax, then zeroes the columns);
  * codes are round(x * (127 * (1 / absmax))) in fp32, rounded in that order (torch evaluates
    bitsandbytes' `127.0 / absmax` as a reciprocal times 127, not as a correctly rounded division);
  * the outlier part is x[:, O] (original values) times the dequantized weight columns.
We deviate where bitsandbytes is lossy or undefined:
  * it casts activations and weights to fp16 before quantizing (overflow above 65504, 11-bit
    mantissa); we quantize in fp32, so fp16-representable inputs give bit-identical codes/scales;
  * a zero row gives it 0 * inf = NaN before the int8 cast; we define the codes as 0;
  * its dequant multiplies by the constant 6.200124e-05, which is 1/127^2 = 6.2000124e-05 with a
    digit slip (1.8e-5 relative); we use 1/127^2;
  * it adds the outlier part in the input dtype (bf16/fp16); we accumulate everything in fp32 and
    round to the input dtype once.

NaN / inf: a NaN in row m makes s_x[m] NaN, so output row m is NaN; an inf is an outlier (when the
decomposition is on), so output row m is +-inf/NaN through the float part. Other rows are not
touched: every step is row-independent except the choice of outlier columns, and NaN never adds one.

Speed on CPU: torch._int_mm (int8 x int8 -> int32, exact) is fast only where oneDNN has the
AVX512-VNNI / AMX int8 instructions; elsewhere it is a scalar loop ~100x slower than an fp32
matmul. There we run the same integer matmul as an fp32 matmul on the int8 codes, which is exact
while every partial sum stays below 2^24 (guaranteed for K <= 1040, since 127^2 * 1040 < 2^24, and
in practice far beyond). bitsandbytes' default backend does the same. That fallback is no faster
than an fp32 F.linear (it also makes a transient fp32 copy of W, N*K*4 bytes, per call): int8 buys
speed on CPU only with VNNI/AMX, and memory everywhere.

On CUDA (MINIRLHF_INT8_BACKEND=torch; the default there is Triton) the int8 GEMM is cuBLASLt via
torch._int_mm, which refuses M <= 16 rows: those are padded to 32 zero rows, so a decode step never
copies the weight.
"""
import torch

from minirlhf import cpu

INT8_MAX = 127.0


# Whether oneDNN runs torch._int_mm with VNNI/AMX int8 instructions (minirlhf/cpu.py reads the flags once);
# tests monkeypatch it to run both CPU GEMM paths.
CPU_FAST_INT_MM = cpu.FAST_INT8


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise absmax quantization of a weight W [N, K] (one scale per output feature).

    Returns (w_int8 [N, K] int8, w_scale [N] fp32) with W ~= w_int8 * w_scale[:, None] / 127.
    Computed in fp32 (exact upcast of fp16/bf16 weights).
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_weight expects a 2-D weight [out, in], got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise TypeError(f"quantize_weight expects a float weight, got {w.dtype}")
    w = w.float()
    absmax = w.abs().amax(dim=1)  # [N]
    codes = _round_to_int8(w, absmax)
    return codes, absmax


def dequantize_weight(w_int8: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """W8 [N, K] int8, s_w [N] fp32 -> W [N, K] fp32 = W8 * s_w / 127."""
    return w_int8.float() * (w_scale.float() / INT8_MAX)[:, None]


def _round_to_int8(x: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """round(x * (127 / absmax)) per row, as int8. x [R, C] fp32, absmax [R] fp32."""
    return _round_codes(x, absmax).to(torch.int8)


def _round_codes(x: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """round(x * (127 / absmax)) per row, as fp32 integers in [-127, 127]. x [R, C] float, absmax [R] fp32.

    A row with absmax 0 (all zeros) gets factor 0 instead of inf, so its codes are 0, not NaN.
    A row with a NaN absmax gets factor 0 too, and its NaN elements are set to code 0, so the codes
    are always defined; the NaN survives in the row scale, which is what poisons that output row.
    """
    # 127 * (1 / absmax), rounded twice: this is what bitsandbytes' `127.0 / absmax` computes
    # (torch evaluates scalar / tensor as reciprocal times scalar), and the Triton kernel copies it
    factor = torch.where(absmax > 0, absmax.reciprocal() * INT8_MAX, 0.0)  # [R]; 1/0 = inf is discarded
    v = x * factor[:, None]  # [R, C] fp32 (bf16/fp16 x is promoted exactly), |v| <= 127 for finite non-outliers
    if not torch.isfinite(factor * absmax).all():  # rare: some row holds a NaN or inf
        v = torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)
    return v.round_()  # torch.round is round-half-to-even, like bitsandbytes


def outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Indices of the feature columns of x [M, K] that hold any |x| >= threshold. int64 [n_out].

    Empty when threshold <= 0 (decomposition off). NaN is never an outlier; +-inf always is.
    """
    return _outlier_columns_of_abs(x.abs(), threshold)


def _outlier_columns_of_abs(a: torch.Tensor, threshold: float) -> torch.Tensor:
    """outlier_columns given a = |x| [M, K], which quantize_rows needs anyway."""
    if threshold <= 0:
        return torch.empty(0, dtype=torch.int64, device=a.device)
    col_absmax = a.amax(dim=0)  # [K]; one reduction instead of an [M, K] bool mask
    is_outlier = col_absmax >= threshold
    nan_cols = col_absmax.isnan()  # a NaN hides the column max: test those few columns elementwise
    if nan_cols.any():
        is_outlier[nan_cols] = (a[:, nan_cols] >= threshold).any(dim=0)
    return torch.nonzero(is_outlier).flatten()


def quantize_rows(x: torch.Tensor, threshold: float = 6.0):
    """Row-wise (per token) int8 quantization of activations x [M, K], outlier columns held out.

    Returns (x_int8 [M, K] int8, row_scale [M] fp32, outlier_cols [n_out] int64).
    x_int8[:, outlier_cols] == 0; those columns are multiplied in float by int8_linear.
    """
    codes, row_scale, cols = _quantize_rows_codes(x, threshold)
    return codes.to(torch.int8), row_scale, cols


def _quantize_rows_codes(x: torch.Tensor, threshold: float):
    """quantize_rows with the codes left as fp32 integers (exact: they lie in [-127, 127])."""
    if x.dim() != 2:
        raise ValueError(f"quantize_rows expects x of shape [M, K], got {tuple(x.shape)}")
    # |x|, the absmaxes and the outlier test are exact in x's own dtype (bf16/fp16 need no fp32 copy of x);
    # the codes are computed in fp32 (_round_codes promotes x * factor)
    a = x.abs()  # [M, K]
    cols = _outlier_columns_of_abs(a, threshold)
    if cols.numel() > 0:
        # bitsandbytes semantics: only the outlier elements leave the absmax ... (they all sit in the outlier
        # columns, so only those few columns are touched)
        a_out = a.index_select(1, cols)  # [M, n_out] (index_select / index_copy_: a[:, cols] without advanced indexing)
        a.index_copy_(1, cols, a_out.masked_fill_(a_out >= threshold, 0.0))
    row_scale = a.amax(dim=1).float()  # [M]; NaN propagates, so a NaN row keeps a NaN scale
    codes = _round_codes(x, row_scale)
    if cols.numel() > 0:
        codes.index_fill_(1, cols, 0.0)  # ... but their whole columns leave the int8 matmul
    return codes, row_scale, cols


def int8_units(a: torch.Tensor) -> bool:
    """Whether this device multiplies int8 matrices natively (cuBLASLt; oneDNN with VNNI/AMX)."""
    return a.is_cuda or (a.device.type == "cpu" and CPU_FAST_INT_MM)


# cuBLASLt's int8 GEMM (torch._int_mm on CUDA) takes only M > 16 rows; decode steps have M <= 16
_CUBLASLT_MIN_ROWS = 17
_DECODE_PAD_ROWS = 32


def int8_matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact int8 GEMM: a [M, K] int8 times w [N, K] int8, transposed -> [M, N] int32."""
    M, K = a.shape
    N = w.shape[0]
    if int8_units(a):
        if not a.is_cuda:
            return torch._int_mm(a, w.t())  # w.t() is [K, N] column-major: the layout oneDNN/cuBLAS want
        if K % 8 == 0 and N % 8 == 0:  # cuBLASLt also needs K and N multiples of 8 (every Pythia layer)
            return _cuda_int_mm(a, w)
    # fp32 matmul on integer values: exact while partial sums stay < 2^24 (see module docstring).
    # It makes an fp32 copy of W (N*K*4 bytes) per call: the CPU path without VNNI, and CUDA only
    # for K or N not a multiple of 8.
    return (a.float() @ w.float().t()).to(torch.int32)


def _cuda_int_mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """torch._int_mm for any M: a decode step's M <= 16 rows are padded with zero rows to 32
    (32 x K bytes; zero codes add nothing) instead of falling back to an fp32 copy of W."""
    M, K = a.shape
    if M >= _CUBLASLT_MIN_ROWS:
        return torch._int_mm(a, w.t())
    padded = a.new_zeros(_DECODE_PAD_ROWS, K)
    padded[:M] = a
    return torch._int_mm(padded, w.t())[:M]


def int8_linear(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    threshold: float = 6.0,
) -> torch.Tensor:
    """LLM.int8() linear layer: x [..., K] -> y [..., N] in x.dtype.

    w_int8 [N, K] int8 and w_scale [N] fp32 come from quantize_weight. All arithmetic is fp32 (never
    fp16 on CPU, where it is ~500x slower); fp16/bf16 inputs are upcast exactly and the result is
    rounded back once at the end.
    """
    K = x.shape[-1]
    N = w_int8.shape[0]
    lead_shape = x.shape[:-1]
    x2 = x.reshape(-1, K)  # [M, K] in x's dtype: quantizing needs no fp32 copy of it
    if x2.shape[0] == 0:
        return x.new_empty(*lead_shape, N)

    codes, row_scale, cols = _quantize_rows_codes(x2, threshold)  # [M, K] integers in fp32, [M], [n_out]
    if int8_units(x2):
        acc = int8_matmul(codes.to(torch.int8), w_int8)  # [M, N] int32 accumulate
    else:
        # no int8 instructions: the same integer matmul in fp32 on the codes (exact, see the module
        # docstring), skipping the round trip through int8 and int32 that would change no value
        acc = codes @ w_int8.float().t()  # [M, N]

    # dequantize: y = acc * s_x[m] * s_w[n] / 127^2 (+ b); the int32 accumulator is converted inside the first
    # multiply (no separate int32 -> fp32 pass)
    y = acc * (row_scale / (INT8_MAX * INT8_MAX))[:, None]  # [M, N] fp32
    y.mul_(w_scale.float())
    if bias is not None:
        y.add_(bias.float())

    add_outlier_columns(y, x2, cols, w_int8, w_scale)
    return y.to(x.dtype).reshape(*lead_shape, N)


def add_outlier_columns(y, x2, cols, w_int8, w_scale) -> torch.Tensor:
    """y [M, N] fp32 += the few outlier features in fp32: x2[:, O] [M, n_out] @ dequantized W[:, O]^T [n_out, N]
    (O = cols, from quantize_rows; nothing to add when it is empty). In place; returns y."""
    if cols.numel() > 0:
        w_cols = dequantize_weight(w_int8.index_select(1, cols), w_scale)  # [N, n_out]
        y.addmm_(x2.index_select(1, cols).float(), w_cols.t())
    return y


__all__ = [
    "INT8_MAX",
    "CPU_FAST_INT_MM",
    "quantize_weight",
    "dequantize_weight",
    "outlier_columns",
    "quantize_rows",
    "int8_matmul",
    "int8_linear",
    "add_outlier_columns",
]
