"""LLM.int8() in Triton: outlier detection, row-wise int8 quantization, int8 GEMM with a fused epilogue.

Same algorithm, same numbers as minirlhf/kernels/reference.py (read that first: it has the math,
the paper, and the bitsandbytes details); this file is about doing it in three GPU launches.

x [M, K] float (fp32/fp16/bf16), W8 [N, K] int8, s_w [N] fp32, b [N], out [M, N] in x.dtype.

    1. _outlier_columns_kernel   grid (M/BLOCK_M, K/BLOCK_K)
       flag[k] = 1 if any |x[m, k]| >= threshold. Every tile writes 1 into the flags of the columns
       where it saw an outlier. Several tiles can write the same flag, but they all write the same
       value 1 into a zeroed int8 vector, so the race is harmless and no atomics are needed.
       (Skipped when threshold <= 0.)  Then torch.nonzero(flag) -> cols [n_out] (one host sync,
       as in bitsandbytes: the GEMM needs the number of outlier columns).

    2. _quantize_rows_kernel     grid (M/BLOCK_M,)
       Two sweeps over each block of rows: the absmax of the non-outlier elements, then the codes
       round(x * (127 * (1 / absmax))), 0 in flagged columns. Rounding is half-to-even, built from floor and
       compares only (see _round_half_even), so the interpreter and the GPU agree with torch.round.

    3. _int8_matmul_kernel       grid (M/BLOCK_M * N/BLOCK_N,), grouped tile order for L2 reuse
       acc[BM, BN] int32 += tl.dot(X8 tile [BM, BK], W8^T tile [BK, BN])   (int8 tensor cores)
       Epilogue, still in registers:
           y  = acc * s_x[m] * s_w[n] / 127^2
           y += (x[:, cols] @ W8[:, cols]^T) * s_w[n] / 127      <- the outlier part, fused
           y += b[n];  store y in x.dtype
       The W^T tile is read straight from row-major W8 [N, K] (K contiguous), which is the
       "col-major B" layout int8 MMA wants, so no transposed copy of the weight is ever made.

Why fuse the outlier part? bitsandbytes runs the int8 GEMM, writes the dequantized output, gathers
x[:, cols] and dequantizes W8[:, cols] into new tensors, then runs a second fp16 GEMM that reads and
writes the whole output again (addmm). Here each output tile loads only its BLOCK_M x n_out slice of
x and n_out x BLOCK_N slice of W8 (n_out is <1% of K in real models) and the output is written once.
For fp16/bf16 inputs the outlier dot runs on tensor cores in the input dtype: int8 codes are exact
in fp16 and bf16 and the products accumulate in fp32, so nothing is lost. For fp32 inputs it runs
in IEEE fp32 (input_precision="ieee"), never TF32, to stay as exact as the reference.

Interpreter: with TRITON_INTERPRET=1 these kernels run on CPU tensors, one program at a time (~4 ms
per program per K-step), so we use one config with big blocks there instead of autotuning. The
interpreter keeps bf16 as raw uint16 bits (a bf16 tl.dot would multiply bit patterns, an fp32 -> bf16
cast truncates), so for bf16 inputs, and only in the interpreter, the outlier dot runs in fp32 and
torch rounds the output; see triton_int8_linear.

How this was checked: bit-exact codes/scales and 1e-3 outputs against the reference in the
interpreter, and compiled to PTX for sm_90 (int8 MMA in the main loop, div.rn for the reciprocal) by
tests/test_int8_kernels.py. It has not been run on a GPU yet; the GPU half of
benchmarks/bench_int8.py is the first thing to run on one.
"""
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# largest finite fp32; |v| <= FLT_MAX is false for NaN and inf. A tl.constexpr, because compiled
# (non-interpreted) kernels may only read globals that are constexpr.
FLT_MAX = tl.constexpr(3.4028234663852886e38)


# ----------------------------------------------------------------------------------------------
# 1. outlier columns
# ----------------------------------------------------------------------------------------------


@triton.jit
def _outlier_columns_kernel(
    x_ptr, flag_ptr, M, K, stride_xm, stride_xk, threshold,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rm[:, None] < M) & (rk[None, :] < K)
    x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=mask, other=0.0)
    hit = (tl.abs(x.to(tl.float32)) >= threshold).to(tl.int32)  # [BM, BK]; NaN >= t is false
    col_hit = tl.max(hit, axis=0)  # [BK]
    ones = tl.full((BLOCK_K,), 1, dtype=tl.int8)
    tl.store(flag_ptr + rk, ones, mask=(rk < K) & (col_hit > 0))


# ----------------------------------------------------------------------------------------------
# 2. row-wise quantization
# ----------------------------------------------------------------------------------------------


@triton.jit
def _round_half_even(v):
    """Nearest integer to v (fp32, |v| < 2^23), ties to even, like torch.round / rint.

    floor, +0.5 on an integer, and compares are all exact, and none of them can be fused into an
    FMA with the multiply that produced v, so the result is the same on every backend.
    """
    r = tl.floor(v)
    half = r + 0.5
    r_is_odd = (r.to(tl.int32) & 1) == 1
    up = (v > half) | ((v == half) & r_is_odd)
    return r + up.to(tl.float32)


