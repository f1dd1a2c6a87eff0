"""End-to-end sampling parity: psa_jax's Pipeline against diffusers' StableDiffusionPipeline.

A tiny random SD1.5-like pipeline (UNet, CLIP text encoder, word tokenizer, VAE, DDIM) is built
and saved locally; a randomised PSA adapter is exported as a diffusers IP-Adapter and loaded with
``pipe.load_ip_adapter``. diffusers then samples with ``ip_adapter_image_embeds`` (negative =
zero profile, as PSAlign guides) from the initial latents psa_jax draws for the same seeds, and
the decoded images must agree. The ``diffusers-unet`` export (``PSAUNet.save_pretrained``) is
covered by ``tests/test_unet.py::test_save_pretrained_round_trips_through_diffusers``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import (
    SD15_LIKE,
    load_ip_adapter_export,
    randomize_adapter,
    tiny_sd_folder,
)

import psa_jax
from psa_jax.sample.pipeline import Pipeline
from psa_jax.sample.sampler import initial_latents

D = 12  # profile embedding size
LATENT = 8  # latent side (images are 16x16: the VAE upsamples once)
MAX_LEN = 16  # tokenizer model_max_length == text encoder max_position_embeddings
STEPS, GUIDANCE = 5, 5.0
IMAGE_TOL = 2e-3  # max abs on [0, 1] images
BATCH_TOL = 1e-5
UNET = {**SD15_LIKE, "sample_size": LATENT, "layers_per_block": 1}
PROMPTS = ["a red cat on a mat", "a blue dog in the park", "an old house by the sea"]
SEEDS = [3, 17, 101]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A saved diffusers StableDiffusionPipeline folder with tiny random components."""
    return tiny_sd_folder(tmp_path_factory.mktemp("pipe"), UNET, PROMPTS, MAX_LEN)


@pytest.fixture(scope="module")
def adapters(folder, tmp_path_factory):
    """Per T: (IP-Adapter export folder, PSAlign export file) of a random T-token adapter."""
    out = {}
    for t in (1, 4):
        unet = psa_jax.load_unet(folder, user_embed_dim=D, num_user_tokens=t)
        unet.adapter = randomize_adapter(unet.adapter, seed=10 + t)
        root = tmp_path_factory.mktemp(f"adapter{t}")
        ip_dir = root / "ip"
        unet.save_adapter(ip_dir, format="diffusers-ip-adapter")
        psalign = unet.save_adapter(root / "psa.safetensors", format="psalign")
        out[t] = (ip_dir, psalign)
    return out


def _profiles(n, seed=0):
    return 3 * np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)


@pytest.fixture(scope="module")
def torch_pipes(folder, adapters):
    """Per T: the saved diffusers pipeline with the T-token adapter's IP-Adapter export."""
    from diffusers import StableDiffusionPipeline

    pipes = {}
    for t, (ip_dir, _) in adapters.items():
        pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        load_ip_adapter_export(pipe, ip_dir)
        pipes[t] = pipe
    return pipes


def _diffusers_images(pipe, prompts, profiles, seeds, user_scale):
    """One diffusers call per sample: StableDiffusionPipeline takes each ``ip_adapter_image_embeds``
    entry as one image's ``[2, 1, D]`` (negative first) and repeats it over the prompt batch, so
    per-sample profiles in one call would mix (each sample would attend to every user's tokens)."""
    pipe.set_ip_adapter_scale(user_scale)
    keys = jax.vmap(jax.random.key)(jnp.asarray(np.asarray(seeds, np.uint32)))
    latents = np.asarray(initial_latents(keys, (LATENT, LATENT, UNET["in_channels"])))
    images = []
    for i, prompt in enumerate(prompts):
        user = torch.from_numpy(profiles[i : i + 1])[:, None, :]  # [1, 1, D]
        with torch.no_grad():
            out = pipe(
                prompt,
                num_inference_steps=STEPS,
                guidance_scale=GUIDANCE,
                latents=torch.from_numpy(latents[i : i + 1].transpose(0, 3, 1, 2).copy()),
                ip_adapter_image_embeds=[torch.cat([torch.zeros_like(user), user])],  # [2, 1, D]
                output_type="np",
            )
        images.append(np.asarray(out.images, np.float32))
    return np.concatenate(images)


