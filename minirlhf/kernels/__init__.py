"""The kernels: the PyTorch references (the spec, and the CPU path), the Triton versions for CUDA tensors, and
oneDNN's int8 GEMM for CPUs with int8 units."""

import os


def backend(x, variable: str, choices=("triton", "torch")) -> str:
    """Which kernels the environment variable `variable` (MINIRLHF_INT8_BACKEND, MINIRLHF_NF4_BACKEND; read on
    every call) asks for, one of `choices`; unset: "triton" for a CUDA tensor x, "" (the caller's CPU default)
    for a CPU one."""
    choice = os.environ.get(variable, "").strip().lower()
    if choice and choice not in choices:
        raise ValueError(f"{variable} must be " + " or ".join(repr(c) for c in choices) + f", got {choice!r}")
    return choice or ("triton" if x.is_cuda else "")


def use_triton(x, variable: str) -> bool:
    """Whether the Triton kernels run this call: yes for CUDA tensors, no for CPU ones, unless `variable` says
    triton or torch."""
    return backend(x, variable) == "triton"


def source_of(*tensors) -> tuple:
    """What a cached copy of these tensors (oneDNN's packed weights) was made from: each one's storage and in-place
    version counter. load_state_dict or any in-place write moves the counter, so a copy whose source no longer
    matches is stale. (A write through .data bypasses the counter; inference tensors have none: their callers
    never cache.)"""
    return tuple((t.data_ptr(), t._version) for t in tensors)
