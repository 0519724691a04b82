"""After training: a run folder -> a Hugging Face model folder (adapter merged) or a PEFT adapter folder.

    python -m minirlhf.export RUN_FOLDER OUT --merged     config.json, model.safetensors, tokenizer files:
                                                         GPTNeoXForCausalLM.from_pretrained(OUT) alone
    python -m minirlhf.export RUN_FOLDER OUT --adapter    adapter_config.json, adapter_model.safetensors,
                                                         tokenizer files, value_head.safetensors (PPO):
                                                         PeftModel.from_pretrained(base, OUT)

Why the merge starts from the float base, not from the int8 model that trained: the int8 blocks are a
lossy copy of the checkpoint (each row rounded to 255 levels), and LoRA's B @ A is a small correction on
top of it. Merging into dequantized int8 weights would ship that rounding in every weight of the export.
So the base is loaded again from its own checkpoint, in the checkpoint's float precision (the dtype its
safetensors store: float16 for the embedded default), the adapter is put on it and merged there,

    W_merged = W_checkpoint + (alpha / r) * B @ A       W: [out, in], B @ A computed in fp32, then cast

and the result is written in that same dtype. The int8 policy that trained differs from this export by
exactly the int8 rounding it trained through (LLM.int8()'s error, README); an export of a --no-int8 run
equals the trained policy up to the checkpoint's float rounding. The same holds for a 4-bit (--quantization
nf4 | fp4) run on a float checkpoint. A base that is itself a 4-bit folder (what transformers saves from a
bitsandbytes model) has no float weights: its dequantized weights are the float base, merged in fp32 and
written in its float dtype, never requantized.

The run folder names its base in config.json ("model", "default" = the embedded one) and keeps the
tokenizer next to adapter/ (train.py writes both). Every error is one line naming the folder, exit 2;
OUT is written through atomic_folder, so an interrupted export leaves nothing half-written, and an existing
non-empty OUT is refused unless --overwrite (which still never deletes files the export would not write).
"""

import json
import os
import shutil
import sys
from collections import Counter

import torch
from safetensors import SafetensorError, safe_open

from .atomic import WriteError, atomic_file, atomic_folder, write_text
from .checkpoint import TOKENIZER_FILES, CheckpointError, load_model, resolve, save_model, weight_files
from .cli import Parser, fail, read_json_object
from .embedded import default_path
from .lora import AdapterError, load_adapter, merge_and_unload
from .quantize import dequantize_linears
from .resume import VALUE_HEAD_FILE

PROG = "python -m minirlhf.export"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# safetensors' dtype names -> torch
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class ExportError(ValueError):
    """A run folder, base model or OUT that the export cannot use; the message names it."""


def read_run(run: str) -> dict:
    """The run's config.json (its resolved flags), after checking the folder is a finished run."""
    config_path = os.path.join(run, "config.json")
    if not os.path.isdir(run):
        raise ExportError(f"{run}: no such run folder")
    if not os.path.isfile(config_path):
        raise ExportError(f"{run}: not a run folder (no config.json; train.py writes one in each run folder)")
    config = read_json_object(config_path, ExportError)
    if not isinstance(config.get("model"), str):
        raise ExportError(f"{config_path}: not a run's config (no \"model\" field)")
    if not os.path.isfile(os.path.join(run, "adapter", "adapter_config.json")):
        raise ExportError(f"{run}: no adapter/ (the run has not finished; its checkpoints are in checkpoints/)")
    return config


def base_folder(run: str, config: dict) -> str:
    """The local folder of the run's base model ("default" = the embedded one), or a one-line error."""
    name = config["model"]
    try:
        return default_path("lm") if name == "default" else resolve(name)
    except CheckpointError as e:
        raise ExportError(f"{run}: base model {name!r} (config.json's \"model\") cannot be found: {e}") from None


