"""Text <-> token ids through Hugging Face `tokenizers` (the tokenizer.json of a checkpoint).

Pythia's tokenizer is a byte-level BPE with two special tokens that matter here:
`<|endoftext|>` (id 0) ends a document, so sampling stops on it; `<|padding|>` (id 1) fills the
short rows of a batch. tokenizer.json alone does not say which token pads, so we look in
tokenizer_config.json, then for `<|padding|>`, and fall back to the eos token.

Batches are padded on the LEFT for a decoder: every prompt then ends in the same column, so the
first sampled token of every row lands in the same column too, and one KV-cached step serves the
whole batch. The attention mask marks real tokens (1) and padding (0); neox.py derives positions
from it so padding shifts nothing.
"""

import json
import os

import torch
from tokenizers import Tokenizer as HFTokenizer

from .checkpoint import CheckpointError, resolve


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, eos_id: int, pad_id: int):
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.pad_id = pad_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], max_length: int | None = None, append_eos: bool = False):
        """texts -> (input_ids [B, T] long, attention_mask [B, T] long), left-padded.

        max_length keeps the LAST max_length tokens of a longer text (the end of a prompt is what
        the model continues from).
        """
        rows = [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]
        if append_eos:
            rows = [r + [self.eos_id] for r in rows]
        if max_length is not None:
            rows = [r[-max_length:] for r in rows]
        T = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                ids[i, T - len(r):] = torch.tensor(r)
                mask[i, T - len(r):] = 1
        return ids, mask

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_batch(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> list[str]:
        """[B, T] ids (and optional 0/1 mask of tokens to keep) -> B strings, special tokens dropped."""
        rows = ids.tolist() if mask is None else [r[m.bool()].tolist() for r, m in zip(ids, mask)]
        return self.tokenizer.decode_batch(rows, skip_special_tokens=True)

    def special_tokens_config(self) -> dict:
        """tokenizer_config.json for this tokenizer: what transformers' AutoTokenizer needs to find eos and pad."""
        eos, pad = self.tokenizer.id_to_token(self.eos_id), self.tokenizer.id_to_token(self.pad_id)
        return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": eos,
                "unk_token": eos, "pad_token": pad}

    def save(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        self.tokenizer.save(os.path.join(folder, "tokenizer.json"))
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(self.special_tokens_config(), f, indent=2)


def _special(config: dict, name: str):
    token = config.get(name)
    return token.get("content") if isinstance(token, dict) else token


def load_tokenizer(name_or_path: str) -> Tokenizer:
    """A tokenizer from a checkpoint folder or Hub id (its tokenizer.json)."""
    folder = resolve(name_or_path)
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: no tokenizer.json")
    try:
        tok = HFTokenizer.from_file(path)
    except Exception as e:
        raise CheckpointError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
    config = {}
    config_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(config_path):
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None

    def token_id(token):
        return None if token is None else tok.token_to_id(token)

    eos_id = token_id(_special(config, "eos_token"))
    if eos_id is None:
        eos_id = token_id("<|endoftext|>")
    if eos_id is None:
        raise CheckpointError(f"{folder}: cannot tell the end-of-text token (no eos_token in "
                              "tokenizer_config.json and no <|endoftext|> in the vocabulary)")
    pad_id = token_id(_special(config, "pad_token"))
    if pad_id is None:
        pad_id = token_id("<|padding|>")
    if pad_id is None:
        pad_id = eos_id
    return Tokenizer(tok, eos_id=eos_id, pad_id=pad_id)
