"""The embedded default: the shipped models against transformers and against the human ratings.

These tests recompute every claimed number from the shipped files and the raw data; nothing is read
from build_report.json.
"""

import json
import math
import os

import pytest
import torch

import minirlhf
from minirlhf.build_default import (BuildConfig, blocks, build, read_snippets, rm_scores, sign_accuracy,
                                    token_stream, val_perplexity)
from minirlhf.rewards import vader_reward

DEFAULT = os.path.join(os.path.dirname(minirlhf.__file__), "default")
DATA = os.path.join(os.path.dirname(__file__), "data", "movieReviewSnippets_GroundTruth.txt")


@pytest.fixture(scope="module")
def data():
    return read_snippets(DATA)


def test_split_is_fixed_by_id(data):
    assert {k: len(v) for k, v in data.items()} == {"train": 8484, "val": 1061, "test": 1060}


@pytest.mark.parametrize("name, cls", [("lm", "GPTNeoXForCausalLM"), ("rm", "GPTNeoXForSequenceClassification")])
def test_transformers_loads_the_shipped_models_and_gives_our_logits(name, cls):
    import transformers

    folder = os.path.join(DEFAULT, name)
    ours = minirlhf.load_model(folder)
    theirs = getattr(transformers, cls).from_pretrained(folder, dtype=torch.float32).eval()
    tok = minirlhf.load_tokenizer(folder)
    ids, mask = tok.encode_batch(["A gorgeous, witty, seductive movie.", "Boring", "the plot is a mess and"])
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        got = ours(ids, mask).logits
    if name == "lm":
        expected, got = expected[mask.bool()], got[mask.bool()]
    assert (got - expected).abs().max().item() < 1e-4


def test_shipped_models_are_4_2m_parameters_in_fp16_17_mb():
    """README: GPT-NeoX h256 x 4 layers, vocabulary 4,096 (4.2M parameters), both models saved in fp16, 17 MB."""
    import math

    from safetensors import safe_open

    V, C, F, L = 4096, 256, 1024, 4
    per_block = (3 * C * C + 3 * C) + (C * C + C) + (C * F + F) + (F * C + C) + 2 * 2 * C  # 4 linears, 2 LayerNorms
    lm = V * C + L * per_block + 2 * C  # tied embeddings, once; the final LayerNorm
    assert lm == 4_208_128
    sizes = 0
    for name, params in (("lm", lm), ("rm", lm + C)):  # the reward model adds its score head [1, C]
        path = os.path.join(DEFAULT, name, "model.safetensors")
        with safe_open(path, "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
            assert sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()) == params
        sizes += os.path.getsize(path)
    assert round(sizes / 1e6) == 17


def test_reward_model_accuracy_is_the_readmes(data):
    """README: test-split sign accuracy 77.2%, VADER 58.3% (65.5% counting VADER's 0 as negative), each
    checked at the precision it is printed with: within 0.05 points. Measured: 0.77230, 0.58349, 0.65465."""
    texts, ratings = [t for _, t in data["test"]], [r for r, _ in data["test"]]
    rm = minirlhf.load_model(os.path.join(DEFAULT, "rm"))
    tok = minirlhf.load_tokenizer(os.path.join(DEFAULT, "rm"))
    ours = sign_accuracy(rm_scores(rm, tok, texts), ratings)
    vader_scores = vader_reward(include_prompt=False)([""] * len(texts), texts)
    vader = sign_accuracy(vader_scores, ratings)
    rated = [(v, r) for v, r in zip(vader_scores, ratings) if r != 0]  # a rating of 0 has no sign to match
    vader_zero_negative = sum((v > 0) == (r > 0) for v, r in rated) / len(rated)
    assert abs(100 * ours - 77.2) <= 0.05, ours
    assert abs(100 * vader - 58.3) <= 0.05, vader
    assert abs(100 * vader_zero_negative - 65.5) <= 0.05, vader_zero_negative


def test_perplexity_fp32_and_int8_are_the_readmes(data):
    """README: validation perplexity 135.0 fp32, 135.0 int8 (within 0.01%). Measured 135.0064 fp32 and
    134.9945 int8 (-0.0089%), on 505 blocks of 64 + 1 tokens; int8 on either CPU GEMM path (bit-identical,
    tests/test_int8_linear.py)."""
    folder = os.path.join(DEFAULT, "lm")
    tok = minirlhf.load_tokenizer(folder)
    val = blocks(token_stream(tok, [t for _, t in data["val"]]), 64)
    fp32 = val_perplexity(minirlhf.load_model(folder), val)
    int8 = val_perplexity(minirlhf.load_model(folder, int8=True), val)
    assert abs(fp32 - 135.0) <= 0.05, fp32
    assert abs(int8 - 135.0) <= 0.05, int8
    assert abs(int8 - fp32) / fp32 <= 1e-4, (fp32, int8)  # 0.01%


