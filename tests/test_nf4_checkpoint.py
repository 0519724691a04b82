"""Prequantized 4-bit folders (nf4_checkpoint.py) against transformers 5.23 + bitsandbytes 0.50.2 + peft 0.21 on CPU.

transformers quantizes a tiny GPT-NeoX with BitsAndBytesConfig(load_in_4bit=True, ...) and saves it; ours loads
that folder into NF4Linear without requantizing (the stored tensors are the file's) with the same logits; ours
saved with keep_4bit=True is the same file, tensor for tensor, and transformers reloads it as Linear4bit; an
adapter PEFT trained on the transformers 4-bit model gives the same logits on ours. Then every kind of bad 4-bit
folder: one line naming the tensor or field.

The tiny model's block linears have in_features 64 and 128, multiples of the block size 64: bitsandbytes
0.50.2's CPU dequantize_4bit is wrong when in_features is even but not a multiple of the block size
(tests/test_nf4_linear.py), so those shapes would be no oracle.

bitsandbytes 0.50.2 on a CPU with AVX512-BF16, in eval mode without grad, switches Linear4bit to a bf16 kernel
(absmax rounded to bf16; measured 7.6e-4 relative on this tiny model's logits). exact() turns that off, so the oracle is its
fp32 path, what it computes in training and on other CPUs.
"""
import json
import logging
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import minirlhf
from minirlhf.checkpoint import CheckpointError
from minirlhf.config import ConfigError
from minirlhf.nf4 import NF4Linear
from test_checkpoint import one_line_error
from tiny import save_hf, save_tokenizer

import bitsandbytes as bnb  # the oracles: bitsandbytes==0.50.2, transformers, peft from the [test] extra
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

FORMATS = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]
QKV = "gpt_neox.layers.0.attention.query_key_value"


def exact(hf_model):
    for m in hf_model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False  # bitsandbytes' fp32 path (see the module docstring)
    return hf_model


def hf_4bit(folder, quant_type=None, double_quant=None, **options):
    """transformers' 4-bit model: quantized from a float folder (more BitsAndBytesConfig options in `options`),
    or reloaded from a 4-bit one (quant_type None)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    extra = {} if quant_type is None else {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32, **options)}
    return exact(AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float32, **extra))


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


IDS = torch.randint(0, 320, (3, 13), generator=torch.Generator().manual_seed(1))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def float_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("float")
    save_hf(folder)
    return folder


@pytest.fixture(scope="module")
def bnb_folders(float_folder, tmp_path_factory):
    """(quant_type, double_quant) -> (a folder transformers saved from its 4-bit model, that model)."""
    out = {}
    for quant_type, double_quant in FORMATS:
        model = hf_4bit(float_folder, quant_type, double_quant)
        folder = tmp_path_factory.mktemp(f"{quant_type}{'_dq' if double_quant else ''}")
        model.save_pretrained(folder)
        out[quant_type, double_quant] = folder, model
    return out


@pytest.mark.parametrize("quant_type, double_quant", FORMATS, ids=str)
def test_a_transformers_4bit_folder_loads_as_it_is(bnb_folders, quant_type, double_quant):
    folder, hf = bnb_folders[quant_type, double_quant]
    ours = minirlhf.load_model(str(folder))
    file = load_file(folder / "model.safetensors")
    layers = [(n, m) for n, m in ours.named_modules() if isinstance(m, NF4Linear)]
    assert len(layers) == 8  # 2 blocks x 4 linears; embeddings, norms and head stay float
    for name, m in layers:
        assert (m.quant_type, m.double_quant, m.blocksize, m.compute_dtype) == (quant_type, double_quant, 64,
                                                                                torch.float32)
        assert torch.equal(m.weight, file[f"{name}.weight"]) and torch.equal(m.absmax, file[f"{name}.weight.absmax"])
        if double_quant:
            assert torch.equal(m.nested_absmax, file[f"{name}.weight.nested_absmax"])
            assert torch.equal(m.offset, hf.get_submodule(name).weight.quant_state.offset)
    err = rel_err(logits(ours), logits(hf))
    assert err <= 1e-5, err  # measured 1.4e-7 to 1.6e-7 (the four formats)


def test_a_sharded_4bit_folder_loads_too(bnb_folders, tmp_path):
    folder, hf = bnb_folders["nf4", True]
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert len([n for n in os.listdir(tmp_path / "sharded") if n.endswith(".safetensors")]) > 2
    ours = minirlhf.load_model(str(tmp_path / "sharded"))
    assert torch.equal(logits(ours), logits(minirlhf.load_model(str(folder))))


def skipping(float_folder, folder, skip):
    """transformers' nf4 model with the `skip` modules kept in float (llm_int8_skip_modules), saved in folder."""
    hf = hf_4bit(float_folder, "nf4", True, llm_int8_skip_modules=skip)
    hf.save_pretrained(folder)
    return hf


