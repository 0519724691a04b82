"""Int8Linear: a frozen nn.Linear stored and multiplied in int8 with LLM.int8() (arXiv:2208.07339).

The module holds
    weight        int8 [out, in]   nn.Parameter(requires_grad=False): 1 byte per parameter
    weight_scale  fp32 [out]       buffer: absmax of each weight row (W ~= weight * scale / 127)
    bias          float [out]      nn.Parameter(requires_grad=False), or None
and computes y = LLM.int8()(x, W) + b (see minirlhf/kernels/reference.py for the math).

It is frozen: this is the base model under LoRA. Gradients flow to the *input* only,
dL/dx = dL/dy @ W [out, in], so adapters in earlier layers keep training; weight and bias never get a
gradient. That product never makes an fp32 copy of W where the device can avoid it (input_grad): in a
bf16 run it is a bf16 GEMM on the codes; with fp32 gradients on a device with int8 units it is one
more int8 GEMM (SwitchBack).

Behaviour worth knowing
  * Same int8 path in train() and eval(). (bitsandbytes on CPU silently switches to
    dequantize-then-float-matmul in train mode; we don't, so what you train is what you run.)
  * Backend: Triton kernels for CUDA tensors; for CPU tensors oneDNN's prepacked int8 GEMM where the CPU
    has int8 units (kernels/onednn_int8.py: the layer keeps a packed copy of its codes, one more byte per
    weight, made on the first forward), else the PyTorch reference. MINIRLHF_INT8_BACKEND=triton|torch|onednn
    forces one (read on every call); MINIRLHF_INT8_SWITCHBACK=0 turns the int8 GEMM of fp32 gradients off
    (input_grad's "fp32" path instead). With TRITON_INTERPRET=1 the Triton kernels also run on CPU tensors
    (slowly; that is how the tests check them).
  * .to(torch.bfloat16) / .half() cast the bias like any float parameter, leave the int8 weight
    alone (not a float), and keep weight_scale in fp32: _apply restores it, because a bf16
    scale would put a 0.4% error on every output.
  * NaN in an input row makes that output row NaN; +-inf is an outlier column (threshold > 0) and
    makes that output row non-finite. Other rows are unaffected.
  * load_state_dict refuses a float "weight" (it would be truncated to int8 silently): quantize
    float checkpoints with Int8Linear.from_weight / from_linear.
"""
import os

import torch
import torch.nn as nn

from minirlhf.kernels import backend, onednn_int8, reference, source_of
from minirlhf.kernels.onednn_linear import PackedHead

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BACKENDS = ("triton", "torch", "onednn")


def forward_backend(x: torch.Tensor) -> str:
    """Which kernels run Int8Linear's forward for x, read once per call: "triton" (CUDA tensors, or the env
    override), "onednn" (oneDNN's prepacked GEMM: by default on a CPU with int8 units, or when
    MINIRLHF_INT8_BACKEND=onednn asks for it; any x86 CPU computes it right, without int8 units slowly) or
    "torch" (the PyTorch reference)."""
    choice = backend(x, "MINIRLHF_INT8_BACKEND", _BACKENDS)
    if choice == "onednn" and x.device.type != "cpu":
        raise ValueError(f"MINIRLHF_INT8_BACKEND=onednn runs CPU tensors only, got one on {x.device}")
    if choice:
        return choice
    return "onednn" if reference.int8_units(x) and onednn_int8.available() else "torch"


def uses_onednn(x: torch.Tensor) -> bool:
    """Whether oneDNN's prepacked GEMM runs this CPU call (forward_backend)."""
    return forward_backend(x) == "onednn"


def _linear_forward(x, weight, weight_scale, bias, threshold, path, packed=None):
    """Run this call on `path` (forward_backend): Triton, oneDNN when the caller packed the weight for it
    (Int8Linear does), else the PyTorch reference."""
    if path == "triton":
        from minirlhf.kernels.int8_matmul import triton_int8_linear  # triton is imported only when used

        return triton_int8_linear(x, weight, weight_scale, bias, threshold)
    if packed is not None:
        return onednn_int8.int8_linear(x, packed, weight, weight_scale, bias, threshold)
    return reference.int8_linear(x, weight, weight_scale, bias, threshold)


class Int8LinearFunction(torch.autograd.Function):
    """y = int8_linear(x, W8, s_w, b); dL/dx = dL/dy @ dequantize(W8, s_w); no grad for W8, s_w, b.
    `path` is forward_backend(x); `packed` is W8 packed for oneDNN (onednn_int8.PackedWeight), or None where
    another backend runs."""

    @staticmethod
    def forward(ctx, x, weight, weight_scale, bias, threshold, path, packed=None):
        ctx.save_for_backward(weight, weight_scale)
        return _linear_forward(x, weight, weight_scale, bias, threshold, path, packed)

    @staticmethod
    def backward(ctx, grad_out):
        weight, weight_scale = ctx.saved_tensors
        grad_x = input_grad(grad_out, weight, weight_scale) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None, None, None


