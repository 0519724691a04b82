"""LoRA: fine-tune a big frozen model by training a small low-rank correction to some of its layers.

Low-Rank Adaptation (Hu et al. 2021, arXiv 2106.09685). A pretrained linear layer computes
y = x W^T + b with W: [out, in]. Fine-tuning changes W by some dW; LoRA's bet is that the useful dW
has low rank, so it writes dW = (alpha / r) * B @ A with

    A: [r, in]     B: [out, r]     r << min(in, out)       (r = 8 on a 1024 -> 3072 layer: 1% of W)

and trains only A and B; W stays frozen (it can even be int8, see int8.py: QLoRA-style training).

    y = base(x) + dropout(x) @ A^T @ B^T * (alpha / r)          x: [..., in] -> y: [..., out]

  * Init: A ~ kaiming-uniform(a=sqrt(5)) (nn.Linear's default), B = 0. So B @ A = 0 and a fresh
    adapter leaves the model exactly as it was; training starts from the pretrained function.
  * scaling = alpha / r: when you try another r, keeping alpha fixed keeps the update size roughly
    fixed, so the learning rate need not be retuned (the paper's argument, section 4.1).
  * The adapter path is computed as two skinny matmuls x @ A^T -> [..., r] then @ B^T, never by
    forming the [out, in] matrix B @ A: that is in*r + r*out multiply-adds per token, not in*out.
  * Adapter weights live in fp32 whatever the base dtype: bf16 keeps ~3 significant digits, so an
    Adam step of lr = 1e-4 on a weight of size 0.1 would round away. The adapter path runs in fp32
    and the sum is cast back to the base output's dtype. This is what PEFT does (get_peft_model's
    autocast_adapter_dtype=True stores fp32 adapters; lora.Linear.forward computes
    result + lora_B(lora_A(dropout(x))) * scaling, which promotes to fp32, then casts to the base
    result's dtype), and we do it in the same order: bf16 outputs equal PEFT's bit for bit.
  * Gradients: dL/dA and dL/dB need the input x and the gradient arriving at y, which flows *through*
    the frozen base (dL/dx = dL/dy @ W), so earlier layers' adapters train too. Frozen base weights
    get requires_grad=False: autograd then never allocates their .grad (their size in memory again).

What this module gives you (names chosen so that PEFT readers can map them):

    LoRALinear                   wraps an nn.Linear or an Int8Linear: .base_layer, .lora_A
                                 (nn.Linear in -> r), .lora_B (nn.Linear r -> out), .lora_dropout,
                                 .scaling, .r, .alpha; flags .merged and .disabled
    add_lora(model, ...)         put adapters on layers chosen by module-name suffix; freeze the rest
    lora_summary(model)          "trainable params: X || all params: Y || trainable%: Z" + where adapters sit
    disable_adapters(model)      context manager: the exact base model inside (the PPO reference policy)
    merge_lora / unmerge_lora    fold W += B @ A * scaling into the base weight, and back
    merge_and_unload(model)      merge, then swap every LoRALinear for its (merged) base layer
    save_adapter / load_adapter  PEFT's on-disk format, readable by PeftModel.from_pretrained and back

Which layers: a module is a target when its name equals a target or ends with "." + target
(PEFT's rule), e.g. "query_key_value" matches "gpt_neox.layers.3.attention.query_key_value" and
"dense" matches "...attention.dense" but not "...mlp.dense_h_to_4h". "all-linear" means every
Linear/Int8Linear inside the transformer blocks (names with a block index, "gpt_neox.layers.{i}."),
so never the output head (embed_out / lm_head / score). PEFT's rule is "every linear layer but the
output layer"; on GPT-NeoX both pick the same layers. `layers=N` keeps only the last
N blocks (trlX's num_layers_unfrozen); PEFT calls the resulting index list `layers_to_transform`.

The file format (PEFT 0.21, what `PeftModel.save_pretrained` writes for one adapter named "default"):

    adapter_config.json          {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
                                  "target_modules": ["query_key_value"], "layers_to_transform": null,
                                  "bias": "none", "fan_in_fan_out": false, "task_type": "CAUSAL_LM", ...}
    adapter_model.safetensors    base_model.model.<module name>.lora_A.weight   [r, in]
                                 base_model.model.<module name>.lora_B.weight   [out, r]

"base_model.model." is the path of the wrapped model inside PeftModel (PeftModel.base_model is a
LoraModel whose .model is yours); PEFT drops the adapter name ("lora_A.default.weight" in memory).
"""

