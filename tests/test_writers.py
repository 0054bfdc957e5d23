"""Small files written whole; a resumed run's metrics.jsonl and TensorBoard events hold each step once."""

import json
import os
import struct

import pytest
from tensorboardX.proto import event_pb2

from diffseg_jax import configlib, writers


def test_a_file_written_whole_keeps_the_old_one_when_writing_fails(tmp_path, monkeypatch):
    path = str(tmp_path / "per_image.csv")
    with writers.open_whole(path, newline="") as f:
        f.write("id,iou\na,0.5\n")
    with pytest.raises(OSError, match="No space left"):
        with writers.open_whole(path, newline="") as f:
            f.write("id,iou\n")  # half of the new file, then the disk is full
            raise OSError(28, "No space left on device")
    assert open(path).read() == "id,iou\na,0.5\n" and os.listdir(tmp_path) == ["per_image.csv"]
    # config.json (and predict.json, fingerprint.json, metrics.json) go through it too
    config = configlib.ml_collections.ConfigDict({"a": 1})
    configlib.save(config, str(tmp_path / "config.json"))

    def dump_half(obj, f, **kwargs):
        f.write('{"a": ')
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", dump_half)
    config.a = 2
    with pytest.raises(OSError):
        configlib.save(config, str(tmp_path / "config.json"))
    monkeypatch.undo()
    assert json.load(open(tmp_path / "config.json")) == {"a": 1}


def _events(folder):
    """(step, tag or 'START') of every event in the folder's event files, in the order they were written."""
    out = []
    for name in sorted(os.listdir(folder)):
        data = open(os.path.join(folder, name), "rb").read()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = event_pb2.Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                out.append((event.step, "START"))
            for value in event.summary.value:
                out.append((event.step, value.tag))
    return out


def _tensorboard_steps(events, tag):
    """The steps TensorBoard shows for ``tag``: a START event at step s hides the earlier events of steps >= s
    (TensorBoard's purge of orphaned data after a restart)."""
    shown = []
    for step, what in events:
        if what == "START":
            shown = [s for s in shown if s < step]
        elif what == tag:
            shown.append(step)
    return shown


def test_a_resumed_run_logs_each_step_once(tmp_path):
    """Killed at step 5 with a checkpoint at 3: the resume redoes 4 and 5. (Before: metrics.jsonl and
    TensorBoard held steps 4 and 5 twice.)"""
    first = writers.MetricWriter(str(tmp_path), resume_step=0)
    for step in range(1, 6):
        first.write(step, {"loss": 1.0 / step})
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # the line a SIGKILL cut
    resumed = writers.MetricWriter(str(tmp_path), resume_step=3)
    for step in range(4, 8):
        resumed.write(step, {"loss": 2.0 / step})
    resumed.close()
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6, 7]
    assert [line["loss"] for line in lines][2:4] == [
        1.0 / 3,
        2.0 / 4,
    ]  # kept before the checkpoint, redone after
    assert _tensorboard_steps(_events(tmp_path / "tensorboard"), "loss") == [1, 2, 3, 4, 5, 6, 7]