def backward_path(grad_out: torch.Tensor) -> str:
    """How input_grad multiplies, by the gradient's dtype and what its device multiplies fast:
    "half"        a bf16/fp16 gradient: W8 cast to that dtype (its codes are exact there), scales folded into
                  the gradient; a half-precision GEMM (2 bytes per weight, transient)
    "switchback"  an fp32 gradient where int8 is native (CUDA; CPUs with VNNI/AMX): one more LLM.int8()
                  product, no copy of W at all
    "fp32"        an fp32 gradient elsewhere (a CPU without VNNI): W dequantized to fp32 (the codes in fp32, then
                  scaled: 8 bytes per weight at the peak, as memory.py counts)"""
    if grad_out.dtype in (torch.bfloat16, torch.float16):
        return "half"
    if os.environ.get("MINIRLHF_INT8_SWITCHBACK", "1").strip() == "0":
        return "fp32"  # switched off: rounding a gradient to 8 bits is not a continuous function of it
    return "switchback" if reference.int8_units(grad_out) else "fp32"


def input_grad(grad_out: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """dL/dx = dL/dy @ W with W = W8 * s_w / 127 [N, K]: grad_out [..., N] -> [..., K], in grad_out's dtype.

    SwitchBack (Wortsman et al. 2023, "Stable and low-precision training for large-scale vision-language
    models", arXiv:2304.13013) runs the input gradient of an int8 layer as an int8 GEMM too:
        dL/dx[m, k] = sum_n dL/dy[m, n] * s_w[n] / 127 * W8[n, k]
    Fold the weight's row scales into the gradient, g = dL/dy * s_w / 127 [M, N], and this is g times W8:
    an LLM.int8() product of g (quantized row-wise: one absmax per token) with W8^T [K, N] as its weight,
    unit scales (127 / 127) and no outlier columns. W8^T is a view of the stored codes, so nothing the size of
    W is made, and the same kernels as the forward run it (Triton on CUDA, torch._int_mm on a CPU).
    """
    path = backward_path(grad_out)
    if path == "switchback":
        g = grad_out.float() * (weight_scale / reference.INT8_MAX)  # [..., N] fp32
        unit = torch.full((weight.shape[1],), reference.INT8_MAX, device=weight.device)  # [K]: s / 127 = 1
        return _linear_forward(g, weight.t(), unit, None, 0.0, forward_backend(g))  # [..., K] fp32
    if path == "half":
        g = torch.mul(grad_out, weight_scale / reference.INT8_MAX).to(grad_out.dtype)  # scaled in fp32 (promoted)
        return g @ weight.to(grad_out.dtype)  # [..., N] @ [N, K]: the codes are exact in bf16 and fp16
    return grad_out @ reference.dequantize_weight(weight, weight_scale)  # fp32 [..., N] @ [N, K]


class Int8Linear(nn.Module):
    """Frozen LLM.int8() linear layer: x [..., in_features] -> [..., out_features], same dtype as x."""

    def __init__(self, in_features, out_features, bias=True, threshold=6.0, device=None, dtype=torch.float32):
        super().__init__()
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0 (0 turns the outlier decomposition off), got {threshold}")
        self.in_features = in_features
        self.out_features = out_features
        self.threshold = float(threshold)
        # zeros until loaded: build real layers with from_linear / from_weight or load_state_dict
        w = torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        self.weight = nn.Parameter(w, requires_grad=False)
        self.register_buffer("weight_scale", torch.zeros(out_features, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._packed = None  # onednn_int8.PackedWeight, made by the first forward that runs on oneDNN

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, threshold: float = 6.0):
        """Quantize a float weight [out, in] (and keep an optional bias [out]) into a new Int8Linear."""
        w_int8, w_scale = reference.quantize_weight(weight.detach())
        out_features, in_features = weight.shape
        bias_dtype = bias.dtype if bias is not None else torch.float32
        module = cls(in_features, out_features, bias=bias is not None, threshold=threshold,
                     device=weight.device, dtype=bias_dtype)
        module.weight.data.copy_(w_int8)
        module.weight_scale.copy_(w_scale)
        if bias is not None:
            if bias.shape != (out_features,):
                raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
            module.bias.data.copy_(bias.detach())
        return module

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = 6.0):
        """Quantize an nn.Linear (its weight and bias) into a new Int8Linear."""
        return cls.from_weight(linear.weight, linear.bias, threshold=threshold)

    def quant_args(self) -> dict:
        """The from_weight arguments that rebuild this layer's format (LoRA's merge requantizes with them)."""
        return dict(threshold=self.threshold)

    def dequantize(self) -> torch.Tensor:
        """The float weight this layer represents: fp32 [out, in] = weight * weight_scale / 127."""
        return reference.dequantize_weight(self.weight, self.weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (2, 3):
            raise ValueError(
                f"Int8Linear expects x of shape [tokens, {self.in_features}] or [batch, seq, {self.in_features}], "
                f"got {tuple(x.shape)}"
            )
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Int8Linear expects {self.in_features} input features, got x of shape {tuple(x.shape)}")
        if x.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"Int8Linear expects a float32, bfloat16 or float16 input, got {x.dtype}")
        path = forward_backend(x)
        # an inference tensor (made under torch.inference_mode) keeps no version counter, so a packed copy of it
        # could go stale unseen: such weights run the reference
        packed = self.packed_weight() if path == "onednn" and not self.weight.is_inference() else None
        if not (torch.is_grad_enabled() and x.requires_grad):  # sampling, scoring: no graph to record
            return _linear_forward(x, self.weight, self.weight_scale, self.bias, self.threshold, path, packed)
        return Int8LinearFunction.apply(x, self.weight, self.weight_scale, self.bias, self.threshold, path, packed)

    def packed_weight(self) -> onednn_int8.PackedWeight:
        """The codes packed for oneDNN: made on first use, remade when the weight or its scales change
        (load_state_dict, any in-place write; a write through .data bypasses the version counter)."""
        if self._packed is None or self._packed.source != source_of(self.weight, self.weight_scale):
            self._packed = onednn_int8.pack(self.weight, self.weight_scale)
        return self._packed

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() / .bfloat16() cast every float buffer; keep the scales fp32.
        scale = self.weight_scale
        super()._apply(fn, recurse)
        if self.weight_scale.dtype != torch.float32:
            self.weight_scale = scale.to(device=self.weight_scale.device)
        self._packed = None  # moved or cast: pack again on the next oneDNN forward
        return self

    def __getstate__(self):
        # copy.deepcopy / pickle: oneDNN's packed tensor is opaque (it cannot be copied); the copy packs anew
        return {**super().__getstate__(), "_packed": None}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        w = state_dict.get(prefix + "weight")
        if w is not None and w.is_floating_point():
            raise TypeError(
                f"{prefix}weight is {w.dtype}, but Int8Linear stores int8: quantize float weights with "
                "Int8Linear.from_weight / from_linear instead of load_state_dict"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, threshold={self.threshold}")


def memory_report(model: nn.Module) -> dict:
    """Bytes held by a model, split by what they are (each tensor counted once, even if shared).

    int8_weights            int8 parameters (Int8Linear.weight)
    int8_packed             oneDNN's packed copies of them (CPUs with int8 units, after a first forward)
    head_packed             oneDNN's packed copy of a frozen bf16 output head (CPU, after a first forward)
    int8_scales             Int8Linear.weight_scale buffers
    float_params_trainable  other parameters with requires_grad (e.g. LoRA adapters)
    float_params_frozen     other parameters without it (embeddings, norms, biases, ...)
    float_params            the two above together
    other_buffers           every other buffer
    total                   everything
    int8_params             number of int8 parameters (so bytes per int8 parameter = 1)
    """
    scale_ids = {id(m.weight_scale) for m in model.modules() if isinstance(m, Int8Linear)}
    report = dict(int8_weights=0, int8_packed=0, head_packed=0, int8_scales=0, float_params_trainable=0,
                  float_params_frozen=0, other_buffers=0)
    int8_params = 0
    for p in model.parameters():  # parameters() already skips shared (tied) parameters
        nbytes = p.numel() * p.element_size()
        if p.dtype == torch.int8:
            report["int8_weights"] += nbytes
            int8_params += p.numel()
        elif p.requires_grad:
            report["float_params_trainable"] += nbytes
        else:
            report["float_params_frozen"] += nbytes
    for b in model.buffers():  # also deduplicated
        nbytes = b.numel() * b.element_size()
        report["int8_scales" if id(b) in scale_ids else "other_buffers"] += nbytes
    for m in model.modules():  # the packed copies are opaque oneDNN tensors: counted as what they hold
        if isinstance(m, Int8Linear) and m._packed is not None:
            report["int8_packed"] += m.weight.numel()  # the codes, one byte each
        elif isinstance(m, PackedHead):
            report["head_packed"] += m.packed_bytes()
    report["float_params"] = report["float_params_trainable"] + report["float_params_frozen"]
    report["total"] = (report["int8_weights"] + report["int8_packed"] + report["head_packed"] + report["int8_scales"]
                       + report["float_params"] + report["other_buffers"])
    report["int8_params"] = int8_params
    return report


def format_memory_report(report: dict) -> str:
    """A small fixed-width table of memory_report(model)."""
    rows = ["int8_weights", "int8_packed", "head_packed", "int8_scales", "float_params_trainable", "float_params_frozen", "other_buffers", "total"]
    total = max(report["total"], 1)
    lines = [f"{'component':<24}{'bytes':>16}{'MiB':>11}{'share':>8}"]
    for name in rows:
        nbytes = report[name]
        lines.append(f"{name:<24}{nbytes:>16,}{nbytes / 2**20:>11.2f}{100 * nbytes / total:>7.1f}%")
    lines.append(f"{'int8 parameters':<24}{report['int8_params']:>16,}")
    return "\n".join(lines)


__all__ = ["Int8Linear", "Int8LinearFunction", "forward_backend", "uses_onednn", "input_grad", "backward_path", "memory_report", "format_memory_report"]