import contextlib
import json
import math
import os
import re

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import atomic_folder
from .quantize import is_linear, set_module

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."  # where PeftModel keeps the wrapped model
KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
# PEFT's default way to find a module's block index when no layers_pattern is given: the first
# number that follows a named container, "gpt_neox.layers.3.attention.dense" -> 3.
BLOCK_RE = re.compile(r"^.*?\.[^.]*\.(?P<idx>\d+)\.")
# adapter_config.json fields that change the math or the set of trained tensors in ways we do not
# implement; each must be off (null / false / empty) for us to load the adapter.
UNSUPPORTED = ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias", "modules_to_save", "rank_pattern",
               "alpha_pattern", "exclude_modules", "layer_replication", "target_parameters",
               "trainable_token_indices", "use_qalora", "use_bdlora", "alora_invocation_tokens")


class AdapterError(ValueError):
    """A bad adapter folder, or one that does not fit the model."""


def _check_r_and_dropout(r, dropout) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


class LoRALinear(nn.Module):
    """y = base_layer(x) + lora_B(lora_A(lora_dropout(x))) * scaling, with base_layer frozen.

    base_layer: nn.Linear or Int8Linear, in_features -> out_features. lora_A: [r, in] weight,
    lora_B: [out, r] weight, both fp32 on the base's device. `merged`: B @ A * scaling is already
    inside the base weight, so forward skips the adapter path. `disabled`: forward is base_layer(x)
    alone (see disable_adapters).
    """

    def __init__(self, base_layer: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0):
        super().__init__()
        _check_r_and_dropout(r, dropout)
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        # Identity when p == 0, as PEFT: no useless mask multiply.
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base_layer.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as nn.Linear, as the paper's code
        nn.init.zeros_(self.lora_B.weight)  # B = 0: a fresh adapter changes nothing
        self.merged = False
        self.disabled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # [..., out] in the base's output dtype
        if self.disabled or self.merged:
            return y  # the adapter path is skipped, not multiplied by 0: exact base outputs
        x = x.to(self.lora_A.weight.dtype)  # fp32, as the adapter weights
        update = self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling  # [..., r] -> [..., out]
        return (y + update).to(y.dtype)  # the sum happens in fp32, then one rounding to y's dtype

    def delta_weight(self) -> torch.Tensor:
        """dW = B @ A * scaling, fp32 [out, in]: what merging adds to the base weight."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def base_weight(self) -> torch.Tensor:
        """The base weight as fp32 [out, in] (dequantized if int8)."""
        if isinstance(self.base_layer, nn.Linear):
            return self.base_layer.weight.float()
        return self.base_layer.dequantize()

    @torch.no_grad()
    def merge(self) -> float:
        """W <- W + B @ A * scaling. Returns the max abs rounding error of the stored weight against
        the exact fp32 merged weight (0 for fp32 up to fp32 rounding; bf16 or int8 rounding otherwise)."""
        if self.merged:
            raise RuntimeError("this LoRALinear is already merged")
        if self.disabled:
            raise RuntimeError("cannot merge while adapters are disabled (inside disable_adapters)")
        error = self._store_base_weight(self.base_weight() + self.delta_weight())
        self.merged = True
        return error

    @torch.no_grad()
    def unmerge(self) -> float:
        """W <- W - B @ A * scaling, undoing merge up to rounding (returned like merge's)."""
        if not self.merged:
            raise RuntimeError("this LoRALinear is not merged")
        error = self._store_base_weight(self.base_weight() - self.delta_weight())
        self.merged = False
        return error

    def _store_base_weight(self, weight: torch.Tensor) -> float:
        """Write an exact fp32 [out, in] weight into the base layer (cast, or requantize to int8)."""
        base = self.base_layer
        if isinstance(base, nn.Linear):
            base.weight.copy_(weight)  # copy_ casts to the base dtype; the Parameter object is kept
            stored = base.weight.float()
        else:
            # quantized: requantized with fresh scales (int8 rows, 4-bit blocks): that is where the error comes from.
            bias = None if base.bias is None else base.bias.detach()
            self.base_layer = type(base).from_weight(weight, bias, **base.quant_args()).train(base.training)
            stored = self.base_layer.dequantize()
        return (stored - weight).abs().max().item()

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


# ---------------------------------------------------------------------------------------------
# Finding the target layers
# ---------------------------------------------------------------------------------------------

def _block_index(name: str, layers_pattern: str | None = None) -> int | None:
    """The transformer block a module sits in: "gpt_neox.layers.3.mlp.dense_4h_to_h" -> 3, else None."""
    if layers_pattern:
        match = re.match(rf"(?:^|.*?\.){re.escape(layers_pattern)}\.(?P<idx>\d+)\.", name)
    else:
        match = BLOCK_RE.match(name)
    return None if match is None else int(match.group("idx"))


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _num_blocks(model: nn.Module) -> int:
    indices = [_block_index(n) for n, _ in model.named_modules()]
    indices = [i for i in indices if i is not None]
    if not indices:
        raise ValueError("layers= needs transformer blocks named like 'gpt_neox.layers.{i}.'; found none")
    return max(indices) + 1


def _layer_ids(model: nn.Module, layers) -> set[int] | None:
    """layers: None (all blocks), an int N (the last N blocks), or a list of block indices."""
    if layers is None:
        return None
    n = _num_blocks(model)
    if isinstance(layers, int) and not isinstance(layers, bool):
        if not 1 <= layers <= n:
            raise ValueError(f"layers={layers}: the model has {n} blocks, so layers must be in 1..{n}")
        return set(range(n - layers, n))
    ids = set(layers)
    if not ids or not all(isinstance(i, int) and 0 <= i < n for i in ids):
        raise ValueError(f"layers={list(layers)}: block indices must be in 0..{n - 1}")
    return ids


def _candidates(model: nn.Module) -> list[str]:
    """Names of the model's linear layers, in model order. A LoRALinear counts as the layer it wraps
    (same name); the Linear inside it and its lora_A / lora_B are not candidates themselves."""
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    return [n for n, m in model.named_modules()
            if n in wrapped or (is_linear(m) and n.rpartition(".")[0] not in wrapped)]


def _targets_of(model: nn.Module, target_modules, layer_ids, layers_pattern: str | None = None) -> list[str]:
    """The layers that PEFT's matching rule selects: a name equal to a target or ending in "." + target
    ("all-linear": any layer inside a block), kept only in blocks `layer_ids` when that is given."""
    if isinstance(target_modules, str) and target_modules != "all-linear":
        target_modules = [target_modules]
    chosen = []
    for name in _candidates(model):
        block = _block_index(name, layers_pattern)
        if target_modules == "all-linear":
            hit = block is not None
        else:
            hit = any(_matches(name, t) for t in target_modules)
        if hit and (layer_ids is None or block in layer_ids):
            chosen.append(name)
    return chosen


def _select_targets(model: nn.Module, target_modules, layer_ids: set[int] | None,
                    layers_pattern: str | None = None) -> list[str]:
    """_targets_of, after checking that every target names at least one layer (typos fail loudly)."""
    if target_modules != "all-linear":
        for t in [target_modules] if isinstance(target_modules, str) else target_modules:
            if not _targets_of(model, [t], layer_ids, layers_pattern):
                known = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in _candidates(model)}))
                if layer_ids is None:
                    raise ValueError(f"unknown target module {t!r}; the model's linear layers are: {known} "
                                     "(or 'all-linear')")
                raise ValueError(f"target module {t!r} matches no linear layer in blocks "
                                 f"{_ranges(sorted(layer_ids))}; the model's linear layers are: {known}")
    chosen = _targets_of(model, target_modules, layer_ids, layers_pattern)
    if not chosen:
        raise ValueError(f"target_modules={target_modules!r} selects no linear layer")
    return chosen


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """(name, module) of every LoRALinear, in model order. The name is the wrapped layer's path."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def _wrap(model: nn.Module, names: list[str], r: int, alpha: float, dropout: float) -> None:
    """Freeze everything, then wrap each named layer in a LoRALinear whose A and B train."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        # a new module starts in train mode; follow the layer it wraps (load_model returns eval mode).
        # PEFT's get_peft_model does not: its new layers are in train mode, dropout on, in an eval model.
        set_module(model, name, LoRALinear(base, r, alpha, dropout).train(base.training))


