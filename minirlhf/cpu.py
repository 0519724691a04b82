"""What this CPU multiplies fast: the instruction-set flags that choose minirlhf's CPU paths.

torch's CPU matrix products go through oneDNN, which picks instructions by what the CPU has:

    int8 x int8 -> int32   AVX512-VNNI (vpdpbusd: 4 byte products summed per 32-bit lane) or AMX-INT8
                           (tile multiply): torch._int_mm is then the fastest GEMM there is. Without them
                           it is a scalar loop, ~100x slower than fp32.
    bf16 x bf16 -> fp32    AVX512-BF16 (vdpbf16ps: 2 bf16 products per lane) or AMX-BF16: bf16 GEMMs
                           run several times faster than fp32. Without them bf16 is converted to fp32 on
                           the fly and runs slower than plain fp32.

So the same model has a different fastest configuration on different CPUs; two decisions follow from
these flags: Int8Linear multiplies with torch._int_mm or with an fp32 GEMM on the codes
(kernels/reference.py), and `--dtype auto` gives the float parts bf16 or fp32 (devices.py).

The flags are read once, from /proc/cpuinfo (Linux; elsewhere nothing is assumed). Tests monkeypatch
FAST_INT8 / FAST_BF16 (and reference.CPU_FAST_INT_MM, which copies FAST_INT8) to run every path on any CPU.
"""
import os
import platform

import torch

INT8_FLAGS = ("avx512_vnni", "amx_int8")  # what oneDNN's fast int8 GEMM needs (one of them)
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # ... and its fast bf16 GEMM


def read_flags() -> tuple[str, set[str]]:
    """(CPU model name, its instruction-set flags) from /proc/cpuinfo; ("unknown CPU", set()) where that fails."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, flags


MODEL, FLAGS = read_flags()
FAST_INT8 = torch.backends.mkldnn.is_available() and any(f in FLAGS for f in INT8_FLAGS)
FAST_BF16 = torch.backends.mkldnn.is_available() and any(f in FLAGS for f in BF16_FLAGS)


def describe() -> str:
    """One line for benchmark headers: the CPU, its cores, and the int8 / bf16 instructions it has."""
    def have(names):
        return ", ".join(f for f in names if f in FLAGS)

    return (f"{MODEL}, {os.cpu_count()} cores; "
            f"int8 instructions: {have(INT8_FLAGS + ('avx_vnni',)) or 'none (no VNNI/AMX)'}; "
            f"bf16 instructions: {have(BF16_FLAGS) or 'none (no AVX512-BF16/AMX)'}")
