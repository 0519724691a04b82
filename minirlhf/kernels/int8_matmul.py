"""LLM.int8() in Triton: outlier detection, row-wise int8 quantization, int8 GEMM with a fused epilogue.

Same algorithm, same numbers as minirlhf/kernels/reference.py (read that first: it has the math,
the paper, and the bitsandbytes details); this file is about doing it in four GPU launches and no
host synchronization.

x [M, K] float (fp32/fp16/bf16), W8 [N, K] int8, s_w [N] fp32, b [N], out [M, N] in x.dtype.

    1. _outlier_columns_kernel   grid (M/BLOCK_M, K/BLOCK_K)
       flag[k] = 1 if any |x[m, k]| >= threshold. Every tile writes 1 into the flags of the columns
       where it saw an outlier. Several tiles can write the same flag, but they all write the same
       value 1 into a zeroed int8 vector, so the race is harmless and no atomics are needed.
       (1 and 2 are skipped when threshold <= 0.)

    2. _compact_columns_kernel   grid (1,)
       cols[0:n_out] = the flagged k in ascending order, count[0] = n_out, by a running prefix sum
       over flag. One program, K/1024 steps. bitsandbytes calls torch.nonzero here, which waits for
       the GPU (the host must know n_out to size its output); we leave n_out in GPU memory and the
       GEMM reads it, so a layer call never blocks the host.

    3. _quantize_rows_kernel     grid (M/BLOCK_M,)
       Two sweeps over each block of rows: the absmax of the non-outlier elements, then the codes
       round(x * (127 * (1 / absmax))), 0 in flagged columns. Rounding is half-to-even, built from floor and
       compares only (see _round_half_even), so the interpreter and the GPU agree with torch.round.

    4. _int8_matmul_kernel       grid (M/BLOCK_M * N/BLOCK_N,), grouped tile order for L2 reuse
       acc[BM, BN] int32 += tl.dot(X8 tile [BM, BK], W8^T tile [BK, BN])   (int8 tensor cores)
       Epilogue, still in registers, in one fp32 tile:
           y  = acc * s_x[m] / 127                        (acc is dead after this: same registers)
           y  = tl.dot(x[:, cols], W8[:, cols]^T, y)      <- the outlier part, accumulating into y
           y  = y * s_w[n] / 127 + b[n];  store y in x.dtype
       which is the reference's acc*s_x*s_w/127^2 + x_O @ (W8_O*s_w/127)^T + b with s_w/127 taken
       out of both terms. Keeping the outlier sum in a second [BM, BN] fp32 tile (as an earlier
       version did) holds two accumulators live at once: 128 x 256 tiles then spill registers.
       The W^T tile is read straight from row-major W8 [N, K] (K contiguous), which is the
       "col-major B" layout int8 MMA wants, so no transposed copy of the weight is ever made.

Why fuse the outlier part? bitsandbytes runs the int8 GEMM, writes the dequantized output, gathers
x[:, cols] and dequantizes W8[:, cols] into new tensors, then runs a second fp16 GEMM that reads and
writes the whole output again (addmm). Here each output tile loads only its BLOCK_M x n_out slice of
x and n_out x BLOCK_N slice of W8 (n_out is <1% of K in real models) and the output is written once.
How the outlier dot multiplies (OUTLIER_DOT):
    "native"  fp16/bf16 inputs: tensor cores in the input dtype. int8 codes are exact in fp16 and
              bf16 and the products accumulate in fp32, so nothing is lost.
    "bf16x3"  fp32 inputs on a GPU: x = hi + mid + lo, three bf16 pieces of 8 significant bits each
              (24 bits: all of fp32's), and three bf16 tensor-core dots. Each product piece * code
              needs at most 8 + 7 bits, so every product is exact and only the fp32 accumulation
              rounds, as in an fp32 FMA loop. An IEEE fp32 tl.dot would run on FMA units in a
              different register layout from the int8 accumulator, and spills (see README).
    "ieee"    the interpreter, for fp32 and bf16 (below): numpy fp32.

Launch specialization (what the compiled code assumes): Triton compiles one variant per pattern
of its integer arguments: == 1 (a constant), divisible by 16 (alignment hints), or neither; and of
its pointers: 16-byte aligned or not. Unit strides become constants and K % 16 == 0 gives aligned
16-byte loads of both int8 operands (every Pythia layer). M and the autotuning bucket change from
call to call (prefill, decode), so they are do_not_specialize: one compiled variant serves all M.
Offsets are int32 unless some tensor spans 2^31 elements or more (e.g. out [M, N] with M = 131072
tokens, N = 24576); then OFFSETS_64 recompiles with int64 row offsets.

Interpreter: with TRITON_INTERPRET=1 these kernels run on CPU tensors, one program at a time (~4 ms
per program per K-step), so we use one config with big blocks there instead of autotuning. The
interpreter keeps bf16 as raw uint16 bits (a bf16 tl.dot would multiply bit patterns, an fp32 -> bf16
cast truncates), so for bf16 inputs, and only in the interpreter, the outlier dot runs in fp32 and
torch rounds the output; see triton_int8_linear.

How this was checked: bit-exact codes/scales and 1e-3 outputs against the reference in the
interpreter (tests/test_int8_kernels.py); every kernel, autotune config and input dtype compiled
for sm_80, sm_89 and sm_90 with the launch's own specialization, no register spills, shared memory
within each arch's limit and int8 MMA in the main loop (minirlhf/kernels/compile_check.py,
tests/test_int8_compile.py). Never run on a GPU yet: tests/test_int8_cuda.py and
`benchmarks/bench_int8.py --gpu` are the first things to run on one.
"""
import contextlib
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# largest finite fp32; |v| <= FLT_MAX is false for NaN and inf. A tl.constexpr, because compiled
# (non-interpreted) kernels may only read globals that are constexpr.
FLT_MAX = tl.constexpr(3.4028234663852886e38)


