"""Compile the Triton kernels for NVIDIA GPUs exactly as a launch would, on a machine without one.

Triton's interpreter checks what the kernels compute, but not what a GPU would run: register
spills, shared memory, whether the main loop really uses int8 tensor cores. Triton can compile
for a CUDA target on any Linux machine (its wheel ships ptxas), so this module does, for every
kernel x autotune config x input dtype x arch, and reads the answers from the PTX and ptxas' log.

"Exactly as a launch would" means three things, each taken from the code that launches:
  * the arguments: int8_matmul.py's own launch builders (_quantize_launches, _gemm_launch) are
    called on meta-device tensors of a real layer shape, so the strides, constexprs and buffer
    dtypes are the host code's, not a copy of them;
  * the specialization: Triton's own binder (create_function_from_signature, the function a launch
    calls) turns those arguments into the signature: unit strides become constant 1, integers
    divisible by 16 and 16-byte-aligned pointers get tt.divisibility = 16, and do_not_specialize
    arguments stay plain i32; then JITFunction._pack_args and triton.compile, as in
    JITFunction.run. (Meta tensors report data_ptr() 0, i.e. 16-byte aligned, like fresh
    allocations from PyTorch's caching allocator.)
  * the configs: the GEMM's autotune list after the same per-arch pruning the autotuner applies.

Checks per build (Build.problems):
  * it compiles; ptxas reports 0 bytes of spill stores and loads;
  * shared memory <= the arch's per-block limit (int8_matmul.SMEM_LIMIT);
  * GEMM: the int8 main loop's tensor-core instruction is in the PTX,
      sm_80 / sm_89, and sm_90 with BLOCK_M < 64:  mma.sync.aligned.m16n8k32.row.col[.satfinite].s32.s8.s8.s32
      sm_90 with BLOCK_M >= 64:                    wgmma.mma_async.sync.aligned.m64nNk32.s32.s8.s8
    and the outlier product runs on tensor cores too (f16 or bf16 MMA, never FMA), and the
    operand loads are asynchronous copies (cp.async) as on a real launch;
  * no approximate fp32 division (div.approx / div.full) anywhere: scales are divided with div_rn.
  * NF4 GEMMs (nf4_matmul.py, built by nf4_matrix from nf4_launches): the K loop's product on tensor cores in
    the compute dtype (mma.sync m16n8k16 f16/bf16, m16n8k8 tf32 for fp32's tf32x3; wgmma on sm_90 with
    BLOCK_M >= 64), cp.async loads when K is a whole number of blocks per row (a ragged K's loop is not
    pipelined), and no fp32 FMA (fma.rn.f32): the nested absmax CODE8[q] * s + offset must round twice.

What only a GPU can tell: whether the numbers are right on the hardware (tests/test_int8_cuda.py),
how fast it is (benchmarks/bench_int8.py --gpu), which config the autotuner picks.

Run in a process WITHOUT TRITON_INTERPRET=1 (the interpreter replaces triton.jit). The command
is benchmarks/compile_matrix.py; tests/test_int8_compile.py and tests/test_nf4_compile.py run subsets in CI.
"""
import contextlib
import io
import re
import time
from dataclasses import asdict, dataclass, field

import torch

ARCHS = (80, 89, 90)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# The 20B layer the matrix is built at: h_to_4h of GPT-NeoX-20B, x [6144 tokens, 6144] -> [6144, 24576].
# Every Pythia layer has the same divisibility pattern (all sizes multiples of 16), so the same code.
SHAPE = dict(M=6144, K=6144, N=24576)
# ... and 2^19 tokens of it, where x [M, K] spans 3.2e9 elements (and out 1.3e10): past int32
# offsets, so every kernel that indexes x or out gets its OFFSETS_64 variant.
SHAPE_64 = dict(M=524288, K=6144, N=24576)

