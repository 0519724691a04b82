"""QLoRA's 4-bit base on a GPU: Triton GEMMs that dequantize NF4 / FP4 tiles in registers inside their K loop.

Same format, same numbers as minirlhf/kernels/nf4_reference.py (read that first: the code books, the packing,
double quantization, bitsandbytes' details). Paper: Dettmers et al., "QLoRA", arXiv:2305.14314.

The idea
--------
QLoRA fine-tunes LoRA adapters over a frozen base stored in 4 bits per weight. The matmuls are float ones
(fp16 / bf16 / fp32, the compute dtype): the 4-bit weight is a storage format. The plain way to use it is
    W = dequantize(packed, absmax)   # writes N*K floats to memory (2 bytes each in fp16) ...
    y = x @ W^T                      # ... and reads them straight back
which moves 2 + 2 = 4 bytes per weight through memory to use a 0.5-byte weight, and needs a transient as big
as the fp16 layer. Here each program loads its [BLOCK_N, BLOCK_K] slice of the packed bytes (BLOCK_N * BLOCK_K / 2
bytes) and one absmax per weight row, decodes it in registers and feeds it straight to tl.dot:

    for each K step:                                            x [M, K]  W packed uint8 [N*K/2]
        x tile      [BM, BK]    load                              (compute dtype)
        bytes       [BN, BK/2]  load, split:  hi = b >> 4, lo = b & 15, interleaved: element 2j is the high nibble
        scale       [BN]        absmax[(n*K + k0) / blocksize]    (double quant: CODE8[q8] * nested[b / 256] + offset)
        W tile      [BN, BK]    CODE[q] * scale   (fp32, then rounded once to the compute dtype)
        acc         [BM, BN]   += x tile @ W tile^T               (tensor cores, fp32 accumulation)

so the weight crosses memory once, at 4.5 (4.127 with double quantization) bits per element, and nothing of
the size of W is ever allocated. In decoding (M = 1..16 tokens per step) a layer is bound by the bytes of its
weight, so reading 0.5 instead of 2 bytes per weight is the whole game; in prefill (M in the thousands) the
GEMM is bound by tensor-core throughput and the dequantization is extra ALU work hidden under the MMAs.

Kernels (x [M, K] and dy [M, N] in the compute dtype, W [N, K] in bitsandbytes' layout: the flattened
row-major weight cut into blocks of `blocksize` elements, codes packed two per byte, high nibble first):
    _nf4_matmul_kernel       y  = x @ W^T + b       [M, K] x [K, N] -> [M, N]   grid (M/BM * N/BN,) grouped
    _nf4_matmul_t_kernel     dx = dy @ W            [M, N] x [N, K] -> [M, K]   grid (M/BM * K/BK,) grouped
                             (the input gradient of the backward: the same tile decoder, W walked along N,
                             so LoRA trains through the 4-bit base without a dequantized weight in memory)
    _nf4_dequantize_kernel   W (fp32 [N, K])   the tile decoder alone: the GEMMs' exact dequantized tiles, for
                             the tests (and a Triton dequantize_4bit)
All three call one @triton.jit helper, _dequant_tile, so what the tests check is what the GEMMs multiply.

Where a block starts (the ROW_ALIGNED constexpr)
    K % blocksize == 0 (every real model: Pythia's K are multiples of 256): a row is a whole number of
        blocks, row n's codes start at byte n*K/2, and a K step of BLOCK_K <= blocksize columns (the
        autotuner prunes larger ones) lies inside one block per row: one absmax per row per step, and the
        bytes load as a contiguous [BN, BK/2] tile.
    otherwise (e.g. K = 130): blocks run over the flattened weight, so a block can span two rows and an odd K
        puts a row's first code in a low nibble. Then every element computes its flat index e = n*K + k,
        loads byte e/2, picks nibble 1 - e%2 and absmax[e / blocksize]: gathers, slower, exact. Same results
        as the reference on every shape it takes (tests/test_nf4_kernels.py: K = 130, 67). Its K loop is not
        software-pipelined (LOOP_STAGES = 1): pipelining would stage every gathered [BN, BK] tile (bytes,
        codes, absmax) in shared memory, more than any GPU has per block, and its tiles are smaller.

Numbers: the decode is exact (CODE[q] * absmax in fp32, one IEEE multiply; the nested absmax CODE8[q8] *
nested + offset, a multiply and an add, kept apart: the launch sets enable_fp_fusion=False, so no FMA
contracts them and the fp32 weight tile is bit-identical to the reference's), then rounded to the compute
dtype once, round-to-nearest-even, as the reference's .to(dtype). The dot accumulates in fp32:
    DOT "native"   fp16 / bf16 on a GPU: tensor cores in the input dtype
        "tf32x3"   fp32 on a GPU: three TF32 tensor-core products per dot (hi*hi + hi*lo + lo*hi), ~fp32
                   accuracy; a plain fp32 tl.dot would round to TF32 (10 bits), an IEEE one runs on FMA units
        "ieee"     the interpreter: numpy fp32, after rounding the weight tile to the compute dtype (W_ROUND)
The interpreter keeps bf16 as raw uint16 bits (a bf16 tl.dot multiplies bit patterns, an fp32 -> bf16 cast
truncates), so there the bf16 weight tile is rounded by integer arithmetic on its fp32 bits (_round_to_bf16),
the dot runs in fp32 and torch rounds the fp32 output to bf16, as triton_int8_linear does.

Why no separate GEMV for M <= 16. bitsandbytes has one (functional.gemv_4bit, for one-token inputs) because its
other 4-bit path dequantizes W to memory first; this GEMM never does, so with BLOCK_M = 16 (the decode configs)
it already reads each packed byte once per call (one M tile), and the mostly idle 16-row MMA costs nothing next
to the weight bytes. What a GEMV could still win is parallelism: the smallest decode tiles (BLOCK_N = 32) give
N / 32 programs, 768 for GPT-NeoX-20B's 24576 outputs but 16 for Pythia-70m's 512, fewer than a GPU's SMs, where
a split-K kernel would keep more of them busy. Whether it beats these tiles is a measurement (a GPU run of
benchmarks/), not something to build blind; nothing here is more than one M tile for M <= 16.

The code books are read from 16 (and 256) fp32 values in global memory: one gathered load per element, served
from L1 (64 bytes). A select tree of constants would trade those loads for ~15 ALU ops per element; which is
faster is again for a GPU run to tell.

Launch specialization as in int8_matmul.py: M and its autotune bucket are do_not_specialize; offsets are int32
unless a tensor spans 2^31 elements (OFFSETS_64). Interpreter: one config with big tiles (BLOCK_K = 64, or 32
for blocksize 32), ~4 ms per program per K step.

How this was checked: in Triton's interpreter, the tiles bit-identical to nf4_reference.dequantize_4bit and the
outputs within 1e-5 of the PyTorch path (tests/test_nf4_kernels.py); every kernel and config compiled for sm_80,
sm_89 and sm_90 (minirlhf/kernels/compile_check.py: 0 spills, tensor-core MMA in the K loop). Never run on a GPU.
"""
import functools

