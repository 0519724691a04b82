"""kernels/nf4_reference.py against bitsandbytes 0.50.2's quantize_4bit / dequantize_4bit on CPU (the oracle).

Bit-identical (torch.equal): the code books, the packed 4-bit codes, the plain fp32 absmax, the dequantized
weights, and for double quantization the offset, the 8-bit absmax codes, the nested fp32 absmax and the
dequantization of a nested state. The 8-bit codes are bitsandbytes' lookup-table codes (not the exact nearest
ones), so they are also checked on values placed next to the table's bin edges, where the two differ.
"""
import logging

import pytest
import torch

from minirlhf.kernels import nf4_reference as R

import bitsandbytes.functional as BF  # the oracle: bitsandbytes==0.50.2 from the [test] extra
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

CASES = [((96, 130), 64), ((33, 77), 64), ((300, 257), 32), ((1001,), 128), ((50, 3000), 4096), ((64, 65), 2048)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


def test_code_books_are_bitsandbytes():
    assert torch.equal(R.NF4_CODE, BF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(R.FP4_CODE, BF.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(R.dynamic_code(), BF.create_dynamic_map())
    # NF4 from normal quantiles: torch's ndtri vs the scipy-computed table, measured 1.2e-7
    assert (R.normal_code() - R.NF4_CODE).abs().max().item() <= 2e-7


@pytest.mark.parametrize("quant_type", R.QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, blocksize", CASES, ids=str)
def test_quantize_and_dequantize_are_bitsandbytes(quant_type, dtype, shape, blocksize):
    w = weight(shape, dtype)
    packed, absmax = R.quantize_4bit(w, blocksize, quant_type)
    ref, state = BF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=False)
    assert packed.dtype == torch.uint8 and packed.shape == ref.shape == ((w.numel() + 1) // 2, 1)
    assert torch.equal(packed, ref)
    assert torch.equal(absmax, state.absmax)
    out = R.dequantize_4bit(packed, absmax, shape, blocksize, quant_type, dtype)
    assert out.dtype == dtype and torch.equal(out, BF.dequantize_4bit(ref, state))
    fast = R.dequantize_4bit_pairs(packed, absmax, shape, blocksize, quant_type, dtype)  # NF4Linear's CPU path
    assert fast.dtype == dtype and fast.shape == out.shape and torch.equal(fast, out)


@pytest.mark.parametrize("quant_type", R.QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, blocksize", CASES, ids=str)
def test_double_quantization_is_bitsandbytes(quant_type, dtype, shape, blocksize):
    w = weight(shape, dtype)
    packed, absmax = R.quantize_4bit(w, blocksize, quant_type)
    ref, state = BF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=True)
    assert torch.equal(packed, ref)
    codes, nested, offset = R.double_quantize(absmax)
    assert codes.dtype == torch.uint8 and torch.equal(codes, state.absmax)
    assert torch.equal(offset, state.offset) and torch.equal(nested, state.state2.absmax)
    # dequantizing the nested state: bit-identical, and so is the whole weight from it
    ours = R.dequantize_absmax(codes, nested, offset)
    assert torch.equal(ours, BF.dequantize_blockwise(state.absmax, state.state2) + state.offset)
    assert torch.equal(R.dequantize_4bit(packed, ours, shape, blocksize, quant_type, dtype),
                       BF.dequantize_4bit(ref, state))
    assert torch.equal(R.dequantize_4bit_pairs(packed, ours, shape, blocksize, quant_type, dtype),
                       BF.dequantize_4bit(ref, state))  # the fast CPU path too


def near_bin_edges(n, blocksize, seed=0):
    """n fp32 values: in each block a 1.0 (so the block's scale is 1 and its values are quantized as they are)
    and values 0 to 3 ulps either side of an edge between two lookup-table bins with different codes (where a
    lookup and an exact nearest-code search can disagree), mixed with uniform ones; the second block (if
    any) all 0."""
    lut = R.lookup_table(R.dynamic_code())
    edges = (lut[1:] != lut[:-1]).nonzero().flatten().double()  # bins k and k + 1 hold different codes
    steps = [((edges + 0.5) / (R.LUT_SIZE - 1) * 2 - 1).float()]  # the edges' midpoints, in [-1, 1]
    for direction in (2.0, -2.0):
        t = steps[0]
        for _ in range(3):
            t = torch.nextafter(t, torch.tensor(direction))
            steps.append(t)
    g = torch.Generator().manual_seed(seed)
    pool = torch.cat(steps + [torch.rand(2000, generator=g) * 2 - 1])
    x = pool[torch.randint(pool.numel(), (n,), generator=g)]
    x[::blocksize] = 1.0
    x[blocksize: 2 * blocksize] = 0.0
    return x


@pytest.mark.parametrize("n, blocksize", [(256 * 40, 256), (1000, 256), (77, 256), (4097, 64)], ids=str)
def test_8bit_blockwise_codes_are_bitsandbytes(n, blocksize):
    x = near_bin_edges(n, blocksize)
    codes, absmax = R.quantize_8bit(x, R.dynamic_code(), blocksize)
    ref, state = BF.quantize_blockwise(x, blocksize=blocksize)
    assert torch.equal(absmax, state.absmax)
    assert torch.equal(codes, ref), (codes != ref).sum().item()
    # and the lookup is not an exact nearest search: on these inputs some codes are the farther neighbour
    # (blocks of scale 1, so the values are their own normalized values; the all-zero block left out)
    code = R.dynamic_code()
    nearest = (x[:, None] - code[None, :]).abs().argmin(dim=1)
    scaled = absmax.repeat_interleave(blocksize)[:n] == 1
    assert (nearest != codes.long())[scaled].any()


def test_an_odd_element_count_pads_one_code_for_zero():
    w = weight((7, 9), torch.float32)
    packed, _ = R.quantize_4bit(w, 64, "nf4")
    assert packed.shape == (32, 1) and (packed[-1, 0] & 0xF).item() == 7  # NF4_CODE[7] == 0.0


def test_an_all_zero_block_gives_zero_codes_not_nan():
    w = torch.zeros(128)
    w[64:] = torch.linspace(-1, 1, 64)
    packed, absmax = R.quantize_4bit(w, 64, "nf4")
    out = R.dequantize_4bit(packed, absmax, w.shape)
    assert absmax[0].item() == 0.0 and torch.equal(out[:64], torch.zeros(64))


def test_bad_blocksize_and_quant_type_are_one_line_errors():
    with pytest.raises(ValueError, match="^blocksize must be one of 32, 64, 128, 256, 512, 1024, 2048, 4096, got 48$"):
        R.quantize_4bit(torch.ones(64), 48)
    with pytest.raises(ValueError, match="^quant_type must be 'nf4' or 'fp4', got 'int4'$"):
        R.quantize_4bit(torch.ones(64), 64, "int4")
