"""The GPT-NeoX configuration: what config.json says, as one dataclass.

GPT-NeoX (Black et al. 2022, arXiv 2204.06745) and the Pythia suite (Biderman et al. 2023,
arXiv 2304.01373) describe a model with a handful of numbers: width, depth, heads, MLP width,
vocabulary, how much of each head is rotated by RoPE, and whether attention and MLP run in
parallel off the same input. That is all this file holds.

config.json comes in two spellings, and both load:

    classic Pythia (transformers 4)       transformers 5
    "rotary_pct": 0.25                    "rope_parameters": {"partial_rotary_factor": 0.25,
    "rotary_emb_base": 10000                                  "rope_theta": 10000,
                                                              "rope_type": "default"}
    (bias always present)                 "attention_bias": true

We write the classic spelling plus `rope_parameters`, which both transformers 4 and 5 read.
Keys missing from the file take transformers' defaults, so a file that transformers reads means
the same model here.
"""

import json
from dataclasses import asdict, dataclass, fields

from .cli import read_json_object


class ConfigError(ValueError):
    """A config.json that cannot describe a GPT-NeoX; the message names the file and the field."""


@dataclass
class NeoXConfig:
    vocab_size: int = 50432
    hidden_size: int = 6144
    num_hidden_layers: int = 44
    num_attention_heads: int = 64
    intermediate_size: int = 24576
    hidden_act: str = "gelu"
    rotary_pct: float = 0.25  # fraction of each head's dims that RoPE rotates
    rotary_emb_base: float = 10000.0  # RoPE's theta
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True  # x + attn(ln1(x)) + mlp(ln2(x)) instead of two sequential residuals
    tie_word_embeddings: bool = False  # embed_out shares embed_in's matrix
    attention_bias: bool = True  # bias on query_key_value and attention.dense
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    bos_token_id: int | None = 0
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    num_labels: int = 1  # outputs of the sequence-classifier head (a reward model has 1)

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_ndims(self) -> int:
        return int(self.head_size * self.rotary_pct)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "NeoXConfig":
        if raw.get("model_type", "gpt_neox") != "gpt_neox":
            raise ConfigError(f"{source}: model_type is {raw['model_type']!r}; only 'gpt_neox' is supported")
        values = {}
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"{source}: rope_parameters must be an object, got {rope!r}")
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ConfigError(f"{source}: rope_parameters.rope_type {rope.get('rope_type')!r} is not supported "
                              "(only the original RoPE, 'default')")
        values["rotary_pct"] = rope.get("partial_rotary_factor", raw.get("rotary_pct", cls.rotary_pct))
        values["rotary_emb_base"] = rope.get("rope_theta", raw.get("rotary_emb_base", cls.rotary_emb_base))
        if "id2label" in raw and "num_labels" not in raw:
            values["num_labels"] = len(raw["id2label"])
        for f in fields(cls):
            if f.name in raw and f.name not in ("rotary_pct", "rotary_emb_base"):
                values[f.name] = raw[f.name]
        for name in ("eos_token_id", "bos_token_id"):
            if isinstance(values.get(name), list):  # transformers allows a list; the first is the one we stop on
                values[name] = values[name][0] if values[name] else None
        config = cls(**values)
        config.validate(source)
        return config

    @classmethod
    def from_json(cls, path: str) -> "NeoXConfig":
        return cls.from_dict(read_json_object(path, ConfigError), source=path)

    def validate(self, source: str = "config") -> None:
        ints = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "num_labels")
        for name in ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{source}: {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{source}: hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        if not (0 < self.rotary_pct <= 1):
            raise ConfigError(f"{source}: rotary_pct / partial_rotary_factor must be in (0, 1], got {self.rotary_pct}")
        if self.rotary_ndims % 2:
            raise ConfigError(f"{source}: rotary dims per head ({self.rotary_ndims}) must be even")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"{source}: hidden_act {self.hidden_act!r} is not supported "
                              f"(supported: {', '.join(sorted(ACTIVATIONS))})")

    def to_dict(self) -> dict:
        """config.json as transformers 4 and 5 both read it."""
        d = asdict(self)
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rotary_emb_base,
                                "partial_rotary_factor": self.rotary_pct}
        d["model_type"] = "gpt_neox"
        return d

    def save(self, path: str, architecture: str = "GPTNeoXForCausalLM", extra: dict | None = None) -> None:
        """Write config.json; extra: more top-level entries (a 4-bit model's quantization_config)."""
        d = {"architectures": [architecture], **self.to_dict(), **(extra or {})}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(d, f, indent=2)


# hidden_act -> torch.nn.functional name and its arguments (transformers' ACT2FN names).
ACTIVATIONS = {
    "gelu": ("gelu", {}),
    "gelu_new": ("gelu", {"approximate": "tanh"}),
    "gelu_fast": ("gelu", {"approximate": "tanh"}),
    "gelu_pytorch_tanh": ("gelu", {"approximate": "tanh"}),
    "relu": ("relu", {}),
    "silu": ("silu", {}),
}
