"""NF4Linear: a frozen nn.Linear stored in 4 bits per weight, NF4 or FP4 with per-block absmax (QLoRA, arXiv:2305.14314).

The module holds (n = out_features * in_features, blocks = ceil(n / blocksize))
    weight         uint8 [ceil(n / 2), 1]  nn.Parameter(requires_grad=False): two 4-bit codes per byte
    absmax         fp32 [blocks]            per-block scale, or with double_quant=True
                   uint8 [blocks]           8-bit codes of absmax - offset (the dynamic map), plus
    nested_absmax  fp32 [ceil(blocks/256)]  the scale of each 256 of those, and
    offset         fp32 []                  the mean absmax
    bias           float [out]              nn.Parameter(requires_grad=False), or None
and computes y = x @ dequantize(W)^T + b in compute_dtype (the input's dtype unless set), as bitsandbytes'
Linear4bit does: the 4-bit weight is a storage format, the matmul is a float one (kernels/nf4_reference.py
for the format and the arithmetic of its 4.5 / 4.127 bits per weight).

It is frozen: the base under LoRA. Autograd returns the input's gradient only, dL/dx = dL/dy @ W (on CPU W is
dequantized again in the backward rather than kept: that transient, one layer's weight in compute_dtype plus
the int32 codes it is gathered with, is the price of 4 bits at rest; the Triton backward decodes tiles in
registers and has none), so adapters keep training.

Backend: the Triton kernels (kernels/nf4_matmul.py: the weight dequantized tile by tile in registers, never
whole in memory, forward and backward) for CUDA tensors, the PyTorch path above for CPU tensors;
MINIRLHF_NF4_BACKEND=triton|torch forces one (read on every call; with TRITON_INTERPRET=1 Triton also runs on
CPU tensors, which is how the tests check it).

.to(torch.bfloat16) casts the bias only: the uint8 tensors are not floats and _apply keeps absmax, nested_absmax
and offset in fp32. load_state_dict refuses a float "weight": quantize with from_weight / from_linear.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from minirlhf.kernels import nf4_reference as R, use_triton

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FP32_STATE = ("nested_absmax", "offset")


def _dequantize(weight, absmax, nested_absmax, offset, shape, blocksize, quant_type, dtype):
    """The layer's weight [out, in] in dtype, from its stored tensors."""
    if nested_absmax is not None:
        absmax = R.dequantize_absmax(absmax, nested_absmax, offset)
    return R.dequantize_4bit_pairs(weight, absmax, shape, blocksize, quant_type, dtype)  # = dequantize_4bit, faster


class NF4LinearFunction(torch.autograd.Function):
    """y = x @ W^T + b with W dequantized in compute dtype; dL/dx = dL/dy @ W; no grad for the stored tensors."""

    @staticmethod
    def forward(ctx, x, weight, absmax, nested_absmax, offset, bias, meta):
        shape, blocksize, quant_type, compute_dtype = meta
        ctx.meta = meta
        ctx.save_for_backward(weight, absmax, nested_absmax, offset)
        if use_triton(x, "MINIRLHF_NF4_BACKEND"):
            from minirlhf.kernels.nf4_matmul import triton_nf4_linear  # triton is imported only when used

            y = triton_nf4_linear(x.to(compute_dtype), weight, absmax, nested_absmax, offset, shape, blocksize,
                                  quant_type, bias)
            return y.to(x.dtype)
        w = _dequantize(weight, absmax, nested_absmax, offset, shape, blocksize, quant_type, compute_dtype)
        b = None if bias is None else bias.to(compute_dtype)
        return F.linear(x.to(compute_dtype), w, b).to(x.dtype)  # [..., in] @ [in, out] -> [..., out]

    @staticmethod
    def backward(ctx, grad_out):
        weight, absmax, nested_absmax, offset = ctx.saved_tensors
        shape, blocksize, quant_type, compute_dtype = ctx.meta
        grad_x = None
        if ctx.needs_input_grad[0] and use_triton(grad_out, "MINIRLHF_NF4_BACKEND"):
            from minirlhf.kernels.nf4_matmul import triton_nf4_grad_input

            grad_x = triton_nf4_grad_input(grad_out.to(compute_dtype), weight, absmax, nested_absmax, offset, shape,
                                           blocksize, quant_type).to(grad_out.dtype)
        elif ctx.needs_input_grad[0]:
            w = _dequantize(weight, absmax, nested_absmax, offset, shape, blocksize, quant_type, compute_dtype)
            grad_x = (grad_out.to(compute_dtype) @ w).to(grad_out.dtype)  # [..., out] @ [out, in] -> [..., in]
        return grad_x, None, None, None, None, None, None