def add_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.05,
             target_modules=("query_key_value",), layers=None) -> nn.Module:
    """Put LoRA adapters on the model's linear layers, in place; freeze everything else.

    target_modules: module-name suffixes (query_key_value, dense, dense_h_to_4h, dense_4h_to_h) or
    "all-linear" (every linear layer inside the blocks, never the head). layers: None for all blocks,
    N for the last N blocks (trlX's num_layers_unfrozen), or a list of block indices (PEFT's
    layers_to_transform). Returns the model; print(lora_summary(model)) shows what happened.
    """
    _check_r_and_dropout(r, dropout)
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters (use load_adapter to load weights into them)")
    names = _select_targets(model, target_modules, _layer_ids(model, layers))
    _wrap(model, names, r, alpha, dropout)  # everything validated above: mutate only now
    return model


def parse_targets(spec: str):
    """--lora-targets as add_lora takes it: "all-linear", or "a,b" -> a tuple of layer-name suffixes."""
    return "all-linear" if spec == "all-linear" else tuple(spec.split(","))


# ---------------------------------------------------------------------------------------------
# Inspecting, disabling, merging
# ---------------------------------------------------------------------------------------------

def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts, counted as PEFT's print_trainable_parameters does: every
    distinct nn.Parameter once by numel(). An int8 weight counts 1 per element; its scales are a
    buffer, not a parameter, so they are not counted (PEFT + bitsandbytes 8-bit behave the same)."""
    trainable = total = 0
    for _, p in model.named_parameters():  # named_parameters() visits a tied weight once
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def trainable_line(model: nn.Module) -> str:
    """PEFT's print_trainable_parameters line: "trainable params: X || all params: Y || trainable%: Z"."""
    trainable, total = trainable_parameters(model)
    return (f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}")


