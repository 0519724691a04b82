"""Loading from folders and the Hugging Face cache, the tokenizer, and every kind of bad input."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import minirlhf
from minirlhf.checkpoint import CheckpointError
from minirlhf.config import ConfigError
from tiny import TEXT, rewrite_config, save_hf


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    save_hf(folder)
    return folder


@pytest.fixture
def copy(good, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(good, dst)
    return dst


def one_line_error(exc_type, fn, *must_contain):
    with pytest.raises(exc_type) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message, message
    for part in must_contain:
        assert part in message, f"{part!r} not in {message!r}"
    return message


def test_loads_from_hf_cache_offline_by_hub_id(good, tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-neox" / "snapshots" / "0123abcd"
    shutil.copytree(good, snapshot)
    (tmp_path / "hub" / "models--tiny-org--tiny-neox" / "refs").mkdir()
    (tmp_path / "hub" / "models--tiny-org--tiny-neox" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    model = minirlhf.load_model("tiny-org/tiny-neox")
    direct = minirlhf.load_model(str(good))
    assert torch.equal(model.embed_out.weight, direct.embed_out.weight)
    tok = minirlhf.load_tokenizer("tiny-org/tiny-neox")
    assert tok.eos_id == 0 and tok.pad_id == 1
    one_line_error(CheckpointError, lambda: minirlhf.load_model("tiny-org/not-cached"), "tiny-org/not-cached",
                   "cache")


def test_tokenizer_left_pads_and_decodes(good):
    tok = minirlhf.load_tokenizer(str(good))
    texts = ["the movie was wonderful", "hello", ""]
    ids, mask = tok.encode_batch(texts)
    lengths = [len(tok.encode(t)) for t in texts]
    assert mask.sum(1).tolist() == lengths
    T = ids.shape[1]
    for row, n in enumerate(lengths):
        assert (ids[row, :T - n] == tok.pad_id).all() and (mask[row, T - n:] == 1).all()
        assert tok.decode(ids[row, T - n:]) == texts[row]
    assert tok.decode_batch(ids, mask) == texts
    ids, mask = tok.encode_batch(["hello"], append_eos=True)
    assert ids[0, -1].item() == tok.eos_id
    ids, _ = tok.encode_batch([TEXT[0]], max_length=3)
    assert ids.tolist()[0] == tok.encode(TEXT[0])[-3:]


def test_missing_config(copy):
    os.remove(copy / "config.json")
    one_line_error(ConfigError, lambda: minirlhf.load_model(str(copy)), "config.json", "not found")


def test_config_not_json(copy):
    (copy / "config.json").write_text("{not json")
    one_line_error(ConfigError, lambda: minirlhf.load_model(str(copy)), "config.json", "not valid JSON")


def test_wrong_model_type(copy):
    rewrite_config(copy, lambda c: {**c, "model_type": "llama"})
    one_line_error(ConfigError, lambda: minirlhf.load_model(str(copy)), "config.json", "llama", "gpt_neox")


def test_bad_config_field(copy):
    rewrite_config(copy, lambda c: {**c, "num_attention_heads": 5})
    one_line_error(ConfigError, lambda: minirlhf.load_model(str(copy)), "num_attention_heads")


def test_missing_weights(copy):
    os.remove(copy / "model.safetensors")
    one_line_error(CheckpointError, lambda: minirlhf.load_model(str(copy)), "model.safetensors")


def test_pickle_only_checkpoint_is_refused(copy):
    os.remove(copy / "model.safetensors")
    (copy / "pytorch_model.bin").write_bytes(b"\x80\x04 would run code if unpickled")
    one_line_error(CheckpointError, lambda: minirlhf.load_model(str(copy)), "pytorch_model.bin", "never unpickles")


def test_wrong_shape(copy):
    tensors = load_file(copy / "model.safetensors")
    key = "gpt_neox.layers.1.mlp.dense_h_to_4h.weight"
    tensors[key] = tensors[key][:-1]
    save_file(tensors, copy / "model.safetensors")
    one_line_error(CheckpointError, lambda: minirlhf.load_model(str(copy)), key, "shape", "[127, 64]")


def test_missing_key(copy):
    tensors = load_file(copy / "model.safetensors")
    del tensors["gpt_neox.layers.0.attention.dense.bias"]
    save_file(tensors, copy / "model.safetensors")
    one_line_error(CheckpointError, lambda: minirlhf.load_model(str(copy)), "gpt_neox.layers.0.attention.dense.bias",
                   "missing")


def test_unexpected_key(copy):
    tensors = load_file(copy / "model.safetensors")
    tensors["gpt_neox.layers.7.mlp.dense_h_to_4h.weight"] = torch.zeros(2)
    save_file(tensors, copy / "model.safetensors")
    one_line_error(CheckpointError, lambda: minirlhf.load_model(str(copy)), "gpt_neox.layers.7", "unexpected")


def test_truncated_safetensors(copy):
    path = copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    one_line_error(CheckpointError, lambda: minirlhf.load_model(str(copy)), "model.safetensors")


def test_corrupt_safetensors(copy):
    (copy / "model.safetensors").write_bytes(b"\xff" * 64)
    one_line_error(CheckpointError, lambda: minirlhf.load_model(str(copy)), "model.safetensors")


def test_not_a_folder_or_id(tmp_path):
    one_line_error(CheckpointError, lambda: minirlhf.load_model(str(tmp_path / "nope")), "nope", "no such folder")
    (tmp_path / "file.txt").write_text("x")
    one_line_error(CheckpointError, lambda: minirlhf.load_model(str(tmp_path / "file.txt")), "file.txt")


def test_missing_tokenizer(copy):
    os.remove(copy / "tokenizer.json")
    one_line_error(CheckpointError, lambda: minirlhf.load_tokenizer(str(copy)), "tokenizer.json")


def test_interrupted_save_leaves_nothing(good, tmp_path, monkeypatch):
    import minirlhf.checkpoint as ckpt

    model = minirlhf.load_model(str(good))

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        minirlhf.save_model(model, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


def test_config_round_trip_keeps_both_spellings(good, tmp_path):
    config = minirlhf.load_config(str(good))
    config.save(tmp_path / "config.json")
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["rope_parameters"]["partial_rotary_factor"] == raw["rotary_pct"] == config.rotary_pct
    import transformers

    hf = transformers.GPTNeoXConfig.from_pretrained(tmp_path)
    assert hf.rope_parameters["partial_rotary_factor"] == config.rotary_pct
    assert hf.hidden_size == config.hidden_size and hf.use_parallel_residual == config.use_parallel_residual
