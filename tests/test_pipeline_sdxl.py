"""End-to-end SDXL sampling parity: psa_jax's Pipeline against diffusers' StableDiffusionXLPipeline.

A tiny random SDXL-like pipeline (text-time UNet, CLIPTextModel + CLIPTextModelWithProjection,
word tokenizers, VAE, DDIM) is built and saved locally; a randomised PSA adapter is exported as a
diffusers IP-Adapter and loaded with ``pipe.load_ip_adapter``. diffusers samples one user per
call (see ``test_pipeline_parity._diffusers_images``) from the initial latents psa_jax draws for
the same seeds. Checked: the two encoders' concatenated penultimate states, the pooled
``text_embeds`` and (H, W, 0, 0, H, W) time ids, and the negative branch (zeros for an empty
negative prompt under ``force_zeros_for_empty_prompt``, else encoded). All fp32, so diffusers'
fp16 VAE upcast (``force_upcast``) never applies.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import (
    SDXL_LIKE,
    load_ip_adapter_export,
    randomize_adapter,
    sd_ddim_scheduler,
    tiny_clip_text,
    tiny_torch_unet,
    tiny_torch_vae,
)

import psa_jax
from psa_jax.data.tokenizer import build_word_tokenizer
from psa_jax.sample.pipeline import Pipeline
from psa_jax.sample.sampler import initial_latents

D, T = 12, 4  # profile embedding size, user tokens
LATENT = 8  # latent side (images are 16x16: the VAE upsamples once)
MAX_LEN = 16  # tokenizer model_max_length == text encoder max_position_embeddings
WIDTH_1, WIDTH_2 = 16, 24  # encoder hidden sizes: concatenated = cross_attention_dim (40)
POOLED = 20  # encoder 2 projection_dim = what projection_class_embeddings_input_dim expects
STEPS, GUIDANCE = 5, 5.0
IMAGE_TOL = 2e-3  # max abs on [0, 1] images
UNET = {
    **SDXL_LIKE,
    "sample_size": LATENT,
    "layers_per_block": 1,
    "transformer_layers_per_block": 1,
}
PROMPTS = ["a red cat on a mat", "a blue dog in the park"]
NEGATIVE = "an old blurry house"
SEEDS = [3, 17]
assert WIDTH_1 + WIDTH_2 == UNET["cross_attention_dim"]
assert POOLED + 6 * UNET["addition_time_embed_dim"] == UNET["projection_class_embeddings_input_dim"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A saved diffusers StableDiffusionXLPipeline folder with tiny random components."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    root = tmp_path_factory.mktemp("sdxl")
    tokenizer = build_word_tokenizer([*PROMPTS, NEGATIVE], max_length=MAX_LEN)
    vocab = len(tokenizer.get_vocab())
    pipe = StableDiffusionXLPipeline(
        vae=tiny_torch_vae(2 * LATENT),
        text_encoder=tiny_clip_text(CLIPTextModel, vocab, WIDTH_1, 1, MAX_LEN, layers=3),
        text_encoder_2=tiny_clip_text(
            CLIPTextModelWithProjection,
            vocab,
            WIDTH_2,
            3,
            MAX_LEN,
            layers=3,
            projection_dim=POOLED,
            hidden_act="gelu",  # OpenCLIP's, as SDXL's encoder 2
        ),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=tiny_torch_unet(UNET),
        scheduler=sd_ddim_scheduler(),
        add_watermarker=False,
    )
    pipe.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def ip_dir(folder, tmp_path_factory):
    """The IP-Adapter export of a random T-token adapter (noise on every leaf: zero-initialised
    to_k/to_v would hide the user branch)."""
    unet = psa_jax.load_unet(folder, user_embed_dim=D, num_user_tokens=T)
    unet.adapter = randomize_adapter(unet.adapter, seed=11)
    out = tmp_path_factory.mktemp("adapter") / "ip"
    unet.save_adapter(out, format="diffusers-ip-adapter")
    return out


@pytest.fixture(scope="module")
def torch_pipes(folder, ip_dir):
    """diffusers' SDXL pipeline without ("base") and with ("ip") the IP-Adapter export."""
    from diffusers import StableDiffusionXLPipeline

    pipes = {}
    for name in ("base", "ip"):
        pipe = StableDiffusionXLPipeline.from_pretrained(
            folder, local_files_only=True, add_watermarker=False
        )
        pipe.set_progress_bar_config(disable=True)
        if name == "ip":
            load_ip_adapter_export(pipe, ip_dir)
        pipes[name] = pipe
    return pipes


