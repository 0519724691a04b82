"""Blockwise 4-bit quantization (NF4 and FP4, QLoRA's storage format) in plain PyTorch: the spec and the CPU path.

Paper: Dettmers, Pagnoni, Holtzman, Zettlemoyer, "QLoRA: Efficient Finetuning of Quantized LLMs",
NeurIPS 2023, arXiv:2305.14314. Bit-identical to bitsandbytes 0.50's quantize_4bit / dequantize_4bit on
CPU (tests/test_nf4_reference.py checks codes, absmax, nested state and dequantized weights).

The idea
--------
A weight W is flattened and cut into blocks of `blocksize` consecutive elements (64 by default; the last
block may be shorter). Each block is divided by its own absmax, so every value lands in [-1, 1], and each
value is replaced by the index of the nearest of 16 fixed numbers, a 4-bit code. Two codes share one byte.

    absmax[b]   = max |w| over block b                                          fp32 [blocks]
    q[i]        = argmin_j |w[i] / absmax[b(i)] - CODE[j]|                       4 bits
    w'[i]       = CODE[q[i]] * absmax[b(i)]                                      (dequantized)

The code books (16 values each, in [-1, 1])
  NF4 (NormalFloat): pretrained weights are close to normally distributed, so put the 16 levels at quantiles
      of N(0, 1), equal probability mass between neighbours, scaled so the extremes are +-1. bitsandbytes
      uses 8 quantiles for the positive half and 7 for the negative one (offset 0.9677 = the mean of the
      two quantiles 1 - 1/(2*15) and 1 - 1/(2*16)), so that 0 is exactly representable (padding and zero
      weights round-trip); normal_code() derives the table, NF4_CODE is bitsandbytes' fp32 table.
  FP4: a tiny float, 1 sign, 2 exponent, 1 mantissa bit, with values {0, 0.0625, 2, 3, 4, 6, 8, 12} / 12
      in bit-pattern order (index 8 is -0: the sign bit with a zero magnitude).

Double quantization (QLoRA section 3): the absmaxes themselves cost 32 bits per block. Subtract their mean
(offset, fp32) and quantize the differences to 8 bits, blockwise again with 256 per block, with the 8-bit
"dynamic" code book (dynamic_code(): a sign, a run of zeros that sets a power of ten, then a fraction).

The memory arithmetic, bits per weight
    plain:      4 + 32/64                       = 4.5      (blocksize 64: one fp32 absmax per block)
    double:     4 + 8/64 + 32/(64*256)          = 4.127    (8-bit absmax, one fp32 per 256 of those)
    (+ one fp32 offset per tensor; int8 for comparison: 8 + 32/in_features)

Matching bitsandbytes 0.50 on CPU (backends/default/ops.py quantize_4bit; csrc/cpu_ops.cpp, common.cpp)
--------------------------------------------------------------------------------------------------------
  * Full blocks are scaled as w * (1 / absmax) (a reciprocal, then a product: not a correctly rounded
    division), the last, short block as w / absmax (a division); both clamped to [-1, 1]. absmax is clamped
    to >= 1e-38 for the scaling only, so an all-zero block gives codes for 0, not NaN.
  * The nearest code is found by bucketing at the midpoints between sorted code values; a value exactly on
    a midpoint goes to the lower one. FP4's sorted order puts +0 (index 0) before -0 (index 8), so a value
    in (0, first midpoint] gets code 8 (-0) and one in [-first midpoint, 0] gets code 0.
  * Packing: element 2k is the high nibble, 2k + 1 the low nibble of byte k, over the flattened tensor; an
    odd element count is padded with one code for 0.0 (bucketed like any other value).
  * Double quantization: x = absmax - mean(absmax); per 256-block s = max |x| and n = x * (1 / s), clamped
    to [-1, 1]. bitsandbytes' CPU C quantizer (cquantize_blockwise_cpu_fp32, csrc/cpu_ops.cpp) does not search
    the 8-bit code book for each value: it reads a 65,536-entry lookup table. Entry i holds the nearest code
    (the lower one on a tie) of the grid point g_i = -1 + 2i / 65535, and a value n reads the entry of the
    grid point nearest to it, i = trunc((n + 1) * 0.5 * 65535 + 0.5), all in fp32. So a value within half a
    grid step (1.5e-5) of a midpoint between two codes may get the farther code, and the codes closer together
    than a grid step (the smallest, near 0) are not all reachable. We build the same table (lookup_table) and
    read it the same way: our 8-bit codes are bitsandbytes' codes, bit for bit. An all-zero 256-block gets
    code 0 (its scale is 0, so it dequantizes to the offset).
  * Dequantization is CODE[q] * absmax in fp32, rounded once to the output dtype (round to nearest even).
    A nested absmax is CODE8[q] * s + offset in fp32.

The CPU path (dequantize_4bit_pairs): the same numbers, bit for bit, faster. dequantize_4bit above is the spec:
unpack every code to an int32, then gather each from the 16-value code book, two passes over 4 bytes per
weight. A byte holds two codes, so a 256-entry table of value *pairs* (pair_table: byte -> CODE[hi], CODE[lo]
as one 8-byte word) turns that into one gather per byte, indexed by the packed bytes themselves: half the
gathers, a 2 KB table that stays in L1. And it runs over the weight in chunks of CHUNK bytes: a chunk's int32
indices and fp32 values (768 KB) stay in the L2 cache while they are scaled and rounded into the output, so
the only large tensor written is the weight in its dtype, and the transient is that weight plus 12 * CHUNK
bytes, not 6 bytes a weight. (Measured in benchmarks/bench_nf4.py; the README's 4-bit table.)
"""
import math

