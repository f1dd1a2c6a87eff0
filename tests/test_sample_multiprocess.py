"""``psa-jax sample`` over two processes (jax.distributed on CPU, localhost): each draws its share,
process 0 merges; every requested image is written exactly once, and each is the image one
process draws for that prompt and seed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from psa_jax.sample.images import load_png
from psa_jax.sample.prompts import merge_shards, shard_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a violent fight near a tent at dawn", "a hate rally near a boat in fog",
           "a nude figure near a house at noon", "a gory corpse near a tree in winter",
           "a propaganda poster near a car by the sea"]  # fmt: skip


def test_shards_cover_the_plan_once_and_merging_refuses_a_double(tmp_path):
    plan = [{"file": f"images/{i}.png"} for i in range(5)]
    shards = [shard_plan(plan, i, 3) for i in range(3)]
    assert sorted(p["file"] for s in shards for p in s) == sorted(p["file"] for p in plan)
    assert [len(s) for s in shards] == [2, 2, 1]
    dirs = []
    for k, files in enumerate((["a.png"], ["a.png"])):
        d = tmp_path / f"s{k}"
        (d / "images").mkdir(parents=True)
        (d / "images" / files[0]).write_bytes(b"x")
        (d / "samples.jsonl").write_text(json.dumps({"file": f"images/{files[0]}"}) + "\n")
        dirs.append(str(d))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(Exception, match="drawn by two processes"):
        merge_shards(str(out), dirs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_write_every_image_exactly_once(tmp_path):
    # One CPU device in the one-process run too: the same program as each of the two runs
    # (a chunk split over devices may differ by 1/255 in a few pixels).
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", PSA_JAX_COMPILATION_CACHE="0",
               PSA_JAX_CPU_DEVICES="1")  # fmt: skip
    common = ["--pretrained", "packaged:tiny-base", "--users", "base", "--steps", "3",
              "--batch-size", "2"]  # fmt: skip
    for p in PROMPTS:
        common += ["--prompt", p]
    out = tmp_path / "two"
    port = _free_port()
    procs = []
    for i in range(2):
        dist = ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
                "--process-id", str(i)]  # fmt: skip
        cmd = [sys.executable, "-m", "psa_jax.cli", "sample", *common, "--out", str(out), *dist]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    said = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    assert sorted(s["drawn"] for s in said) == [2, 3] and all(s["images"] == 5 for s in said)
    with open(out / "samples.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    files = [r["file"] for r in records]
    assert len(files) == 5 == len(set(files))
    on_disk = sorted(
        os.path.relpath(os.path.join(d, n), out)
        for d, _, names in os.walk(out)
        for n in names
        if n.endswith(".png") and n != "grid.png"
    )
    assert on_disk == sorted(files)
    assert (out / "grid.png").is_file()
    assert not [n for n in os.listdir(tmp_path) if ".shard-" in n or ".partial-" in n]
    # The same images as one process draws.
    one = tmp_path / "one"
    subprocess.run([sys.executable, "-m", "psa_jax.cli", "sample", *common, "--out", str(one)],
                   env=env, check=True, capture_output=True)  # fmt: skip
    for name in files:
        np.testing.assert_array_equal(load_png(out / name), load_png(one / name))
