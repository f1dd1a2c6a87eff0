"""Metrics JSONL round trip and TensorBoard event files, read back without TensorFlow."""

import glob
import json
import math
import os
import struct
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from psa_jax.train import metrics_io as M

tensorboardX = pytest.importorskip("tensorboardX")


def _read_events(logdir):
    """Events of every TFRecord file under ``logdir``, checking both CRCs of each record."""
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c

    events = []
    for path in sorted(
        glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True)
    ):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            header = data[pos : pos + 8]
            (length,) = struct.unpack("Q", header)
            (header_crc,) = struct.unpack("I", data[pos + 8 : pos + 12])
            payload = data[pos + 12 : pos + 12 + length]
            (payload_crc,) = struct.unpack("I", data[pos + 12 + length : pos + 16 + length])
            assert header_crc == masked_crc32c(header) and payload_crc == masked_crc32c(payload)
            events.append(event_pb2.Event.FromString(payload))
            pos += 16 + length
    return events


def _scalars(events):
    out = {}
    for e in events:
        for v in e.summary.value:
            if v.HasField("simple_value"):
                out.setdefault(v.tag, []).append((e.step, v.simple_value))
    return out


def test_round_trip_jsonl_and_tensorboard(tmp_path):
    with M.MetricWriter(tmp_path) as w:
        w.write(1, {"loss": 0.5, "lr": np.float32(1e-5), "acc": jnp.asarray(0.25), "seen": 8})
        w.write(2, {"loss": float("nan"), "grad_norm": float("inf"), "neg": -np.inf})
        w.write(3, {"loss": jnp.array([0.125])})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]  # every line valid JSON
    assert json.loads(lines[1]) == {"step": 2, "loss": "nan", "grad_norm": "inf", "neg": "-inf"}
    records = M.read_metrics(tmp_path)
    assert records[0] == {
        "step": 1,
        "loss": 0.5,
        "lr": float(np.float32(1e-5)),
        "acc": 0.25,
        "seen": 8,
    }
    assert type(records[0]["lr"]) is float and type(records[0]["seen"]) is int
    assert math.isnan(records[1]["loss"]) and records[1]["grad_norm"] == math.inf
    assert records[1]["neg"] == -math.inf and records[2]["loss"] == 0.125
    assert len(M.read_metrics(tmp_path / "metrics.jsonl")) == 3  # the file path works too

    scalars = _scalars(_read_events(tmp_path / "tensorboard"))
    assert scalars["loss"][0] == (1, 0.5) and scalars["loss"][2] == (3, 0.125)
    assert math.isnan(scalars["loss"][1][1]) and scalars["seen"] == [(1, 8.0)]
    assert scalars["lr"][0][1] == pytest.approx(1e-5)


def test_appends_across_writers_like_a_resumed_run(tmp_path):
    with M.MetricWriter(tmp_path, tensorboard=False) as w:
        for step in (1, 2, 3):
            w.write(step, {"loss": float(step)})
        w.write(3, {"eval_loss": 30.0})
    with M.MetricWriter(tmp_path, tensorboard=False) as w:  # resumed from step 1
        w.write(2, {"loss": 20.0})
        w.write(3, {"loss": 30.0})
    assert len(M.read_metrics(tmp_path)) == 6
    assert not (tmp_path / "tensorboard").exists()
    last = M.last_per_step(M.read_metrics(tmp_path))
    assert list(last) == [1, 2, 3]
    assert last[1] == {"step": 1, "loss": 1.0}
    assert last[2] == {"step": 2, "loss": 20.0}
    assert last[3] == {"step": 3, "loss": 30.0, "eval_loss": 30.0}


def test_disabled_writer_creates_nothing(tmp_path):
    workdir = tmp_path / "run"
    with M.MetricWriter(workdir, enabled=False) as w:
        w.write(1, {"loss": 1.0})
        w.write_text(1, "prompt", "a cat")
        w.write_hparams({"lr": 1e-5})
        w.flush()
    assert not workdir.exists()


def test_text_and_hparams(tmp_path):
    with M.MetricWriter(tmp_path) as w:
        w.write_hparams({"optim.learning_rate": 1e-5, "name": "adamw", "shape": (1, 2)})
        w.write_text(5, "samples/prompt", "a photo of a cat")
    assert json.loads((tmp_path / "hparams.json").read_text())["shape"] == "(1, 2)"
    assert json.loads((tmp_path / "text.jsonl").read_text())["text"] == "a photo of a cat"
    tags = {v.tag for e in _read_events(tmp_path / "tensorboard") for v in e.summary.value}
    assert "samples/prompt/text_summary" in tags and "_hparams_/experiment" in tags


def test_bad_inputs_raise(tmp_path):
    with M.MetricWriter(tmp_path, tensorboard=False) as w:
        with pytest.raises(ValueError, match="step"):
            w.write(1, {"step": 3})
        with pytest.raises(ValueError, match="scalar"):
            w.write(1, {"loss": np.zeros(3)})


def test_truncated_last_line_is_skipped_but_corruption_elsewhere_raises(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    assert M.read_metrics(path) == [{"step": 1, "loss": 1.0}]
    path.write_text('{"step": 1, "lo\n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(json.JSONDecodeError):
        M.read_metrics(path)


def test_tensorboard_writer_does_not_import_torch(tmp_path):
    code = (
        "import sys; from psa_jax.train.metrics_io import MetricWriter\n"
        f"w = MetricWriter({str(tmp_path)!r}); w.write(0, {{'x': 1.0}}); w.close()\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "import tensorboardX.writer\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.getcwd())
    assert _scalars(_read_events(tmp_path / "tensorboard"))["x"] == [(0, 1.0)]