@triton.jit
def _quantize_rows_kernel(
    x_ptr, flag_ptr, q_ptr, scale_ptr, M, K, stride_xm, stride_xk, stride_qm, threshold,
    USE_OUTLIERS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = rm < M

    # sweep 1: absmax per row over the non-outlier elements (bitsandbytes semantics). NaN is
    # tracked on the side because GPU max() drops NaN; a NaN row must keep a NaN scale.
    absmax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    has_nan = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask = m_mask[:, None] & (rk[None, :] < K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=mask, other=0.0)
        a = tl.abs(x.to(tl.float32))  # [BM, BK]
        if USE_OUTLIERS:
            a = tl.where(a >= threshold, 0.0, a)
        has_nan = tl.maximum(has_nan, tl.max((a != a).to(tl.int32), axis=1))
        absmax = tl.maximum(absmax, tl.max(a, axis=1))
    absmax = tl.where(has_nan > 0, float("nan"), absmax)
    tl.store(scale_ptr + rm, absmax, mask=m_mask)

    # factor = 127 * (1 / absmax), each step IEEE-rounded, exactly like the reference (and like
    # bitsandbytes' `127.0 / absmax`, which torch evaluates as a reciprocal times 127); 0 for
    # all-zero and NaN rows
    nonzero = absmax > 0
    factor = tl.where(nonzero, tl.math.div_rn(1.0, tl.where(nonzero, absmax, 1.0)) * 127.0, 0.0)

    # sweep 2: codes
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask = m_mask[:, None] & (rk[None, :] < K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=mask, other=0.0)
        v = x.to(tl.float32) * factor[:, None]
        v = tl.where(tl.abs(v) <= FLT_MAX, v, 0.0)  # NaN/inf -> code 0 (the row scale carries the NaN)
        if USE_OUTLIERS:
            is_outlier_col = tl.load(flag_ptr + rk, mask=rk < K, other=0) != 0  # [BK]
            v = tl.where(is_outlier_col[None, :], 0.0, v)
        q = _round_half_even(v).to(tl.int8)
        tl.store(q_ptr + rm[:, None] * stride_qm + rk[None, :], q, mask=mask)


# block sizes: small rows-per-program on a GPU (parallelism), big blocks in the interpreter (speed)
_FLAG_BLOCK_M, _FLAG_BLOCK_K = (64, 256) if INTERPRET else (64, 128)
_QUANT_BLOCK_M, _QUANT_BLOCK_K = (32, 256) if INTERPRET else (4, 512)


def triton_quantize_rows(x: torch.Tensor, threshold: float = 6.0):
    """Triton version of reference.quantize_rows: x [M, K] -> (x_int8 [M, K], row_scale [M] fp32,
    outlier_cols [n_out] int64). Bit-identical to the reference."""
    if x.dim() != 2:
        raise ValueError(f"triton_quantize_rows expects x of shape [M, K], got {tuple(x.shape)}")
    M, K = x.shape
    use_outliers = threshold > 0
    flags = torch.zeros(K, dtype=torch.int8, device=x.device)
    if use_outliers:
        grid = (triton.cdiv(M, _FLAG_BLOCK_M), triton.cdiv(K, _FLAG_BLOCK_K))
        _outlier_columns_kernel[grid](
            x, flags, M, K, x.stride(0), x.stride(1), float(threshold),
            BLOCK_M=_FLAG_BLOCK_M, BLOCK_K=_FLAG_BLOCK_K,
        )
    q = torch.empty(M, K, dtype=torch.int8, device=x.device)
    row_scale = torch.empty(M, dtype=torch.float32, device=x.device)
    _quantize_rows_kernel[(triton.cdiv(M, _QUANT_BLOCK_M),)](
        x, flags, q, row_scale, M, K, x.stride(0), x.stride(1), q.stride(0), float(threshold),
        USE_OUTLIERS=use_outliers, BLOCK_M=_QUANT_BLOCK_M, BLOCK_K=_QUANT_BLOCK_K,
    )
    cols = torch.nonzero(flags).flatten()  # int64, like bitsandbytes; host sync
    return q, row_scale, cols


# ----------------------------------------------------------------------------------------------
# 3. int8 GEMM + fused dequant / outlier / bias epilogue
# ----------------------------------------------------------------------------------------------


def _gemm_configs():
    if INTERPRET:
        # one config, big blocks: autotuning would time kernels with CUDA events, and every
        # program costs ~4 ms per K-step in the interpreter
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=1)]
    configs = []
    # (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps): large tiles for prefill, BLOCK_M=16/32 for decode
    for bm, bn, bk, stages, warps in [
        (128, 256, 128, 3, 8),
        (256, 128, 128, 3, 8),
        (128, 128, 128, 4, 8),
        (128, 128, 64, 4, 4),
        (128, 64, 128, 4, 4),
        (64, 128, 128, 4, 4),
        (64, 64, 256, 4, 4),
        (32, 128, 128, 4, 4),
        (32, 64, 256, 4, 4),
        (16, 128, 128, 4, 4),
        (16, 64, 256, 4, 4),
    ]:
        meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}
        configs.append(triton.Config(meta, num_stages=stages, num_warps=warps))
    return configs


