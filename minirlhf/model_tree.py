"""The model as a tree of modules, repeated blocks folded: what a run prints at start and --plan-memory shows.

    CausalLM: 4,240,896 params, float32; int8: 3,145,728; trainable: 32,768     (the embedded default)
    ├── gpt_neox (GPTNeoX)
    │   ├── embed_in (Embedding) weight:[4096, 256]
    │   ├── layers (ModuleList)
    │   │   └── 0-3 (Block) x4
    │   │       ├── attention (Attention)
    │   │       │   ├── query_key_value (LoRALinear) r=8 alpha=16
    │   │       │   │   ├── base_layer (Int8Linear) weight:[768, 256] int8, bias:[768]
    │   │       │   │   ├── lora_A (Linear) weight:[8, 256] trainable  <- LoRA A
    │   │       │   │   └── lora_B (Linear) weight:[768, 8] trainable  <- LoRA B
    ...
    └── embed_out (PackedHead) weight: tied to gpt_neox.embed_in.weight
    trainable params: 32,768 || all params: 4,240,896 || trainable%: 0.7727

The picture of the trlX write-up (OpenDelta's `Visualization`): a Pythia has 6 to 44 identical blocks, and
printing each one hides the few lines that matter. So consecutive children of a container (ModuleList
indices) whose whole subtrees are alike (the same module types, parameter names, shapes, dtypes and
trainability) are printed once, as a range "0-3" with their count; blocks that differ (--lora-layers 2 puts
adapters in the last two only) fold into separate ranges. Each line is one module: its attribute name, its
type, and the parameters it holds itself ("int8": an LLM.int8() weight; "trainable": requires grad, the
LoRA A and B). A weight shared with an earlier module (a tied LM head) is named, not counted twice. The last
line is PEFT's print_trainable_parameters line (lora.trainable_line), counted the way PEFT counts.
"""

import torch
from torch import nn

from .lora import LoRALinear, trainable_line

BRANCH, LAST, PIPE, SPACE = "├── ", "└── ", "│   ", "    "


def _signature(module: nn.Module) -> tuple:
    """What makes two subtrees print alike: type, own parameters (name, shape, dtype, trainable), children."""
    params = tuple((n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in module.named_parameters(recurse=False))
    extra = (module.r, module.alpha) if isinstance(module, LoRALinear) else ()
    return (type(module).__name__, params, extra, tuple((n, _signature(c)) for n, c in module.named_children()))


def _groups(module: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """Children as (label, first module, count): runs of alike numbered children fold into "i-j"."""
    out = []
    for name, child in module.named_children():
        prev = out[-1] if out else None
        if (name.isdigit() and prev is not None and prev[3] is not None and int(name) == prev[3] + prev[2]
                and _signature(child) == _signature(prev[1])):
            out[-1] = (prev[0], prev[1], prev[2] + 1, prev[3])
        else:
            out.append((name, child, 1, int(name) if name.isdigit() else None))
    return [(label if count == 1 else f"{start}-{start + count - 1}", child, count)
            for label, child, count, start in out]


def _describe(name: str, module: nn.Module, count: int, seen: dict, path: str) -> str:
    """One line: name (Type), LoRA settings, each own parameter with its shape and what is special about it."""
    words = [f"{name} ({type(module).__name__})"]
    if isinstance(module, LoRALinear):
        words.append(f"r={module.r} alpha={module.alpha:g}")
    params = []
    for n, p in module.named_parameters(recurse=False):
        full = f"{path}.{n}" if path else n
        if id(p) in seen:
            params.append(f"{n}: tied to {seen[id(p)]}")
            continue
        seen[id(p)] = full
        marks = [m for m, on in (("int8", p.dtype == torch.int8), ("trainable", p.requires_grad)) if on]
        params.append(f"{n}:{list(p.shape)}" + "".join(" " + m for m in marks))
    if params:
        words.append(", ".join(params))
    if count > 1:
        words.append(f"x{count}")
    role = {"lora_A": "  <- LoRA A", "lora_B": "  <- LoRA B"}.get(name, "")
    return " ".join(words) + role


def _lines(module: nn.Module, prefix: str, path: str, seen: dict) -> list[str]:
    lines = []
    groups = _groups(module)
    for i, (label, child, count) in enumerate(groups):
        last = i == len(groups) - 1
        child_path = f"{path}.{label.split('-')[0]}" if path else label.split("-")[0]
        lines.append(prefix + (LAST if last else BRANCH) + _describe(label, child, count, seen, child_path))
        lines += _lines(child, prefix + (SPACE if last else PIPE), child_path, seen)
    return lines


def format_tree(model: nn.Module) -> str:
    """The folded module tree, a header of totals, and PEFT's trainable-parameter line. Works on the meta device."""
    unique = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in unique)
    int8 = sum(p.numel() for p in unique if p.dtype == torch.int8)
    floats = sorted({str(p.dtype).removeprefix("torch.") for p in unique if p.is_floating_point()})
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    head = f"{type(model).__name__}: {total:,d} params, {'/'.join(floats)}"
    head += (f"; int8: {int8:,d}" if int8 else "") + f"; trainable: {trainable:,d}"
    seen = {}
    for n, p in model.named_parameters(recurse=False):
        seen[id(p)] = n
    return "\n".join([head, *_lines(model, "", "", seen), trainable_line(model)])
