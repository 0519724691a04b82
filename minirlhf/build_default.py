"""Build the embedded default: all three RLHF ingredients from real human judgments, on a CPU.

    python -m minirlhf.build_default            # ~15-20 min on 2 CPU cores; writes minirlhf/default/

No pretrained GPT-NeoX can be downloaded on an offline machine, so we make our own, small ones,
with this project's own model code, from real data:

  data    10,605 movie-review snippets, each with the mean sentiment rating (-4 .. +4) that ~20 people
          gave it (Hutto & Gilbert, "VADER", ICWSM 2014). The file ships inside the vaderSentiment
          3.3.2 source distribution (additional_resources/hutto_ICWSM_2014.tar.gz), which `pip
          download` fetches from PyPI; --data points at a local copy instead.
          Split by id, fixed: id % 10 == 0 -> test, id % 10 == 1 -> validation, the rest -> train.
  1. LM   a byte-level BPE tokenizer (Pythia's special tokens: <|endoftext|> = 0, <|padding|> = 1) and
          a tiny GPT-NeoX pretrained on the training snippets (next-token prediction on blocks of
          concatenated "snippet <|endoftext|>" text). Validation perplexity is reported, in fp32 and
          with the LLM.int8() base that PPO will use.
  2. RM   a reward model, InstructGPT-style: the same network with the LM head swapped for a scalar
          `score` head (GPTNeoXForSequenceClassification's layout), initialised from the LM and
          regressed onto rating / 4, then scaled by 4 so it outputs the predicted mean rating on the raters'
          -4 .. +4 scale. Score > 0 means "people found this positive". Its test-split sign accuracy is
          reported beside VADER's on the same snippets.
  3. PPO  (train.py) prompts are the first 2-8 words of validation snippets; eval prompts come from
          the test split, so no prompt was seen by the LM or RM in training.

Everything is seeded; the same command on the same machine gives the same files.
"""

import dataclasses
import glob
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .atomic import atomic_folder
from .checkpoint import load_model, save_model
from .cli import Parser, UsageError, add_dataclass_flags, fail, flag
from .config import NeoXConfig
from .embedded import DEFAULT_DIR
from .neox import CausalLM, SequenceClassifier, count_params, init_weights, perplexity
from .rewards import vader_reward
from .tokenizer import Tokenizer

DATA_NAME = "movieReviewSnippets_GroundTruth.txt"


@dataclass
class BuildConfig:
    out: str = DEFAULT_DIR
    """Where the default lives: lm/, rm/, prompts.txt, eval_prompts.txt, build_report.json."""
    data: str = ""
    """movieReviewSnippets_GroundTruth.txt; empty = fetch the vaderSentiment 3.3.2 sdist with pip."""
    limit: int = 0
    """Use only the first N snippets (tests build on a small slice); 0 = all."""
    vocab_size: int = 4096
    """BPE vocabulary size."""
    hidden_size: int = 256
    """LM width."""
    layers: int = 4
    """LM depth."""
    heads: int = 4
    """Attention heads."""
    block: int = 64
    """Tokens per pretraining sequence."""
    lm_steps: int = 1500
    """Pretraining steps of batch_size blocks."""
    eval_every: int = 250
    """Validation perplexity every N steps; the best point is kept."""
    batch_size: int = 32
    """Sequences per step, LM and RM."""
    lm_lr: float = 2e-3
    """Peak LM learning rate (warmup, then cosine to 10%)."""
    dropout: float = 0.1
    """Dropout while pretraining (saved configs have 0: inference and PPO run without it)."""
    rm_epochs: int = 3
    """Reward-model epochs over the training snippets."""
    rm_lr: float = 5e-4
    """Reward-model learning rate."""
    prompts: int = 800
    """How many PPO prompts to cut from validation snippets."""
    eval_prompts: int = 512
    """How many eval prompts to cut from test snippets."""
    seed: int = 0
    """Seed for initialisation, batches and prompt lengths."""