_S8_MMA_SYNC = re.compile(r"mma\.sync\.aligned\.m16n8k32\.row\.col(?:\.satfinite)?\.s32\.s8\.s8\.s32")
_S8_WGMMA = re.compile(r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k32\.s32\.s8\.s8")
_APPROX_DIV = re.compile(r"div\.(?:approx|full)(?:\.ftz)?\.f32")


_FP32_FMA = re.compile(r"\bfma\.rn(?:\.ftz)?\.f32\b")


def _float_mma(t):
    """A tensor-core MMA with fp32 accumulation and operands of type t ('f16', 'bf16', or 'tf32')."""
    k = 8 if t == "tf32" else 16
    return re.compile(rf"mma\.sync\.aligned\.m16n8k{k}\.row\.col\.f32\.{t}\.{t}\.f32"
                      rf"|wgmma\.mma_async\.sync\.aligned\.m64n\d+k{k}\.f32\.{t}\.{t}")


@dataclass
class Build:
    kernel: str
    arch: int
    dtype: str
    config: str  # constexprs that pick the code, plus warps/stages
    offsets_64: bool
    seconds: float = 0.0
    regs: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    smem: int = -1
    s8_mma: str = ""  # the int8 MMA instruction found in the PTX (GEMM only)
    outlier_mma: str = ""  # the float MMA found: the int8 GEMM's outlier product, or an NF4 GEMM's K loop
    error: str = ""
    problems: list = field(default_factory=list)

    @property
    def ok(self):
        return not self.problems

    def as_dict(self):
        return {**asdict(self), "ok": self.ok}


def _meta(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


def launches(dtype, M, K, N, threshold=6.0, bias=True):
    """Every kernel launch of one triton_int8_linear call, as (kernel, grid, args, kwargs), built
    by int8_matmul's own launch code on meta tensors (no memory, no GPU)."""
    from minirlhf.kernels import int8_matmul as T

    x = _meta(M, K, dtype=dtype)
    flags, cols, count, q, row_scale = T._quantize_buffers(x, threshold)
    quant = T._quantize_launches(x, threshold, flags, cols, count, q, row_scale)
    w_int8, w_scale = _meta(N, K, dtype=torch.int8), _meta(N, dtype=torch.float32)
    b = _meta(N, dtype=dtype) if bias else None
    out = _meta(M, N, dtype=dtype)
    gemm = T._gemm_launch(x, q, row_scale, w_int8, w_scale, b, cols, count, out)
    return quant + [gemm]


NF4_KERNELS = ("_nf4_matmul_kernel", "_nf4_matmul_t_kernel")
NF4_BLOCKSIZE = 64
# the NF4 variants: double-quantized or plain fp32 absmax (K % 64 == 0, int32 offsets), both built with every
# config that survives pruning; a K that is not a whole number of blocks per row (the flat-index decoder,
# K = 6120) and 2^19 tokens (int64 offsets), each with the largest config that survives
NF4_VARIANTS = {"double-quant": dict(double_quant=True), "fp32-absmax": dict(double_quant=False),
                "ragged-K": dict(double_quant=True, K=6120), "offsets-64": dict(double_quant=True, M=SHAPE_64["M"])}
NF4_EVERY_CONFIG = ("double-quant", "fp32-absmax")


def nf4_launches(dtype, M, K, N, double_quant=True, blocksize=NF4_BLOCKSIZE):
    """The two GEMM launches of one NF4Linear forward + backward on CUDA (triton_nf4_linear, then
    triton_nf4_grad_input), as (kernel, grid, args, kwargs), built by nf4_matmul's own launch code on meta tensors."""
    from minirlhf.kernels import nf4_matmul as T

    blocks = -(-(N * K) // blocksize)
    if double_quant:
        absmax, nested, offset = (_meta(blocks, dtype=torch.uint8), _meta(-(-blocks // 256), dtype=torch.float32),
                                  _meta(1, dtype=torch.float32))
    else:
        absmax, nested, offset = _meta(blocks, dtype=torch.float32), None, None
    state = T.launch_state(absmax, nested, offset, _meta(16, dtype=torch.float32), _meta(256, dtype=torch.float32))
    weight = _meta((N * K + 1) // 2, 1, dtype=torch.uint8)
    forward = T._gemm_launch(_meta(M, K, dtype=dtype), weight, state, (N, K), blocksize, _meta(N, dtype=dtype),
                             _meta(M, N, dtype=dtype))
    grad_input = T._gemm_launch(_meta(M, N, dtype=dtype), weight, state, (N, K), blocksize, None,
                                _meta(M, K, dtype=dtype), transposed=True)
    return [forward, grad_input]


def nf4_matrix(archs=ARCHS, dtypes=tuple(DTYPES), kernels=NF4_KERNELS, configs=None, variants=tuple(NF4_VARIANTS),
               on_build=None):
    """Check the NF4 GEMM builds (nf4_matmul.py): every config that survives pruning in the variants of
    NF4_EVERY_CONFIG, the largest one in the others (NF4_VARIANTS); configs: labels "BMxBNxBK" to keep.
    Returns [Build]."""
    from minirlhf.kernels.nf4_matmul import nf4_configs_for

    builds = []
    for variant in variants:
        spec = dict(NF4_VARIANTS[variant])
        double_quant = spec.pop("double_quant")
        shape = {**SHAPE, **spec}
        for arch in archs:
            for dtype_name in dtypes:
                for kernel, _grid, args, kwargs in nf4_launches(DTYPES[dtype_name], **shape, double_quant=double_quant):
                    name = _jit_function(kernel).fn.__name__
                    if name not in kernels:
                        continue
                    kept = nf4_configs_for(kernel.configs, NF4_BLOCKSIZE, arch, DTYPES[dtype_name],
                                           transposed=name == "_nf4_matmul_t_kernel",
                                           ragged=not kwargs["ROW_ALIGNED"])
                    for config in kept if variant in NF4_EVERY_CONFIG else kept[:1]:
                        kw = {**kwargs, **config.all_kwargs()}
                        if configs and f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}" not in configs:
                            continue
                        b = check_build(kernel, args, kw, arch, dtype_name)
                        builds.append(b)
                        if on_build:
                            on_build(b)
    return builds


def _jit_function(kernel):
    while not hasattr(kernel, "params"):  # Autotuner -> JITFunction
        kernel = kernel.fn
    return kernel


def compile_like_launch(kernel, args, kwargs, arch):
    """triton.compile of `kernel` for sm_<arch> with the specialization a launch with these
    arguments would get (the steps of JITFunction.run, with the target given instead of read
    from the driver). Returns (CompiledKernel, ptxas log)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    if knobs.runtime.interpret:
        raise RuntimeError("compile_check needs a process without TRITON_INTERPRET=1")
    jit = _jit_function(kernel)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(kwargs)
    # as JITFunction.run
    kwargs["debug"] = kwargs.get("debug", jit.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    binder = create_function_from_signature(jit.signature, jit.params, backend)  # as JITFunction.create_binder
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound_args, specialization, options)
    src = ASTSource(jit, signature, constexprs, attrs)

    # ptxas runs with -v on every compile; dump_ptxas_log prints its log (registers, spills), and
    # always_compile makes sure ptxas runs instead of a cache hit
    saved = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=target, options=options.__dict__)
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
    return compiled, log.getvalue()


def _config_label(kernel_name, kwargs, options):
    keys = {"_int8_matmul_kernel": ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
            "_quantize_rows_kernel": ("BLOCK_M", "BLOCK_K"),
            "_outlier_columns_kernel": ("BLOCK_M", "BLOCK_K"),
            "_compact_columns_kernel": ("BLOCK",),
            "_nf4_matmul_kernel": ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
            "_nf4_matmul_t_kernel": ("BLOCK_M", "BLOCK_N", "BLOCK_K")}[kernel_name]
    label = "x".join(str(kwargs[k]) for k in keys)
    if kernel_name == "_quantize_rows_kernel":
        label += " outliers" if kwargs["USE_OUTLIERS"] else " no-outliers"
    if kernel_name in NF4_KERNELS:
        label += (" double-quant" if kwargs["DOUBLE_QUANT"] else " fp32-absmax") + \
            ("" if kwargs["ROW_ALIGNED"] else " ragged-K")
    return f"{label} w{options.get('num_warps', 4)} s{options.get('num_stages', 3)}"


def check_build(kernel, args, kwargs, arch, dtype_name):
    """Compile one launch for one arch and check it (see the module docstring)."""
    from minirlhf.kernels.int8_matmul import SMEM_LIMIT

    name = _jit_function(kernel).fn.__name__
    opts = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    b = Build(name, arch, dtype_name, _config_label(name, kwargs, opts), bool(kwargs.get("OFFSETS_64", False)))
    t0 = time.perf_counter()
    try:
        compiled, log = compile_like_launch(kernel, args, kwargs, arch)
    except Exception as e:  # noqa: BLE001 -- a failed build is a result
        b.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
        b.problems.append("does not compile")
        return b
    b.seconds = round(time.perf_counter() - t0, 2)
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spills is None:
        b.problems.append("no ptxas register report")
    else:
        b.regs = int(regs.group(1))
        b.spill_stores, b.spill_loads = int(spills.group(1)), int(spills.group(2))
        if b.spill_stores or b.spill_loads:
            b.problems.append(f"spills {b.spill_stores} B stores / {b.spill_loads} B loads")
    b.smem = int(compiled.metadata.shared)
    if b.smem > SMEM_LIMIT[arch]:
        b.problems.append(f"shared memory {b.smem} B > sm_{arch} limit {SMEM_LIMIT[arch]} B")
    ptx = compiled.asm["ptx"]
    if _APPROX_DIV.search(ptx):
        b.problems.append(f"approximate division {_APPROX_DIV.search(ptx).group(0)}")
    if name == "_int8_matmul_kernel":
        wgmma = arch >= 90 and kwargs["BLOCK_M"] >= 64
        found = (_S8_WGMMA if wgmma else _S8_MMA_SYNC).search(ptx)
        b.s8_mma = found.group(0) if found else ""
        if not found:
            b.problems.append("no int8 tensor-core MMA (" + ("wgmma" if wgmma else "mma.sync") + ") in the PTX")
        operand = {"fp16": "f16", "bf16": "bf16", "fp32": "bf16"}[dtype_name]  # fp32: bf16x3 pieces
        found = _float_mma(operand).search(ptx)
        b.outlier_mma = found.group(0) if found else ""
        if not found:
            b.problems.append(f"outlier product not on {operand} tensor cores")
        if "cp.async" not in ptx:
            b.problems.append("no asynchronous copies (cp.async) in the main loop")
    if name in NF4_KERNELS:
        operand = {"fp16": "f16", "bf16": "bf16", "fp32": "tf32"}[dtype_name]  # fp32: tf32x3
        found = _float_mma(operand).search(ptx)
        b.outlier_mma = found.group(0) if found else ""
        if not found:
            b.problems.append(f"the K loop's product is not on {operand} tensor cores")
        if kwargs["ROW_ALIGNED"] and "cp.async" not in ptx:  # a ragged K's loop is not pipelined
            b.problems.append("no asynchronous copies (cp.async) in the main loop")
        if _FP32_FMA.search(ptx):
            b.problems.append("an fp32 FMA: the nested absmax must round its product and its sum apart")
    return b


def gemm_launches_per_config(kernel, kwargs, arch):
    """The GEMM launch once per autotune config that survives the autotuner's pruning on `arch`."""
    from minirlhf.kernels.int8_matmul import gemm_configs_for

    for config in gemm_configs_for(kernel.configs, arch):
        yield {**kwargs, **config.all_kwargs()}


def matrix(archs=ARCHS, dtypes=tuple(DTYPES), kernels=None, configs=None, offsets=("32", "64"), on_build=None):
    """Check every (kernel, config, arch, dtype, offset width) build; returns [Build].

    kernels: kernel names to keep (default all); configs: GEMM labels "BMxBNxBK" to keep (default
    all). on_build(build) is called after each build (progress printing)."""
    from minirlhf.kernels.int8_matmul import _int8_matmul_kernel

    builds, seen = [], set()
    for width in offsets:
        shape = SHAPE if width == "32" else SHAPE_64
        for arch in archs:
            for dtype_name in dtypes:
                todo = launches(DTYPES[dtype_name], **shape) + launches(DTYPES[dtype_name], **shape, threshold=0.0)
                for kernel, _grid, args, kwargs in todo:
                    name = _jit_function(kernel).fn.__name__
                    if kernels and name not in kernels:
                        continue
                    variants = (gemm_launches_per_config(kernel, kwargs, arch)
                                if kernel is _int8_matmul_kernel else [kwargs])
                    for kw in variants:
                        if kernel is _int8_matmul_kernel and configs and \
                                f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}" not in configs:
                            continue
                        # the compact kernel does not depend on x's dtype; no-outlier launches repeat kernels
                        key = (name, arch, dtype_name if name != "_compact_columns_kernel" else "",
                               repr(sorted((k, v) for k, v in kw.items())))
                        if key in seen:
                            continue
                        seen.add(key)
                        shown = dtype_name if name != "_compact_columns_kernel" else "-"
                        b = check_build(kernel, args, kw, arch, shown)
                        builds.append(b)
                        if on_build:
                            on_build(b)
    return builds


def summary(builds):
    """Counts for the report: builds, compiled, spill-free, with int8 MMA (GEMM), NF4 builds with their float
    MMA, problems."""
    gemm = [b for b in builds if b.kernel == "_int8_matmul_kernel"]
    nf4 = [b for b in builds if b.kernel in NF4_KERNELS]
    return dict(
        nf4_builds=len(nf4),
        nf4_float_mma=sum(bool(b.outlier_mma) for b in nf4),
        builds=len(builds),
        compiled=sum(not b.error for b in builds),
        spill_free=sum(b.spill_stores == 0 and b.spill_loads == 0 for b in builds),
        smem_within_limit=sum(0 <= b.smem and not any("shared memory" in p for p in b.problems) for b in builds),
        gemm_builds=len(gemm),
        gemm_int8_mma=sum(bool(b.s8_mma) for b in gemm),
        gemm_outlier_mma=sum(bool(b.outlier_mma) for b in gemm),
        failing=sum(not b.ok for b in builds),
    )


__all__ = ["ARCHS", "DTYPES", "SHAPE", "SHAPE_64", "NF4_KERNELS", "NF4_VARIANTS", "Build", "launches",
           "nf4_launches", "compile_like_launch", "check_build", "matrix", "nf4_matrix", "summary"]