def _dropout_p(m: LoRALinear) -> float:
    return m.lora_dropout.p if isinstance(m.lora_dropout, nn.Dropout) else 0.0


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    parts, start = [], None
    for i, x in enumerate(indices):
        if start is None:
            start = x
        if i + 1 == len(indices) or indices[i + 1] != x + 1:
            parts.append(str(x) if x == start else f"{start}-{x}")
            start = None
    return ",".join(parts)


def lora_summary(model: nn.Module) -> str:
    """PEFT's parameter line, then one line per adapted layer kind with the blocks it sits in:

        trainable params: 1,536 || all params: 118,016 || trainable%: 1.3015
        LoRA r=4 alpha=8 (scaling 2) dropout=0.0 on 2 layers, everything else frozen:
          gpt_neox.layers.[1].attention.query_key_value   Linear 64 -> 192
    """
    lines = [trainable_line(model)]
    modules = lora_modules(model)
    if not modules:
        return lines[0] + "\nno LoRA adapters"
    first = modules[0][1]
    lines.append(f"LoRA r={first.r} alpha={first.alpha} (scaling {first.scaling:g}) dropout={_dropout_p(first)} "
                 f"on {len(modules)} layers, everything else frozen:")
    groups = {}  # "gpt_neox.layers.*.attention.dense" -> ([block indices], module)
    for name, m in modules:
        match = BLOCK_RE.match(name)
        key = name if match is None else name[:match.start("idx")] + "*" + name[match.end("idx"):]
        groups.setdefault(key, ([], m))[0].append(None if match is None else int(match.group("idx")))
    width = max(len(k) for k in groups) + 8
    for key, (indices, m) in groups.items():
        shown = key if "*" not in key else key.replace("*", f"[{_ranges(indices)}]")
        merged = "  (merged)" if m.merged else ""
        lines.append(f"  {shown:<{width}} {type(m.base_layer).__name__} {m.in_features} -> {m.out_features}{merged}")
    return "\n".join(lines)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Inside the block the model is exactly the base model: each LoRALinear returns base_layer(x)
    without touching its adapter. Used for PPO's reference policy (no second copy of the model).

    Each layer's previous flag is saved and restored on exit, even on an exception, so nesting works:
    an inner block's exit puts back "disabled", and only the outermost exit re-enables.
    """
    modules = [m for _, m in lora_modules(model)]
    if any(m.merged for m in modules):
        raise RuntimeError("cannot disable merged adapters: the update is inside the base weight; "
                           "call unmerge_lora(model) first")
    previous = [m.disabled for m in modules]
    for m in modules:
        m.disabled = True
    try:
        yield model
    finally:
        for m, was_disabled in zip(modules, previous):
            m.disabled = was_disabled


def merge_lora(model: nn.Module) -> dict[str, float]:
    """Merge every adapter into its base weight (W += B @ A * scaling, in fp32, then cast or
    requantized). While merged, forward skips the adapter path: one matmul per layer again.

    Returns {layer name: max abs rounding error of the stored weight vs the exact fp32 merged
    weight}. For an Int8Linear base this is the requantization error the merge costs (the weight is
    dequantized, B @ A added, and quantized again with new row scales)."""
    return {name: m.merge() for name, m in lora_modules(model)}


def unmerge_lora(model: nn.Module) -> dict[str, float]:
    """Undo merge_lora: W -= B @ A * scaling. Exact only up to rounding (fp32: ~1e-7; bf16 and int8
    round again, so merge + unmerge is lossy there, as in PEFT). Returns errors like merge_lora."""
    return {name: m.unmerge() for name, m in lora_modules(model) if m.merged}


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter, then replace each LoRALinear by its base layer: a plain model again.

    nn.Linear bases come back as nn.Linear with the merged weight, so the model saves as a normal
    checkpoint. Int8Linear bases stay Int8Linear (requantized; merge_lora reports the error);
    checkpoint.save_model writes them dequantized. For a float export of an adapter trained on an
    int8 base, load_adapter onto the float model and merge there: no quantization error at all.
    Parameters stay frozen (requires_grad False), as PEFT leaves them.
    """
    for name, m in lora_modules(model):
        if not m.merged:
            m.merge()
        set_module(model, name, m.base_layer)
    return model