def test_layers_transformers_kept_in_float_stay_float(float_folder, tmp_path):
    hf = skipping(float_folder, tmp_path / "skip", ["dense_4h_to_h", "lm_head"])
    ours = minirlhf.load_model(str(tmp_path / "skip"))
    block = ours.gpt_neox.layers[1]
    kinds = {name.rsplit(".", 1)[1]: type(m) for name, m in block.named_modules()
             if isinstance(m, (NF4Linear, torch.nn.Linear))}
    assert kinds == {"query_key_value": NF4Linear, "dense": NF4Linear, "dense_h_to_4h": NF4Linear,
                     "dense_4h_to_h": torch.nn.Linear}
    err = rel_err(logits(ours), logits(hf))
    assert err <= 1e-5, err  # measured 1.5e-7
    skipping(float_folder, tmp_path / "head", ["dense_4h_to_h"])  # the head in 4 bits too: not ours to hold
    one_line_error(CheckpointError, lambda: minirlhf.load_model(str(tmp_path / "head")), "model.safetensors",
                   "embed_out is stored in 4 bits")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_ours_saved_in_4bit_is_transformers_file_and_reloads_as_linear4bit(bnb_folders, float_folder, tmp_path,
                                                                          quant_type):
    ours = minirlhf.load_model(str(float_folder), quantization=quant_type)  # quantized here, from fp32
    minirlhf.save_model(ours, str(tmp_path / "ours"), keep_4bit=True)
    theirs_folder, _ = bnb_folders[quant_type, True]
    mine, theirs = load_file(tmp_path / "ours" / "model.safetensors"), load_file(theirs_folder / "model.safetensors")
    assert sorted(mine) == sorted(theirs)
    different = [k for k in mine if mine[k].dtype != theirs[k].dtype or not torch.equal(mine[k], theirs[k])]
    assert different == []  # every tensor, the 8-bit absmax codes and the JSON quant states included
    config = json.loads((tmp_path / "ours" / "config.json").read_text())["quantization_config"]
    assert config == json.loads((theirs_folder / "config.json").read_text())["quantization_config"]
    hf = hf_4bit(tmp_path / "ours")
    assert isinstance(hf.get_submodule(QKV), bnb.nn.Linear4bit)
    err = rel_err(logits(hf), logits(ours))
    assert err <= 1e-5, err  # measured 1.4e-7 (nf4 and fp4)


@pytest.fixture(scope="module")
def peft_adapter(bnb_folders, tmp_path_factory):
    """(the nf4 double-quant folder, an adapter folder PEFT trained on transformers' 4-bit model from it)."""
    from peft import LoraConfig, get_peft_model

    folder, _ = bnb_folders["nf4", True]
    torch.manual_seed(0)
    peft_model = get_peft_model(hf_4bit(folder), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                           target_modules=["query_key_value"]))
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(3):  # a few steps of language modelling on random tokens: B becomes non-zero
        loss = peft_model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    adapter = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(adapter)
    return folder, adapter


