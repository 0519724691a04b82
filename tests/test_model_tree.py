"""The module tree a run prints at start (and --plan-memory shows): read back line by line, it names every real
module with its type and own parameters, folds only alike blocks, counts what the model holds, and ends with the
line PEFT's print_trainable_parameters prints for the same model built by transformers."""

import itertools
import re

import torch

from minirlhf.embedded import default_path
from minirlhf.lora import trainable_parameters
from minirlhf.memory import meta_model, read_config
from minirlhf.model_tree import format_tree
from minirlhf.train import TrainConfig, run
from tiny import hf_model, save_tokenizer

LINE = re.compile(r"^(?P<prefix>(?:│   |    )*)(?:├── |└── )(?P<label>\S+) \((?P<type>\w+)\)(?P<rest>.*)$")
PARAM = re.compile(r"(?P<name>\w+):\[(?P<shape>[\d, ]*)\](?P<marks>(?: int8| trainable)*)")
TIED = re.compile(r"(?P<name>\w+): tied to (?P<target>[\w.]+)")
# Pythia-410m's config.json (EleutherAI/pythia-410m), written out: the Hub is not reachable from the tests
PYTHIA_410M = dict(vocab_size=50304, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                   intermediate_size=4096, max_position_embeddings=2048, rotary_pct=0.25, rotary_emb_base=10000,
                   use_parallel_residual=True, tie_word_embeddings=False, hidden_act="gelu", layer_norm_eps=1e-5,
                   bos_token_id=0, eos_token_id=0)


def expand(label: str) -> list[str]:
    if re.fullmatch(r"\d+-\d+", label):
        a, b = map(int, label.split("-"))
        return [str(i) for i in range(a, b + 1)]
    return [label]


def read_tree(text: str) -> list[dict]:
    """Every module line of the tree, its ranges expanded: path, type, own params, how many it stands for."""
    lines = text.splitlines()
    stack, out = [], []
    for line in lines[1:-1]:
        m = LINE.match(line)
        assert m, line
        depth = len(m["prefix"]) // 4
        stack[depth:] = [expand(m["label"])]
        rest = m["rest"]
        count = int(re.search(r" x(\d+)", rest)[1]) if re.search(r" x(\d+)", rest) else 1
        assert count == len(stack[-1])  # "0-3 ... x4"
        params = [(p["name"], [int(x) for x in p["shape"].split(",") if x.strip()], p["marks"].split())
                  for p in PARAM.finditer(rest)]
        tied = [(t["name"], t["target"]) for t in TIED.finditer(rest)]
        for parts in itertools.product(*stack):
            out.append(dict(path=".".join(parts), type=m["type"], params=params, tied=tied))
    return out


def check_against_model(model, text: str) -> None:
    rows = read_tree(text)
    modules = dict(model.named_modules())
    assert sorted(r["path"] for r in rows) == sorted(n for n in modules if n)  # every module once, no other
    counted = trainable = int8 = 0
    for r in rows:
        module = modules[r["path"]]
        assert type(module).__name__ == r["type"], r["path"]
        own = dict(module.named_parameters(recurse=False))
        assert sorted([n for n, _, _ in r["params"]] + [n for n, _ in r["tied"]]) == sorted(own), r["path"]
        for name, shape, marks in r["params"]:
            p = own[name]
            assert list(p.shape) == shape, (r["path"], name)
            assert ("int8" in marks) == (p.dtype == torch.int8) and ("trainable" in marks) == p.requires_grad
            counted += p.numel()
            trainable += p.numel() if p.requires_grad else 0
            int8 += p.numel() if p.dtype == torch.int8 else 0
        for name, target in r["tied"]:
            assert own[name] is model.get_parameter(target)
    want_trainable, want_total = trainable_parameters(model)
    assert (counted, trainable) == (want_total, want_trainable)
    assert text.splitlines()[0].startswith(f"CausalLM: {want_total:,d} params")
    assert f"int8: {int8:,d}" in text.splitlines()[0] and int8 > 0


