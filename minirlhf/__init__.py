"""minirlhf: RLHF of a GPT-NeoX with an int8 base and LoRA adapters, written to be read.

    model = load_model("EleutherAI/pythia-410m", int8=True)    # checkpoint.py, neox.py, int8.py
    tok = load_tokenizer("EleutherAI/pythia-410m")             # tokenizer.py
    add_lora(model, r=8, alpha=16)                              # lora.py
    with disable_adapters(model): ...                           # the PPO reference: adapters off
    tokens, mask = generate(model, *tok.encode_batch(["Hello"]), max_new_tokens=20)  # generate.py

The PPO loop is trainer.py (one step) and train.py (the job); `python train.py --help` lists its flags.
"""

from .checkpoint import CheckpointError, load_config, load_model, save_model
from .config import ConfigError, NeoXConfig
from .generate import generate
from .int8 import Int8Linear, memory_report
from .nf4 import NF4Linear
from .lora import (AdapterError, LoRALinear, add_lora, disable_adapters, load_adapter, lora_summary,
                   merge_and_unload, merge_lora, save_adapter, trainable_parameters, unmerge_lora)
from .neox import CausalLM, KVCache, SequenceClassifier
from .tokenizer import Tokenizer, load_tokenizer

__version__ = "0.1.0"
