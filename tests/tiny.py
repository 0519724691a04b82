"""Tiny random GPT-NeoX checkpoints made by transformers itself (no download), and a tiny tokenizer.

transformers is the oracle: it builds and saves the model, and its forward pass is what ours must
equal. Nothing here is produced by minirlhf.
"""

import json
import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# The PPO recipe: what `python train.py` ran before RLOO became the embedded default (README), and what the
# tests of PPO's machinery (value head, GAE, trl's PPOTrainer) run.
PPO = dict(algorithm="ppo", init_kl_coef=0.15, lr_schedule="constant")

TEXT = [
    "the movie was wonderful and the actors were great",
    "a dull, boring film with a terrible plot",
    "I loved every minute of this charming story",
    "hello world, this is a tiny tokenizer for tests",
] * 4


def tiny_config(**overrides):
    from transformers import GPTNeoXConfig

    kwargs = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, max_position_embeddings=128, rotary_pct=0.25,
                  use_parallel_residual=True, tie_word_embeddings=False, eos_token_id=0, bos_token_id=0,
                  pad_token_id=1)
    kwargs.update(overrides)
    return GPTNeoXConfig(**kwargs)


def hf_model(cls_name="GPTNeoXForCausalLM", seed=0, **overrides):
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(tiny_config(**overrides)).eval()
    # transformers initialises biases and LayerNorms to 0/1; randomise them so a forgotten bias,
    # a swapped LayerNorm or a wrong residual path cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layernorm" in name or "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_tokenizer(folder):
    """A byte-level BPE with Pythia's special tokens: <|endoftext|> = 0, <|padding|> = 1."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXT, trainer)
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    return tok


def save_hf(folder, cls_name="GPTNeoXForCausalLM", seed=0, tokenizer=True, **overrides):
    model = hf_model(cls_name, seed, **overrides)
    model.save_pretrained(folder)
    if tokenizer:
        save_tokenizer(folder)
    return model


def rewrite_config(folder, fn):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    config = fn(config)
    with open(path, "w") as f:
        json.dump(config, f)


def run_folder_inputs(folder, prompts, **files):
    """A tiny model + tokenizer in folder/model, the prompts in folder/prompts.txt and each extra file (name -> text):
    what a small train.py run needs."""
    hf_model(seed=0).save_pretrained(os.path.join(folder, "model"))
    save_tokenizer(os.path.join(folder, "model"))
    with open(os.path.join(folder, "prompts.txt"), "w") as f:
        f.write("\n".join(prompts) + "\n")
    for name, text in files.items():
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    return folder
