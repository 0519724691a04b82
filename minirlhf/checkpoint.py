"""Hugging Face checkpoints in and out: a folder or Hub id -> a model, and a model -> a folder.

What a GPT-NeoX checkpoint on the Hub is:
    config.json                      the NeoXConfig (config.py reads both spellings)
    model.safetensors                all tensors, or
    model.safetensors.index.json     {"weight_map": {tensor name: shard file}} + the shards
    tokenizer.json                   the `tokenizers` BPE (tokenizer.py)

Tensor names on disk equal our module paths (neox.py mirrors transformers' layout), with the
exceptions spelled out in HF_NAMES and LEGACY below. Old Pythia files also carry buffers that are
not weights (a causal-mask matrix, RoPE's inv_freq); we recompute those and skip them.

Loading builds the model on the "meta" device (shapes only, no memory), then reads tensors one
module at a time with safetensors' `safe_open` and moves each onto the real device. Peak memory
stays near the final model's size. With int8=True each linear layer inside the blocks is
quantized as soon as its weight is read (int8.py), so a full-precision copy of the model never
exists: the 1-byte-per-parameter promise of LLM.int8() holds during loading too.

A folder that transformers saved from a bitsandbytes 4-bit model (config.json's quantization_config, packed
uint8 weights with their absmax and quant state) loads its 4-bit layers as they are, into NF4Linear, and
save_model(keep_4bit=True) writes ours that way (nf4_checkpoint.py has the format).

We never unpickle: a folder holding only a PyTorch `.bin` checkpoint is refused, because loading
one runs arbitrary code from the file.
"""

import contextlib
import json
import os
import shutil

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from . import nf4_checkpoint as bnb4
from .atomic import atomic_folder
from .cli import read_json_object
from .config import ConfigError, NeoXConfig
from .neox import CausalLM, SequenceClassifier
from .nf4 import NF4Linear
from .quantize import QUANTIZATIONS, QUANTIZED_LINEARS, is_block_linear, quantize_linear, set_module

