"""The kernels: the PyTorch references (the spec, and the CPU path) and the Triton versions for CUDA tensors."""

import os


def use_triton(x, variable: str) -> bool:
    """Whether the Triton kernels run this call: yes for CUDA tensors, no for CPU ones, unless the environment
    variable `variable` (MINIRLHF_INT8_BACKEND, MINIRLHF_NF4_BACKEND; read on every call) says triton or torch."""
    backend = os.environ.get(variable, "").strip().lower()
    if backend not in ("", "triton", "torch"):
        raise ValueError(f"{variable} must be 'triton' or 'torch', got {backend!r}")
    return backend == "triton" or (backend == "" and x.is_cuda)
