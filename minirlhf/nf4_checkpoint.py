"""A 4-bit model on disk as transformers + bitsandbytes save it: NF4Linear in and out, bit for bit.

transformers' `save_pretrained` of a model loaded with `BitsAndBytesConfig(load_in_4bit=True, ...)` writes, for
each 4-bit linear layer <name> (n = out_features * in_features, blocks = ceil(n / blocksize)):

    <name>.weight                                  uint8 [ceil(n / 2), 1]  two 4-bit codes per byte
    <name>.weight.absmax                           fp32 [blocks], or uint8 [blocks] with double quantization
    <name>.weight.quant_map                        fp32 [16]               the code book, NF4 or FP4
    <name>.weight.nested_absmax                    fp32 [ceil(blocks / 256)]   } double quantization only
    <name>.weight.nested_quant_map                 fp32 [256]  the 8-bit dynamic code book }
    <name>.weight.quant_state.bitsandbytes__nf4    uint8 [bytes]  UTF-8 JSON (a tensor, as safetensors holds
                                                   only tensors): {"quant_type": "nf4", "blocksize": 64,
                                                   "dtype": "float32", "shape": [out, in], and with double
                                                   quantization "nested_blocksize": 256, "nested_dtype":
                                                   "float32", "nested_offset": 0.0521...}  (__fp4 for FP4)
    <name>.bias                                    float [out], as any bias

plus, in config.json, "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": true,
"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": true, "bnb_4bit_compute_dtype": "float32", ...}.

Those are NF4Linear's own tensors under other names (weight, absmax, nested_absmax, and offset is
"nested_offset"), so a layer is read by copying them, never dequantized and requantized, and written the same
way; kernels/nf4_reference.py makes them the tensors bitsandbytes itself computes. The code books in the file
are checked against ours rather than used (NF4Linear has no place for a custom one). "dtype" is the float dtype
the weight had before quantization, which bitsandbytes dequantizes to before casting to the compute dtype; we
check it and dequantize straight to the compute dtype: the same numbers when the two dtypes are the same (one
rounding from fp32 either way), not when a bfloat16 or float16 weight computes in float32.

Every check raises ValueError with one line naming the tensor and the field; checkpoint.py adds the file.
"""
import json
import math

import torch

from .kernels import nf4_reference as R
from .nf4 import NF4Linear

QUANT_STATE = "weight.quant_state.bitsandbytes__"  # + quant type: the JSON tensor's suffix
TENSORS = ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map")
FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What transformers' BitsAndBytesConfig.to_dict() writes for a 4-bit model (those keys, in that order).
BNB_CONFIG_DEFAULTS = {"_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": "float32",
                       "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "nf4",
                       "bnb_4bit_use_double_quant": True, "llm_int8_enable_fp32_cpu_offload": False,
                       "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0,
                       "load_in_4bit": True, "load_in_8bit": False, "quant_method": "bitsandbytes"}