class NF4Linear(nn.Module):
    """Frozen 4-bit (NF4 or FP4) linear layer: x [..., in_features] -> [..., out_features], same dtype as x."""

    def __init__(self, in_features, out_features, bias=True, blocksize=64, double_quant=True, quant_type="nf4",
                 compute_dtype=None, device=None, dtype=torch.float32):
        super().__init__()
        if blocksize not in R.BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {', '.join(map(str, R.BLOCKSIZES))}, got {blocksize}")
        if quant_type not in R.QUANT_TYPES:
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
        if compute_dtype is not None and compute_dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"compute_dtype must be float32, bfloat16, float16 or None, got {compute_dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.blocksize, self.double_quant, self.quant_type = blocksize, bool(double_quant), quant_type
        self.compute_dtype = compute_dtype
        n = in_features * out_features
        blocks = -(-n // blocksize)
        # zeros until loaded: build real layers with from_linear / from_weight or load_state_dict
        self.weight = nn.Parameter(torch.zeros((n + 1) // 2, 1, dtype=torch.uint8, device=device), requires_grad=False)
        if double_quant:
            self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.uint8, device=device))
            self.register_buffer("nested_absmax", torch.zeros(-(-blocks // R.NESTED_BLOCKSIZE), device=device))
            self.register_buffer("offset", torch.zeros((), device=device))
        else:
            self.register_buffer("absmax", torch.zeros(blocks, device=device))
            self.register_buffer("nested_absmax", None)
            self.register_buffer("offset", None)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, blocksize: int = 64,
                    double_quant: bool = True, quant_type: str = "nf4", compute_dtype=None):
        """Quantize a float weight [out, in] (and keep an optional bias [out]) into a new NF4Linear."""
        if weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(f"weight must be a float [out, in] tensor, got {weight.dtype} {tuple(weight.shape)}")
        out_features, in_features = weight.shape
        if bias is not None and bias.shape != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        module = cls(in_features, out_features, bias=bias is not None, blocksize=blocksize,
                     double_quant=double_quant, quant_type=quant_type, compute_dtype=compute_dtype,
                     device=weight.device, dtype=bias.dtype if bias is not None else torch.float32)
        packed, absmax = R.quantize_4bit(weight.detach(), blocksize, quant_type)
        module.weight.data.copy_(packed)
        if double_quant:
            codes, nested, offset = R.double_quantize(absmax)
            module.absmax.copy_(codes)
            module.nested_absmax.copy_(nested)
            module.offset.copy_(offset)
        else:
            module.absmax.copy_(absmax)
        if bias is not None:
            module.bias.data.copy_(bias.detach())
        return module

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True, quant_type: str = "nf4",
                    compute_dtype=None):
        """Quantize an nn.Linear (its weight and bias) into a new NF4Linear."""
        return cls.from_weight(linear.weight, linear.bias, blocksize=blocksize, double_quant=double_quant,
                               quant_type=quant_type, compute_dtype=compute_dtype)

    def quant_args(self) -> dict:
        """The from_weight arguments that rebuild this layer's format (LoRA's merge requantizes with them)."""
        return dict(blocksize=self.blocksize, double_quant=self.double_quant, quant_type=self.quant_type,
                    compute_dtype=self.compute_dtype)

    def _meta(self, dtype):
        return (self.out_features, self.in_features), self.blocksize, self.quant_type, dtype

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight this layer represents: [out, in] = CODE[q] * absmax, in dtype (fp32 by default)."""
        return _dequantize(self.weight, self.absmax, self.nested_absmax, self.offset,
                           (self.out_features, self.in_features), self.blocksize, self.quant_type, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (2, 3) or x.shape[-1] != self.in_features:
            raise ValueError(f"NF4Linear expects x of shape [tokens, {self.in_features}] or "
                             f"[batch, seq, {self.in_features}], got {tuple(x.shape)}")
        if x.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"NF4Linear expects a float32, bfloat16 or float16 input, got {x.dtype}")
        meta = self._meta(self.compute_dtype or x.dtype)
        return NF4LinearFunction.apply(x, self.weight, self.absmax, self.nested_absmax, self.offset, self.bias, meta)

    def nbytes(self) -> dict:
        """Bytes held, by part: weight (n/2), absmax (blocks x 1 or 4), nested (4 per 256 blocks + 4), bias."""
        size = lambda t: 0 if t is None else t.numel() * t.element_size()  # noqa: E731
        return dict(weight=size(self.weight), absmax=size(self.absmax),
                    nested=size(self.nested_absmax) + size(self.offset), bias=size(self.bias))

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() cast every float buffer: keep the (plain or nested) absmax state in fp32.
        keep = {k: getattr(self, k) for k in ("absmax", *_FP32_STATE) if getattr(self, k) is not None}
        super()._apply(fn, recurse)
        for k, t in keep.items():
            now = getattr(self, k)
            if now.dtype != t.dtype:
                setattr(self, k, t.to(device=now.device))
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        w = state_dict.get(prefix + "weight")
        if w is not None and w.is_floating_point():
            raise TypeError(f"{prefix}weight is {w.dtype}, but NF4Linear stores packed uint8 4-bit codes: quantize "
                            "float weights with NF4Linear.from_weight / from_linear instead of load_state_dict")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}")


__all__ = ["NF4Linear", "NF4LinearFunction"]