@pytest.fixture(scope="module")
def jax_pipelines(folder, adapters):
    """psa_jax pipelines: T=1 from the PSAlign file, T=4 from the IP-Adapter export (also what
    a T=1 IP-Adapter export reads back as: 4 tiled tokens)."""
    return {
        1: Pipeline.from_pretrained(folder, adapter=adapters[1][1]),
        4: Pipeline.from_pretrained(folder, adapter=adapters[4][0] / "ip_adapter.safetensors"),
    }


def _jax_images(pipeline, prompts, profiles, seeds, user_scale):
    return pipeline(
        list(prompts),
        profiles,
        seeds,
        scheduler="ddim",
        steps=STEPS,
        guidance_scale=GUIDANCE,
        user_scale=user_scale,
        output="float",
    )


@pytest.mark.parametrize(
    "num_tokens, n_users, user_scale",
    [(1, 1, 1.0), (4, 1, 0.7), (4, 2, 1.0)],
    ids=["T1", "T4-scale0.7", "T4-two-users"],
)
def test_images_match_diffusers_ip_adapter_pipeline(
    torch_pipes, jax_pipelines, num_tokens, n_users, user_scale
):
    """psa_jax samples all users in one call; diffusers one user per call (see above)."""
    prompts, seeds = PROMPTS[:n_users], SEEDS[:n_users]
    profiles = _profiles(n_users, seed=num_tokens)
    want = _diffusers_images(torch_pipes[num_tokens], prompts, profiles, seeds, user_scale)
    got = _jax_images(jax_pipelines[num_tokens], prompts, profiles, seeds, user_scale)
    assert got.shape == want.shape == (n_users, 2 * LATENT, 2 * LATENT, 3)
    diff = float(np.max(np.abs(got - want)))
    print(f"T={num_tokens} users={n_users} scale={user_scale}: max abs {diff:.3g}")
    assert diff <= IMAGE_TOL
    # The adapter really acts: another profile moves the image far beyond the tolerance.
    other = _jax_images(jax_pipelines[num_tokens], prompts, -profiles, seeds, user_scale)
    assert float(np.max(np.abs(other - want))) > 20 * IMAGE_TOL


def test_adapter_formats_give_the_same_images(adapters, jax_pipelines, folder):
    """A T=1 adapter read back from its 4-token IP-Adapter export samples like the original."""
    tiled = Pipeline.from_pretrained(folder, adapter=adapters[1][0])
    prompts, profiles, seeds = PROMPTS[:1], _profiles(1, seed=5), SEEDS[:1]
    a = _jax_images(jax_pipelines[1], prompts, profiles, seeds, 1.0)
    b = _jax_images(tiled, prompts, profiles, seeds, 1.0)
    diff = float(np.max(np.abs(a - b)))
    print(f"T=1 psalign vs tiled ip-adapter: max abs {diff:.3g}")
    assert diff <= 1e-5


def test_mixed_user_batch_equals_each_alone(jax_pipelines):
    pipeline = jax_pipelines[1]
    profiles, scales = _profiles(3, seed=7), np.array([1.0, 0.5, 1.3], np.float32)
    batch = _jax_images(pipeline, PROMPTS, profiles, SEEDS, scales)
    worst = 0.0
    for i in range(3):
        one = slice(i, i + 1)
        alone = _jax_images(pipeline, PROMPTS[one], profiles[one], SEEDS[one], scales[i])
        worst = max(worst, float(np.max(np.abs(alone[0] - batch[i]))))
    print(f"mixed batch vs alone: max abs {worst:.3g}")
    assert worst <= BATCH_TOL
    assert float(np.max(np.abs(batch[0] - batch[1]))) > 0.01  # the samples really differ