@pytest.fixture(scope="module")
def jax_pipeline(folder, ip_dir):
    return Pipeline.from_pretrained(folder, adapter=ip_dir / "ip_adapter.safetensors")


def _profiles(n, seed=0):
    return 3 * np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)


def _diffusers_images(pipe, profiles, negative, user_scale):
    """One call per sample; ``profiles=None`` runs the pipeline without IP-Adapter inputs."""
    if profiles is not None:
        pipe.set_ip_adapter_scale(user_scale)
    keys = jax.vmap(jax.random.key)(jnp.asarray(np.asarray(SEEDS, np.uint32)))
    latents = np.asarray(initial_latents(keys, (LATENT, LATENT, UNET["in_channels"])))
    images = []
    for i, prompt in enumerate(PROMPTS):
        extra = {}
        if profiles is not None:
            user = torch.from_numpy(profiles[i : i + 1])[:, None, :]  # [1, 1, D]
            extra["ip_adapter_image_embeds"] = [torch.cat([torch.zeros_like(user), user])]
        with torch.no_grad():
            out = pipe(
                prompt,
                negative_prompt=negative or None,  # psa_jax's "" = diffusers' None
                num_inference_steps=STEPS,
                guidance_scale=GUIDANCE,
                latents=torch.from_numpy(latents[i : i + 1].transpose(0, 3, 1, 2).copy()),
                output_type="np",
                **extra,
            )
        images.append(np.asarray(out.images, np.float32))
    return np.concatenate(images)


def _jax_images(pipeline, profiles, negative, user_scale):
    return pipeline(
        PROMPTS,
        profiles,
        SEEDS,
        scheduler="ddim",
        steps=STEPS,
        guidance_scale=GUIDANCE,
        user_scale=user_scale,
        negative_prompt=negative,
        batch_size=len(PROMPTS),
        output="float",
    )


def test_reads_sdxl_components(jax_pipeline):
    assert jax_pipeline.force_zeros_for_empty_prompt  # saved in model_index.json
    assert jax_pipeline.text_encoder_2.with_projection
    states, pooled = jax_pipeline.encode_prompts(PROMPTS)
    assert states.shape == (2, MAX_LEN, UNET["cross_attention_dim"])
    assert pooled.shape == (2, POOLED)
    np.testing.assert_array_equal(jax_pipeline.time_ids(1), [[16, 16, 0, 0, 16, 16]])


@pytest.mark.parametrize(
    "negative, force_zeros, user_scale",
    [("", True, 1.0), (NEGATIVE, True, 0.7), ("", False, 1.0)],
    ids=["zero-negative", "negative-prompt", "encoded-empty-negative"],
)
def test_images_match_diffusers_sdxl_ip_adapter(
    torch_pipes, jax_pipeline, negative, force_zeros, user_scale
):
    """Both users in one psa_jax call; the negative branch per ``force_zeros_for_empty_prompt``."""
    torch_pipe = torch_pipes["ip"]
    torch_pipe.register_to_config(force_zeros_for_empty_prompt=force_zeros)
    pipeline = dataclasses.replace(jax_pipeline, force_zeros_for_empty_prompt=force_zeros)
    profiles = _profiles(len(PROMPTS), seed=1)
    try:
        want = _diffusers_images(torch_pipe, profiles, negative, user_scale)
    finally:
        torch_pipe.register_to_config(force_zeros_for_empty_prompt=True)
    got = _jax_images(pipeline, profiles, negative, user_scale)
    assert got.shape == want.shape == (len(PROMPTS), 2 * LATENT, 2 * LATENT, 3)
    diff = float(np.max(np.abs(got - want)))
    print(f"SDXL ip-adapter negative={negative!r} zeros={force_zeros}: max abs {diff:.3g}")
    assert diff <= IMAGE_TOL
    # The adapter really acts: another profile moves the image far beyond the tolerance.
    other = _jax_images(pipeline, -profiles, negative, user_scale)
    assert float(np.max(np.abs(other - want))) > 20 * IMAGE_TOL


def test_base_model_matches_diffusers_sdxl(torch_pipes, jax_pipeline):
    """``user_embeds=None`` samples the base UNet, as diffusers without an IP-Adapter."""
    want = _diffusers_images(torch_pipes["base"], None, "", 1.0)
    got = _jax_images(jax_pipeline, None, "", 1.0)
    diff = float(np.max(np.abs(got - want)))
    print(f"SDXL base: max abs {diff:.3g}")
    assert diff <= IMAGE_TOL