def test_shipped_prompts_come_from_held_out_snippets(data):
    held_out = " ".join(t for _, t in data["val"] + data["test"])
    train = {t for _, t in data["train"]}
    for name in ("prompts.txt", "eval_prompts.txt"):
        with open(os.path.join(DEFAULT, name), encoding="utf-8") as f:
            prompts = f.read().splitlines()
        assert len(prompts) >= 16
        assert all(2 <= len(p.split()) <= 8 and p in held_out for p in prompts)
        assert not any(t.startswith(p) for p in prompts[:50] for t in train if len(p.split()) >= 6)


def test_shipped_prompts_open_positive_and_negative_snippets(data):
    """The snippets file holds positive reviews first: prompts cut from its top would all open
    positive ones. Each shipped prompt file must open both kinds, roughly as the data does."""
    for name, split in (("prompts.txt", "val"), ("eval_prompts.txt", "test")):
        with open(os.path.join(DEFAULT, name), encoding="utf-8") as f:
            prompts = f.read().splitlines()
        ratings = [next(r for r, t in data[split] if t.startswith(p + " ")) for p in prompts]
        positive = sum(r > 0 for r in ratings) / len(ratings)
        data_positive = sum(r > 0 for r, _ in data[split]) / len(data[split])
        assert abs(positive - data_positive) < 0.1, (name, positive, data_positive)


def test_build_default_end_to_end_on_a_slice(tmp_path):
    import transformers

    cfg = BuildConfig(out=str(tmp_path / "default"), data=DATA, limit=300, vocab_size=400, hidden_size=32, layers=1,
                      heads=2, lm_steps=10, eval_every=5, rm_epochs=1, prompts=10, eval_prompts=4)
    report = build(cfg, log=lambda *_: None)
    out = tmp_path / "default"
    for name in ("lm/config.json", "lm/model.safetensors", "lm/tokenizer.json", "rm/model.safetensors",
                 "prompts.txt", "eval_prompts.txt", "build_report.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "build_report.json").read_text())["split"] == report["split"]
    assert report["split"]["train"] > 200 and report["split"]["test"] > 10
    transformers.GPTNeoXForSequenceClassification.from_pretrained(out / "rm")
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]


def test_build_default_help_lists_every_field(capsys):
    from minirlhf.build_default import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("--lm-lr", "--rm-epochs", "--eval-every", "--limit", "--data"):
        assert name in out


def test_perplexity_nf4_is_bitsandbytes_through_transformers(data):
    """NF4 + double quantization (blocksize 64) of the blocks' linear layers: ours (load_model(quantization="nf4"))
    against transformers' GPT-NeoX with those layers replaced by bitsandbytes 0.50.2 Linear4bit (compute fp32).
    Measured 135.25799 ours, 135.25798 bitsandbytes (1.2e-7 relative), fp32 135.0064 (+0.19%)."""
    import logging

    import bitsandbytes as bnb
    import transformers
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

    folder = os.path.join(DEFAULT, "lm")
    tok = minirlhf.load_tokenizer(folder)
    val = blocks(token_stream(tok, [t for _, t in data["val"]]), 64)
    fp32 = val_perplexity(minirlhf.load_model(folder), val)
    nf4 = val_perplexity(minirlhf.load_model(folder, quantization="nf4"), val)
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for name, m in list(hf.named_modules()):
        if name.startswith("gpt_neox.layers.") and isinstance(m, torch.nn.Linear):
            q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None,
                                  compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
            q.load_state_dict(m.state_dict())
            parent, _, leaf = name.rpartition(".")
            setattr(hf.get_submodule(parent), leaf, q.to("cpu"))  # Params4bit quantizes on .to(device)
    nll, count = 0.0, 0
    with torch.no_grad():
        for chunk in val.split(64):
            positions = torch.arange(chunk.shape[1]).expand_as(chunk)  # transformers 5 does not derive them
            logits = hf(input_ids=chunk, position_ids=positions).logits[:, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                                                     reduction="sum").item()
            count += chunk[:, 1:].numel()
    theirs = math.exp(nll / count)
    assert abs(nf4 - theirs) / theirs <= 1e-3, (nf4, theirs)  # 0.1%
    assert abs(nf4 - fp32) / fp32 <= 1e-2, (nf4, fp32)  # 1%