# ---------------------------------------------------------------------------------------------
# PEFT's file format
# ---------------------------------------------------------------------------------------------

def adapter_config(model: nn.Module, base_model_name_or_path: str | None = None,
                   task_type: str = "CAUSAL_LM") -> dict:
    """The adapter_config.json that describes the model's adapters, in PEFT 0.21's field names.

    target_modules is the list of layer-name suffixes that carry adapters and layers_to_transform
    the blocks they sit in (null when all). If that pair would select a different set of layers
    than the one that has adapters, the full layer names are written instead (PEFT accepts those).
    """
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA adapters to save")
    first = modules[0][1]
    for name, m in modules:
        if (m.r, m.alpha, _dropout_p(m)) != (first.r, first.alpha, _dropout_p(first)):
            raise ValueError(f"{name}: r, alpha or dropout differ from {modules[0][0]}'s; "
                             "one adapter_config.json holds one r, one alpha and one dropout")
    names = [n for n, _ in modules]
    targets = sorted({n.rsplit(".", 1)[-1] for n in names})  # "query_key_value", "dense", ...
    blocks = {_block_index(n) for n in names}
    layers = None
    if None not in blocks and len(blocks) < _num_blocks(model):
        layers = sorted(blocks)  # adapters in some blocks only
    if _targets_of(model, targets, None if layers is None else set(layers)) != names:
        targets, layers = names, None  # suffixes would select other layers too: name them in full
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": _dropout_p(first),
        "target_modules": targets,
        "layers_to_transform": layers,
        "layers_pattern": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_adapter(model: nn.Module, directory: str, base_model_name_or_path: str | None = None,
                 task_type: str = "CAUSAL_LM") -> None:
    """Write adapter_config.json + adapter_model.safetensors (fp32 A and B) in PEFT's format.

    Written through atomic_folder: an interrupted save leaves nothing half-written, and the previous
    adapter in `directory` stays whole until the new one replaces it.
    """
    config = adapter_config(model, base_model_name_or_path, task_type)
    tensors = {}
    for name, m in lora_modules(model):
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().float().cpu().contiguous()
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().float().cpu().contiguous()
    with atomic_folder(directory) as tmp:
        save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2)