import torch

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts
NESTED_BLOCKSIZE = 256  # double quantization: absmaxes per second-level block
QUANT_TYPES = ("nf4", "fp4")

# bitsandbytes' NF4 table (functional.get_4bit_type("nf4")), exactly as fp32.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)
# FP4 magnitudes in bit-pattern order (2 exponent bits, 1 mantissa bit, exponent bias 2; 0b001 subnormal),
# then the same with the sign bit set; divided by the largest, 12.
FP4_CODE = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                         -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0], dtype=torch.float32) / 12.0


def normal_code(offset: float = 0.9677083) -> torch.Tensor:
    """NF4 derived from normal quantiles (fp32 [16], sorted): 8 positive quantiles of N(0, 1) between
    probabilities 0.5 and `offset`, 7 negative ones, and 0, divided by the largest. Equals NF4_CODE to
    ~1e-7 (the table was computed with scipy's ppf; torch's ndtri differs in the last bits)."""
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])  # 8 values
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])  # 7 values
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return (values / values.max()).float()


def code_4bit(quant_type: str) -> torch.Tensor:
    """The 16-value code book (fp32 [16]) of "nf4" or "fp4"."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    return NF4_CODE if quant_type == "nf4" else FP4_CODE


def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(), fp32 [256], sorted). For i = 0..6, 2^i fractions (midpoints of a linspace(0.1, 1) grid) times
    10^(i - 6), each with both signs: 254 values, plus 0 and 1."""
    data = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


_DYNAMIC_CODE = dynamic_code()  # built once: dequantize_absmax runs in every NF4Linear forward and backward


def _check_blocksize(blocksize: int) -> None:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {', '.join(map(str, BLOCKSIZES))}, got {blocksize}")


def block_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """fp32 [n] -> the absmax of each block of `blocksize` (the last one may be short): fp32 [ceil(n / bs)]."""
    n = flat.numel()
    full = n - n % blocksize
    absmax = flat[:full].reshape(-1, blocksize).abs().amax(dim=1)
    if full < n:
        absmax = torch.cat([absmax, flat[full:].abs().amax().reshape(1)])
    return absmax