def _needs_int64_offsets(*tensors) -> bool:
    """True when some element of some tensor lies 2^31 or more elements from its start, so
    row * stride would overflow the kernels' default int32 offsets."""
    for t in tensors:
        if t is not None and t.numel() > 0 and sum((n - 1) * st for n, st in zip(t.shape, t.stride())) >= 2**31:
            return True
    return False


# ----------------------------------------------------------------------------------------------
# 1. outlier columns
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["M"])
def _outlier_columns_kernel(
    x_ptr, flag_ptr, M, K, stride_xm, stride_xk, threshold,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, OFFSETS_64: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    if OFFSETS_64:
        rm = rm.to(tl.int64)
    mask = (rm[:, None] < M) & (rk[None, :] < K)
    x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=mask, other=0.0)
    hit = (tl.abs(x.to(tl.float32)) >= threshold).to(tl.int32)  # [BM, BK]; NaN >= t is false
    col_hit = tl.max(hit, axis=0)  # [BK]
    ones = tl.full((BLOCK_K,), 1, dtype=tl.int8)
    tl.store(flag_ptr + rk, ones, mask=(rk < K) & (col_hit > 0))


@triton.jit
def _compact_columns_kernel(flag_ptr, cols_ptr, count_ptr, K, BLOCK: tl.constexpr):
    # one program walks the K flags in blocks; `count` is the number of flagged columns before
    # this block, so flagged column k goes to slot count + (flags before k within the block)
    count = 0
    for k0 in range(0, K, BLOCK):
        rk = k0 + tl.arange(0, BLOCK)
        f = tl.load(flag_ptr + rk, mask=rk < K, other=0).to(tl.int32)  # [BLOCK] 0/1
        slot = count + tl.cumsum(f, axis=0) - f  # exclusive prefix sum
        tl.store(cols_ptr + slot, rk, mask=f > 0)
        count += tl.sum(f, axis=0)
    tl.store(count_ptr, count)


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