def _read_config(directory: str) -> dict:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise AdapterError(f"{path}: missing (not a LoRA adapter folder)")
    try:
        with open(path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type is {config.get('peft_type')!r}, expected 'LORA'")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise AdapterError(f"{path}: field r must be a positive integer, got {r!r}")
    if not isinstance(config.get("lora_alpha", 8), (int, float)):
        raise AdapterError(f"{path}: field lora_alpha must be a number, got {config['lora_alpha']!r}")
    dropout = config.get("lora_dropout", 0.0)
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise AdapterError(f"{path}: field lora_dropout must be in [0, 1), got {dropout!r}")
    targets = config.get("target_modules")
    if not (targets == "all-linear" or (isinstance(targets, list) and targets
                                        and all(isinstance(t, str) for t in targets))):
        raise AdapterError(f"{path}: field target_modules must be a list of module names, got {targets!r} "
                           "(regular-expression strings are not supported)")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{path}: field bias is {config['bias']!r}; only 'none' is supported")
    for field in UNSUPPORTED:
        if config.get(field):
            raise AdapterError(f"{path}: field {field} = {config[field]!r} is not supported (LoRA only)")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init != "gaussian":
        # pissa/olora/loftq/corda/... initialisations also change the base weights
        raise AdapterError(f"{path}: init_lora_weights={init!r} modifies the base model; not supported")
    layers = config.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers is not None and not (isinstance(layers, list) and all(isinstance(i, int) for i in layers)):
        raise AdapterError(f"{path}: field layers_to_transform must be null, an int or a list of ints, got {layers!r}")
    pattern = config.get("layers_pattern")
    if isinstance(pattern, list):
        if len(pattern) != 1:
            raise AdapterError(f"{path}: field layers_pattern must name one container, got {pattern!r}")
        pattern = pattern[0]
    config["layers_to_transform"], config["layers_pattern"] = (layers or None), pattern
    return config


def _read_weights(directory: str) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: {"A": [r, in], "B": [out, r]}} from adapter_model.safetensors (never a pickle)."""
    path = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise AdapterError(f"{path}: missing (PEFT's .bin pickles are not read: they can run code)")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{path}: not a readable safetensors file ({e})") from None
    weights = {}
    for key, t in tensors.items():
        match = KEY_RE.match(key)
        if match is None and key.endswith(".base_layer.weight"):
            # PeftModel.save_pretrained adds the full weight of a targeted lm_head / embedding layer
            # (save_embedding_layers="auto"); that would overwrite a base weight, which we never do.
            raise AdapterError(f"{path}: tensor {key!r} is a full base-layer weight (PEFT's save_embedding_layers); "
                               "not supported: save the PEFT adapter with save_embedding_layers=False")
        if match is None:
            raise AdapterError(f"{path}: unexpected tensor {key!r} (expected "
                               f"{KEY_PREFIX}<module>.lora_A.weight / .lora_B.weight)")
        weights.setdefault(match.group("module"), {})[match.group("which")] = t
    for module, pair in weights.items():
        for which in "AB":
            if which not in pair:
                raise AdapterError(f"{path}: missing tensor {KEY_PREFIX}{module}.lora_{which}.weight")
    return weights


def _layers_to_load(model: nn.Module, config: dict, config_path: str) -> list[str]:
    """The layers adapter_config.json selects in this model. If the model has adapters already,
    they must be on exactly those layers, with the same r, and not merged."""
    r = config["r"]
    layer_ids = None if config["layers_to_transform"] is None else set(config["layers_to_transform"])
    existing = dict(lora_modules(model))
    if not existing:
        try:
            return _select_targets(model, config["target_modules"], layer_ids, config["layers_pattern"])
        except ValueError as e:
            raise AdapterError(f"{config_path}: {e}") from None
    if any(m.merged for m in existing.values()):
        raise AdapterError(f"{config_path}: the model's adapters are merged; unmerge_lora(model) first")
    bad_r = next((n for n, m in existing.items() if m.r != r), None)
    if bad_r is not None:
        raise AdapterError(f"{config_path}: r={r} but the model's adapter on {bad_r} has r={existing[bad_r].r}")
    wanted = set(_targets_of(model, config["target_modules"], layer_ids, config["layers_pattern"]))
    if wanted != set(existing):
        differ = sorted(wanted ^ set(existing))
        raise AdapterError(f"{config_path}: target_modules/layers_to_transform select different layers than "
                           f"the model's adapters (e.g. {differ[0]})")
    return list(existing)


def _check_weights_fit(model: nn.Module, names: list[str], weights: dict, r: int, weights_path: str) -> None:
    """The weights file holds exactly these layers' A [r, in] and B [out, r], in floating point."""
    for name in names:
        if name not in weights:
            raise AdapterError(f"{weights_path}: missing tensor {KEY_PREFIX}{name}.lora_A.weight "
                               f"(adapter_config.json targets {name})")
    for name in weights:
        if name not in names:
            raise AdapterError(f"{weights_path}: tensor {KEY_PREFIX}{name}.lora_A.weight is for a layer "
                               "that adapter_config.json does not target in this model")
    for name in names:
        layer = model.get_submodule(name)
        expected = {"A": (r, layer.in_features), "B": (layer.out_features, r)}
        for which in "AB":
            key, t = f"{KEY_PREFIX}{name}.lora_{which}.weight", weights[name][which]
            if tuple(t.shape) != expected[which]:
                shape = f"r={r}, layer {layer.in_features} -> {layer.out_features}"
                raise AdapterError(f"{weights_path}: {key} has shape {list(t.shape)}, "
                                   f"expected {list(expected[which])} ({shape})")
            if not t.is_floating_point():
                raise AdapterError(f"{weights_path}: {key} has dtype {t.dtype}; expected floating point")


