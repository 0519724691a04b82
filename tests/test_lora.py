"""LoRA (minirlhf/lora.py) against the real PEFT 0.21 on tiny random GPT-NeoX models.

The oracle is PEFT + transformers: same base weights, same A and B (copied across, B nonzero so
the adapter matters), same outputs; adapters saved by one side are loaded by the other.
Int8 bases use minirlhf.int8.Int8Linear; the tests on `minirlhf.load_model` use our own GPT-NeoX.
"""

import copy
import json
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn

import minirlhf.lora as lora
from minirlhf.lora import (AdapterError, LoRALinear, add_lora, disable_adapters, load_adapter, lora_modules,
                           lora_summary, merge_and_unload, merge_lora, save_adapter, trainable_parameters,
                           unmerge_lora)
from tiny import hf_model

BLOCK = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
# (our add_lora kwargs, the equivalent PEFT LoraConfig kwargs), on a 3-block model
TARGET_SETS = {
    "qkv": (dict(target_modules=("query_key_value",)), dict(target_modules=["query_key_value"])),
    "all-linear": (dict(target_modules="all-linear"), dict(target_modules="all-linear")),
    "all-linear-last2": (dict(target_modules="all-linear", layers=2),
                         dict(target_modules=BLOCK, layers_to_transform=[1, 2])),
    "dense-mlp-block0": (dict(target_modules=("dense", "dense_4h_to_h"), layers=[0]),
                         dict(target_modules=["dense", "dense_4h_to_h"], layers_to_transform=[0])),
    # the head only when named explicitly (transformers 5 calls GPT-NeoX's head lm_head; ours embed_out)
    "qkv-and-head": (dict(target_modules=("query_key_value", "lm_head")),
                     dict(target_modules=["query_key_value", "lm_head"])),
}


def tiny(seed=0, **overrides):
    """transformers' GPTNeoXForCausalLM, 3 blocks, random weights and biases, eval mode."""
    return hf_model("GPTNeoXForCausalLM", seed=seed, num_hidden_layers=3, **overrides)


def input_ids(B=2, T=9, seed=1):
    return torch.randint(2, 160, (B, T), generator=torch.Generator().manual_seed(seed))


def logits(model, ids=None):
    with torch.no_grad():
        return model(input_ids=input_ids() if ids is None else ids).logits