def fetch_data(cfg: BuildConfig, workdir: str) -> str:
    """Path to the snippets file: --data, or extracted from the vaderSentiment sdist fetched from PyPI."""
    if cfg.data:
        if not os.path.isfile(cfg.data):
            raise UsageError(f"--data {cfg.data}: file not found")
        if not os.access(cfg.data, os.R_OK):
            raise UsageError(f"--data {cfg.data}: not readable")
        return cfg.data
    # the pip of this interpreter (a bare `pip` may be another Python's, or missing)
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                             "vadersentiment==3.3.2", "-d", workdir, "-q"], capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UsageError(f"could not download the vaderSentiment 3.3.2 sdist with pip ({last}); "
                         "pass --data movieReviewSnippets_GroundTruth.txt")
    with tarfile.open(glob.glob(os.path.join(workdir, "vaderSentiment-3.3.2.tar.gz"))[0]) as sdist:
        inner = sdist.extractfile("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        with tarfile.open(fileobj=inner) as resources:
            member = next(m for m in resources.getmembers() if m.name.endswith(DATA_NAME))
            path = os.path.join(workdir, DATA_NAME)
            with open(path, "wb") as f:
                f.write(resources.extractfile(member).read())
    return path


def read_snippets(path: str, limit: int = 0) -> dict[str, list[tuple[float, str]]]:
    """id<TAB>rating<TAB>snippet lines (UTF-8, CRLF) -> {"train"|"val"|"test": [(rating, text)]}."""
    split = {"train": [], "val": [], "test": []}
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        lines = [line for line in f if line.strip()]
    if limit:  # the file is sorted by sentiment: take a random sample (in file order), not the head
        keep = sorted(random.Random(0).sample(range(len(lines)), min(limit, len(lines))))
        lines = [lines[i] for i in keep]
    for n, line in enumerate(lines):
        parts = line.rstrip("\r\n").split("\t")
        if len(parts) != 3:
            raise ValueError(f"{path}: line {n + 1} does not have 3 tab-separated fields")
        idx, rating, text = int(parts[0]), float(parts[1]), " ".join(parts[2].split())
        split["test" if idx % 10 == 0 else "val" if idx % 10 == 1 else "train"].append((rating, text))
    return split


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return Tokenizer(tok, eos_id=0, pad_id=1)


def token_stream(tok: Tokenizer, texts: list[str]) -> torch.Tensor:
    """All snippets as one stream, each followed by <|endoftext|>: [n_tokens]."""
    ids = []
    for text in texts:
        ids += tok.encode(text) + [tok.eos_id]
    return torch.tensor(ids)


def blocks(stream: torch.Tensor, size: int) -> torch.Tensor:
    """[n] -> [n // (size+1), size+1]: inputs are [:, :-1], targets [:, 1:]."""
    n = len(stream) // (size + 1) * (size + 1)
    return stream[:n].view(-1, size + 1)


def lr_at(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(cfg: BuildConfig, tok: Tokenizer, train: torch.Tensor, val: torch.Tensor, log) -> CausalLM:
    config = NeoXConfig(vocab_size=tok.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.layers,
                        num_attention_heads=cfg.heads, intermediate_size=4 * cfg.hidden_size,
                        max_position_embeddings=256, rotary_pct=0.25, use_parallel_residual=True,
                        tie_word_embeddings=True, hidden_dropout=cfg.dropout, attention_dropout=0.0,
                        bos_token_id=tok.eos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    model = CausalLM(config)
    init_weights(model)
    log(f"LM: {count_params(model) / 1e6:.2f}M parameters, {train.numel() / 1e3:.0f}k training tokens")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lm_lr, weight_decay=0.1, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(cfg.seed)
    best, best_state = math.inf, None
    model.train()
    for step in range(cfg.lm_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.lm_steps, cfg.lm_lr)
        batch = train[torch.randint(len(train), (cfg.batch_size,), generator=g)]
        # fp32: bf16 autocast only pays on CPUs with AVX512-BF16/AMX, and costs determinism across machines
        logits = model(batch[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.lm_steps:
            ppl = val_perplexity(model, val)
            log(f"LM step {step + 1}/{cfg.lm_steps}: train loss {loss.item():.3f}, val perplexity {ppl:.1f}")
            if ppl < best:  # a few thousand snippets overfit quickly: keep the best validation point
                best, best_state = ppl, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    set_dropout(model, 0.0)
    return model.eval()


@torch.no_grad()
def val_perplexity(model, val_blocks: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for chunk in val_blocks.split(64):
        mask = torch.ones_like(chunk)
        ppl = perplexity(model, chunk, mask)
        n = chunk[:, 1:].numel()
        nll, count = nll + math.log(ppl) * n, count + n
    model.train(was_training)
    return math.exp(nll / count)


def train_reward_model(cfg: BuildConfig, tok: Tokenizer, lm: CausalLM, train, log) -> SequenceClassifier:
    """Regress the score head (at the last token) onto rating / 4, starting from the LM's backbone."""
    rm = SequenceClassifier(dataclasses.replace(lm.config, num_labels=1))
    rm.gpt_neox.load_state_dict(lm.gpt_neox.state_dict())
    torch.nn.init.zeros_(rm.score.weight)  # start at "neutral" for every text
    set_dropout(rm, cfg.dropout)
    opt = torch.optim.AdamW(rm.parameters(), lr=cfg.rm_lr, weight_decay=0.01)
    g = random.Random(cfg.seed)
    rm.train()
    total = cfg.rm_epochs * math.ceil(len(train) / cfg.batch_size)
    step = 0
    for epoch in range(cfg.rm_epochs):
        order = list(range(len(train)))
        g.shuffle(order)
        for i in range(0, len(order), cfg.batch_size):
            rows = [train[j] for j in order[i:i + cfg.batch_size]]
            ids, mask = tok.encode_batch([t for _, t in rows], max_length=cfg.block)
            target = torch.tensor([r / 4 for r, _ in rows])
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, cfg.rm_lr, warmup=30)
            loss = F.mse_loss(rm(ids, mask).logits[:, 0], target)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(rm.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
        log(f"RM epoch {epoch + 1}/{cfg.rm_epochs}: last batch MSE {loss.item():.3f}")
    set_dropout(rm, 0.0)
    with torch.no_grad():  # fit to rating / 4; scaled so it outputs the predicted rating itself, in the
        rm.score.weight.mul_(4)  # raters' -4 .. +4 units (a power of two: exact in fp16 too)
    return rm.eval()


def set_dropout(model, p: float) -> None:
    """Dropout on (training) or off (what we ship: inference and PPO run without it)."""
    model.config.hidden_dropout = p
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p


@torch.no_grad()
def rm_scores(rm, tok, texts: list[str], max_length: int = 64) -> list[float]:
    out = []
    for i in range(0, len(texts), 64):
        ids, mask = tok.encode_batch(texts[i:i + 64], max_length=max_length)
        out += rm(ids, mask).logits[:, 0].tolist()
    return out


def sign_accuracy(pred: list[float], ratings: list[float]) -> float:
    """Share of snippets (rating != 0) whose predicted sign matches; a prediction of exactly 0 is wrong."""
    pairs = [(p, r) for p, r in zip(pred, ratings) if r != 0]
    return sum((p > 0) == (r > 0) and p != 0 for p, r in pairs) / len(pairs)


def make_prompts(snippets: list[tuple[float, str]], n: int, seed: int) -> list[str]:
    """The first 2-8 words of n snippets drawn at random (seeded), as PPO prompts.

    Drawn, not taken from the top: the file holds the positive reviews first and the negative ones
    after, so its first snippets would all open positive reviews.
    """
    g = random.Random(seed)
    usable = [text.split() for _, text in snippets if len(text.split()) >= 4]
    prompts = []
    for words in g.sample(usable, min(n, len(usable))):
        prompts.append(" ".join(words[:min(len(words) - 1, g.randint(2, 8))]))
    return prompts


def build(cfg: BuildConfig, log=print) -> dict:
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    with tempfile.TemporaryDirectory() as work:
        data = read_snippets(fetch_data(cfg, work), cfg.limit)
    log(f"data: {', '.join(f'{k} {len(v)}' for k, v in data.items())} snippets")
    tok = train_tokenizer([t for _, t in data["train"]], cfg.vocab_size)
    train_blocks = blocks(token_stream(tok, [t for _, t in data["train"]]), cfg.block)
    val_blocks = blocks(token_stream(tok, [t for _, t in data["val"]]), cfg.block)
    lm = pretrain(cfg, tok, train_blocks, val_blocks, log)
    rm = train_reward_model(cfg, tok, lm, data["train"], log)

    with atomic_folder(cfg.out) as tmp:  # the shipped default is replaced whole, or not at all
        tok.save(os.path.join(tmp, "tok"))
        save_model(lm, os.path.join(tmp, "lm"), tokenizer_folder=os.path.join(tmp, "tok"), dtype=torch.float16)
        save_model(rm, os.path.join(tmp, "rm"), tokenizer_folder=os.path.join(tmp, "tok"), dtype=torch.float16)
        shutil.rmtree(os.path.join(tmp, "tok"))
        # Report on the files as shipped (fp16 on disk), loaded back the way train.py loads them.
        lm32 = load_model(os.path.join(tmp, "lm"))
        lm8 = load_model(os.path.join(tmp, "lm"), int8=True)
        rm32 = load_model(os.path.join(tmp, "rm"))
        test_texts, test_ratings = [t for _, t in data["test"]], [r for r, _ in data["test"]]
        vader = vader_reward(include_prompt=False)([""] * len(test_texts), test_texts)
        report = {
            "split": {k: len(v) for k, v in data.items()},
            "lm_parameters": count_params(lm32),
            "val_perplexity_fp32": val_perplexity(lm32, val_blocks),
            "val_perplexity_int8": val_perplexity(lm8, val_blocks),
            "rm_test_sign_accuracy": sign_accuracy(rm_scores(rm32, tok, test_texts, cfg.block), test_ratings),
            "vader_test_sign_accuracy": sign_accuracy(vader, test_ratings),
            "vader_test_sign_accuracy_zero_as_negative": sum(
                (v > 0) == (r > 0) for v, r in zip(vader, test_ratings) if r != 0) / sum(r != 0 for r in test_ratings),
            "build_seconds": round(time.time() - t0, 1),
            "config": asdict(cfg),
        }
        report["config"]["out"] = "minirlhf/default"
        with open(os.path.join(tmp, "prompts.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(make_prompts(data["val"], cfg.prompts, cfg.seed)) + "\n")
        with open(os.path.join(tmp, "eval_prompts.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(make_prompts(data["test"], cfg.eval_prompts, cfg.seed + 1)) + "\n")
        with open(os.path.join(tmp, "build_report.json"), "w") as f:
            json.dump(report, f, indent=2)
    log(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))
    return report


def validate(cfg: BuildConfig) -> None:
    for name in ("vocab_size", "hidden_size", "layers", "heads", "block", "lm_steps", "eval_every", "batch_size",
                 "rm_epochs", "prompts", "eval_prompts"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"{flag(name)} must be >= 1, got {getattr(cfg, name)}")
    for name in ("limit", "seed"):
        if getattr(cfg, name) < 0:
            raise UsageError(f"{flag(name)} must be >= 0, got {getattr(cfg, name)}")
    for name in ("lm_lr", "rm_lr"):
        if not (math.isfinite(getattr(cfg, name)) and getattr(cfg, name) > 0):
            raise UsageError(f"{flag(name)} must be a finite number > 0, got {getattr(cfg, name)}")
    if not 0 <= cfg.dropout < 1:
        raise UsageError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.hidden_size % cfg.heads:
        raise UsageError(f"--hidden-size {cfg.hidden_size} is not divisible by --heads {cfg.heads}")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise UsageError(f"--out {cfg.out}: exists and is not a folder")


def main(argv=None) -> int:
    parser = Parser(prog="python -m minirlhf.build_default", description=__doc__.split("\n\n")[0])
    add_dataclass_flags(parser, BuildConfig)
    cfg = BuildConfig(**vars(parser.parse_args(argv)))
    try:
        validate(cfg)
        build(cfg)
    except (ValueError, OSError) as e:  # bad flags, an unreadable or malformed --data, a disk error
        return fail("python -m minirlhf.build_default", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