def read_config(raw: dict) -> dict | None:
    """config.json (parsed) -> None for a float model, or {"quant_type", "double_quant", "compute_dtype"} for a
    bitsandbytes 4-bit one. Raises ValueError naming the quantization_config field that we cannot load."""
    qc = raw.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise ValueError(f"quantization_config must be an object, got {qc!r}")
    if qc.get("quant_method") != "bitsandbytes":
        raise ValueError(f"quantization_config.quant_method {qc.get('quant_method')!r} is not supported "
                         "(only 'bitsandbytes' 4-bit)")
    if qc.get("load_in_8bit"):
        raise ValueError("quantization_config.load_in_8bit: prequantized int8 folders are not supported; load the "
                         "float model with quantization='int8' instead")
    if qc.get("load_in_4bit") is not True:
        raise ValueError(f"quantization_config.load_in_4bit must be true, got {qc.get('load_in_4bit')!r}")
    quant_type = qc.get("bnb_4bit_quant_type", "fp4")  # BitsAndBytesConfig's default
    if quant_type not in R.QUANT_TYPES:
        raise ValueError(f"quantization_config.bnb_4bit_quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    double_quant = qc.get("bnb_4bit_use_double_quant", False)
    if not isinstance(double_quant, bool):
        raise ValueError(f"quantization_config.bnb_4bit_use_double_quant must be true or false, got {double_quant!r}")
    compute = qc.get("bnb_4bit_compute_dtype") or "float32"  # transformers: None means float32
    if compute not in FLOAT_DTYPES:
        raise ValueError(f"quantization_config.bnb_4bit_compute_dtype must be one of {', '.join(FLOAT_DTYPES)}, "
                         f"got {compute!r}")
    storage = qc.get("bnb_4bit_quant_storage", "uint8")
    if storage != "uint8":
        raise ValueError(f"quantization_config.bnb_4bit_quant_storage {storage!r} is not supported (only uint8)")
    return dict(quant_type=quant_type, double_quant=double_quant, compute_dtype=FLOAT_DTYPES[compute])


def write_config(quant_type: str, double_quant: bool, compute_dtype: torch.dtype) -> dict:
    """The quantization_config entry of config.json for NF4Linear blocks of this format."""
    name = str(compute_dtype).removeprefix("torch.")
    return {**BNB_CONFIG_DEFAULTS, "bnb_4bit_compute_dtype": name, "bnb_4bit_quant_type": quant_type,
            "bnb_4bit_use_double_quant": double_quant}


def quant_state_key(tensor_names, prefix: str) -> str | None:
    """The name of the JSON quant state of the layer at prefix ("gpt_neox.layers.0.mlp.dense_h_to_4h"), if any."""
    for quant_type in R.QUANT_TYPES:
        if f"{prefix}.{QUANT_STATE}{quant_type}" in tensor_names:
            return f"{prefix}.{QUANT_STATE}{quant_type}"
    return None


def _decode(key: str, t: torch.Tensor) -> dict:
    """The JSON object packed in a uint8 1-D tensor."""
    if t.dtype != torch.uint8 or t.dim() != 1:
        raise ValueError(f"tensor {key!r} must be uint8 [bytes] (JSON text), got {t.dtype} {list(t.shape)}")
    try:
        state = json.loads(bytes(t.tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"tensor {key!r} is not a JSON quant state ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"tensor {key!r} must hold a JSON object, got {type(state).__name__}")
    return state


def _field(key: str, state: dict, name: str, ok, domain: str):
    value = state.get(name)
    if value is None or not ok(value):
        raise ValueError(f"tensor {key!r}: field {name!r} must be {domain}, got {value!r}")
    return value


def _tensor(tensors: dict, key: str, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    """tensors[key], which must exist with this dtype and shape."""
    if key not in tensors:
        raise ValueError(f"missing tensor {key!r} (a 4-bit layer needs it)")
    t = tensors[key]
    if t.dtype != dtype or tuple(t.shape) != shape:
        raise ValueError(f"tensor {key!r} must be {dtype} {list(shape)}, got {t.dtype} {list(t.shape)}")
    return t


def read_linear(tensors: dict, prefix: str, state_key: str, out_features: int, in_features: int,
                bias: torch.Tensor | None, compute_dtype: torch.dtype) -> NF4Linear:
    """One layer's tensors as read from the file ({full name: tensor}) -> an NF4Linear holding them unchanged.

    bias: the layer's float bias [out] (already read and cast), or None."""
    state = _decode(state_key, tensors[state_key])
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    quant_type = _field(state_key, state, "quant_type", lambda v: v in R.QUANT_TYPES, "'nf4' or 'fp4'")
    if not state_key.endswith(quant_type):
        raise ValueError(f"tensor {state_key!r}: field 'quant_type' is {quant_type!r}, its name says otherwise")
    blocksize = _field(state_key, state, "blocksize", lambda v: is_int(v) and v in R.BLOCKSIZES,
                       f"one of {', '.join(map(str, R.BLOCKSIZES))} (what bitsandbytes supports)")
    _field(state_key, state, "dtype", lambda v: v in FLOAT_DTYPES, f"one of {', '.join(FLOAT_DTYPES)}")
    _field(state_key, state, "shape", lambda v: v == [out_features, in_features],
           f"[{out_features}, {in_features}] (config.json's shape of this layer)")
    double_quant = f"{prefix}.weight.nested_absmax" in tensors or "nested_offset" in state
    n = out_features * in_features
    blocks = -(-n // blocksize)
    layer = NF4Linear(in_features, out_features, bias=bias is not None, blocksize=blocksize,
                      double_quant=double_quant, quant_type=quant_type, compute_dtype=compute_dtype,
                      dtype=bias.dtype if bias is not None else torch.float32)
    code = _tensor(tensors, f"{prefix}.weight.quant_map", torch.float32, (16,))
    if not torch.equal(code, R.code_4bit(quant_type)):
        raise ValueError(f"tensor '{prefix}.weight.quant_map' is not bitsandbytes' {quant_type} code book "
                         "(custom code books are not supported)")
    layer.weight.data.copy_(_tensor(tensors, f"{prefix}.weight", torch.uint8, ((n + 1) // 2, 1)))
    if double_quant:
        _field(state_key, state, "nested_blocksize", lambda v: v == R.NESTED_BLOCKSIZE, str(R.NESTED_BLOCKSIZE))
        _field(state_key, state, "nested_dtype", lambda v: v == "float32", "'float32'")
        offset = _field(state_key, state, "nested_offset",
                        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                        "a finite number")
        code8 = _tensor(tensors, f"{prefix}.weight.nested_quant_map", torch.float32, (256,))
        if not torch.equal(code8, R.dynamic_code()):
            raise ValueError(f"tensor '{prefix}.weight.nested_quant_map' is not bitsandbytes' dynamic 8-bit "
                             "code book")
        layer.absmax.copy_(_tensor(tensors, f"{prefix}.weight.absmax", torch.uint8, (blocks,)))
        layer.nested_absmax.copy_(_tensor(tensors, f"{prefix}.weight.nested_absmax", torch.float32,
                                          (-(-blocks // R.NESTED_BLOCKSIZE),)))
        layer.offset.fill_(offset)  # JSON holds the fp32 value as a double: it converts back exactly
    else:
        layer.absmax.copy_(_tensor(tensors, f"{prefix}.weight.absmax", torch.float32, (blocks,)))
    if bias is not None:
        layer.bias.data.copy_(bias)
    return layer


def linear_tensors(layer: NF4Linear, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """An NF4Linear -> its tensors under bitsandbytes' names (bias not included). dtype: the model's float dtype,
    recorded as the quant state's "dtype"."""
    state = {"quant_type": layer.quant_type, "blocksize": layer.blocksize,
             "dtype": str(dtype).removeprefix("torch."), "shape": [layer.out_features, layer.in_features]}
    tensors = {f"{prefix}.weight": layer.weight.detach(), f"{prefix}.weight.absmax": layer.absmax,
               f"{prefix}.weight.quant_map": R.code_4bit(layer.quant_type).clone()}
    if layer.double_quant:
        state.update(nested_blocksize=R.NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=layer.offset.item())
        tensors[f"{prefix}.weight.nested_absmax"] = layer.nested_absmax
        tensors[f"{prefix}.weight.nested_quant_map"] = R.dynamic_code()
    packed = json.dumps(state).encode("utf-8")
    tensors[f"{prefix}.{QUANT_STATE}{layer.quant_type}"] = torch.tensor(list(packed), dtype=torch.uint8)
    return tensors


__all__ = ["QUANT_STATE", "TENSORS", "read_config", "write_config", "quant_state_key", "read_linear", "linear_tensors"]