# Our parameter name -> the names it may have on disk, first is what we write.
# transformers 5 calls the LM head `lm_head` in code but still writes `embed_out.weight`.
HF_NAMES = {"embed_out.weight": ("embed_out.weight", "lm_head.weight")}
# Buffers that old checkpoints saved and that are not weights: a causal mask, a mask fill value,
# RoPE frequencies. Skipped on load.
LEGACY = ("attention.bias", "attention.masked_bias", "attention.rotary_emb.inv_freq")
# Files worth fetching from the Hub: never the pickles, never the other frameworks' weights.
# A tokenizer's files in a model folder (tokenizer.py reads tokenizer.json and tokenizer_config.json).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
HUB_FILES = ["config.json", *TOKENIZER_FILES,
             "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
ARCHITECTURES = {"GPTNeoXForCausalLM": CausalLM, "GPTNeoXForSequenceClassification": SequenceClassifier}


class CheckpointError(ValueError):
    """A folder, Hub id or file that cannot be loaded; the message names it and says why."""


def resolve(name_or_path: str, files=HUB_FILES) -> str:
    """A local folder, or a Hub id downloaded into (or found in) the HF cache -> a local folder.

    files: the Hub files worth fetching (glob patterns): by default a model's config, tokenizer and safetensors
    weights; the memory planner asks for config.json alone. Honours HF_HUB_OFFLINE=1: then only the cache is
    consulted.
    """
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path):
        raise CheckpointError(f"{name_or_path}: is a file; expected a model folder or a Hub id")
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or not name_or_path
    if looks_local:
        raise CheckpointError(f"{name_or_path}: no such folder")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id=name_or_path, allow_patterns=list(files))
    except LocalEntryNotFoundError:
        raise CheckpointError(f"{name_or_path}: not a local folder, and not in the Hugging Face cache "
                              f"(offline, or the Hub could not be reached)") from None
    except HFValidationError:
        raise CheckpointError(f"{name_or_path}: not a local folder and not a valid Hub id") from None
    except Exception as e:  # repository not found, gated, HTTP errors: all one-line messages
        raise CheckpointError(f"{name_or_path}: could not download from the Hub "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def weight_files(folder: str) -> list[str]:
    """The safetensors files of a checkpoint folder, single-file or sharded."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        files = [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]
        for path in files:
            if not os.path.isfile(path):
                raise CheckpointError(f"{path}: listed in {index} but missing")
        return files
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    pickles = [n for n in os.listdir(folder) if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    if pickles:
        raise CheckpointError(f"{folder}: only pickle checkpoints ({', '.join(sorted(pickles))}); minirlhf "
                              "loads safetensors only and never unpickles (convert with safetensors first)")
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def load_config(name_or_path: str) -> NeoXConfig:
    folder = resolve(name_or_path)
    return NeoXConfig.from_json(os.path.join(folder, "config.json"))


def _model_class(folder: str, kind: str | None):
    if kind is not None:
        classes = {"causal_lm": CausalLM, "classifier": SequenceClassifier}
        if kind not in classes:
            raise CheckpointError(f"kind must be one of {sorted(classes)}, got {kind!r}")
        return classes[kind]
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        architectures = json.load(f).get("architectures") or ["GPTNeoXForCausalLM"]
    return ARCHITECTURES.get(architectures[0], CausalLM)


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, device="cpu", int8: bool = False,
               threshold: float = 6.0, kind: str | None = None, quantization: str | None = None) -> nn.Module:
    """Load a GPT-NeoX from a folder or Hub id.

    kind: "causal_lm" or "classifier"; by default config.json's `architectures` decides.
    int8: quantize the blocks' linear layers to LLM.int8() while loading (embeddings, norms and the
    head stay in `dtype`). quantization: "none", "int8", "nf4" or "fp4" (NF4Linear, nf4.py: quantized tensor by
    tensor the same way); None means "int8" if int8 else "none". A folder that transformers saved from a
    bitsandbytes 4-bit model (config.json's quantization_config, nf4_checkpoint.py) loads its 4-bit layers as
    they are, into NF4Linear; quantization must then be None or its quant type. The returned model is in eval
    mode; nothing in it requires grad until you add adapters or ask for it.
    """
    if int8 and quantization not in (None, "int8"):
        raise ValueError(f"load_model: int8=True conflicts with quantization={quantization!r}")
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"load_model: quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    folder = resolve(name_or_path)
    config_path = os.path.join(folder, "config.json")
    config = NeoXConfig.from_json(config_path)
    four_bit = _four_bit_config(config_path)
    if four_bit is None:
        quantization = quantization or ("int8" if int8 else "none")
    elif (quantization or four_bit["quant_type"]) != four_bit["quant_type"] or int8:
        raise CheckpointError(f"{folder}: holds bitsandbytes {four_bit['quant_type']} 4-bit weights (config.json "
                              f"quantization_config); load it with quantization {four_bit['quant_type']!r} "
                              f"(--quantization {four_bit['quant_type']}), not {quantization or 'int8'!r}")
    files = weight_files(folder)
    with torch.device("meta"):
        model = _model_class(folder, kind)(config)
    with contextlib.ExitStack() as stack:
        where = _open_all(files, stack)  # tensor name on disk -> open safetensors handle, file path
        used = set()
        tied = config.tie_word_embeddings and isinstance(model, CausalLM)
        for module_name, module in list(model.named_modules()):
            names = [n for n, p in module.named_parameters(recurse=False) if p.is_meta]
            if not names or (tied and module_name == "embed_out"):  # the tied head is re-pointed below
                continue
            # A 4-bit folder: its 4-bit layers load as they are, the layers it kept in float stay float.
            state_key = None if four_bit is None else bnb4.quant_state_key(where, module_name)
            if state_key is not None and not is_block_linear(module_name):
                raise CheckpointError(f"{where[state_key][1]}: {module_name} is stored in 4 bits; minirlhf holds "
                                      "only the blocks' linear layers in 4 bits (embeddings, norms, head in float)")
            if state_key is not None:
                set_module(model, module_name, _read_4bit(where, module, module_name, state_key, four_bit,
                                                          dtype, device, used))
                continue
            tensors = {}
            for n in names:
                full = f"{module_name}.{n}" if module_name else n
                disk_name = next((k for k in HF_NAMES.get(full, (full,)) if k in where), None)
                if disk_name is None:
                    raise CheckpointError(f"{folder}: missing weight {full!r} "
                                          f"(not in {', '.join(os.path.basename(f) for f in files)})")
                tensors[n] = _read(where, disk_name, tuple(getattr(module, n).shape))
                used.add(disk_name)
            if quantization != "none" and four_bit is None and is_block_linear(module_name):
                set_module(model, module_name, quantize_linear(tensors, threshold, dtype, device, quantization))
            else:
                for n, t in tensors.items():
                    setattr(module, n, nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False))
        if tied:
            model.embed_out.weight = model.gpt_neox.embed_in.weight
            used.update(HF_NAMES["embed_out.weight"])
        unexpected = [k for k in where if k not in used and not k.endswith(LEGACY)]
        if unexpected:
            raise CheckpointError(f"{where[unexpected[0]][1]}: unexpected tensor {unexpected[0]!r} "
                                  f"for {type(model).__name__} with this config.json")
    return model.eval()


def stored_quantization(name_or_path: str) -> str | None:
    """"nf4" or "fp4" for a folder (or Hub id) that transformers saved from a bitsandbytes 4-bit model, None for a
    float one. Reads config.json alone: what --quantization auto follows before any weight is loaded."""
    four_bit = _four_bit_config(os.path.join(resolve(name_or_path, files=("config.json",)), "config.json"))
    return None if four_bit is None else four_bit["quant_type"]


def _four_bit_config(config_path: str) -> dict | None:
    """config.json's bitsandbytes 4-bit quantization_config, checked (nf4_checkpoint.read_config), or None."""
    try:
        return bnb4.read_config(read_json_object(config_path, ConfigError))
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{config_path}: {e}") from None


def _read_4bit(where, module, module_name, state_key, four_bit, dtype, device, used) -> NF4Linear:
    """A block linear's bitsandbytes 4-bit tensors -> NF4Linear on device, its stored tensors unchanged."""
    keys = [state_key] + [f"{module_name}.{n}" for n in bnb4.TENSORS if f"{module_name}.{n}" in where]
    path = where[state_key][1]
    tensors = {key: _read_any(where, key) for key in keys}
    bias = None
    if module.bias is not None:
        bias_name = f"{module_name}.bias"
        if bias_name not in where:
            raise CheckpointError(f"{path}: missing weight {bias_name!r}")
        bias = _read(where, bias_name, tuple(module.bias.shape)).to(dtype)
        keys.append(bias_name)
    try:
        layer = bnb4.read_linear(tensors, module_name, state_key, module.out_features, module.in_features, bias,
                                 four_bit["compute_dtype"])
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    used.update(keys)
    return layer.to(device)


def _open_all(files, stack) -> dict:
    where = {}
    for path in files:
        try:
            handle = stack.enter_context(safe_open(path, framework="pt"))
            for key in handle.keys():
                where[key] = (handle, path)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    return where


def _read_any(where, key) -> torch.Tensor:
    handle, path = where[key]
    try:
        return handle.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot read tensor {key!r} ({e})") from None


def _read(where, key, shape) -> torch.Tensor:
    t = _read_any(where, key)
    path = where[key][1]
    if tuple(t.shape) != shape:
        raise CheckpointError(f"{path}: tensor {key!r} has shape {list(t.shape)}, "
                              f"config.json implies {list(shape)}")
    if not t.is_floating_point():
        raise CheckpointError(f"{path}: tensor {key!r} has dtype {t.dtype}; expected floating point")
    return t


def float_state_dict(model: nn.Module, keep_4bit: bool = False,
                     dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's weights under their on-disk names, quantized layers dequantized, a tied head once.

    keep_4bit: NF4Linear layers are written as bitsandbytes' 4-bit tensors instead (nf4_checkpoint.py).
    dtype: cast the float tensors to it (the 4-bit tensors are not float tensors and keep theirs)."""
    state = {}
    for module_name, module in model.named_modules():
        if module_name.endswith(("lora_A", "lora_B")):
            raise CheckpointError("the model still has LoRA adapters: merge them first (merge_and_unload) "
                                  "or save them with save_adapter")
        prefix = f"{module_name}." if module_name else ""
        if keep_4bit and isinstance(module, NF4Linear):
            bias = None if module.bias is None else module.bias.detach()
            float_dtype = dtype or (torch.float32 if bias is None else bias.dtype)
            state.update(bnb4.linear_tensors(module, module_name, float_dtype))
            if bias is not None:
                state[prefix + "bias"] = bias.to(float_dtype)
            continue
        if isinstance(module, QUANTIZED_LINEARS):
            state[prefix + "weight"] = module.dequantize().to(dtype or torch.float32)  # fp32, then one rounding
            if module.bias is not None:
                state[prefix + "bias"] = module.bias.detach().to(dtype or module.bias.dtype)
            continue
        for n, p in module.named_parameters(recurse=False):
            state[prefix + n] = p.detach().to(dtype or p.dtype)
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("embed_out.weight", None)
    return {k: v.contiguous() for k, v in state.items()}


def four_bit_format(model: nn.Module) -> dict:
    """The one bitsandbytes 4-bit format of a model's NF4Linear layers, for config.json's quantization_config
    ({"quant_type", "double_quant", "compute_dtype"}); CheckpointError if it has none, mixes formats or holds
    layers the format cannot write (int8)."""
    formats = set()
    for name, module in model.named_modules():
        if isinstance(module, QUANTIZED_LINEARS) and not isinstance(module, NF4Linear):
            raise CheckpointError(f"save_model(keep_4bit=True): {name} is a {type(module).__name__}; only NF4Linear "
                                  "layers have a bitsandbytes 4-bit format")
        if isinstance(module, NF4Linear):
            compute = module.compute_dtype or (module.bias.dtype if module.bias is not None else torch.float32)
            formats.add((module.quant_type, module.double_quant, compute))
    if len(formats) != 1:
        found = "no NF4Linear layers" if not formats else f"{len(formats)} formats ({sorted(map(str, formats))})"
        raise CheckpointError(f"save_model(keep_4bit=True): config.json holds one 4-bit format (quant type, double "
                              f"quantization, compute dtype); this model has {found}")
    quant_type, double_quant, compute_dtype = formats.pop()
    return dict(quant_type=quant_type, double_quant=double_quant, compute_dtype=compute_dtype)


def save_model(model: nn.Module, folder: str, tokenizer_folder: str | None = None,
               dtype: torch.dtype | None = None, keep_4bit: bool = False) -> None:
    """Write config.json + model.safetensors (+ tokenizer files) so transformers loads the folder.

    Written through atomic_folder: an interrupted save never leaves a half-written checkpoint, and an
    existing folder is replaced only if it holds nothing but a previous save. Int8 and 4-bit layers are written
    dequantized (float), which is what `from_pretrained` expects without bitsandbytes; with keep_4bit, NF4Linear
    layers are written as they are, in the format transformers + bitsandbytes save (nf4_checkpoint.py), with the
    quantization_config that makes `from_pretrained` rebuild them as bitsandbytes' Linear4bit.
    """
    architecture = "GPTNeoXForSequenceClassification" if isinstance(model, SequenceClassifier) else "GPTNeoXForCausalLM"
    extra = {"quantization_config": bnb4.write_config(**four_bit_format(model))} if keep_4bit else {}
    state = float_state_dict(model, keep_4bit, dtype)  # before the folder: a model we cannot write leaves nothing
    with atomic_folder(folder) as tmp:
        model.config.save(os.path.join(tmp, "config.json"), architecture, extra)
        save_file({k: v.cpu() for k, v in state.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        os.chmod(os.path.join(tmp, "model.safetensors"), 0o644)  # safetensors writes it owner-only
        if tokenizer_folder is not None:
            for name in TOKENIZER_FILES:
                src = os.path.join(tokenizer_folder, name)
                if os.path.isfile(src):
                    shutil.copyfile(src, os.path.join(tmp, name))


__all__ = ["CheckpointError", "ConfigError", "load_model", "load_config", "save_model", "resolve",
           "weight_files", "float_state_dict", "four_bit_format"]
