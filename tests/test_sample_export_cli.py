"""``psa-jax sample`` and ``psa-jax export`` on a tiny DPO run of the small Sage-mini world."""

from __future__ import annotations

import csv
import json
import os

import jax
import numpy as np
import pytest
import torch
from helpers import rel_err
from PIL import Image
from test_trainer import small_config

import psa_jax
from psa_jax import cli
from psa_jax.core.checkpoint import restore_host_params
from psa_jax.export.formats import export_run
from psa_jax.sample.pipeline import Pipeline
from psa_jax.train import trainer

PROMPTS = ["a violent fight near a tent", "a nude figure near a car"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    workdir = str(tmp_path_factory.mktemp("dpo"))
    trainer.train(small_config(cache, "train.steps=2", "train.checkpoint_every=2"), workdir)
    pipeline = Pipeline.from_run(workdir)
    # Two DPO steps barely move the zero-initialised adapter: randomise it so users differ.
    rng = np.random.default_rng(0)
    pipeline.adapter = jax.tree.map(
        lambda x: np.asarray(x) + 0.5 * rng.standard_normal(np.shape(x)).astype(np.float32),
        pipeline.adapter,
    )
    return workdir, pipeline


def test_grid_crosses_prompts_and_users_with_one_seed_per_prompt(run, tmp_path, monkeypatch):
    workdir, pipeline = run
    users = sorted(pipeline.embeddings)[:2]
    monkeypatch.setattr(Pipeline, "from_run", classmethod(lambda cls, w, step=None: pipeline))
    out = str(tmp_path / "grid")
    args = ["sample", "--workdir", workdir, "--out", out, "--steps", "3", "--seed", "5"]
    args += ["--users", ",".join(["base", *users])]
    for p in PROMPTS:
        args += ["--prompt", p]
    assert cli.main(args) == 0
    records = [json.loads(line) for line in open(os.path.join(out, "samples.jsonl"))]
    assert len(records) == 3 * len(PROMPTS)
    assert {r["seed"] for r in records} == {5, 6}  # per prompt, shared by every user
    with Image.open(os.path.join(out, "grid.png")) as grid:
        assert grid.size[0] > 2 * 96 and grid.size[1] > 3 * 96

    def png(user, i):
        return np.asarray(Image.open(os.path.join(out, "images", user, f"{i:07d}.png")))

    embeds = np.stack([pipeline.embeddings[u] for u in users])
    want = pipeline([PROMPTS[1]] * 2, embeds, [6, 6], steps=3)
    for u, image in zip(users, want):
        np.testing.assert_array_equal(png(u, 1), image)
    base = pipeline([PROMPTS[0]], None, [5], steps=3)[0]
    np.testing.assert_array_equal(png("base", 0), base)
    assert np.abs(png(users[0], 1).astype(int) - png(users[1], 1)).max() > 0  # users differ


def test_prompts_csv_rows_use_their_own_users(run, tmp_path, monkeypatch, capsys):
    workdir, pipeline = run
    monkeypatch.setattr(Pipeline, "from_run", classmethod(lambda cls, w, step=None: pipeline))
    user = sorted(pipeline.embeddings)[0]
    path = tmp_path / "prompts.csv"
    with open(path, "w", newline="") as f:  # PSAlign's eval layout: unpadded integer ids
        w = csv.writer(f)
        w.writerow(["file_name", "caption", "user_id"])
        w.writerow(["a_u.jpg", PROMPTS[0], str(int(user))])
        w.writerow(["b_u.jpg", PROMPTS[1], str(int(user))])
    out = str(tmp_path / "rows")
    argv = ["sample", "--workdir", workdir, "--prompts", str(path), "--out", out, "--steps", "2"]
    assert cli.main(argv) == 0
    assert sorted(os.listdir(os.path.join(out, "images"))) == ["a_u.png", "b_u.png"]
    assert not os.path.exists(os.path.join(out, "grid.png"))
    with open(path, "a", newline="") as f:
        csv.writer(f).writerow(["c_u.jpg", PROMPTS[0], "999999"])
    capsys.readouterr()
    drawn = []
    monkeypatch.setattr(Pipeline, "__call__", lambda self, *a, **k: drawn.append(a))
    assert cli.main([*argv[:-4], "--out", str(tmp_path / "bad"), "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "0999999" in err and workdir in err and "Traceback" not in err  # one line
    # The run's own table is known once the run is loaded: checked then, before any image
    # (here the base row would have been drawn first), and --out is never created.
    grid = ["sample", "--workdir", workdir, "--users", "base,999999", "--prompt", PROMPTS[0]]
    assert cli.main([*grid, "--out", str(tmp_path / "bad")]) == 2
    assert "0999999" in capsys.readouterr().err
    assert not drawn and not (tmp_path / "bad").exists()
    assert not [f for f in os.listdir(tmp_path) if ".partial-" in f]


def test_export_formats_load_back(run, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    workdir, _ = run
    adapter, _ = restore_host_params(workdir)

    def export(fmt, out):
        return cli.main(["export", "--workdir", workdir, "--format", fmt, "--out", out])

    out, folder = str(tmp_path / "psa.safetensors"), str(tmp_path / "unet")
    assert export("psalign", out) == 0 and export("diffusers-unet", folder) == 0
    unet = UNet2DConditionModel.from_pretrained(folder).eval()
    psa_unet = psa_jax.load_unet(folder)
    psa_unet.load_adapter(out)
    got = jax.tree.leaves(psa_unet.adapter)
    want = jax.tree.leaves(jax.tree.map(np.asarray, adapter))
    assert all(np.array_equal(a, b) for a, b in zip(got, want))

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 16, 16), dtype=np.float32)
    ctx = rng.standard_normal((2, 7, unet.config.cross_attention_dim), dtype=np.float32)
    t = np.array([10, 900])
    with torch.no_grad():
        ref = unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()
    assert rel_err(np.asarray(psa_unet(x, t, ctx)), ref) < 1e-5

    ip = str(tmp_path / "ip")
    assert export("diffusers-ip-adapter", ip) == 0
    assert os.path.isfile(os.path.join(ip, "ip_adapter.safetensors"))
    assert export("diffusers-ip-adapter", ip) == 0  # an earlier export is replaced
    assert os.listdir(ip) == ["ip_adapter.safetensors"]
    assert export("psalign", out) == 0  # a file too
    capsys.readouterr()
    assert export("peft-lora", str(tmp_path / "lora.safetensors")) == 2  # before any model
    assert "not a LoRA run" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not a LoRA run"):  # still a ValueError
        export_run(workdir, "peft-lora", str(tmp_path / "lora.safetensors"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("someone's")
    assert export("diffusers-unet", str(tmp_path / "mine")) == 2  # other files: refused
    assert "notes.txt" in capsys.readouterr().err
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]
    assert not os.path.exists(tmp_path / "lora.safetensors")
    assert not [f for f in os.listdir(tmp_path) if ".partial-" in f or ".old-" in f]


def test_an_adapter_file_replaces_the_runs_adapter(run, tmp_path):
    """``--workdir RUN --adapter FILE``: the run's base with the file's adapter."""
    import dataclasses

    from psa_jax.models.psa_unet import PSAUNet
    from psa_jax.sample.prompts import with_adapter

    _, pipeline = run
    tokens = (
        pipeline.adapter["user_proj"]["kernel"].shape[1]
        // pipeline.module.config.cross_attention_dim
    )
    unet = PSAUNet(
        pipeline.module.config, pipeline.params, adapter=pipeline.adapter, num_user_tokens=tokens
    )
    path = unet.save_adapter(str(tmp_path / "adapter.safetensors"))
    loaded = with_adapter(dataclasses.replace(pipeline, adapter=None), path)
    for a, b in zip(jax.tree.leaves(loaded.adapter), jax.tree.leaves(pipeline.adapter)):
        np.testing.assert_array_equal(a, b)
    user = sorted(pipeline.embeddings)[0]
    embeds = pipeline.embeddings[user][None]
    np.testing.assert_array_equal(
        loaded([PROMPTS[0]], embeds, [3], steps=2), pipeline([PROMPTS[0]], embeds, [3], steps=2)
    )


@pytest.mark.parametrize(
    "name, has_user", [("sage_seen.csv", True), ("CoProv2_test.csv", False), ("debug.csv", False)]
)
def test_reads_psalign_eval_prompt_layouts(name, has_user):
    """PSAlign's eval CSVs (caption, file_name, [user_id], extra columns) read as they ship."""
    from psa_jax.sample.prompts import read_prompts

    path = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "psalign", "eval_prompts")
    assert os.path.isdir(path), f"{path}: ../shared/psalign must be beside the checkout"
    rows = read_prompts(os.path.join(path, name), limit=5)
    assert len(rows) == 5 and all(r["caption"] and r["file_name"] for r in rows)
    assert ("user_id" in rows[0]) == has_user
