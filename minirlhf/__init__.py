"""minirlhf: RLHF of a GPT-NeoX with an int8 base and LoRA adapters, written to be read.

    model = load_model("EleutherAI/pythia-410m", int8=True)    # checkpoint.py, neox.py, int8.py
    tok = load_tokenizer("EleutherAI/pythia-410m")             # tokenizer.py
    tokens, mask = generate(model, *tok.encode_batch(["Hello"]), max_new_tokens=20)  # generate.py
"""

from .checkpoint import CheckpointError, load_config, load_model, save_model
from .config import ConfigError, NeoXConfig
from .generate import generate
from .neox import CausalLM, KVCache, SequenceClassifier
from .tokenizer import Tokenizer, load_tokenizer

__version__ = "0.1.0"
