"""Which layers of a GPT-NeoX are held quantized, and the quantized linear layers: where a new format plugs in.

    load_model(..., int8=True)      quantize_linear(...) for each block linear, tensor by tensor while loading
    memory.meta_model               quantize_on_meta(...): the same swap, on the meta device, for the planner
    lora.add_lora                   is_linear(...): adapters go on nn.Linear and on every quantized linear
    save_model, merge               module.dequantize(): a quantized layer written (or merged) as float

Only the linear layers inside the transformer blocks are quantized (query_key_value, attention.dense,
dense_h_to_4h, dense_4h_to_h: >95% of a Pythia's parameters). Embeddings, LayerNorms and the LM head stay in
floating point, as transformers' load_in_8bit does: they are small, and the head's outputs are the log-probs.

A quantized linear is a frozen nn.Module with `from_weight(weight fp32 [out, in], bias, ...)`, a constructor
`(in_features, out_features, bias=..., dtype=...)` that builds it empty (the planner builds it on the meta
device), `dequantize() -> fp32 [out, in]`, and a forward whose autograd returns the input's gradient only, so
LoRA trains through it, and `quant_args()` (the from_weight arguments of its format, for LoRA's merge). The
formats: Int8Linear (int8.py, LLM.int8()) and NF4Linear (nf4.py, QLoRA's NF4 or FP4 with double quantization).
"""

import torch
from torch import nn

from .int8 import Int8Linear
from .nf4 import NF4Linear

# The layers that get quantized: a linear layer inside a block.
BLOCK_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
QUANTIZED_LINEARS = (Int8Linear, NF4Linear)
# What --quantization / load_model(quantization=...) take; "none" keeps the blocks in floating point.
QUANTIZATIONS = ("none", "int8", "nf4", "fp4")


def is_block_linear(module_name: str) -> bool:
    """Whether load_model quantizes this module (int8, nf4 or fp4): a linear layer inside a block."""
    return module_name.startswith("gpt_neox.layers.") and module_name.endswith(BLOCK_LINEARS)


def is_linear(module: nn.Module) -> bool:
    """A float or quantized linear layer (what LoRA can wrap)."""
    return isinstance(module, (nn.Linear, *QUANTIZED_LINEARS))


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at a dotted path ("gpt_neox.layers.0.mlp.dense_h_to_4h"), in place."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, new)


def quantize_linear(tensors: dict[str, torch.Tensor], threshold: float, dtype: torch.dtype, device,
                    quantization: str = "int8") -> nn.Module:
    """A block linear's tensors as read from the checkpoint ({"weight": [out, in], "bias": [out]}) -> Int8Linear,
    or NF4Linear (quantization "nf4" / "fp4": blocksize 64, double quantization, compute in the input's dtype).
    The weight is quantized from fp32 whatever the file holds; the bias keeps the model's float dtype."""
    weight = tensors["weight"].to(device=device, dtype=torch.float32)
    bias = tensors.get("bias")
    bias = None if bias is None else bias.to(device=device, dtype=dtype)
    if quantization in ("nf4", "fp4"):
        return NF4Linear.from_weight(weight, bias, quant_type=quantization)
    if quantization != "int8":
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS[1:])}, got {quantization!r}")
    return Int8Linear.from_weight(weight, bias, threshold=threshold)


def dequantize_linears(model: nn.Module, dtype: torch.dtype) -> None:
    """Swap every quantized linear for a frozen nn.Linear holding its dequantized weight, cast once to dtype:
    the float model a prequantized (4-bit) checkpoint stands for, the only float version of it there is."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QUANTIZED_LINEARS):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                               device=module.weight.device, dtype=dtype).requires_grad_(False)
            linear.weight.copy_(module.dequantize())  # fp32 [out, in], rounded once to dtype by copy_
            if module.bias is not None:
                linear.bias.copy_(module.bias)
            set_module(model, name, linear)


def quantize_on_meta(model: nn.Module, dtype: torch.dtype, quantization: str = "int8") -> None:
    """Swap every block linear of a model on the meta device for an empty quantized linear of the same shape."""
    for name, module in list(model.named_modules()):
        if is_block_linear(name):
            args = (module.in_features, module.out_features)
            with torch.device("meta"):
                if quantization in ("nf4", "fp4"):
                    empty = NF4Linear(*args, bias=module.bias is not None, quant_type=quantization, dtype=dtype)
                else:
                    empty = Int8Linear(*args, bias=module.bias is not None, dtype=dtype)
            set_module(model, name, empty)
