"""``--preset psalign``: PSAlign's generation settings, and the folder's own scheduler.

A tiny random SD1.5-like diffusers folder ships SD 1.5's scheduler config (PNDM with
``skip_prk_steps``). psa_jax's ``Pipeline`` with the preset's settings (the folder's scheduler,
guidance 7.5, PSAlign's negative prompt; fewer steps than 50 to stay fast, the same on both
sides) must draw what diffusers' ``StableDiffusionPipeline`` draws from the same initial latents
with the IP-Adapter export loaded; ``psa-jax sample`` picks that preset by itself for such a
folder and writes exactly the ``Pipeline``'s images.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import (
    SD15_LIKE,
    SD15_SCHEDULER_CONFIG,
    load_ip_adapter_export,
    randomize_adapter,
    tiny_sd_folder,
)
from PIL import Image

import psa_jax
from psa_jax import cli
from psa_jax.models.packaged import TINY_BASE, resolve
from psa_jax.sample import presets
from psa_jax.sample.pipeline import Pipeline
from psa_jax.sample.sampler import initial_latents
from psa_jax.sample.schedulers import UnsupportedSchedulerError

D = 8  # profile embedding size
LATENT = 8
STEPS = 6  # PSAlign draws 50; any count goes through the same PLMS start and history
IMAGE_TOL = 2e-3  # max abs on [0, 1] images
UNET = {**SD15_LIKE, "sample_size": LATENT, "layers_per_block": 1}
PROMPTS = ["a red cat on a mat", "a blue dog in the park"]
NEGATIVE = presets.PSALIGN_NEGATIVE_PROMPT


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from diffusers import PNDMScheduler

    root = tmp_path_factory.mktemp("sd15")
    pndm = PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    return tiny_sd_folder(root, UNET, [*PROMPTS, NEGATIVE], 24, scheduler=pndm)


@pytest.fixture(scope="module")
def ip_dir(folder, tmp_path_factory):
    """A random adapter written as ``psa-jax export --format diffusers-ip-adapter`` writes it
    (``export_run`` calls this ``save_adapter``)."""
    unet = psa_jax.load_unet(folder, user_embed_dim=D)
    unet.adapter = randomize_adapter(unet.adapter, seed=3)
    out = tmp_path_factory.mktemp("ip") / "ip"
    unet.save_adapter(out, format="diffusers-ip-adapter")
    return out


@pytest.fixture(scope="module")
def pipeline(folder, ip_dir):
    return Pipeline.from_pretrained(folder, adapter=ip_dir / "ip_adapter.safetensors")


def _profiles(n: int, seed: int = 0) -> np.ndarray:
    return 3 * np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)


def _psalign(**given):
    """The preset's call arguments (its seed goes to ``seeds``)."""
    settings = presets.preset_settings("psalign", **given)
    return settings.pop("seed"), settings


def test_psalign_preset_matches_diffusers_with_the_ip_adapter_export(folder, ip_dir, pipeline):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    seed, settings = _psalign(steps=STEPS)
    assert settings["scheduler"] is None and pipeline.scheduler_name() == "pndm"
    assert settings["guidance_scale"] == 7.5 and settings["negative_prompt"] == NEGATIVE
    assert seed == 2025
    seeds = [seed, seed + 1]
    profiles = _profiles(2)
    got = pipeline(PROMPTS, profiles, seeds, output="float", **settings)

    ref = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    assert isinstance(ref.scheduler, PNDMScheduler) and ref.scheduler.config.skip_prk_steps
    load_ip_adapter_export(ref, ip_dir)
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
    latents = np.asarray(initial_latents(keys, pipeline.latent_shape())).transpose(0, 3, 1, 2)
    want = []
    for i, prompt in enumerate(PROMPTS):  # one user per call (see test_pipeline_parity.py)
        user = torch.from_numpy(profiles[i : i + 1])[:, None, :]
        with torch.no_grad():
            out = ref(
                prompt,
                negative_prompt=NEGATIVE,
                num_inference_steps=STEPS,
                guidance_scale=7.5,
                latents=torch.from_numpy(latents[i : i + 1].copy()),
                ip_adapter_image_embeds=[torch.cat([torch.zeros_like(user), user])],
                output_type="np",
            )
        want.append(np.asarray(out.images, np.float32))
    want = np.concatenate(want)
    diff = float(np.abs(got - want).max())
    print(f"psalign preset (PNDM, {STEPS} steps) vs diffusers: max abs {diff:.3g}")
    assert got.shape == want.shape and diff <= IMAGE_TOL
    # What the preset sets matters: another scheduler, no negative prompt, another profile.
    for change in (dict(scheduler="ddim"), dict(negative_prompt=""), dict(profiles=-profiles)):
        kw = {**settings, **change}
        other = pipeline(PROMPTS, kw.pop("profiles", profiles), seeds, output="float", **kw)
        assert float(np.abs(other - want).max()) > 10 * IMAGE_TOL, change


def test_an_explicit_scheduler_ignores_the_folder(pipeline):
    from psa_jax.sample import schedulers

    named = pipeline.sampler_schedule("ddim", 5)
    assert named.name == "ddim"
    want = schedulers.make_sampler_schedule("ddim", 5, pipeline.noise_schedule)
    assert jax.tree.all(jax.tree.map(np.array_equal, named, want))
    folder = pipeline.sampler_schedule(None, 5, {"skip_prk_steps": False})
    assert folder.name == "pndm" and folder.num_inference_steps == 5 + 9  # the warm-up: 12 calls
    bare = dataclasses.replace(pipeline, scheduler_config=None)
    assert bare.scheduler_name() == "ddim"  # a run's pipeline without a folder: DDIM as before