@triton.autotune(configs=_gemm_configs(), key=["M_BUCKET", "N", "K", "HAS_BIAS", "OUTLIER_IEEE"])
@triton.jit
def _int8_matmul_kernel(
    a_ptr, w_ptr, row_scale_ptr, w_scale_ptr, bias_ptr, x_ptr, cols_ptr, out_ptr,
    M, N, K, n_out, M_BUCKET,
    stride_am, stride_ak, stride_wn, stride_wk, stride_xm, stride_xk, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, OUTLIER_IEEE: tl.constexpr, BLOCK_O: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # grouped ordering: GROUP_M row-tiles share each column of W tiles while it is hot in L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] token rows
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] output features
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N

    # main loop: exact int8 x int8 -> int32
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak  # X8 tile [BM, BK]
    w_ptrs = w_ptr + rn[None, :] * stride_wn + rk[:, None] * stride_wk  # W8^T tile [BK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + rk) < K
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0)
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    # epilogue 1: dequantize the int8 part
    s_x = tl.load(row_scale_ptr + rm, mask=m_mask, other=0.0)  # [BM]
    s_w = tl.load(w_scale_ptr + rn, mask=n_mask, other=0.0)  # [BN]
    y = acc.to(tl.float32) * (s_x / (127.0 * 127.0))[:, None] * s_w[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]

    # epilogue 2: the outlier columns in float, BLOCK_O of them per dot (zero iterations if none)
    out_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for o0 in range(0, n_out, BLOCK_O):
        ro = o0 + tl.arange(0, BLOCK_O)
        o_mask = ro < n_out
        col = tl.load(cols_ptr + ro, mask=o_mask, other=0)  # [BO] feature indices
        xo = tl.load(x_ptr + rm[:, None] * stride_xm + col[None, :] * stride_xk,
                     mask=m_mask[:, None] & o_mask[None, :], other=0.0)  # [BM, BO] original x
        wo = tl.load(w_ptr + rn[None, :] * stride_wn + col[:, None] * stride_wk,
                     mask=o_mask[:, None] & n_mask[None, :], other=0)  # [BO, BN] int8 codes
        if OUTLIER_IEEE:
            out_acc = tl.dot(xo.to(tl.float32), wo.to(tl.float32), out_acc, input_precision="ieee")
        else:
            out_acc = tl.dot(xo, wo.to(xo.dtype), out_acc)  # fp16/bf16 tensor cores, exact products
    y += out_acc * (s_w / 127.0)[None, :]

    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


_BLOCK_O = 16  # outlier columns per tl.dot; 16 is the smallest K a tl.dot accepts


def triton_int8_linear(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    threshold: float = 6.0,
) -> torch.Tensor:
    """Triton version of reference.int8_linear: x [..., K] -> [..., N] in x.dtype."""
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"triton_int8_linear expects fp32/fp16/bf16 input, got {x.dtype}")
    K = x.shape[-1]
    N = w_int8.shape[0]
    if w_int8.shape[1] != K:
        raise ValueError(f"x has {K} features but the weight is {tuple(w_int8.shape)}")
    lead_shape = x.shape[:-1]
    x2 = x.reshape(-1, K)  # [M, K], a view when x is contiguous
    M = x2.shape[0]
    # Interpreter quirk (not a GPU issue): it keeps bf16 as raw uint16, so a bf16 tl.dot multiplies
    # bit patterns and an fp32 -> bf16 cast truncates. For bf16 in the interpreter we run the outlier
    # dot in fp32 and let torch round the fp32 output to bf16 (round-to-nearest-even, as on a GPU).
    bf16_interpreted = INTERPRET and x.dtype == torch.bfloat16
    out = torch.empty(M, N, dtype=torch.float32 if bf16_interpreted else x.dtype, device=x.device)
    if M == 0:
        return out.to(x.dtype).reshape(*lead_shape, N)

    x_int8, row_scale, cols = triton_quantize_rows(x2, threshold)
    n_out = cols.numel()
    # the kernel never reads cols_ptr when n_out == 0, but it still needs a valid pointer
    cols32 = cols.to(torch.int32) if n_out > 0 else torch.zeros(1, dtype=torch.int32, device=x.device)
    w_scale = w_scale.float().contiguous()

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _int8_matmul_kernel[grid](
        x_int8, w_int8, row_scale, w_scale, bias if bias is not None else w_scale, x2, cols32, out,
        M, N, K, n_out, min(triton.next_power_of_2(M), 4096),  # autotune per power-of-2 bucket of M
        x_int8.stride(0), x_int8.stride(1), w_int8.stride(0), w_int8.stride(1),
        x2.stride(0), x2.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, OUTLIER_IEEE=x.dtype == torch.float32 or bf16_interpreted, BLOCK_O=_BLOCK_O,
    )
    return out.to(x.dtype).reshape(*lead_shape, N)


__all__ = ["triton_quantize_rows", "triton_int8_linear", "INTERPRET"]