def peft_4bit(folder, adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(hf_4bit(folder), str(adapter)).eval()


def test_a_peft_adapter_trained_on_transformers_4bit_gives_the_same_logits_on_ours(peft_adapter):
    folder, adapter = peft_adapter
    theirs = peft_4bit(folder, adapter)
    with theirs.disable_adapter():
        base = logits(theirs)
    trained = logits(theirs)
    assert rel_err(trained, base) > 1e-3  # the adapter changes the logits (measured 0.32)
    ours = minirlhf.load_adapter(minirlhf.load_model(str(folder)), str(adapter))
    err = rel_err(logits(ours), trained)
    assert err <= 1e-5, err  # measured 1.6e-7


def test_merging_into_the_4bit_base_requantizes_as_peft_does(peft_adapter):
    """merge: dequantize, add (alpha / r) B @ A in fp32, quantize again (PEFT's Linear4bit.merge does the same
    with bitsandbytes): the same new 4-bit tensors, bit for bit, and the rounding error reported."""
    folder, adapter = peft_adapter
    theirs = peft_4bit(folder, adapter).merge_and_unload()
    ours = minirlhf.load_adapter(minirlhf.load_model(str(folder)), str(adapter))
    wanted = {name: (m.base_weight() + m.delta_weight()).detach() for name, m in minirlhf.lora.lora_modules(ours)}
    errors = minirlhf.merge_lora(ours)
    assert sorted(errors) == sorted(wanted) == [f"gpt_neox.layers.{i}.attention.query_key_value" for i in (0, 1)]
    for name, error in errors.items():
        merged, bnb_layer = ours.get_submodule(name).base_layer, theirs.get_submodule(name)
        assert isinstance(merged, NF4Linear) and isinstance(bnb_layer, bnb.nn.Linear4bit)
        qs = bnb_layer.weight.quant_state
        assert torch.equal(merged.weight, bnb_layer.weight.data) and torch.equal(merged.absmax, qs.absmax)
        assert torch.equal(merged.nested_absmax, qs.state2.absmax) and torch.equal(merged.offset, qs.offset)
        assert error == (merged.dequantize() - wanted[name]).abs().max().item() > 0  # measured 1.2e-2, 1.0e-2
    err = rel_err(logits(minirlhf.merge_and_unload(ours)), logits(theirs))
    assert err <= 1e-5, err  # measured 1.4e-7


# ------------------------------------------------------------------------------------------------ bad input

def quant_state(tensors, name=QKV, quant_type="nf4"):
    key = f"{name}.weight.quant_state.bitsandbytes__{quant_type}"
    return key, json.loads(bytes(tensors[key].tolist()).decode())


def packed(state: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)


def set_state(**fields):
    def edit(t):
        key, state = quant_state(t)
        t[key] = packed({**state, **fields})
    return edit


def drop(suffix):
    def edit(t):
        del t[f"{QKV}.{suffix}"]
    return edit


def put(suffix, value):
    def edit(t):
        t[f"{QKV}.{suffix}"] = value(t[f"{QKV}.{suffix}"]) if callable(value) else value
    return edit


STATE = f"{QKV}.weight.quant_state.bitsandbytes__nf4"
# tensor edit -> pieces of the one-line error
BAD_TENSORS = {
    "unknown quant type": (set_state(quant_type="int4"), [STATE, "'quant_type' must be 'nf4' or 'fp4', got 'int4'"]),
    "quant type against its name": (set_state(quant_type="fp4"), [STATE, "'quant_type' is 'fp4'"]),
    "unsupported blocksize": (set_state(blocksize=48),
                              [STATE, "'blocksize' must be one of 32, 64, 128, 256, 512, 1024, 2048, 4096", "48"]),
    "blocksize 16": (set_state(blocksize=16), [STATE, "'blocksize' must be one of", "got 16"]),
    "blocksize against absmax": (set_state(blocksize=128), [f"{QKV}.weight.absmax", "[96]", "[192]"]),
    "shape": (set_state(shape=[64, 192]), [STATE, "'shape' must be [192, 64]", "[64, 192]"]),
    "missing shape": (set_state(shape=None), [STATE, "'shape'", "got None"]),
    "dtype": (set_state(dtype="int8"), [STATE, "'dtype' must be one of float32, bfloat16, float16"]),
    "nested offset": (set_state(nested_offset="x"), [STATE, "'nested_offset' must be a finite number"]),
    "nested blocksize": (set_state(nested_blocksize=128), [STATE, "'nested_blocksize' must be 256"]),
    "missing absmax": (drop("weight.absmax"), [f"missing tensor '{QKV}.weight.absmax'"]),
    "missing nested absmax": (drop("weight.nested_absmax"), [f"missing tensor '{QKV}.weight.nested_absmax'"]),
    "missing nested quant map": (drop("weight.nested_quant_map"), [f"'{QKV}.weight.nested_quant_map'", "missing"]),
    "missing quant map": (drop("weight.quant_map"), [f"missing tensor '{QKV}.weight.quant_map'"]),
    "absmax numel": (put("weight.absmax", lambda t: t[:-1]), [f"{QKV}.weight.absmax", "torch.uint8 [192]", "[191]"]),
    "absmax dtype": (put("weight.absmax", lambda t: t.float()), [f"{QKV}.weight.absmax", "torch.float32 [192]"]),
    "nested absmax numel": (put("weight.nested_absmax", lambda t: torch.cat([t, t])),
                            [f"{QKV}.weight.nested_absmax", "[1]", "[2]"]),
    "weight numel": (put("weight", lambda t: t[:-2]), [f"'{QKV}.weight'", "torch.uint8 [6144, 1]", "[6142, 1]"]),
    "weight dtype": (put("weight", lambda t: t.reshape(-1).view(torch.bfloat16)),
                     [f"'{QKV}.weight'", "torch.bfloat16"]),
    "custom code book": (put("weight.quant_map", lambda t: t * 0.5), [f"{QKV}.weight.quant_map", "nf4 code book"]),
    "custom nested code book": (put("weight.nested_quant_map", lambda t: t.flip(0)),
                                [f"{QKV}.weight.nested_quant_map", "dynamic 8-bit code book"]),
    "not JSON": (put("weight.quant_state.bitsandbytes__nf4", torch.tensor(list(b"{not json"), dtype=torch.uint8)),
                 [STATE, "not a JSON quant state"]),
    "not UTF-8": (put("weight.quant_state.bitsandbytes__nf4", torch.tensor([0xFF, 0xFE], dtype=torch.uint8)),
                  [STATE, "not a JSON quant state"]),
    "JSON not an object": (put("weight.quant_state.bitsandbytes__nf4", packed([1, 2])), [STATE, "JSON object"]),
    "state dtype": (put("weight.quant_state.bitsandbytes__nf4", lambda t: t.float()),
                    [STATE, "must be uint8 [bytes]", "torch.float32"]),
    "state shape": (put("weight.quant_state.bitsandbytes__nf4", lambda t: t[None]), [STATE, "must be uint8 [bytes]"]),
}


@pytest.fixture
def nf4_copy(bnb_folders, tmp_path):
    dst = tmp_path / "nf4"
    shutil.copytree(bnb_folders["nf4", True][0], dst)
    return dst


def edit_tensors(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


@pytest.mark.parametrize("case", list(BAD_TENSORS))
def test_a_bad_4bit_tensor_is_one_line_naming_it(nf4_copy, case):
    edit, parts = BAD_TENSORS[case]
    edit_tensors(nf4_copy, edit)
    one_line_error(CheckpointError, lambda: minirlhf.load_model(str(nf4_copy)), "model.safetensors", *parts)


BAD_CONFIGS = {
    "unknown quant type": ({"bnb_4bit_quant_type": "int4"},
                           "quantization_config.bnb_4bit_quant_type must be 'nf4' or 'fp4', got 'int4'"),
    "compute dtype": ({"bnb_4bit_compute_dtype": "float64"}, "quantization_config.bnb_4bit_compute_dtype must be"),
    "quant storage": ({"bnb_4bit_quant_storage": "bfloat16"}, "quantization_config.bnb_4bit_quant_storage"),
    "int8": ({"load_in_4bit": False, "load_in_8bit": True}, "quantization_config.load_in_8bit"),
    "method": ({"quant_method": "gptq"}, "quantization_config.quant_method 'gptq' is not supported"),
    "double quant": ({"bnb_4bit_use_double_quant": "yes"}, "quantization_config.bnb_4bit_use_double_quant"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_a_bad_quantization_config_is_one_line_naming_the_field(nf4_copy, case):
    fields, message = BAD_CONFIGS[case]
    path = nf4_copy / "config.json"
    raw = json.loads(path.read_text())
    raw["quantization_config"].update(fields)
    path.write_text(json.dumps(raw))
    one_line_error(ConfigError, lambda: minirlhf.load_model(str(nf4_copy)), "config.json", message)


def test_a_4bit_folder_refuses_another_quantization(nf4_copy):
    for kwargs in (dict(quantization="fp4"), dict(quantization="int8"), dict(quantization="none"), dict(int8=True)):
        one_line_error(CheckpointError, lambda: minirlhf.load_model(str(nf4_copy), **kwargs), str(nf4_copy),
                 "holds bitsandbytes nf4 4-bit weights", "quantization 'nf4'")
    assert isinstance(minirlhf.load_model(str(nf4_copy), quantization="nf4").get_submodule(QKV), NF4Linear)


def test_saving_what_the_4bit_format_cannot_hold_writes_nothing(float_folder, tmp_path):
    def save():
        minirlhf.save_model(model, str(tmp_path / "out"), keep_4bit=True)

    for kwargs, message in ((dict(int8=True), "Int8Linear; only NF4Linear"), (dict(), "no NF4Linear layers")):
        model = minirlhf.load_model(str(float_folder), **kwargs)
        one_line_error(CheckpointError, save, message)
    model = minirlhf.load_model(str(float_folder), quantization="nf4")
    model.gpt_neox.layers[1].mlp.dense_4h_to_h = NF4Linear.from_linear(torch.nn.Linear(128, 64), quant_type="fp4")
    one_line_error(CheckpointError, save, "2 formats")
    assert os.listdir(tmp_path) == []


def test_train_py_names_the_bad_tensor_or_field_in_one_line_and_exits_2(nf4_copy, tmp_path, capsys):
    from test_cli import call

    save_tokenizer(nf4_copy)
    (tmp_path / "prompts.txt").write_text("the movie was\nhello world\n")
    argv = ["--model", str(nf4_copy), "--prompts", str(tmp_path / "prompts.txt"), "--reward", "vader",
            "--steps", "1", "--out", str(tmp_path / "run")]

    def one_line_exit_2(argv, message):
        code, err = call(argv, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("train.py: error: --model: "), err
        assert message in lines[0] and "Traceback" not in err, err
        assert not (tmp_path / "run").exists()  # nothing written

    one_line_exit_2(argv + ["--quantization", "int8"], "(--quantization nf4), not 'int8'")
    one_line_exit_2(argv + ["--no-int8"], "(--quantization nf4), not 'none'")
    config = json.loads((nf4_copy / "config.json").read_text())
    config["quantization_config"]["bnb_4bit_quant_type"] = "int4"
    (nf4_copy / "config.json").write_text(json.dumps(config))
    one_line_exit_2(argv + ["--quantization", "nf4"], "quantization_config.bnb_4bit_quant_type must be")
    config["quantization_config"]["bnb_4bit_quant_type"] = "nf4"
    (nf4_copy / "config.json").write_text(json.dumps(config))
    edit_tensors(nf4_copy, drop("weight.absmax"))
    one_line_exit_2(argv + ["--quantization", "nf4"], f"missing tensor '{QKV}.weight.absmax'")


def test_quantization_auto_follows_what_the_folder_holds(nf4_copy, float_folder):
    from minirlhf.memory import plan_for
    from minirlhf.train import TrainConfig, follow_stored_quantization

    def held(**flags):
        return follow_stored_quantization(TrainConfig.from_flags(**flags)).base.quantized()

    assert held(model=str(nf4_copy)) == "nf4"  # auto: the folder's own 4-bit type
    assert held(model=str(float_folder)) == "int8"  # a float folder: LLM.int8(), as before
    assert held(model=str(nf4_copy), int8=False) == "none"  # explicit choices are kept (load_model refuses them)
    assert held(model=str(nf4_copy), quantization="int8") == "int8"
    auto, nf4 = (plan_for(TrainConfig.from_flags(model=str(nf4_copy), **q)) for q in ({}, {"quantization": "nf4"}))
    assert auto["rows"] == nf4["rows"] and auto["totals"] == nf4["totals"]
    assert auto["rows"][0]["name"] == "4-bit weights (nf4, blocks' linear layers)", auto["rows"][0]