@triton.jit(do_not_specialize=["M"])
def _quantize_rows_kernel(
    x_ptr, flag_ptr, q_ptr, scale_ptr, M, K, stride_xm, stride_xk, stride_qm, threshold,
    USE_OUTLIERS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, OFFSETS_64: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = rm < M
    if OFFSETS_64:
        rm = rm.to(tl.int64)

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
_COMPACT_BLOCK = 1024


def _quantize_launches(x, threshold, flags, cols, count, q, row_scale):
    """The launches of steps 1-3 as (kernel, grid, args, kwargs): the host code runs them and
    compile_check.py compiles exactly these, so the two cannot disagree on a specialization."""
    M, K = x.shape
    offsets_64 = _needs_int64_offsets(x, q)
    launches = []
    if threshold > 0:
        launches.append((
            _outlier_columns_kernel, (triton.cdiv(M, _FLAG_BLOCK_M), triton.cdiv(K, _FLAG_BLOCK_K)),
            (x, flags, M, K, x.stride(0), x.stride(1), float(threshold)),
            dict(BLOCK_M=_FLAG_BLOCK_M, BLOCK_K=_FLAG_BLOCK_K, OFFSETS_64=offsets_64),
        ))
        launches.append((_compact_columns_kernel, (1,), (flags, cols, count, K), dict(BLOCK=_COMPACT_BLOCK)))
    launches.append((
        _quantize_rows_kernel, (triton.cdiv(M, _QUANT_BLOCK_M),),
        (x, flags, q, row_scale, M, K, x.stride(0), x.stride(1), q.stride(0), float(threshold)),
        dict(USE_OUTLIERS=threshold > 0, BLOCK_M=_QUANT_BLOCK_M, BLOCK_K=_QUANT_BLOCK_K, OFFSETS_64=offsets_64),
    ))
    return launches


def _quantize_buffers(x, threshold):
    """Outputs of steps 1-3 for x [M, K]: flags [K] int8 (zeroed), cols [K] int32, count [1] int32,
    codes [M, K] int8, row scales [M] fp32. Without outliers cols is a 1-element dummy."""
    M, K = x.shape
    dev = x.device
    flags = torch.zeros(K, dtype=torch.int8, device=dev)
    cols = torch.empty(K if threshold > 0 else 1, dtype=torch.int32, device=dev)
    count = torch.zeros(1, dtype=torch.int32, device=dev)
    q = torch.empty(M, K, dtype=torch.int8, device=dev)
    row_scale = torch.empty(M, dtype=torch.float32, device=dev)
    return flags, cols, count, q, row_scale


def _quantize_rows_async(x: torch.Tensor, threshold: float):
    """Steps 1-3 on x [M, K]: (codes [M, K] int8, row_scale [M] fp32, cols [>= n_out] int32,
    count [1] int32), with n_out = count[0] still on the device."""
    flags, cols, count, q, row_scale = _quantize_buffers(x, threshold)
    for kernel, grid, args, kwargs in _quantize_launches(x, threshold, flags, cols, count, q, row_scale):
        kernel[grid](*args, **kwargs)
    return q, row_scale, cols, count


def _device_guard(x):
    """Launch on x's GPU, not on whichever one is current (Triton launches on the current device)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _check_device(name, t, x):
    if not (x.is_cuda or INTERPRET):
        raise ValueError(f"the Triton int8 kernels need CUDA tensors (or TRITON_INTERPRET=1), got x on {x.device}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def triton_quantize_rows(x: torch.Tensor, threshold: float = 6.0):
    """Triton version of reference.quantize_rows: x [M, K] -> (x_int8 [M, K], row_scale [M] fp32,
    outlier_cols [n_out] int64). Bit-identical to the reference.

    Returning the columns as a tensor of their own size needs n_out on the host: this reads it
    back (one host sync). triton_int8_linear does not; it keeps n_out on the device."""
    if x.dim() != 2:
        raise ValueError(f"triton_quantize_rows expects x of shape [M, K], got {tuple(x.shape)}")
    _check_device("x", x, x)
    with _device_guard(x):
        q, row_scale, cols, count = _quantize_rows_async(x, threshold)
        n_out = int(count.item())  # host sync
    return q, row_scale, cols[:n_out].long()


# ----------------------------------------------------------------------------------------------
# 3. int8 GEMM + fused dequant / outlier / bias epilogue
# ----------------------------------------------------------------------------------------------

# Per-block shared memory a kernel may use (cudaDevAttrMaxSharedMemoryPerBlockOptin, bytes):
# A100 (sm_80) 163 KB, sm_86/sm_89 (RTX 30xx/40xx, L4, L40) 99 KB, H100/H200 (sm_90) 227 KB.
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}

# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps): large tiles for prefill, BLOCK_M=16/32 for decode.
# No 256 x 128 tile: it spills everywhere (sm_8x: too many accumulators per thread, see
# gemm_configs_for; sm_90: on top of the main loop, the outlier loop's 256-row gather of x needs
# more registers than 128 x 256's 128-row one). Numbers: README, "Compiled for GPUs".
_GEMM_TILES = [
    (128, 256, 128, 3, 8),
    (128, 128, 128, 4, 8),
    (128, 128, 64, 4, 4),
    (128, 64, 128, 4, 4),
    (64, 128, 128, 4, 4),
    (64, 64, 256, 4, 4),
    (32, 128, 128, 4, 4),
    (32, 64, 256, 4, 4),
    (16, 128, 128, 4, 4),
    (16, 64, 256, 4, 4),
]


def _gemm_configs():
    if INTERPRET:
        # one config, big blocks: autotuning would time kernels with CUDA events, and every
        # program costs ~4 ms per K-step in the interpreter
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                          num_stages=stages, num_warps=warps)
            for bm, bn, bk, stages, warps in _GEMM_TILES]


def gemm_configs_for(configs, arch: int):
    """The autotune configs that compile without register spills and fit in shared memory on
    compute capability `arch` (e.g. 89), for every input dtype (compile_check.py verifies both on
    the compiled kernels; no dtype needed a rule of its own).

    Registers: with mma.sync (every arch but sm_90) int8 MMA reads both operands from registers,
    and a warp keeps its slice of every BK step's operand fragments there next to its
    accumulators. With 128 fp32 accumulators per thread (128 x 256 tiles on 8 warps, 128 x 128 on
    4) that exceeds ptxas' 255 registers and spills; 64 per thread does not. sm_90's wgmma reads
    the operands from shared memory, so there 128 per thread fits. Shared memory: the pipelined
    main loop keeps num_stages copies of the two int8 tiles, (BM + BN) * BK bytes each (one fewer
    with mma.sync). Archs not in SMEM_LIMIT get the strictest rules (unverified there)."""
    limit = SMEM_LIMIT.get(arch, min(SMEM_LIMIT.values()))
    wgmma = arch == 90
    kept = []
    for c in configs:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        acc_per_thread = bm * bn // (32 * c.num_warps)
        buffers = c.num_stages if wgmma else max(c.num_stages - 1, 1)
        if not wgmma and acc_per_thread > 64:
            continue
        if buffers * (bm + bn) * bk > limit:
            continue
        kept.append(c)
    return kept


def _prune_gemm_configs(configs, named_args, **kwargs):
    major, minor = torch.cuda.get_device_capability(named_args["out_ptr"].device)
    return gemm_configs_for(configs, 10 * major + minor)


@triton.autotune(configs=_gemm_configs(), key=["M_BUCKET", "N", "K", "HAS_BIAS", "OUTLIER_DOT", "OFFSETS_64"],
                 prune_configs_by={"early_config_prune": _prune_gemm_configs})
@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _int8_matmul_kernel(
    a_ptr, w_ptr, row_scale_ptr, w_scale_ptr, bias_ptr, x_ptr, cols_ptr, count_ptr, out_ptr,
    M, N, K, M_BUCKET,
    stride_am, stride_ak, stride_wn, stride_wk, stride_xm, stride_xk, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, OUTLIER_DOT: tl.constexpr, BLOCK_O: tl.constexpr, OFFSETS_64: tl.constexpr,
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
    if OFFSETS_64:
        rm = rm.to(tl.int64)
        rn = rn.to(tl.int64)

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

    # epilogue: ONE fp32 tile y. The scales are divided by 127 with IEEE rounding (div_rn; a plain
    # `/` compiles to an approximate division) on the [BM] and [BN] vectors, never per element.
    s_x = tl.load(row_scale_ptr + rm, mask=m_mask, other=0.0)  # [BM]
    s_w = tl.load(w_scale_ptr + rn, mask=n_mask, other=0.0)  # [BN]
    y = acc.to(tl.float32) * tl.math.div_rn(s_x, 127.0)[:, None]  # [BM, BN]: acc's registers, reused

    # the outlier columns, BLOCK_O per dot, accumulated into y (zero iterations when n_out = 0)
    n_out = tl.load(count_ptr)
    for o0 in range(0, n_out, BLOCK_O):
        ro = o0 + tl.arange(0, BLOCK_O)
        o_mask = ro < n_out
        col = tl.load(cols_ptr + ro, mask=o_mask, other=0)  # [BO] feature indices
        xo = tl.load(x_ptr + rm[:, None] * stride_xm + col[None, :] * stride_xk,
                     mask=m_mask[:, None] & o_mask[None, :], other=0.0)  # [BM, BO] original x
        wo = tl.load(w_ptr + rn[None, :] * stride_wn + col[:, None] * stride_wk,
                     mask=o_mask[:, None] & n_mask[None, :], other=0)  # [BO, BN] int8 codes
        if OUTLIER_DOT == "native":  # fp16/bf16: tensor cores, exact products
            y = tl.dot(xo, wo.to(xo.dtype), y)
        elif OUTLIER_DOT == "bf16x3":  # fp32 as three exact bf16 pieces (module docstring)
            wb = wo.to(tl.bfloat16)
            hi = xo.to(tl.bfloat16)
            r = xo - hi.to(tl.float32)  # exact: what rounding to 8 bits left out
            mid = r.to(tl.bfloat16)
            lo = (r - mid.to(tl.float32)).to(tl.bfloat16)  # exact: <= 8 significant bits remain
            y = tl.dot(hi, wb, y)
            y = tl.dot(mid, wb, y)
            y = tl.dot(lo, wb, y)
        else:  # "ieee": the interpreter's numpy fp32
            y = tl.dot(xo.to(tl.float32), wo.to(tl.float32), y, input_precision="ieee")

    y = y * tl.math.div_rn(s_w, 127.0)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


_BLOCK_O = 16  # outlier columns per tl.dot; 16 is the smallest K a tl.dot accepts


def _outlier_dot(dtype) -> str:
    """OUTLIER_DOT for input dtype (see the module docstring)."""
    if INTERPRET:
        return "native" if dtype == torch.float16 else "ieee"
    return "bf16x3" if dtype == torch.float32 else "native"


def _gemm_launch(x2, x_int8, row_scale, w_int8, w_scale, bias, cols, count, out):
    """Step 4 as (kernel, grid, args, kwargs); shared by triton_int8_linear and compile_check.py."""
    M, K = x2.shape
    N = w_int8.shape[0]

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    args = (
        x_int8, w_int8, row_scale, w_scale, bias if bias is not None else w_scale, x2, cols, count, out,
        M, N, K, min(triton.next_power_of_2(M), 4096),  # autotune per power-of-2 bucket of M
        x_int8.stride(0), x_int8.stride(1), w_int8.stride(0), w_int8.stride(1),
        x2.stride(0), x2.stride(1), out.stride(0), out.stride(1),
    )
    kwargs = dict(HAS_BIAS=bias is not None, OUTLIER_DOT=_outlier_dot(x2.dtype), BLOCK_O=_BLOCK_O,
                  OFFSETS_64=_needs_int64_offsets(x2, x_int8, w_int8, out))
    return _int8_matmul_kernel, grid, args, kwargs


def _check_linear_args(x, w_int8, w_scale, bias):
    """One-line errors for what the kernels cannot take; returns (w_scale, bias) as they need them."""
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"triton_int8_linear expects fp32/fp16/bf16 input x, got {x.dtype}")
    if w_int8.dtype != torch.int8 or w_int8.dim() != 2:
        raise TypeError(f"w_int8 must be a 2-D int8 tensor [N, K], got {w_int8.dtype} {tuple(w_int8.shape)}")
    N, K = w_int8.shape
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features but w_int8 is {tuple(w_int8.shape)}")
    if tuple(w_scale.shape) != (N,) or not w_scale.is_floating_point():
        raise ValueError(f"w_scale must be a float tensor of shape ({N},), got {w_scale.dtype} {tuple(w_scale.shape)}")
    _check_device("w_int8", w_int8, x)
    _check_device("w_scale", w_scale, x)
    if bias is not None:
        if tuple(bias.shape) != (N,) or not bias.is_floating_point():
            raise ValueError(f"bias must be a float tensor of shape ({N},), got {bias.dtype} {tuple(bias.shape)}")
        _check_device("bias", bias, x)
        bias = bias.contiguous()  # the kernel reads bias[n] at bias_ptr + n
    return w_scale.float().contiguous(), bias  # no copies when already fp32 / contiguous


def triton_int8_linear(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    threshold: float = 6.0,
) -> torch.Tensor:
    """Triton version of reference.int8_linear: x [..., K] -> [..., N] in x.dtype. Four launches on
    x's device, no host sync."""
    w_scale, bias = _check_linear_args(x, w_int8, w_scale, bias)
    N, K = w_int8.shape
    lead_shape = x.shape[:-1]
    x2 = x.reshape(-1, K)  # [M, K], a view when x is contiguous
    M = x2.shape[0]
    # Interpreter quirk (not a GPU issue): it keeps bf16 as raw uint16, so a bf16 tl.dot multiplies
    # bit patterns and an fp32 -> bf16 cast truncates. For bf16 in the interpreter we run the outlier
    # dot in fp32 and let torch round the fp32 output to bf16 (round-to-nearest-even, as on a GPU).
    bf16_interpreted = INTERPRET and x.dtype == torch.bfloat16
    with _device_guard(x):
        out = torch.empty(M, N, dtype=torch.float32 if bf16_interpreted else x.dtype, device=x.device)
        if M == 0:
            return out.to(x.dtype).reshape(*lead_shape, N)
        x_int8, row_scale, cols, count = _quantize_rows_async(x2, threshold)
        kernel, grid, args, kwargs = _gemm_launch(x2, x_int8, row_scale, w_int8, w_scale, bias, cols, count, out)
        kernel[grid](*args, **kwargs)
    return out.to(x.dtype).reshape(*lead_shape, N)


__all__ = ["triton_quantize_rows", "triton_int8_linear", "gemm_configs_for", "SMEM_LIMIT", "INTERPRET"]
