"""python -m minirlhf.export: after a short run, transformers and PEFT load what it writes and give the trained
policy's logits; the merge starts from the checkpoint's own float weights; bad inputs are one line, exit 2."""

import json
import os

import pytest
import torch
from safetensors import safe_open

import minirlhf
from minirlhf.export import main
from minirlhf.lora import load_adapter, lora_modules
from minirlhf.train import TrainConfig, run
from tiny import PPO, hf_model, save_tokenizer

PROMPTS = ["the movie was", "hello world", "a dull film", "I loved every", "this is a", "boring plot"]
TEXTS = ["the movie was wonderful", "a dull, boring film with"]
# A short run that moves the adapters visibly: B starts at 0, so lr and all-linear make B @ A large enough
# that the exported logits differ from the base's by far more than the tolerances below.
SHORT = dict(steps=2, batch_size=4, mini_batch_size=2, ppo_epochs=2, lr=5e-2, min_new_tokens=2, max_new_tokens=4,
             eval_size=2, save_every=2, seed=0, reward="vader", lora_targets="all-linear", **PPO)


def short_run(tmp, dtype=torch.float32, **kw):
    """A tiny transformers checkpoint saved in `dtype`, and a 2-step run on it -> (base folder, run folder)."""
    base, out = tmp / "base", tmp / "run"
    hf_model(seed=0).to(dtype).save_pretrained(base)
    save_tokenizer(base)
    (tmp / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    run(TrainConfig.from_flags(model=str(base), prompts=str(tmp / "prompts.txt"), out=str(out), **{**SHORT, **kw}),
        progress=False)
    return base, out


@pytest.fixture(scope="module")
def float_run(tmp_path_factory):
    """A --no-int8 run on a float32 checkpoint: the trained policy is exactly float base + adapter."""
    return short_run(tmp_path_factory.mktemp("float"), int8=False)


def policy_logits(base, run_folder, ids, mask):
    """The trained policy as minirlhf computes it: the float32 base with the run's adapter, unmerged."""
    model = load_adapter(minirlhf.load_model(str(base)), str(run_folder / "adapter"))
    with torch.no_grad():
        return model(ids, mask).logits


def encode(folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.padding_side = "left"
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    return tok, batch["input_ids"], batch["attention_mask"]


def test_merged_folder_loads_in_transformers_alone_and_gives_the_policys_logits(float_run, tmp_path):
    from transformers import GPTNeoXForCausalLM

    base, run_folder = float_run
    assert (run_folder / "tokenizer.json").is_file() and (run_folder / "tokenizer_config.json").is_file()
    out = tmp_path / "merged"
    assert main([str(run_folder), str(out), "--merged"]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    tok, ids, mask = encode(out)  # the exported folder alone: its own tokenizer
    hf = GPTNeoXForCausalLM.from_pretrained(str(out)).eval()
    assert hf.dtype == torch.float32  # the checkpoint's precision
    with torch.no_grad():
        got = hf(input_ids=ids, attention_mask=mask).logits
        base_logits = minirlhf.load_model(str(base))(ids, mask).logits
    want = policy_logits(base, run_folder, ids, mask)
    real = mask.bool()
    moved = (want - base_logits)[real].abs().max().item()
    assert moved > 0.05  # training changed the policy: the comparison below can fail
    # fp32 checkpoint: W + s*B@A merged vs base(x) + s*(x A^T) B^T unmerged differ by fp32 rounding only
    # (measured max |diff| ~1e-6 on logits of size ~1); 1e-4 is the README's fp32 tolerance.
    diff = (got - want)[real].abs().max().item()
    assert diff <= 1e-4, diff
    # and it generates: greedy continuation equals the argmax of our policy's logits, token by token
    one = tok(["the movie was"], return_tensors="pt")
    gen = hf.generate(**one, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    policy = load_adapter(minirlhf.load_model(str(base)), str(run_folder / "adapter"))
    seq = one["input_ids"]
    with torch.no_grad():
        for _ in range(5):
            seq = torch.cat([seq, policy(seq).logits[:, -1:].argmax(-1)], 1)
    assert gen.tolist() == seq.tolist()


def test_adapter_folder_loads_with_peft_on_the_base_and_gives_the_same_logits(float_run, tmp_path):
    from peft import PeftModel
    from transformers import GPTNeoXForCausalLM

    base, run_folder = float_run
    out = tmp_path / "adapter"
    assert main([str(run_folder), str(out), "--adapter"]) == 0
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
                                       "tokenizer_config.json", "value_head.safetensors"]
    _, ids, mask = encode(out)
    peft_model = PeftModel.from_pretrained(GPTNeoXForCausalLM.from_pretrained(str(base)), str(out)).eval()
    with torch.no_grad():
        got = peft_model(input_ids=ids, attention_mask=mask).logits
    want = policy_logits(base, run_folder, ids, mask)
    diff = (got - want)[mask.bool()].abs().max().item()
    assert diff <= 1e-4, diff  # both unmerged fp32: same operations, measured ~1e-6
    with safe_open(str(out / "value_head.safetensors"), "pt") as f:
        assert len(list(f.keys())) > 0


@pytest.mark.parametrize("quantization", ["int8", "nf4"])
def test_a_quantized_run_is_merged_into_the_checkpoints_own_float16_weights(tmp_path, quantization):
    """The run trained on int8 (or 4-bit) blocks; the export merges into the float16 checkpoint, not into
    dequantized int8 (4-bit) weights."""
    base, run_folder = short_run(tmp_path, dtype=torch.float16, quantization=quantization)
    out = tmp_path / "merged"
    assert main([str(run_folder), str(out), "--merged"]) == 0
    name = "gpt_neox.layers.1.attention.query_key_value"
    with safe_open(str(base / "model.safetensors"), "pt") as f:
        w16 = f.get_tensor(name + ".weight")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
        merged = f.get_tensor(name + ".weight")
    trained = load_adapter(minirlhf.load_model(str(base), quantization=quantization), str(run_folder / "adapter"))
    m = dict(lora_modules(trained))[name]
    delta = m.delta_weight().detach()
    assert torch.equal(merged, (w16.float() + delta).half())  # bit for bit: fp32 sum, one cast to fp16
    dequantized = (m.base_layer.dequantize() + delta).half()
    assert not torch.equal(merged, dequantized)  # what a merge into dequantized int8 would have written


def test_a_run_on_a_prequantized_4bit_folder_is_merged_into_its_dequantized_weights(tmp_path):
    """A 4-bit base folder (transformers + bitsandbytes' format, here written by save_model(keep_4bit=True)) has
    no float weights: the export merges into its dequantized ones, in fp32, without requantizing."""
    from transformers import GPTNeoXForCausalLM

    float_base, base = tmp_path / "float", tmp_path / "base"
    hf_model(seed=0).save_pretrained(float_base)
    minirlhf.save_model(minirlhf.load_model(str(float_base), quantization="nf4"), str(base), keep_4bit=True)
    save_tokenizer(base)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    run_folder = tmp_path / "run"
    run(TrainConfig.from_flags(model=str(base), prompts=str(tmp_path / "prompts.txt"), out=str(run_folder),
                               quantization="nf4", **SHORT), progress=False)
    out = tmp_path / "merged"
    assert main([str(run_folder), str(out), "--merged"]) == 0
    trained = load_adapter(minirlhf.load_model(str(base)), str(run_folder / "adapter"))  # the 4-bit policy
    name = "gpt_neox.layers.1.mlp.dense_h_to_4h"
    m = dict(lora_modules(trained))[name]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
        merged = f.get_tensor(name + ".weight")
    assert torch.equal(merged, m.base_layer.dequantize() + m.delta_weight().detach())  # bit for bit
    tok, ids, mask = encode(out)
    with torch.no_grad():
        want = trained(ids, mask).logits
        got = GPTNeoXForCausalLM.from_pretrained(str(out)).eval()(input_ids=ids, attention_mask=mask).logits
    diff = (got - want)[mask.bool()].abs().max().item()
    assert diff <= 1e-4, diff  # measured 4.2e-7: the merged float model is the 4-bit policy


def bad_cases(tmp):
    not_run = tmp / "empty_folder"
    not_run.mkdir()
    unfinished = tmp / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text(json.dumps({"model": "default"}))
    return not_run, unfinished


@pytest.mark.parametrize("case", ["no_folder", "not_a_run", "unfinished", "missing_base", "out_not_empty",
                                  "out_is_a_file", "both_modes"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(float_run, tmp_path, capsys, case):
    _, run_folder = float_run
    not_run, unfinished = bad_cases(tmp_path)
    out = tmp_path / "out"
    argv, message = {
        "no_folder": ([str(tmp_path / "nope"), str(out), "--merged"], f"{tmp_path / 'nope'}: no such run folder"),
        "not_a_run": ([str(not_run), str(out), "--merged"], f"{not_run}: not a run folder (no config.json"),
        "unfinished": ([str(unfinished), str(out), "--adapter"], f"{unfinished}: no adapter/"),
        "missing_base": (None, "base model '/nonexistent/base' (config.json's \"model\") cannot be found"),
        "out_not_empty": ([str(run_folder), str(out), "--merged"], f"{out}: exists and is not empty (pass --overwrite"),
        "out_is_a_file": ([str(run_folder), str(out), "--merged"], f"{out}: exists and is not a folder"),
        "both_modes": ([str(run_folder), str(out), "--merged", "--adapter"], "not allowed with argument"),
    }[case]
    if case == "missing_base":  # a copy of the run whose config.json names a base that is gone
        moved = tmp_path / "moved_run"
        moved.mkdir()
        (moved / "adapter").mkdir()
        for n in ("adapter_config.json", "adapter_model.safetensors"):
            (moved / "adapter" / n).write_bytes((run_folder / "adapter" / n).read_bytes())
        config = json.loads((run_folder / "config.json").read_text())
        (moved / "config.json").write_text(json.dumps({**config, "model": "/nonexistent/base"}))
        argv = [str(moved), str(out), "--merged"]
    if case == "out_not_empty":
        out.mkdir()
        (out / "mine.txt").write_text("keep me\n")
    if case == "out_is_a_file":
        out.write_text("a file\n")
    before = sorted(os.listdir(out)) if out.is_dir() else None
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m minirlhf.export: error: ") and message in lines[0], err
    assert (sorted(os.listdir(out)) if out.is_dir() else None) == before  # nothing half-written
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]


def test_overwrite_replaces_a_previous_export_but_never_foreign_files(float_run, tmp_path, capsys):
    _, run_folder = float_run
    out = tmp_path / "out"
    assert main([str(run_folder), str(out), "--adapter"]) == 0
    assert main([str(run_folder), str(out), "--adapter"]) == 2  # not empty
    assert main([str(run_folder), str(out), "--adapter", "--overwrite"]) == 0
    (out / "mine.txt").write_text("keep me\n")
    assert main([str(run_folder), str(out), "--adapter", "--overwrite"]) == 2
    assert "already holds files this write would not replace (mine.txt)" in capsys.readouterr().err
    assert (out / "mine.txt").read_text() == "keep me\n"
