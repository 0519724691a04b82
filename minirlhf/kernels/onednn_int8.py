"""LLM.int8() on an x86 CPU with int8 units (AVX512-VNNI, AVX-VNNI, AMX): oneDNN's prepacked int8 GEMM.

reference.int8_linear is the specification; this computes the same layer with its two costly parts moved into
oneDNN (the library behind torch's CPU matmuls), through the two ops torch's own int8 inference uses
(torch.ops.onednn.qlinear_prepack / qlinear_pointwise):

  * the weight is reordered once into oneDNN's blocked layout, `PackedWeight` (torch._int_mm takes a plain
    matrix and reorders it inside every call), and
  * the weight's row scales are applied in the GEMM's epilogue: oneDNN writes acc[m, n] * s_w[n] / 127^2 in
    fp32 straight from its int32 accumulators, so the int32 [M, N] result never reaches memory.

What oneDNN cannot take stays in torch. LLM.int8() has one activation scale per token (s_x[m]) and oneDNN
one per tensor, so the GEMM runs with activation scale 1 and the token scales follow in one pass together
with the bias (torch.addcmul); then the outlier columns in fp32, as in the reference:

    y[m, n] = b[n] + s_x[m] * (s_w[n] / 127^2 * sum_k X8[m, k] W8[n, k])      oneDNN inside the parentheses
            + sum_{k in O} x[m, k] * W8[n, k] * s_w[n] / 127                  outlier columns (fp32 addmm)

The integer sum is exact either way; the scales are the same fp32 numbers multiplied in another order, so an
output differs from the reference by at most a few fp32 roundings (~1e-7 relative), and after the cast to a
bf16/fp16 input's dtype by at most one ulp of it, where the two land on either side of a rounding boundary
(tests/test_int8_linear.py).

Memory: the packed weight is a second copy of the codes (one more byte per weight), held beside the plain
int8 parameter, which stays what state_dict saves and what the backward multiplies (int8.input_grad).
"""
from dataclasses import dataclass

import torch

from minirlhf.kernels import reference, source_of


def available() -> bool:
    """Whether this torch build has oneDNN's int8 linear ops (x86 CPU builds do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


@dataclass
class PackedWeight:
    """W8 [N, K] reordered for oneDNN, with the per-row scale its epilogue applies."""

    packed: torch.Tensor  # opaque oneDNN tensor: the int8 codes of W^T [K, N] in a blocked layout
    scale: torch.Tensor  # [N] fp32: s_w / 127^2
    zero_points: torch.Tensor  # [N] int64 zeros: the codes are symmetric
    source: tuple  # kernels.source_of(W8, s_w) when made: reused only while it matches (the scales live here too)


def pack(w_int8: torch.Tensor, w_scale: torch.Tensor) -> PackedWeight:
    """PackedWeight of W8 [N, K] int8 and s_w [N] fp32 (a reorder of N*K bytes: done once per weight)."""
    packed = torch.ops.onednn.qlinear_prepack(w_int8.contiguous(), None)
    scale = w_scale.float() / (reference.INT8_MAX * reference.INT8_MAX)
    zero_points = torch.zeros(w_int8.shape[0], dtype=torch.int64)
    return PackedWeight(packed, scale, zero_points, source_of(w_int8, w_scale))


def gemm(codes: torch.Tensor, weight: PackedWeight) -> torch.Tensor:
    """X8 [M, K] int8 times the packed W8^T, its row scales applied: [M, N] fp32 = (X8 W8^T)[m, n] * s_w[n] / 127^2."""
    return torch.ops.onednn.qlinear_pointwise(
        codes, 1.0, 0,  # activation: scale 1, zero point 0 (the token scales come after)
        weight.packed, weight.scale, weight.zero_points,  # weight: per-row scale s_w / 127^2, symmetric
        None, 1.0, 0, torch.float32,  # no bias inside (it must not be scaled by s_x); output fp32, unscaled
        "none", [], "",  # no post-op
    )


def int8_linear(
    x: torch.Tensor,
    weight: PackedWeight,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    threshold: float = 6.0,
) -> torch.Tensor:
    """reference.int8_linear(x, w_int8, w_scale, bias, threshold) with the GEMM in oneDNN: x [..., K] -> [..., N].

    `weight` is pack(w_int8, w_scale); w_int8 and w_scale are still needed for the few outlier columns.
    """
    K = x.shape[-1]
    N = w_int8.shape[0]
    lead_shape = x.shape[:-1]
    x2 = x.reshape(-1, K)  # [M, K]
    if x2.shape[0] == 0:
        return x.new_empty(*lead_shape, N)

    codes, row_scale, cols = reference.quantize_rows(x2, threshold)  # [M, K] int8, [M] fp32, [n_out]
    y = gemm(codes, weight)  # [M, N] fp32 = acc * s_w / 127^2
    return finish(y, row_scale, x2, cols, w_int8, w_scale, bias).to(x.dtype).reshape(*lead_shape, N)


def finish(y, row_scale, x2, cols, w_int8, w_scale, bias):
    """What follows the GEMM, in fp32: y [M, N] = acc * s_w / 127^2 times the token scales s_x [M], plus the bias
    (one pass, torch.addcmul), plus the outlier columns x2[:, cols] [M, n_out] times their dequantized weights."""
    row = row_scale[:, None]  # [M, 1]
    y = torch.addcmul(bias.float(), y, row) if bias is not None else y.mul_(row)
    return reference.add_outlier_columns(y, x2, cols, w_int8, w_scale)


__all__ = ["available", "PackedWeight", "pack", "gemm", "finish", "int8_linear"]
