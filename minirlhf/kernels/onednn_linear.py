"""The output head on a CPU in bf16: a frozen linear layer whose weight is prepacked once for oneDNN.

torch multiplies bf16 matrices on a CPU with oneDNN, which wants the weight of y = x W^T in its own blocked
layout and reorders W into it inside every call. For the head of a 50k vocabulary that reorder is a pass over
V * C * 2 bytes (51 MB for Pythia-70m's), paid at every sampled token, every scoring pass and every minibatch
of a PPO step, and it costs as much as the product itself. The head is frozen under LoRA (lora.py never adapts
it), so its weight can be reordered once: torch.ops.mkldnn._reorder_linear_weight packs it, and
torch.ops.mkldnn._linear_pointwise multiplies with the packed copy, the same oneDNN kernel on the same layout,
so the logits are bit-identical to F.linear's (tests/test_neox.py).

The gradient (dL/dx = dL/dy @ W, [.., V] @ [V, C]) reads W as it is stored: that product needs no reorder.
Memory: the packed copy is a second V * C * 2 bytes, held beside the weight (memory.py plans it).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from minirlhf.kernels import source_of


def available() -> bool:
    """Whether this torch build has oneDNN's packed linear ops (x86 CPU builds do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the packed product runs y = x W^T: a bf16 input and weight on a CPU, the weight frozen and not an
    inference tensor (made under torch.inference_mode: it keeps no version counter, so a packed copy of it could
    go stale unseen)."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.bfloat16 and not weight.requires_grad
            and not weight.is_inference() and available())


@dataclass
class PackedWeight:
    packed: torch.Tensor  # opaque oneDNN tensor: W [out, in] in oneDNN's blocked layout
    source: tuple  # kernels.source_of(W) when made: reused only while it matches


def pack(weight: torch.Tensor) -> PackedWeight:
    return PackedWeight(torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None), source_of(weight))


class _PackedLinear(torch.autograd.Function):
    """y = x W^T + b with W packed; dL/dx = dL/dy @ W. W and b are frozen: no gradient for them."""

    @staticmethod
    def forward(ctx, x, weight, bias, packed):
        ctx.save_for_backward(weight)
        return torch.ops.mkldnn._linear_pointwise(x, packed.packed, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        return grad_out @ weight, None, None, None  # [..., out] @ [out, in]


class PackedHead(nn.Linear):
    """nn.Linear (same parameters, same state_dict) that runs a frozen bf16 weight on a CPU packed for oneDNN;
    anything else (training it, fp32, CUDA) is plain F.linear."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._packed = None  # PackedWeight, made by the first forward that uses it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not applies(x, self.weight):
            return super().forward(x)
        if self._packed is None or self._packed.source != source_of(self.weight):
            self._packed = pack(self.weight)
        return _PackedLinear.apply(x, self.weight, self.bias, self._packed)

    def packed_bytes(self) -> int:
        """Bytes of the packed copy while one is held (oneDNN's layout pads little: counted as the weight's)."""
        return 0 if self._packed is None else self.weight.numel() * self.weight.element_size()

    def _apply(self, fn, recurse=True):
        self._packed = None  # moved or cast: pack again on the next forward
        return super()._apply(fn, recurse)

    def __getstate__(self):
        # copy.deepcopy / pickle: the opaque oneDNN tensor cannot be copied; the copy packs anew
        return {**super().__getstate__(), "_packed": None}


__all__ = ["available", "applies", "PackedWeight", "pack", "PackedHead"]