def randomize(model, seed=2):
    """Nonzero A and B in every adapter (a fresh B is 0, which would make every comparison trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.2)
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.2)
    return model


def peft_lora_names(peft_model):
    return sorted(n for n, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer))


def copy_into_peft(ours, peft_model):
    """Give PEFT our A and B, after checking it adapted exactly the same layers."""
    assert peft_lora_names(peft_model) == sorted(n for n, _ in lora_modules(ours))
    with torch.no_grad():
        for name, m in lora_modules(ours):
            theirs = peft_model.base_model.model.get_submodule(name)
            theirs.lora_A["default"].weight.copy_(m.lora_A.weight)
            theirs.lora_B["default"].weight.copy_(m.lora_B.weight)


def peft_of(base, r=4, alpha=8, dropout=0.05, **kwargs):
    # get_peft_model leaves its new LoRA layers (and the wrapper) in train mode even when the base model
    # was in eval mode, so its dropout would be active: put it back in eval mode. (Ours follow the base.)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, task_type="CAUSAL_LM",
                                            **kwargs))
    return model.eval()


# ------------------------------------------------------------------------------------------------
# The layer itself
# ------------------------------------------------------------------------------------------------

def test_fresh_adapter_changes_nothing_and_has_the_right_shapes():
    model = tiny()
    before = logits(model)
    add_lora(model, r=4, alpha=8)
    m = model.gpt_neox.layers[0].attention.query_key_value
    assert isinstance(m, LoRALinear) and isinstance(m.base_layer, nn.Linear)
    assert m.lora_A.weight.shape == (4, 64) and m.lora_B.weight.shape == (192, 4)
    assert m.lora_A.weight.dtype == m.lora_B.weight.dtype == torch.float32
    assert m.scaling == 2.0 and m.r == 4 and m.alpha == 8
    assert torch.count_nonzero(m.lora_B.weight) == 0 and torch.count_nonzero(m.lora_A.weight) == 4 * 64
    bound = 1 / 64 ** 0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 64 = U(-1/sqrt(64), 1/sqrt(64))
    assert m.lora_A.weight.abs().max() <= bound and m.lora_A.weight.std() > bound / 3
    assert torch.equal(logits(model), before)


def test_layer_formula_on_a_linear():
    base = nn.Linear(16, 12)
    layer = LoRALinear(base, r=3, alpha=6, dropout=0.0)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(2, 5, 16)
    expected = base(x) + x @ layer.lora_A.weight.T @ layer.lora_B.weight.T * 2.0
    assert torch.allclose(layer(x), expected, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Against PEFT: same outputs, same disabled outputs, same parameter counts
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(TARGET_SETS))
def test_outputs_and_disable_match_peft(case, capsys):
    ours_kwargs, peft_kwargs = TARGET_SETS[case]
    base = tiny()
    base_logits = logits(base)
    ours = randomize(add_lora(copy.deepcopy(base), r=4, alpha=8, **ours_kwargs))
    theirs = peft_of(base, **peft_kwargs)
    copy_into_peft(ours, theirs)

    ours_logits, peft_logits = logits(ours), logits(theirs)
    assert (ours_logits - peft_logits).abs().max() <= 1e-5
    assert (ours_logits - base_logits).abs().max() > 1e-2  # the adapters really do something

    calls = []  # disabled means skipped, not multiplied by 0: the adapter layers are never called
    hooks = [m.lora_A.register_forward_hook(lambda *args: calls.append(1)) for _, m in lora_modules(ours)]
    with disable_adapters(ours), theirs.disable_adapter():
        ours_off, peft_off = logits(ours), logits(theirs)
    assert calls == []
    logits(ours)
    assert len(calls) == len(hooks)
    for h in hooks:
        h.remove()
    assert torch.equal(ours_off, peft_off) and torch.equal(ours_off, base_logits)
    assert torch.equal(logits(ours), ours_logits)  # enabled again after the block

    assert trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
    capsys.readouterr()
    theirs.print_trainable_parameters()
    assert lora_summary(ours).splitlines()[0] == capsys.readouterr().out.strip()


def test_summary_shows_where_adapters_sit():
    model = add_lora(tiny(), r=4, alpha=8, target_modules=("query_key_value", "dense_4h_to_h"), layers=2)
    text = lora_summary(model)
    assert "gpt_neox.layers.[1-2].attention.query_key_value" in text
    assert "gpt_neox.layers.[1-2].mlp.dense_4h_to_h" in text
    assert "Linear 64 -> 192" in text and "layers.[0" not in text and "on 4 layers" in text


def test_bf16_base_keeps_fp32_adapters_like_peft():
    base = tiny().to(torch.bfloat16)
    ours = randomize(add_lora(copy.deepcopy(base), r=4, alpha=8, target_modules="all-linear"))
    theirs = peft_of(base, target_modules="all-linear")  # autocast_adapter_dtype=True: fp32 adapters
    copy_into_peft(ours, theirs)
    m = ours.gpt_neox.layers[0].mlp.dense_h_to_4h
    assert m.base_layer.weight.dtype == torch.bfloat16 and m.lora_A.weight.dtype == torch.float32
    assert theirs.base_model.model.gpt_neox.layers[0].mlp.dense_h_to_4h.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        y = m(x)
        # adapter path in fp32, summed in fp32 with the bf16 base output, one rounding to bf16
        manual = (m.base_layer(x).float() + m.lora_B(m.lora_A(x.float())) * m.scaling).to(torch.bfloat16)
    assert y.dtype == torch.bfloat16 and torch.equal(y, manual)
    ours_logits, peft_logits = logits(ours), logits(theirs)
    assert ours_logits.dtype == torch.bfloat16
    assert torch.equal(ours_logits, peft_logits)
    errors = merge_lora(ours)  # a bf16 merge rounds: the reported error is bf16 rounding, not 0
    assert all(0 < e < 0.01 for e in errors.values())


# ------------------------------------------------------------------------------------------------
# Saving and loading in PEFT's format, both directions
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["qkv", "all-linear", "all-linear-last2", "dense-mlp-block0", "qkv-and-head"])
def test_peft_loads_our_adapter(case, tmp_path):
    ours_kwargs, peft_kwargs = TARGET_SETS[case]
    ours = randomize(add_lora(tiny(), r=4, alpha=8, **ours_kwargs))
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path="tiny-neox")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["base_model_name_or_path"] == "tiny-neox" and config["task_type"] == "CAUSAL_LM"
    assert config["layers_to_transform"] == peft_kwargs.get("layers_to_transform")

    # the same tensor names and shapes as PEFT's own save of the same configuration
    reference = peft_of(tiny(), **peft_kwargs)
    reference.save_pretrained(tmp_path / "reference")
    ours_file = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    peft_file = load_file(tmp_path / "reference" / "adapter_model.safetensors")
    # (targeting lm_head makes PEFT also save the head's full base weight, "save_embedding_layers")
    peft_file = {k: v for k, v in peft_file.items() if not k.endswith("base_layer.weight")}
    assert {k: v.shape for k, v in ours_file.items()} == {k: v.shape for k, v in peft_file.items()}

    loaded = PeftModel.from_pretrained(tiny(), str(tmp_path / "adapter"))
    assert peft_lora_names(loaded) == sorted(n for n, _ in lora_modules(ours))
    assert (logits(loaded) - logits(ours)).abs().max() <= 1e-5
    assert sorted(os.listdir(tmp_path)) == ["adapter", "reference"]  # no temp folder left behind


@pytest.mark.parametrize("case", ["qkv", "all-linear", "all-linear-last2", "dense-mlp-block0"])
def test_we_load_a_peft_adapter(case, tmp_path):
    ours_kwargs, peft_kwargs = TARGET_SETS[case]
    theirs = peft_of(tiny(), r=4, alpha=8, **peft_kwargs)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    theirs.save_pretrained(tmp_path / "peft")
    expected = logits(theirs)

    fresh = load_adapter(tiny(), tmp_path / "peft")  # creates the adapters from adapter_config.json
    assert sorted(n for n, _ in lora_modules(fresh)) == peft_lora_names(theirs)
    assert (logits(fresh) - expected).abs().max() <= 1e-5

    prepared = add_lora(tiny(), r=4, alpha=8, **ours_kwargs)  # loads into existing adapters
    load_adapter(prepared, tmp_path / "peft")
    assert (logits(prepared) - expected).abs().max() <= 1e-5


def test_lora_alpha_and_dropout_come_from_the_file(tmp_path):
    ours = randomize(add_lora(tiny(), r=4, alpha=32, dropout=0.1))
    save_adapter(ours, tmp_path / "a")
    other = load_adapter(add_lora(tiny(), r=4, alpha=8, dropout=0.0), tmp_path / "a")
    m = other.gpt_neox.layers[0].attention.query_key_value
    assert m.scaling == 8.0 and m.lora_dropout.p == 0.1 and not m.lora_dropout.training
    assert torch.equal(logits(other), logits(ours))


def test_save_is_atomic(tmp_path, monkeypatch):
    ours = randomize(add_lora(tiny(), r=4, alpha=8))

    def broken_save_file(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(lora, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(ours, tmp_path / "adapter")
    assert os.listdir(tmp_path) == []  # neither the folder nor a temp folder is left behind
    monkeypatch.undo()
    save_adapter(ours, tmp_path / "adapter")
    save_adapter(ours, tmp_path / "adapter")  # over an existing folder: files replaced
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert os.listdir(tmp_path) == ["adapter"]


# ------------------------------------------------------------------------------------------------
# Merging
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["qkv", "all-linear-last2"])
def test_merged_model_saved_and_loaded_by_transformers(case, tmp_path):
    from transformers import GPTNeoXForCausalLM

    ours = randomize(add_lora(tiny(), r=4, alpha=8, **TARGET_SETS[case][0]))
    unmerged = logits(ours)
    plain = merge_and_unload(ours)
    assert not lora_modules(plain) and isinstance(plain.gpt_neox.layers[2].attention.query_key_value, nn.Linear)
    assert not any(".lora_" in k or "base_layer" in k for k in plain.state_dict())
    plain.save_pretrained(tmp_path / "merged")
    reloaded = GPTNeoXForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (logits(reloaded) - unmerged).abs().max() <= 1e-4


def test_merge_unmerge_roundtrip_and_merged_forward():
    model = randomize(add_lora(tiny(), r=4, alpha=8, target_modules="all-linear"))
    weights = {n: m.base_layer.weight.detach().clone() for n, m in lora_modules(model)}
    unmerged = logits(model)
    errors = merge_lora(model)
    assert sorted(errors) == sorted(weights) and max(errors.values()) < 1e-6  # fp32 rounding only
    m = model.gpt_neox.layers[1].mlp.dense_4h_to_h
    assert m.merged and torch.allclose(m.base_layer.weight, weights["gpt_neox.layers.1.mlp.dense_4h_to_h"]
                                       + m.lora_B.weight @ m.lora_A.weight * 2.0, atol=1e-6)
    assert (logits(model) - unmerged).abs().max() <= 1e-4
    with pytest.raises(RuntimeError, match="unmerge"):
        with disable_adapters(model):
            pass
    unmerge_lora(model)
    for n, mod in lora_modules(model):
        assert not mod.merged and (mod.base_layer.weight - weights[n]).abs().max() <= 1e-6
    assert (logits(model) - unmerged).abs().max() <= 1e-5


# ------------------------------------------------------------------------------------------------
# Training behaviour: gradients, dropout, disable
# ------------------------------------------------------------------------------------------------

def test_gradients_reach_only_the_adapters():
    model = randomize(add_lora(tiny(), r=4, alpha=8, target_modules="all-linear", layers=2))
    model.train()
    model(input_ids=input_ids()).logits.square().mean().backward()
    adapters = {id(p) for _, m in lora_modules(model) for p in (m.lora_A.weight, m.lora_B.weight)}
    assert len(adapters) == 2 * 8
    for name, p in model.named_parameters():
        if id(p) in adapters:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_dropout_only_in_train_mode():
    model = randomize(add_lora(tiny(), r=4, alpha=8, dropout=0.5))
    m = model.gpt_neox.layers[0].attention.query_key_value
    assert isinstance(m.lora_dropout, nn.Dropout) and not m.lora_dropout.training  # follows eval base
    eval_a, eval_b = logits(model), logits(model)
    assert torch.equal(eval_a, eval_b)
    model.train()
    train_a, train_b = logits(model), logits(model)
    assert not torch.equal(train_a, train_b) and not torch.equal(train_a, eval_a)
    with disable_adapters(model):  # dropout sits on the adapter path only
        off_a, off_b = logits(model), logits(model)
    assert torch.equal(off_a, off_b)
    # p = 0 is an Identity, as PEFT
    assert isinstance(LoRALinear(nn.Linear(4, 4), r=2, dropout=0.0).lora_dropout, nn.Identity)


def test_disable_nests_and_survives_exceptions():
    base = tiny()
    base_logits = logits(base)
    model = randomize(add_lora(base, r=4, alpha=8))
    on = logits(model)
    with disable_adapters(model):
        with disable_adapters(model):
            assert torch.equal(logits(model), base_logits)
        assert torch.equal(logits(model), base_logits)  # the inner exit did not re-enable
    assert torch.equal(logits(model), on)
    with pytest.raises(KeyError):
        with disable_adapters(model):
            raise KeyError("boom")
    assert torch.equal(logits(model), on)
    assert not any(m.disabled for _, m in lora_modules(model))


# ------------------------------------------------------------------------------------------------
# Int8 bases (need minirlhf/int8.py)
# ------------------------------------------------------------------------------------------------

def int8_model(seed=0):
    """tiny() with every linear layer inside the blocks replaced by Int8Linear.from_linear."""
    from minirlhf.int8 import Int8Linear

    model = tiny(seed)
    for name, m in list(model.named_modules()):
        if ".layers." in name and isinstance(m, nn.Linear):
            lora.set_module(model, name, Int8Linear.from_linear(m))
    return model


def test_int8_base_gradients_flow_through_to_layer_0():
    base = int8_model()
    base_logits = logits(base)
    model = randomize(add_lora(base, r=4, alpha=8, target_modules="all-linear"))
    assert type(model.gpt_neox.layers[0].mlp.dense_4h_to_h.base_layer).__name__ == "Int8Linear"
    with disable_adapters(model):
        assert torch.equal(logits(model), base_logits)
    model.train()
    # the loss depends on layer 0 only through layers 1 and 2, whose bases are all int8
    model(input_ids=input_ids()).logits.square().mean().backward()
    first = model.gpt_neox.layers[0].attention.query_key_value
    assert first.lora_A.weight.grad.abs().sum() > 0 and first.lora_B.weight.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        if ".lora_" not in name:
            assert p.grad is None and not p.requires_grad, name
    # counting as PEFT does: an int8 weight is one parameter per element, like the float one
    assert trainable_parameters(model) == trainable_parameters(add_lora(tiny(), r=4, alpha=8,
                                                                        target_modules="all-linear"))


def test_int8_layer_forward_and_merge_error():
    from minirlhf.int8 import Int8Linear

    torch.manual_seed(0)
    base = Int8Linear.from_linear(nn.Linear(32, 24))
    layer = LoRALinear(base, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.5)
    x = torch.randn(5, 32)
    with torch.no_grad():
        expected = base(x) + x @ layer.lora_A.weight.T @ layer.lora_B.weight.T * 2.0
        assert (layer(x) - expected).abs().max() <= 1e-5
        exact = base.dequantize() + layer.lora_B.weight @ layer.lora_A.weight * 2.0
    error = layer.merge()
    merged_base = layer.base_layer
    assert isinstance(merged_base, Int8Linear) and layer.merged
    assert error == pytest.approx((merged_base.dequantize() - exact).abs().max().item())
    # LLM.int8() weights are row-wise absmax int8: step = absmax(row) / 127; rounding costs <= step / 2
    merged_step = merged_base.dequantize().abs().amax(1, keepdim=True) / 127
    assert 0 < error and ((merged_base.dequantize() - exact).abs() <= merged_step / 2 + 1e-7).all()
    with torch.no_grad():
        assert torch.equal(layer(x), merged_base(x))  # merged: the adapter path is skipped
    layer.unmerge()
    # unmerging rounds once more: back to the original weights within the two half-steps
    back_step = layer.base_layer.dequantize().abs().amax(1, keepdim=True) / 127
    assert ((layer.base_layer.dequantize() - base.dequantize()).abs() <= (merged_step + back_step) / 2 + 1e-7).all()


# ------------------------------------------------------------------------------------------------
# Our own GPT-NeoX (minirlhf.neox via minirlhf.load_model)
# ------------------------------------------------------------------------------------------------

def test_on_our_model_matches_peft_both_ways(tmp_path):
    import minirlhf

    hf = tiny()
    hf.save_pretrained(tmp_path / "base")
    ours = randomize(add_lora(minirlhf.load_model(str(tmp_path / "base")), r=4, alpha=8, target_modules="all-linear"))
    ids = input_ids()
    save_adapter(ours, tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(hf, str(tmp_path / "adapter"))
    with torch.no_grad():
        ours_logits = ours(ids).logits
    assert (ours_logits - logits(theirs, ids)).abs().max() <= 1e-4
    with disable_adapters(ours), theirs.disable_adapter(), torch.no_grad():
        assert (ours(ids).logits - logits(theirs, ids)).abs().max() <= 1e-4


def test_on_our_model_merged_and_saved_for_transformers(tmp_path):
    import minirlhf
    from transformers import GPTNeoXForCausalLM

    tiny().save_pretrained(tmp_path / "base")
    ours = randomize(add_lora(minirlhf.load_model(str(tmp_path / "base")), r=4, alpha=8, target_modules="all-linear",
                              layers=2))
    ids = input_ids()
    with torch.no_grad():
        unmerged = ours(ids).logits
    minirlhf.save_model(merge_and_unload(ours), str(tmp_path / "merged"))
    reloaded = GPTNeoXForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (logits(reloaded, ids) - unmerged).abs().max() <= 1e-4


def test_on_our_int8_model_trains_adapters_only(tmp_path):
    import minirlhf

    tiny().save_pretrained(tmp_path / "base")
    base = minirlhf.load_model(str(tmp_path / "base"), int8=True)
    ids = input_ids()
    with torch.no_grad():
        base_logits = base(ids).logits
    model = randomize(add_lora(base, r=4, alpha=8, target_modules="all-linear"))
    assert "Int8Linear 64 -> 192" in lora_summary(model)
    with disable_adapters(model), torch.no_grad():
        assert torch.equal(model(ids).logits, base_logits)
    model.train()
    model(ids).logits.square().mean().backward()
    first = model.gpt_neox.layers[0].attention.query_key_value
    assert first.lora_A.weight.grad.abs().sum() > 0 and first.lora_B.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)
    errors = merge_lora(model)  # requantizing costs a rounding in every merged layer
    assert len(errors) == 12 and all(e > 0 for e in errors.values())


# ------------------------------------------------------------------------------------------------
# Bad input: clear errors, model untouched
# ------------------------------------------------------------------------------------------------

def untouched(model):
    return not lora_modules(model) and all(p.requires_grad for p in model.parameters())


def test_unknown_target_lists_the_linear_layers():
    model = tiny()
    with pytest.raises(ValueError, match="unknown target module 'q_proj'") as e:
        add_lora(model, target_modules=("query_key_value", "q_proj"))
    for name in BLOCK:
        assert name in str(e.value)
    assert untouched(model)


@pytest.mark.parametrize("r", [0, -1, 2.0])
def test_bad_rank(r):
    model = tiny()
    with pytest.raises(ValueError, match="positive integer"):
        add_lora(model, r=r)
    assert untouched(model)


def test_bad_layers_and_double_add():
    model = tiny()
    for layers in (0, 4, [3]):
        with pytest.raises(ValueError, match="layers"):
            add_lora(model, layers=layers)
    with pytest.raises(ValueError, match="'lm_head' matches no linear layer in blocks 2"):
        add_lora(model, target_modules=("query_key_value", "lm_head"), layers=1)  # the head is in no block
    assert untouched(model)
    add_lora(model)
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model)


@pytest.fixture
def saved(tmp_path):
    ours = randomize(add_lora(tiny(), r=4, alpha=8))
    save_adapter(ours, tmp_path / "a")
    return tmp_path / "a"


def rewrite(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_missing_files(saved, tmp_path):
    model = tiny()
    with pytest.raises(AdapterError, match="adapter_config.json: missing"):
        load_adapter(model, tmp_path / "nowhere")
    os.remove(saved / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="adapter_model.safetensors: missing"):
        load_adapter(model, saved)
    assert untouched(model)


def test_config_not_json(saved):
    (saved / "adapter_config.json").write_text("{not json")
    model = tiny()
    with pytest.raises(AdapterError, match="adapter_config.json: not valid JSON"):
        load_adapter(model, saved)
    assert untouched(model)


@pytest.mark.parametrize("changes, message", [
    (dict(r=0), "field r must be a positive integer"),
    (dict(peft_type="IA3"), "peft_type"),
    (dict(use_dora=True), "field use_dora"),
    (dict(bias="all"), "field bias"),
    (dict(target_modules=["q_proj"]), "unknown target module 'q_proj'"),
    (dict(target_modules=["dense"]), "missing tensor base_model.model.gpt_neox.layers.0.attention.dense.lora_A"),
    (dict(r=8), r"lora_A.weight has shape \[4, 64\], expected \[8, 64\]"),
])
def test_config_that_does_not_fit(saved, changes, message):
    rewrite(saved, **changes)
    model = tiny()
    with pytest.raises(AdapterError, match=message) as e:
        load_adapter(model, saved)
    assert "\n" not in str(e.value)
    assert untouched(model)


def test_weights_that_do_not_fit(saved):
    path = saved / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.gpt_neox.layers.2.attention.query_key_value.lora_B.weight"
    tensors[key] = torch.zeros(191, 4)
    save_file(tensors, path)
    model = tiny()
    with pytest.raises(AdapterError, match=r"layers.2.attention.query_key_value.lora_B.weight has shape \[191, 4\]"):
        load_adapter(model, saved)
    assert untouched(model)
    tensors["base_model.model.embed_out.lora_A.weight"] = torch.zeros(4, 64)
    save_file(tensors, path)
    with pytest.raises(AdapterError, match="embed_out"):
        load_adapter(model, saved)
    del tensors["base_model.model.embed_out.lora_A.weight"]
    tensors["base_model.model.lm_head.base_layer.weight"] = torch.zeros(160, 64)
    save_file(tensors, path)
    with pytest.raises(AdapterError, match="full base-layer weight"):
        load_adapter(model, saved)
    tensors = {"base_model.model.gpt_neox.layers.0.attention.query_key_value.weight": torch.zeros(1)}
    save_file(tensors, path)
    with pytest.raises(AdapterError, match="unexpected tensor"):
        load_adapter(model, saved)
    assert untouched(model)


def same_state(model, before):
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_existing_adapters_that_do_not_match(saved):
    # the model's adapters (randomized, so a load that wrote anything would show) stay as they were
    model = randomize(add_lora(tiny(), r=4, alpha=8, target_modules=("dense",)), seed=9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match="select different layers"):
        load_adapter(model, saved)
    assert same_state(model, before)
    model = randomize(add_lora(tiny(), r=2, alpha=8), seed=9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    message = "r=4 but the model's adapter on gpt_neox.layers.0.attention.query_key_value has r=2"
    with pytest.raises(AdapterError, match=message):
        load_adapter(model, saved)
    assert same_state(model, before)
