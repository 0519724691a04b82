"""kernels/nf4_reference.py against bitsandbytes 0.50.2's quantize_4bit / dequantize_4bit on CPU (the oracle).

Bit-identical (torch.equal): the code books, the packed 4-bit codes, the plain fp32 absmax, the dequantized
weights, and for double quantization the offset, the nested fp32 absmax and the dequantization of a nested
state. Not bit-identical: the 8-bit absmax codes. bitsandbytes' CPU C quantizer is not an exact nearest-code
search; ours is. The test bounds the difference: at most 1% of those codes differ (measured 0.28% on 10,240
uniform values, 0 to 9 of 88 to 2,400 absmaxes below), each by one code step, and only where the value is
within 2e-5 of the midpoint between the two codes (measured at most 1.5e-5).
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
def test_double_quantization_against_bitsandbytes(quant_type, dtype, shape, blocksize):
    w = weight(shape, dtype)
    packed, absmax = R.quantize_4bit(w, blocksize, quant_type)
    ref, state = BF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=True)
    assert torch.equal(packed, ref)
    codes, nested, offset = R.double_quantize(absmax)
    assert torch.equal(offset, state.offset) and torch.equal(nested, state.state2.absmax)
    # dequantizing bitsandbytes' nested state: bit-identical, and so is the whole weight from it
    bnb_absmax = R.dequantize_absmax(state.absmax, state.state2.absmax, state.offset)
    assert torch.equal(bnb_absmax, BF.dequantize_blockwise(state.absmax, state.state2) + state.offset)
    assert torch.equal(R.dequantize_4bit(ref, bnb_absmax, shape, blocksize, quant_type, dtype),
                       BF.dequantize_4bit(ref, state))
    assert torch.equal(R.dequantize_4bit_pairs(ref, bnb_absmax, shape, blocksize, quant_type, dtype),
                       BF.dequantize_4bit(ref, state))
    # our 8-bit codes: nearest; bitsandbytes' C search differs only next to a midpoint, by one step
    code = R.dynamic_code()
    differ = (codes != state.absmax).nonzero().flatten()
    assert differ.numel() <= max(1, 0.01 * codes.numel()), differ.numel()
    normed = (absmax - offset) / nested.repeat_interleave(256)[: absmax.numel()]
    ours, theirs = codes[differ].long(), state.absmax[differ].long()
    assert ((ours - theirs).abs() == 1).all()
    midpoint = (code[ours] + code[theirs]) / 2
    assert ((normed[differ] - midpoint).abs() <= 2e-5).all()
    # and ours are the nearest codes (ties to the lower one)
    dist = (normed[:, None] - code[None, :]).abs()
    assert torch.equal(dist.gather(1, codes.long()[:, None]).squeeze(1), dist.min(dim=1).values)


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