def peft_line(hf_config, r=8, alpha=16, layers=None) -> str:
    """What PEFT prints for transformers' GPTNeoXForCausalLM with the same adapters (built on the meta device)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPTNeoXForCausalLM

    with torch.device("meta"):
        hf = GPTNeoXForCausalLM(hf_config)
    peft_model = get_peft_model(hf, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, layers_to_transform=layers,
                                               target_modules=["query_key_value"]))
    trainable, total = peft_model.get_nb_trainable_parameters()
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def test_peft_line_format_is_peft_own(capsys):
    """peft_line rebuilds PEFT's printed line from its counts; check that against print_trainable_parameters."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(hf_model(seed=0), LoraConfig(r=4, target_modules=["query_key_value"]))
    capsys.readouterr()
    peft_model.print_trainable_parameters()
    printed = capsys.readouterr().out.strip()
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert printed == f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def test_tree_of_the_embedded_default():
    from transformers import GPTNeoXConfig

    config, _, _ = read_config(default_path("lm"))
    for layers, ranges in ((0, ["0-3 (Block) x4"]), (2, ["0-1 (Block) x2", "2-3 (Block) x2"])):
        model = meta_model(config, TrainConfig.from_flags(lora_layers=layers), torch.float32)
        text = format_tree(model)
        check_against_model(model, text)
        assert [line.split("── ")[1] for line in text.splitlines() if "(Block)" in line] == ranges
        assert "embed_out (PackedHead) weight: tied to gpt_neox.embed_in.weight" in text
        hf_config = GPTNeoXConfig.from_pretrained(default_path("lm"))
        assert text.splitlines()[-1] == peft_line(hf_config, layers=[2, 3] if layers else None)


def test_tree_of_a_pythia_shaped_model(tmp_path):
    from transformers import GPTNeoXConfig

    hf_config = GPTNeoXConfig(**PYTHIA_410M)
    hf_config.save_pretrained(tmp_path)
    config, _, _ = read_config(str(tmp_path))
    model = meta_model(config, TrainConfig.from_flags(lora_r=16, lora_alpha=32), torch.bfloat16)
    text = format_tree(model)
    check_against_model(model, text)
    # Pythia-410m's 405,334,016 parameters plus 24 blocks x (16 x 1024 + 3072 x 16) adapter weights
    assert text.splitlines()[0] == ("CausalLM: 406,906,880 params, bfloat16/float32; int8: 301,989,888; "
                                    "trainable: 1,572,864")  # float32: the fp32 adapters
    assert "0-23 (Block) x24" in text and text.count("(Block)") == 1
    assert "query_key_value (LoRALinear) r=16 alpha=32" in text and "weight:[16, 1024] trainable  <- LoRA A" in text
    assert text.splitlines()[-1] == peft_line(hf_config, r=16, alpha=32)


def test_the_run_prints_the_tree_and_plan_memory_shows_the_same(tmp_path, capsys):
    folder = tmp_path / "model"
    hf_model(seed=0).save_pretrained(folder)
    save_tokenizer(folder)
    (tmp_path / "p.txt").write_text("the movie was\nhello world\n")
    flags = dict(model=str(folder), prompts=str(tmp_path / "p.txt"), reward="vader", steps=1, batch_size=2,
                 mini_batch_size=2, ppo_epochs=1, min_new_tokens=2, max_new_tokens=2, eval_size=1,
                 out=str(tmp_path / "run"), lora_layers=1, algorithm="ppo")
    plan = run(TrainConfig.from_flags(**flags, plan_memory=True), progress=False)["plan"]
    planned = capsys.readouterr().out
    assert planned.startswith(plan["tree"] + "\n")
    run(TrainConfig.from_flags(**flags), progress=False)
    printed = capsys.readouterr().out
    assert printed.startswith(plan["tree"] + "\n")  # the loaded int8 + LoRA model prints as its meta twin
    assert "0 (Block)" in plan["tree"] and "1 (LoRA" not in plan["tree"] and "base_layer (Int8Linear)" in plan["tree"]