import torch
import triton
import triton.language as tl

from minirlhf.kernels import nf4_reference as R
from minirlhf.kernels.int8_matmul import INTERPRET, SMEM_LIMIT, _device_guard, _needs_int64_offsets


# ----------------------------------------------------------------------------------------------
# the tile decoder
# ----------------------------------------------------------------------------------------------


@triton.jit
def _absmax_of(blk, mask, absmax_ptr, nested_ptr, offset_ptr, code8_ptr, DOUBLE_QUANT: tl.constexpr):
    """The fp32 absmax of blocks `blk` (any shape): stored, or CODE8[q8] * nested[blk / 256] + offset."""
    if DOUBLE_QUANT:
        q8 = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)  # uint8 codes of absmax - offset
        nested = tl.load(nested_ptr + blk // 256, mask=mask, other=0.0)  # fp32, one per 256 blocks
        absmax = tl.load(code8_ptr + q8) * nested + tl.load(offset_ptr)  # two roundings: no FMA (module docstring)
    else:
        absmax = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return absmax


@triton.jit
def _dequant_tile(w_ptr, absmax_ptr, nested_ptr, offset_ptr, code_ptr, code8_ptr, rows, col0, N, K,
                  BLOCK_C: tl.constexpr, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                  ROW_ALIGNED: tl.constexpr):
    """W[rows, col0 : col0 + BLOCK_C] as fp32 [R, BLOCK_C], decoded from the packed bytes; 0 outside [N, K].

    rows [R] (int32, or int64 with OFFSETS_64). col0 is a multiple of BLOCK_C and BLOCK_C <= BLOCKSIZE."""
    cols = col0 + tl.arange(0, BLOCK_C)
    row_ok = rows < N
    if ROW_ALIGNED:
        # K % BLOCKSIZE == 0: row n is bytes [n*K/2, (n+1)*K/2) and this tile lies inside one block per row
        half = col0 // 2 + tl.arange(0, BLOCK_C // 2)  # [C/2] byte columns
        packed = tl.load(w_ptr + rows[:, None] * (K // 2) + half[None, :],
                         mask=row_ok[:, None] & (half < K // 2)[None, :], other=0)  # uint8 [R, C/2]
        q = tl.interleave(packed >> 4, packed & 0xF).to(tl.int32)  # [R, C]: element 2j is the high nibble
        blk = rows * (K // BLOCKSIZE) + col0 // BLOCKSIZE  # [R]
        scale = _absmax_of(blk, row_ok, absmax_ptr, nested_ptr, offset_ptr, code8_ptr, DOUBLE_QUANT)  # [R]
        w = tl.load(code_ptr + q) * scale[:, None]
    else:
        # blocks over the flattened weight: each element finds its byte, nibble and block from e = n*K + k
        mask = row_ok[:, None] & (cols < K)[None, :]
        e = rows[:, None] * K + cols[None, :]  # [R, C] flat element index (int64 with OFFSETS_64)
        byte = tl.load(w_ptr + (e >> 1), mask=mask, other=0).to(tl.int32)
        q = (byte >> (4 - 4 * (e & 1)).to(tl.int32)) & 0xF  # even e: high nibble
        scale = _absmax_of(e // BLOCKSIZE, mask, absmax_ptr, nested_ptr, offset_ptr, code8_ptr, DOUBLE_QUANT)
        w = tl.where(mask, tl.load(code_ptr + q) * scale, 0.0)
    return w


@triton.jit
def _round_to_bf16(v):
    """fp32 -> the nearest bf16 value (ties to even), still as fp32, by integer arithmetic on the bits (finite
    v). Only the interpreter needs it: its fp32 -> bf16 cast truncates (module docstring)."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _dot(a, w, acc, DOT: tl.constexpr, W_ROUND: tl.constexpr):
    """acc [BM, BN] += a [BM, BK] @ w [BK, BN] with w fp32 (decoded), a in the compute dtype."""
    if DOT == "native":  # fp16 / bf16 tensor cores; the cast rounds to nearest even
        return tl.dot(a, w.to(a.dtype), acc)
    elif DOT == "tf32x3":  # fp32 inputs on a GPU
        return tl.dot(a, w, acc, input_precision="tf32x3")
    else:  # "ieee": the interpreter, numpy fp32 on the weight rounded to the compute dtype
        if W_ROUND == "fp16":
            w = w.to(tl.float16).to(tl.float32)
        elif W_ROUND == "bf16":
            w = _round_to_bf16(w)
        return tl.dot(a.to(tl.float32), w, acc, input_precision="ieee")


@triton.jit
def _grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Program id -> (row tile, column tile), GROUP_M row tiles sharing each column of W tiles while it is in L2."""
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    return first_pid_m + (pid % num_pid_in_group) % group_size_m, (pid % num_pid_in_group) // group_size_m


# ----------------------------------------------------------------------------------------------
# the GEMMs
# ----------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps). BLOCK_K <= blocksize (one absmax per row per step), so
# 64 for the default blocksize 64 and 32 for blocksize 32. BLOCK_M 16 / 32 serve decoding (see "no GEMV").
# The input-gradient kernel reads the same tuples with BLOCK_N as its reduction step over N and BLOCK_K as its
# output tile along K; its decoded tile is an MMA B operand in row-major order (a transposing shared-memory
# round trip on mma.sync), and the tiles that spilled there are left out of its list. fp32 inputs have lists
# of their own: tf32x3 splits both operands in two. Every tile kept compiled spill-free for sm_80/89/90 in
# both absmax formats; what spilled and left the lists: README, "The NF4 kernels" under the GPU section.
_FORWARD_TILES = [
    (128, 128, 64, 3, 8),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (64, 64, 32, 4, 4),
    (32, 128, 64, 4, 4),
    (16, 128, 64, 4, 4),
    (16, 64, 64, 4, 4),
    (16, 32, 64, 4, 2),
    (16, 64, 32, 4, 2),
]
_GRAD_INPUT_TILES = [t for t in _FORWARD_TILES if t not in ((64, 128, 64, 4, 4), (16, 32, 64, 4, 2))]
_FP32_FORWARD_TILES = [
    (64, 64, 32, 4, 4),
    (16, 64, 64, 4, 4),
    (16, 32, 64, 4, 2),
    (16, 32, 32, 4, 2),
]
_FP32_GRAD_INPUT_TILES = _FP32_FORWARD_TILES[1:]
# K % blocksize != 0: the flat-index decoder holds an index, a byte and an absmax per decoded element, so its
# decoded tiles [BN, BK] are kept to 2048 elements (larger ones spilled)
_RAGGED_MAX_TILE = 2048


def _gemm_configs():
    if INTERPRET:  # big tiles, no autotuning (it would time kernels with CUDA events); BLOCK_K by blocksize
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=4, num_stages=1)
                for bk in (64, 32)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
            for bm, bn, bk, s, w in dict.fromkeys(_FORWARD_TILES + _FP32_FORWARD_TILES)]


def nf4_configs_for(configs, blocksize: int, arch: int | None, dtype=torch.float16, transposed=False,
                    ragged=False):
    """The configs a launch may use: BLOCK_K <= blocksize; on a GPU of compute capability `arch` the tiles of
    the kernel's and dtype's list (decoded tiles of at most 2048 elements for a ragged K) whose shared memory
    fits, estimated as num_stages copies of the pipelined input tile and packed bytes plus two of the decoded
    tile (compile_check.py measures the real figure). In the interpreter (arch None) the single largest
    BLOCK_K that fits."""
    kept = [c for c in configs if c.kwargs["BLOCK_K"] <= blocksize]
    if arch is None:
        return kept[:1]
    if dtype == torch.float32:
        tiles = _FP32_GRAD_INPUT_TILES if transposed else _FP32_FORWARD_TILES
    else:
        tiles = _GRAD_INPUT_TILES if transposed else _FORWARD_TILES
    tiles = {t[:3] + (t[4],) for t in tiles}
    limit = SMEM_LIMIT.get(arch, min(SMEM_LIMIT.values()))
    size = torch.empty((), dtype=dtype).element_size()
    out = []
    for c in kept:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if (bm, bn, bk, c.num_warps) not in tiles or (ragged and bn * bk > _RAGGED_MAX_TILE):
            continue
        inputs = bm * (bn if transposed else bk) * size  # dy [BM, BN] or x [BM, BK]
        if c.num_stages * (inputs + bn * bk // 2) + 2 * bn * bk * size <= limit:
            out.append(c)
    return out


def _prune(configs, named_args, **kwargs):
    if INTERPRET:
        return nf4_configs_for(configs, kwargs["BLOCKSIZE"], None)
    out = named_args["out_ptr"]
    major, minor = torch.cuda.get_device_capability(out.device)
    return nf4_configs_for(configs, kwargs["BLOCKSIZE"], 10 * major + minor, out.dtype, "dy_ptr" in named_args,
                           not kwargs["ROW_ALIGNED"])


_KEY = ["M_BUCKET", "N", "K", "BLOCKSIZE", "DOUBLE_QUANT", "ROW_ALIGNED", "DOT", "W_ROUND", "OFFSETS_64"]


@triton.autotune(configs=_gemm_configs(), key=_KEY + ["HAS_BIAS"], prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _nf4_matmul_kernel(
    x_ptr, w_ptr, absmax_ptr, nested_ptr, offset_ptr, code_ptr, code8_ptr, bias_ptr, out_ptr,
    M, N, K, M_BUCKET, stride_xm, stride_xk, stride_om, stride_on,
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ROW_ALIGNED: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT: tl.constexpr, W_ROUND: tl.constexpr, OFFSETS_64: tl.constexpr, LOOP_STAGES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # y [M, N] = x [M, K] @ W^T [K, N] (+ b)
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] tokens
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] output features = rows of W
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    if OFFSETS_64:
        rm = rm.to(tl.int64)
        rn = rn.to(tl.int64)
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk  # [BM, BK]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=LOOP_STAGES):
        x = tl.load(x_ptrs, mask=m_mask[:, None] & ((k0 + rk) < K)[None, :], other=0.0)
        w = _dequant_tile(w_ptr, absmax_ptr, nested_ptr, offset_ptr, code_ptr, code8_ptr, rn, k0, N, K,
                          BLOCK_K, BLOCKSIZE, DOUBLE_QUANT, ROW_ALIGNED)  # fp32 [BN, BK]
        acc = _dot(x, tl.trans(w), acc, DOT, W_ROUND)
        x_ptrs += BLOCK_K * stride_xk
    n_mask = rn < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.autotune(configs=_gemm_configs(), key=_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _nf4_matmul_t_kernel(
    dy_ptr, w_ptr, absmax_ptr, nested_ptr, offset_ptr, code_ptr, code8_ptr, out_ptr,
    M, N, K, M_BUCKET, stride_dm, stride_dn, stride_om, stride_ok,
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ROW_ALIGNED: tl.constexpr,
    DOT: tl.constexpr, W_ROUND: tl.constexpr, OFFSETS_64: tl.constexpr, LOOP_STAGES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # dx [M, K] = dy [M, N] @ W [N, K]: output tiles [BM, BK], the reduction walks W's rows BLOCK_N at a time
    pid_m, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] tokens
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK] input features = columns of W
    rn = tl.arange(0, BLOCK_N)
    m_mask = rm < M
    if OFFSETS_64:
        rm = rm.to(tl.int64)
        rn = rn.to(tl.int64)
    dy_ptrs = dy_ptr + rm[:, None] * stride_dm + rn[None, :] * stride_dn  # [BM, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in tl.range(0, N, BLOCK_N, num_stages=LOOP_STAGES):
        dy = tl.load(dy_ptrs, mask=m_mask[:, None] & ((n0 + rn) < N)[None, :], other=0.0)
        w = _dequant_tile(w_ptr, absmax_ptr, nested_ptr, offset_ptr, code_ptr, code8_ptr, n0 + rn,
                          pid_k * BLOCK_K, N, K, BLOCK_K, BLOCKSIZE, DOUBLE_QUANT, ROW_ALIGNED)  # fp32 [BN, BK]
        acc = _dot(dy, w, acc, DOT, W_ROUND)
        dy_ptrs += BLOCK_N * stride_dn
    out_ptrs = out_ptr + rm[:, None] * stride_om + rk[None, :] * stride_ok
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & (rk < K)[None, :])


@triton.jit
def _nf4_dequantize_kernel(
    w_ptr, absmax_ptr, nested_ptr, offset_ptr, code_ptr, code8_ptr, out_ptr, N, K,
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ROW_ALIGNED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # out [N, K] fp32 = the tiles _dequant_tile gives the GEMMs
    rn = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # a test kernel: int64 always
    k0 = tl.program_id(1) * BLOCK_K
    rk = k0 + tl.arange(0, BLOCK_K)
    w = _dequant_tile(w_ptr, absmax_ptr, nested_ptr, offset_ptr, code_ptr, code8_ptr, rn, k0, N, K,
                      BLOCK_K, BLOCKSIZE, DOUBLE_QUANT, ROW_ALIGNED)
    tl.store(out_ptr + rn[:, None] * K + rk[None, :], w, mask=(rn < N)[:, None] & (rk < K)[None, :])


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _code_books(quant_type: str, device: torch.device):
    """(the 16-value 4-bit code book, the 256-value dynamic map) as fp32 tensors on `device`, made once."""
    return R.code_4bit(quant_type).to(device), R.dynamic_code().to(device)


def _quant_state(x, weight, absmax, nested_absmax, offset, shape, blocksize, quant_type):
    """Check the stored tensors against shape [N, K] and x's device (one-line errors naming the tensor) and
    return them as launch_state."""
    N, K = shape
    R._check_blocksize(blocksize)
    blocks = -(-(N * K) // blocksize)
    if not (x.is_cuda or INTERPRET):
        raise ValueError(f"the Triton NF4 kernels need CUDA tensors (or TRITON_INTERPRET=1), got x on {x.device}")
    if weight.dtype != torch.uint8 or weight.numel() != (N * K + 1) // 2:
        raise ValueError(f"weight must be packed uint8 with {(N * K + 1) // 2} bytes for shape {tuple(shape)}, "
                         f"got {weight.dtype} {tuple(weight.shape)}")
    double_quant = nested_absmax is not None
    want = torch.uint8 if double_quant else torch.float32
    if absmax.dtype != want or absmax.numel() != blocks:
        raise ValueError(f"absmax must be {want} with {blocks} blocks, got {absmax.dtype} {tuple(absmax.shape)}")
    for name, t in (("weight", weight), ("absmax", absmax), ("nested_absmax", nested_absmax), ("offset", offset)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    code, code8 = _code_books(quant_type, x.device)
    return launch_state(absmax, nested_absmax, offset, code, code8)


def launch_state(absmax, nested_absmax, offset, code, code8):
    """The five quantization-state pointers every kernel takes: (absmax, nested, offset, code, code8).
    Without double quantization nested and offset are never read (DOUBLE_QUANT=False): code8 stands in."""
    if nested_absmax is None:
        return absmax.contiguous(), code8, code8, code, code8
    return absmax.contiguous(), nested_absmax.float().contiguous(), offset.float().reshape(1), code, code8


def _dot_mode(dtype):
    """(DOT, W_ROUND) for compute dtype `dtype` (module docstring)."""
    if INTERPRET:
        return "ieee", {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "none")
    return ("tf32x3" if dtype == torch.float32 else "native"), "none"


def _gemm_launch(x2, weight, state, shape, blocksize, bias, out, transposed=False):
    """One GEMM launch as (kernel, grid, args, kwargs), shared by the host functions and compile_check.py.
    Forward: x2 [M, K] -> out [M, N]; transposed (the input gradient): x2 = dy [M, N] -> out [M, K]."""
    N, K = shape
    M = x2.shape[0]
    dot, w_round = _dot_mode(x2.dtype)
    consts = dict(BLOCKSIZE=blocksize, DOUBLE_QUANT=state[0].dtype == torch.uint8, ROW_ALIGNED=K % blocksize == 0,
                  DOT=dot, W_ROUND=w_round, OFFSETS_64=_needs_int64_offsets(x2, out, weight) or N * K >= 2**31,
                  LOOP_STAGES=None if K % blocksize == 0 else 1,  # ragged K: the gathers are not pipelined
                  enable_fp_fusion=False)  # no FMA in the nested absmax (module docstring)
    m_bucket = min(triton.next_power_of_2(M), 4096)  # autotune per power-of-2 bucket of M
    if transposed:
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)

        args = (x2, weight, *state, out, M, N, K, m_bucket, x2.stride(0), x2.stride(1), out.stride(0), out.stride(1))
        return _nf4_matmul_t_kernel, grid, args, consts

    def grid(meta):  # noqa: F811 -- one grid per branch
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    args = (x2, weight, *state, bias if bias is not None else state[4], out,
            M, N, K, m_bucket, x2.stride(0), x2.stride(1), out.stride(0), out.stride(1))
    return _nf4_matmul_kernel, grid, args, dict(consts, HAS_BIAS=bias is not None)


def _run_gemm(x, weight, absmax, nested_absmax, offset, shape, blocksize, quant_type, bias, transposed):
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the Triton NF4 kernels expect an fp32/fp16/bf16 input, got {x.dtype}")
    N, K = shape
    width_in, width_out = (N, K) if transposed else (K, N)
    if x.shape[-1] != width_in:
        raise ValueError(f"x has {x.shape[-1]} features but the 4-bit weight is {tuple(shape)}")
    state = _quant_state(x, weight, absmax, nested_absmax, offset, shape, blocksize, quant_type)
    if bias is not None:
        if tuple(bias.shape) != (N,) or bias.device != x.device:
            raise ValueError(f"bias must be a float tensor of shape ({N},) on {x.device}, got {tuple(bias.shape)}")
        bias = bias.to(x.dtype).contiguous()  # added in the compute dtype's value, as F.linear would
    lead_shape = x.shape[:-1]
    x2 = x.reshape(-1, width_in)  # [M, width_in], a view when x is contiguous
    bf16_interpreted = INTERPRET and x.dtype == torch.bfloat16  # the interpreter stores bf16 as truncated bits
    with _device_guard(x):
        out = torch.empty(x2.shape[0], width_out, dtype=torch.float32 if bf16_interpreted else x.dtype,
                          device=x.device)
        if x2.shape[0] > 0:
            kernel, grid, args, kwargs = _gemm_launch(x2, weight, state, shape, blocksize, bias, out, transposed)
            kernel[grid](*args, **kwargs)
    return out.to(x.dtype).reshape(*lead_shape, width_out)


def triton_nf4_linear(x, weight, absmax, nested_absmax, offset, shape, blocksize=64, quant_type="nf4", bias=None):
    """x [..., K] (fp32/fp16/bf16, the compute dtype) -> x @ dequantize(W)^T + b: [..., N] in x.dtype.

    weight: packed uint8 [ceil(N*K / 2), 1]; absmax fp32 [blocks], or with double quantization uint8 [blocks]
    plus nested_absmax fp32 [ceil(blocks / 256)] and offset fp32 [] (None without); shape = (N, K)."""
    return _run_gemm(x, weight, absmax, nested_absmax, offset, shape, blocksize, quant_type, bias, False)


def triton_nf4_grad_input(grad_out, weight, absmax, nested_absmax, offset, shape, blocksize=64, quant_type="nf4"):
    """dL/dx = grad_out [..., N] @ dequantize(W) [N, K] -> [..., K] in grad_out.dtype (the backward's GEMM)."""
    return _run_gemm(grad_out, weight, absmax, nested_absmax, offset, shape, blocksize, quant_type, None, True)


_DEQUANT_BLOCK_N = 32


def triton_dequantize_4bit(weight, absmax, nested_absmax, offset, shape, blocksize=64, quant_type="nf4"):
    """The weight [N, K] in fp32, decoded tile by tile with the GEMMs' own decoder (_dequant_tile)."""
    N, K = shape
    state = _quant_state(weight, weight, absmax, nested_absmax, offset, shape, blocksize, quant_type)
    block_k = min(64, blocksize)
    with _device_guard(weight):
        out = torch.empty(N, K, dtype=torch.float32, device=weight.device)
        grid = (triton.cdiv(N, _DEQUANT_BLOCK_N), triton.cdiv(K, block_k))
        _nf4_dequantize_kernel[grid](weight, *state, out, N, K, BLOCKSIZE=blocksize,
                                     DOUBLE_QUANT=nested_absmax is not None, ROW_ALIGNED=K % blocksize == 0,
                                     BLOCK_N=_DEQUANT_BLOCK_N, BLOCK_K=block_k, enable_fp_fusion=False)
    return out


__all__ = ["triton_nf4_linear", "triton_nf4_grad_input", "triton_dequantize_4bit", "nf4_configs_for", "launch_state"]
