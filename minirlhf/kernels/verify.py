"""Does the Triton LLM.int8() give the reference's numbers on this device? One function, for the
checks that only a GPU can run: tests/test_int8_cuda.py and benchmarks/bench_int8.py --gpu (which
checks every shape before timing it). On CPU tensors it runs the kernels in Triton's interpreter.

The bar is the interpreter tests' (tests/test_int8_kernels.py): int8 codes, row scales and outlier
columns bit-identical (the quantize kernels use only exactly rounded operations), outputs within
1e-3 relative (the GEMM sums in a different order and folds s_w / 127 out of two terms).
"""
import torch

from minirlhf.kernels import reference

OUTPUT_RTOL = 1e-3


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp32 (0 when both are zero)."""
    num = (a.float() - b.float()).norm()
    den = b.float().norm()
    return 0.0 if num == 0 else (num / den).item()


def compare_with_reference(x, w_int8, w_scale, bias=None, threshold=6.0) -> dict:
    """Run triton_quantize_rows / triton_int8_linear and the PyTorch reference on the same inputs.

    Returns {"codes", "scales", "cols": bool (bit-identical), "rel_err": float, "finite": bool
    (Triton's output is finite wherever the reference's is), "ok": bool}.
    """
    from minirlhf.kernels.int8_matmul import triton_int8_linear, triton_quantize_rows

    x2 = x.reshape(-1, x.shape[-1])
    codes, scale, cols = triton_quantize_rows(x2, threshold)
    ref_codes, ref_scale, ref_cols = reference.quantize_rows(x2, threshold)
    y = triton_int8_linear(x, w_int8, w_scale, bias, threshold)
    ref = reference.int8_linear(x, w_int8, w_scale, bias, threshold)
    finite = torch.isfinite(ref)
    result = dict(
        codes=torch.equal(codes, ref_codes),
        scales=torch.equal(scale, ref_scale),  # NaN rows would compare unequal: test those separately
        cols=torch.equal(cols, ref_cols),
        shape=tuple(y.shape) == tuple(ref.shape) and y.dtype == ref.dtype,
        finite=bool(torch.isfinite(y)[finite].all()),
        rel_err=rel_err(y[finite], ref[finite]),
    )
    result["ok"] = all(result[k] for k in ("codes", "scales", "cols", "shape", "finite")) and \
        result["rel_err"] <= OUTPUT_RTOL
    return result


__all__ = ["OUTPUT_RTOL", "rel_err", "compare_with_reference"]