def _embeddings(tmp_path) -> str:
    from psa_jax.data.embed import embed_profiles
    from psa_jax.data.profiles import packaged_users_csv

    with open(packaged_users_csv(), encoding="utf-8") as f:
        lines = f.read().splitlines()[:3]
    (tmp_path / "users.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "npy").mkdir()
    for i, row in enumerate(_profiles(2, seed=4), start=1):
        np.save(tmp_path / "npy" / f"{i:07d}.npy", row)
    out = str(tmp_path / "emb")
    embed_profiles(
        str(tmp_path / "users.csv"), f"npy:{tmp_path / 'npy'}", out, ids_from_row_order=True
    )
    return out


def test_cli_uses_the_psalign_preset_for_a_real_folder(
    folder, ip_dir, pipeline, tmp_path, monkeypatch
):
    monkeypatch.setattr(Pipeline, "from_pretrained", classmethod(lambda cls, *a, **k: pipeline))
    emb = _embeddings(tmp_path)
    base = ["sample", "--pretrained", str(folder), "--adapter", str(ip_dir), "--embeddings", emb]
    base += ["--users", "1", "--prompt", PROMPTS[0], "--steps", str(STEPS)]
    out = tmp_path / "default"
    assert cli.main([*base, "--out", str(out)]) == 0
    (record,) = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert record["preset"] == "psalign" and record["scheduler"] == "pndm"
    assert (record["seed"], record["steps"], record["guidance_scale"]) == (2025, STEPS, 7.5)
    assert record["negative_prompt"] == NEGATIVE
    png = np.asarray(Image.open(out / "images" / "1" / "0000000.png"))
    embeds = np.stack([pipeline.embeddings["0000001"]])
    seed, settings = _psalign(steps=STEPS)
    np.testing.assert_array_equal(png, pipeline(PROMPTS[:1], embeds, [seed], **settings)[0])

    # Explicit flags win over the preset; --preset tiny is today's default of the tiny world.
    out = tmp_path / "flags"
    flags = ["--scheduler", "ddim", "--seed", "3", "--negative-prompt", "", "--guidance-scale", "2"]
    assert cli.main([*base, *flags, "--out", str(out)]) == 0
    (record,) = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert (record["scheduler"], record["seed"], record["negative_prompt"]) == ("ddim", 3, "")
    assert (record["guidance_scale"], record["preset"]) == (2.0, "psalign")
    out = tmp_path / "tiny"
    assert cli.main([*base, "--preset", "tiny", "--out", str(out)]) == 0
    (record,) = [json.loads(line) for line in open(out / "samples.jsonl")]
    want = {"preset": "tiny", "scheduler": "ddim", "seed": 0, "negative_prompt": ""}
    assert {k: record[k] for k in want} == want


def test_default_presets_follow_the_source():
    packaged = resolve(TINY_BASE)
    assert presets.default_preset(TINY_BASE) == presets.default_preset(packaged) == "tiny"
    assert presets.default_preset("/models/sd15") == "psalign"

    def run(init, pretrained):
        return {"model": {"init": init, "pretrained": pretrained}}

    assert presets.default_preset(None, run("pretrained", "/models/sd15")) == "psalign"
    assert presets.default_preset(None, run("pretrained", TINY_BASE)) == "tiny"
    assert presets.default_preset(None, run("pretrained", "")) == "tiny"  # base_workdir
    assert presets.default_preset(None, run("random", "")) == "tiny"
    assert presets.base_folder(None, run("pretrained", TINY_BASE)) == packaged
    assert presets.base_folder(None, run("random", "")) is None
    tiny = presets.preset_settings("tiny")
    assert tiny == dict(scheduler="ddim", steps=25, guidance_scale=7.5, seed=0, negative_prompt="")
    assert presets.preset_settings("psalign", steps=4, seed=None)["steps"] == 4


def test_a_folder_scheduler_we_lack_is_a_named_error_before_any_model(folder, tmp_path, capsys):
    import shutil

    lms = tmp_path / "lms"
    shutil.copytree(folder, lms)
    path = lms / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "_class_name": "LMSDiscreteScheduler"}))
    with pytest.raises(UnsupportedSchedulerError, match=r"LMSDiscreteScheduler.*PNDMScheduler"):
        presets.check_folder_scheduler(None, str(lms))
    assert presets.check_folder_scheduler("euler", str(lms)) == "euler"
    capsys.readouterr()
    argv = ["sample", "--pretrained", str(lms), "--users", "base", "--prompt", "x"]
    assert cli.main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "LMSDiscreteScheduler" in err and str(path) in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert (
        cli.main([*argv, "--scheduler", "ddim", "--steps", "2", "--out", str(tmp_path / "ok")]) == 0
    )
    with pytest.raises(UnsupportedSchedulerError, match="LMSDiscreteScheduler"):
        Pipeline.from_pretrained(lms)(["x"], steps=2)
    assert os.path.isfile(tmp_path / "ok" / "images" / "base" / "0000000.png")
