"""Every writer goes through atomic.py: an exception in the middle of a write leaves the previous version whole
and no temporary file behind."""

import os

import pytest
import torch
from safetensors.torch import load_file

import minirlhf
from minirlhf import atomic, checkpoint, lora, resume
from minirlhf.atomic import WriteError, atomic_file, atomic_folder, write_text
from tiny import hf_model, save_tokenizer


class Boom(Exception):
    pass


def litter(folder):
    return [n for n in os.listdir(folder) if n.startswith((".tmp-", ".old-"))]


def test_an_interrupted_file_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "summary.json"
    write_text(str(path), "old")
    with pytest.raises(Boom):
        with atomic_file(str(path)) as tmp:
            with open(tmp, "w") as f:
                f.write("half of the new")
            raise Boom
    assert path.read_text() == "old" and litter(tmp_path) == []
    write_text(str(path), "new")
    assert path.read_text() == "new" and litter(tmp_path) == []
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"


def test_an_interrupted_folder_write_keeps_the_old_folder(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_folder(str(target)) as tmp:
        (open(os.path.join(tmp, "a"), "w")).write("old a")
    with pytest.raises(Boom):
        with atomic_folder(str(target)) as tmp:
            (open(os.path.join(tmp, "a"), "w")).write("new a")
            raise Boom
    assert (target / "a").read_text() == "old a" and litter(tmp_path) == []
    with atomic_folder(str(target)) as tmp:
        (open(os.path.join(tmp, "a"), "w")).write("new a")
    assert (target / "a").read_text() == "new a" and litter(tmp_path) == []


def test_a_folder_holding_other_files_is_never_replaced(tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(WriteError, match="already holds files this write would not replace \\(notes.txt\\)"):
        with atomic_folder(str(target)) as tmp:
            open(os.path.join(tmp, "a"), "w").write("x")
    assert (target / "notes.txt").read_text() == "keep me" and not (target / "a").exists()
    assert litter(tmp_path) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(WriteError, match="exists and is not a folder"):
        with atomic_folder(str(tmp_path / "file")):
            pass


def test_save_model_and_save_adapter_interrupted(tmp_path, monkeypatch):
    hf_model(seed=0).save_pretrained(tmp_path / "hf")
    save_tokenizer(tmp_path / "hf")
    base = minirlhf.load_model(str(tmp_path / "hf"))
    adapted = lora.add_lora(minirlhf.load_model(str(tmp_path / "hf")), r=2, alpha=4, dropout=0.0)
    checkpoint.save_model(base, str(tmp_path / "saved"))
    lora.save_adapter(adapted, str(tmp_path / "adapter"))
    before = {"model": load_file(tmp_path / "saved" / "model.safetensors"),
              "adapter": load_file(tmp_path / "adapter" / "adapter_model.safetensors")}
    with torch.no_grad():
        for p in list(base.parameters()) + list(adapted.parameters()):
            p.add_(1.0)

    def boom(*args, **kwargs):
        raise Boom

    # each writes its config first, then the weights: fail on the weights
    monkeypatch.setattr(checkpoint, "save_file", boom)
    with pytest.raises(Boom):
        checkpoint.save_model(base, str(tmp_path / "saved"))
    monkeypatch.setattr(lora, "save_file", boom)
    with pytest.raises(Boom):
        lora.save_adapter(adapted, str(tmp_path / "adapter"))
    after = {"model": load_file(tmp_path / "saved" / "model.safetensors"),
             "adapter": load_file(tmp_path / "adapter" / "adapter_model.safetensors")}
    for kind in before:
        assert before[kind].keys() == after[kind].keys()
        for k in before[kind]:
            assert torch.equal(before[kind][k], after[kind][k]), (kind, k)
    assert litter(tmp_path) == []


def test_a_checkpoint_interrupted_after_its_adapter_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """resume.save_checkpoint writes the adapter, then the value head, then the state: fail on the state file."""
    from minirlhf.train import TrainConfig, run

    hf_model(seed=0).save_pretrained(tmp_path / "m")
    save_tokenizer(tmp_path / "m")
    (tmp_path / "p.txt").write_text("the movie was\nhello world\n")
    cfg = dict(model=str(tmp_path / "m"), prompts=str(tmp_path / "p.txt"), reward="vader", batch_size=2,
               mini_batch_size=2, ppo_epochs=1, min_new_tokens=2, max_new_tokens=3, eval_size=2, save_every=1,
               algorithm="ppo")
    run(TrainConfig.from_flags(steps=1, out=str(tmp_path / "run"), **cfg), progress=False)
    step1 = tmp_path / "run" / "checkpoints" / "step-000001"
    state_before = (step1 / "trainer_state.json").read_text()
    # a second checkpoint into the same folder name, interrupted after its adapter and value head were written
    real_save_file, calls = resume.save_file, []

    def failing(tensors, path, *args, **kwargs):
        calls.append(path)
        if path.endswith(resume.TENSORS_FILE):
            raise Boom
        return real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(resume, "save_file", failing)
    trainer_like = resume_trainer(tmp_path, cfg)
    with pytest.raises(Boom):
        resume.save_checkpoint(str(step1), trainer_like, {"model": cfg["model"]})
    assert any(resume.VALUE_HEAD_FILE in p for p in calls)  # it got that far
    assert (step1 / "trainer_state.json").read_text() == state_before
    assert sorted(os.listdir(step1)) == ["adapter", "state.safetensors", "trainer_state.json", "value_head.safetensors"]
    assert litter(step1.parent) == [] and litter(tmp_path / "run") == []


def resume_trainer(tmp_path, cfg):
    from minirlhf.rewards import checked_reward_fn
    from minirlhf.train import TrainConfig
    from minirlhf.trainer import PPOTrainer

    model = lora.add_lora(minirlhf.load_model(cfg["model"]), r=8, alpha=16, dropout=0.0)
    tok = minirlhf.load_tokenizer(cfg["model"])
    return PPOTrainer.for_config(model, tok, checked_reward_fn(lambda p, r: [0.0] * len(p), "zero"), TrainConfig.from_flags(**cfg))


def test_every_writer_uses_the_one_atomic_writer():
    """No module but atomic.py renames files into place or makes temporary files for writing."""
    root = os.path.dirname(atomic.__file__)
    for name in os.listdir(root):
        if name.endswith(".py") and name != "atomic.py":
            text = open(os.path.join(root, name), encoding="utf-8").read()
            for pattern in ("os.rename(", "os.replace(", "mkstemp(", "mkdtemp("):
                assert pattern not in text, (name, pattern)