def load_adapter(model: nn.Module, directory: str) -> nn.Module:
    """Load a PEFT-format LoRA adapter (ours or PeftModel.save_pretrained's) into the model.

    No adapters on the model yet: they are created from adapter_config.json (r, lora_alpha,
    lora_dropout, target_modules, layers_to_transform), then filled. Adapters already there: the
    file must have the same r and the same adapted layers; the weights are copied in and alpha and
    dropout are taken from the file. Everything is checked before anything changes, so a bad
    folder raises AdapterError (one line naming the file and the key or field) and leaves the model
    as it was. Returns the model.
    """
    config = _read_config(directory)
    weights = _read_weights(directory)
    names = _layers_to_load(model, config, os.path.join(directory, CONFIG_FILE))
    r, alpha, dropout = config["r"], config.get("lora_alpha", 8), config.get("lora_dropout", 0.0)
    _check_weights_fit(model, names, weights, r, os.path.join(directory, WEIGHTS_FILE))
    # Validated: now change the model.
    if not lora_modules(model):
        _wrap(model, names, r, alpha, dropout)
    with torch.no_grad():
        for name in names:
            m = model.get_submodule(name)
            m.lora_A.weight.copy_(weights[name]["A"])  # copy_ casts to the adapter's fp32
            m.lora_B.weight.copy_(weights[name]["B"])
            m.alpha, m.scaling = alpha, alpha / r
            m.lora_dropout = (nn.Dropout(dropout) if dropout > 0 else nn.Identity()).train(m.training)
    return model


__all__ = ["AdapterError", "LoRALinear", "add_lora", "adapter_config", "disable_adapters", "load_adapter",
           "lora_modules", "lora_summary", "trainable_line", "merge_and_unload", "merge_lora", "save_adapter",
           "trainable_parameters", "unmerge_lora"]