def quantize_4bit(weight: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"):
    """A float tensor (any shape, fp32/bf16/fp16) -> (packed uint8 [ceil(n / 2), 1], absmax fp32 [blocks]).

    Codes are indices into code_4bit(quant_type); two per byte, the even element in the high nibble."""
    _check_blocksize(blocksize)
    code = code_4bit(quant_type).to(weight.device)
    flat = weight.reshape(-1).float()  # [n]
    n = flat.numel()
    full = n - n % blocksize
    absmax = block_absmax(flat, blocksize)
    safe = absmax.clamp(min=1e-38)  # an all-zero block scales to zeros, not 0/0
    scaled = (flat[:full].reshape(-1, blocksize) * (1.0 / safe[: full // blocksize, None])).reshape(-1)
    if full < n:
        scaled = torch.cat([scaled, flat[full:] / safe[-1]])  # the short block divides (bitsandbytes does)
    scaled = scaled.clamp(-1, 1)
    if n % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))  # one more value, 0.0, fills the last low nibble
    order = torch.argsort(code, stable=True)  # sorted position -> code index (identity for NF4)
    midpoints = (code[order[:-1]] + code[order[1:]]) / 2  # [15]
    q = order[torch.bucketize(scaled, midpoints)].to(torch.uint8)  # on a midpoint: the lower code
    packed = (q[0::2] << 4) | q[1::2]  # [ceil(n / 2)]
    return packed.unsqueeze(1), absmax


def pair_table(quant_type: str) -> torch.Tensor:
    """int64 [256]: byte b -> the fp32 bit patterns of (CODE[b >> 4], CODE[b & 15]) side by side in one 8-byte
    word, in memory order, so that gathering words with the packed bytes and viewing the result as fp32 gives
    the codes' values in element order (the even element, the high nibble, first)."""
    code = code_4bit(quant_type)
    byte = torch.arange(256)
    pairs = torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1)  # fp32 [256, 2], contiguous
    return pairs.view(torch.int64).reshape(256)


_PAIR_TABLES = {quant_type: pair_table(quant_type) for quant_type in QUANT_TYPES}
CHUNK = 1 << 16  # packed bytes per step of dequantize_4bit_pairs: 128K weights; a multiple of every blocksize / 2


def dequantize_4bit_pairs(packed: torch.Tensor, absmax: torch.Tensor, shape, blocksize: int = 64,
                          quant_type: str = "nf4", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """dequantize_4bit's result, bit for bit, with one 8-byte gather per packed byte (pair_table) instead of an
    int32 unpack and a gather per element, CHUNK bytes at a time: the CPU path of NF4Linear."""
    _check_blocksize(blocksize)
    code_4bit(quant_type)  # the one-line error for an unknown quant type
    n = math.prod(shape)
    table = _PAIR_TABLES[quant_type].to(packed.device)
    flat = packed.reshape(-1)  # uint8 [ceil(n / 2)]
    out = torch.empty(n, dtype=dtype, device=packed.device)
    for start in range(0, flat.numel(), CHUNK):
        first = 2 * start  # the chunk's first weight: a block boundary, since CHUNK is a multiple of blocksize / 2
        words = table.index_select(0, flat[start:start + CHUNK].int())  # int64 [<= CHUNK]: two fp32 values each
        values = words.view(torch.float32)[: n - first]  # fp32 [<= 2 CHUNK] (the last drops an odd n's padding)
        _scale_blocks(values, absmax[first // blocksize:], blocksize)
        out[first:first + values.numel()].copy_(values)  # the one rounding to dtype
    return out.reshape(shape)


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """packed uint8 [ceil(n / 2), 1] -> the n codes as int32 [n] (int32: what indexing a code book takes)."""
    packed = packed.reshape(-1)
    codes = torch.empty(packed.numel() * 2, dtype=torch.int32, device=packed.device)
    codes[0::2] = packed >> 4
    codes[1::2] = packed & 0xF
    return codes[:n]


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, shape, blocksize: int = 64,
                    quant_type: str = "nf4", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(packed uint8, absmax fp32 [blocks]) -> the tensor of `shape` in `dtype`: CODE[q] * absmax in fp32,
    rounded once to dtype."""
    _check_blocksize(blocksize)
    n = 1
    for s in shape:
        n *= s
    values = code_4bit(quant_type).to(packed.device)[unpack_4bit(packed, n)]  # fp32 [n]
    return _scale_blocks(values, absmax, blocksize).reshape(shape).to(dtype)


def _scale_blocks(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values fp32 [n] times the absmax of their block (in place); the last block may be short."""
    n = values.numel()
    full = n - n % blocksize
    values[:full].view(-1, blocksize).mul_(absmax[: full // blocksize, None])
    if full < n:
        values[full:].mul_(absmax[-1])
    return values


LUT_SIZE = 65536  # grid points of bitsandbytes' CPU 8-bit quantizer over [-1, 1]


def lookup_table(code: torch.Tensor) -> torch.Tensor:
    """For a sorted fp32 code book [256]: int64 [LUT_SIZE], entry i = the nearest code to the grid point
    -1 + 2i / (LUT_SIZE - 1), the lower one on a tie (= how many midpoints lie strictly below the point)."""
    midpoints = 0.5 * (code[:-1] + code[1:])  # [255]
    grid = -1.0 + (2.0 * torch.arange(LUT_SIZE, dtype=torch.float32, device=code.device)) / (LUT_SIZE - 1)
    return torch.searchsorted(midpoints, grid)  # left: the first midpoint >= the grid point


def quantize_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE):
    """fp32 [n] -> (codes uint8 [n], absmax fp32 [ceil(n / blocksize)]), as bitsandbytes' CPU quantize_blockwise:
    each block times 1 / its absmax, clamped to [-1, 1], rounded to the nearest of LUT_SIZE grid points, and
    that point's nearest code read from lookup_table(code)."""
    absmax = block_absmax(x, blocksize)
    inverse = torch.where(absmax > 0, 1.0 / absmax, 0.0)  # a reciprocal, then a product, as the C code does
    normed = (x * inverse.repeat_interleave(blocksize)[: x.numel()]).clamp(-1, 1)  # [n]
    point = ((normed + 1.0) * 0.5 * (LUT_SIZE - 1) + 0.5).long()  # fp32 arithmetic, truncated: the nearest point
    codes = lookup_table(code)[point]
    codes[(absmax == 0).repeat_interleave(blocksize)[: x.numel()]] = 0  # what the C code writes for a zero block
    return codes.to(torch.uint8), absmax


def double_quantize(absmax: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE):
    """fp32 absmax [blocks] -> (codes uint8 [blocks], nested absmax fp32 [ceil(blocks / 256)], offset fp32 []).

    absmax - offset (its mean) is quantized to the 8-bit dynamic code book, blockwise (quantize_8bit)."""
    offset = absmax.mean()
    codes, nested = quantize_8bit(absmax - offset, dynamic_code().to(absmax.device), blocksize)
    return codes, nested, offset


def dequantize_absmax(codes: torch.Tensor, nested: torch.Tensor, offset: torch.Tensor,
                      blocksize: int = NESTED_BLOCKSIZE) -> torch.Tensor:
    """Undo double_quantize: CODE8[q] * nested absmax + offset, fp32 [blocks]."""
    values = _DYNAMIC_CODE.to(codes.device).index_select(0, codes.int())  # fp32 [blocks]
    return _scale_blocks(values, nested, blocksize) + offset


__all__ = ["BLOCKSIZES", "NESTED_BLOCKSIZE", "QUANT_TYPES", "NF4_CODE", "FP4_CODE", "normal_code", "code_4bit",
           "dynamic_code", "block_absmax", "quantize_4bit", "pair_table", "CHUNK", "dequantize_4bit_pairs",
           "unpack_4bit", "dequantize_4bit", "LUT_SIZE", "lookup_table", "quantize_8bit", "double_quantize",
           "dequantize_absmax"]