def checkpoint_dtype(folder: str) -> torch.dtype:
    """The float dtype the checkpoint's safetensors store (the most common one, by tensor count)."""
    counts = Counter()
    for path in weight_files(folder):
        try:
            with safe_open(path, framework="pt") as f:
                counts.update(f.get_slice(k).get_dtype() for k in f.keys())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    floats = [(n, d) for d, n in counts.items() if d in SAFETENSORS_DTYPES]
    if not floats:
        raise CheckpointError(f"{folder}: no floating-point tensors in its safetensors")
    return SAFETENSORS_DTYPES[max(floats)[1]]


def tokenizer_folder(run: str, base: str) -> str:
    """The run's own tokenizer (written next to adapter/), or the base's for a run folder without one."""
    return run if os.path.isfile(os.path.join(run, "tokenizer.json")) else base


def check_out(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f"{out}: exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ExportError(f"{out}: exists and is not empty (pass --overwrite to replace a previous export)")


def export_merged(run: str, out: str) -> None:
    """Base in the checkpoint's dtype + the run's adapter, merged, written as a transformers folder."""
    config = read_run(run)
    base = base_folder(run, config)
    dtype = checkpoint_dtype(base)
    model = load_model(base, dtype=dtype, device="cpu", int8=False)
    dequantize_linears(model, dtype)  # a prequantized 4-bit base: its dequantized weights are the float base
    load_adapter(model, os.path.join(run, "adapter"))
    merge_and_unload(model)  # W + (alpha/r) B @ A in fp32, cast to the checkpoint's dtype
    save_model(model, out, tokenizer_folder=tokenizer_folder(run, base), dtype=dtype)


def export_adapter(run: str, out: str) -> None:
    """The PEFT adapter folder, with the tokenizer and the value head beside it (PPO runs: rloo and grpo have
    none)."""
    config = read_run(run)
    tokenizers = tokenizer_folder(run, base_folder(run, config))
    sources = [os.path.join(run, "adapter", n) for n in ADAPTER_FILES]
    if config.get("algorithm", "ppo") == "ppo":
        sources.append(os.path.join(run, VALUE_HEAD_FILE))
    sources += [os.path.join(tokenizers, n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizers, n))]
    for src in sources:
        if not os.path.isfile(src):
            raise ExportError(f"{src}: missing (the run folder is incomplete)")
    with atomic_folder(out) as tmp:
        for src in sources:
            shutil.copyfile(src, os.path.join(tmp, os.path.basename(src)))
            os.chmod(os.path.join(tmp, os.path.basename(src)), 0o644)


def write_tokenizer(tokenizer, src_folder: str, dst_folder: str) -> None:
    """train.py: the base's tokenizer files into the run folder, each written atomically; a base without a
    tokenizer_config.json gets one naming the eos and pad tokens the run used (AutoTokenizer reads it)."""
    for name in TOKENIZER_FILES:
        src = os.path.join(src_folder, name)
        if os.path.isfile(src):
            with atomic_file(os.path.join(dst_folder, name)) as tmp:
                shutil.copyfile(src, tmp)
    if not os.path.isfile(os.path.join(src_folder, "tokenizer_config.json")):
        write_text(os.path.join(dst_folder, "tokenizer_config.json"),
                   json.dumps(tokenizer.special_tokens_config(), indent=2))


def parse_args(argv):
    parser = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("run", metavar="RUN_FOLDER", help="a finished run folder (train.py --out)")
    parser.add_argument("out", metavar="OUT", help="the folder to write (new or empty, or --overwrite)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--merged", action="store_true",
                      help="a transformers folder: the adapter merged into the base, in the checkpoint's dtype")
    what.add_argument("--adapter", action="store_true",
                      help="the PEFT adapter folder, with the tokenizer and a PPO run's value_head.safetensors")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a previous export in OUT (files the export does not write are never deleted)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)  # a malformed command line exits 2 here, with one line
    try:
        check_out(args.out, args.overwrite)
        (export_merged if args.merged else export_adapter)(args.run, args.out)
    except (ExportError, CheckpointError, AdapterError, WriteError) as e:
        return fail(PROG, e)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
