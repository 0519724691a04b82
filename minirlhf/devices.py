"""Which device a run uses, and which float dtype its float parts get there: one policy for training and planning.

    --device auto      cuda when a GPU is visible, else cpu
    --device cpu | cuda | cuda:N
    --dtype auto       bfloat16 where the device multiplies bf16 fast: a GPU (tensor cores), or a CPU with
                       AVX512-BF16 or AMX (cpu.py); float32 on other CPUs, where bf16 runs slower than fp32.
                       bf16 has fp32's exponent range and half its memory, with ~3 significant digits.
    --dtype float16    refused on a CPU: fp16 matrix products there run ~500x slower than fp32

The float dtype is for the parts that are not quantized (embeddings, norms, the LM head, activations);
LoRA weights, the value head, optimizer state, log-probs and losses stay fp32 whatever it says.
"""

import torch

from . import cpu
from .cli import UsageError

DTYPES = ("auto", "float32", "bfloat16", "float16")


def parse_device(name: str) -> torch.device:
    """--device's value as a torch.device ("auto" resolved), without checking that the device exists here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index):
        raise UsageError(f"--device {name}: expected cpu, cuda, cuda:N or auto")
    return device


def check_present(device: torch.device, name: str) -> None:
    """The device exists on this machine (a plan may name a GPU this machine lacks; a run may not)."""
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is visible on this machine")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")


def float_dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype's value on this device type ("auto" resolved); float16 on a CPU is refused."""
    if name not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    if name == "auto":
        name = "bfloat16" if device.type == "cuda" or cpu.FAST_BF16 else "float32"
    if device.type == "cpu" and name == "float16":
        raise UsageError("--dtype float16 on CPU: fp16 matmuls are ~500x slower than fp32 there; "
                         "use float32 or bfloat16")
    return getattr(torch, name)


def pick(device_name: str, dtype_name: str, present: bool = True) -> tuple[torch.device, torch.dtype]:
    """(device, float dtype) for --device / --dtype; present=False for a plan of a machine you don't have."""
    device = parse_device(device_name)
    if present:
        check_present(device, device_name)
    return device, float_dtype(dtype_name, device)
