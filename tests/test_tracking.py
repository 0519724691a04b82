"""--log-with tensorboard: the event file, read back with tensorboard's own EventAccumulator, holds every scalar of
metrics.jsonl at its step with its value, and the before/after samples as text; --log-with wandb: the offline run's
log, read back record by record with W&B's own protobuf messages, holds the same; off (the default), nothing else
is written and metrics.jsonl is the same."""

import glob
import json
import shutil
import struct

import numpy as np
import pytest

from minirlhf.train import TrainConfig, run
from minirlhf.tracking import scalars
from tiny import PPO, hf_model, save_tokenizer

SMALL = dict(steps=3, batch_size=4, mini_batch_size=2, ppo_epochs=1, min_new_tokens=2, max_new_tokens=4,
             eval_size=2, save_every=3, seed=0, reward="vader", **PPO)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tracking")
    hf_model(seed=0).save_pretrained(tmp / "model")
    save_tokenizer(tmp / "model")
    (tmp / "p.txt").write_text("the movie was\nhello world\na dull film\nI loved every\n")
    common = dict(model=str(tmp / "model"), prompts=str(tmp / "p.txt"), **SMALL)
    run(TrainConfig.from_flags(out=str(tmp / "tb"), log_with="tensorboard", **common), progress=False)
    run(TrainConfig.from_flags(out=str(tmp / "wb"), log_with="wandb", **common), progress=False)
    run(TrainConfig.from_flags(out=str(tmp / "plain"), **common), progress=False)
    return tmp


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_holds_every_scalar_of_metrics_jsonl(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs / "tb" / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    rows = metrics(runs / "tb")
    names = set(scalars(rows[0]))
    assert {"env/reward_mean", "objective/kl", "objective/kl_coef", "ppo/policy/approxkl"} <= names
    assert set(acc.Tags()["scalars"]) == names
    for name in names:
        events = acc.Scalars(name)
        assert [e.step for e in events] == [m["step"] for m in rows] == [1, 2, 3]
        # TensorBoard stores a scalar as float32: the value of metrics.jsonl rounded once, exactly
        assert [e.value for e in events] == [float(np.float32(m[name])) for m in rows], name
    text = acc.Tensors("samples/text_summary")
    assert len(text) == 1 and text[0].step == 3
    assert text[0].tensor_proto.string_val[0].decode() == (runs / "tb" / "samples.md").read_text()


def wandb_records(path):
    """The records of a W&B offline run file (run-<id>.wandb), as W&B's protobuf Record messages.

    The file is a LevelDB-style log: a 7-byte header (":W&B", a 2-byte magic, a version byte), then 32 KiB blocks
    of chunks, each a 7-byte header (crc32, length as uint16, type) and its bytes; type 1 is a whole record, 2 / 3
    / 4 the first / middle / last piece of one split across blocks; a block's last < 7 bytes are padding."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", data[:7]
    pos, pieces, records = 7, b"", []
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        body = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces + body)
            records.append(record)
            pieces = b""
        elif kind in (2, 3):
            pieces += body
    return records


def test_wandb_offline_run_holds_every_scalar_of_metrics_jsonl(runs):
    """Each step's history record holds every number of that step's metrics.jsonl line, exactly (W&B keeps JSON
    doubles), and the last step's also the samples table, as the HTML page W&B stored for it."""
    (folder,) = glob.glob(str(runs / "wb" / "wandb" / "offline-run-*"))
    (log,) = glob.glob(folder + "/run-*.wandb")
    history = [r.history for r in wandb_records(log) if r.WhichOneof("record_type") == "history"]
    rows = metrics(runs / "wb")
    assert [h.step.num for h in history] == [m["step"] for m in rows] == [1, 2, 3]
    for h, m in zip(history, rows):
        # a name is a path of keys: ["objective/kl"] for a scalar, ["samples", "path"] for a part of the HTML page
        logged = {item.nested_key[0]: json.loads(item.value_json) for item in h.item
                  if len(item.nested_key) == 1 and not item.nested_key[0].startswith("_")}  # "_step", "_runtime": W&B's
        assert logged == scalars(m)
    samples = {item.nested_key[1]: json.loads(item.value_json) for item in history[-1].item
               if list(item.nested_key[:1]) == ["samples"]}
    assert samples["_type"] == "html-file"
    page = open(f"{folder}/files/{samples['path']}").read()
    markdown = (runs / "wb" / "samples.md").read_text()
    escaped = markdown.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    assert page.endswith(f"<pre>{escaped}</pre>")


def test_off_by_default_and_the_same_numbers(runs):
    assert not (runs / "plain" / "tensorboard").exists() and not (runs / "plain" / "wandb").exists()
    a, b, c = metrics(runs / "tb"), metrics(runs / "plain"), metrics(runs / "wb")
    for x, y, z in zip(a, b, c):
        assert {k: v for k, v in x.items() if not k.startswith("time/")} == \
               {k: v for k, v in y.items() if not k.startswith("time/")} == \
               {k: v for k, v in z.items() if not k.startswith("time/")}


def test_a_resumed_run_logs_each_step_once(runs, tmp_path):
    """A process that logged step 3 and died before its checkpoint: the resumed run logs step 3 again, and
    TensorBoard shows it once (purge_step), as metrics.jsonl holds it once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "resumed"
    common = dict(model=str(runs / "model"), prompts=str(runs / "p.txt"), log_with="tensorboard",
                  **{**SMALL, "save_every": 2})
    run(TrainConfig.from_flags(out=str(out), **common), progress=False)
    shutil.rmtree(out / "checkpoints" / "step-000003")  # the crash: step 3 logged, its checkpoint never written
    run(TrainConfig.from_flags(resume=str(out), **common), progress=False)
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    rows = metrics(out)
    assert [m["step"] for m in rows] == [1, 2, 3]
    for name in ("env/reward_mean", "objective/kl", "time/ppo/total"):
        events = acc.Scalars(name)
        assert [e.step for e in events] == [1, 2, 3], name
        assert [e.value for e in events] == [float(np.float32(m[name])) for m in rows], name  # the resumed step's
