"""Sampling contest: psa_jax's ``Pipeline`` against diffusers with psa_jax's exported adapter.

One random pipeline folder is written per run (a diffusers ``StableDiffusionPipeline``, or
``StableDiffusionXLPipeline`` for SDXL shapes: UNet with the bench's random weights, random VAE
and CLIP text encoders, a word-level tokenizer, DDIM) plus the adapter exported the way users
export it (``PSAUNet.save_adapter(dir, format="diffusers-ip-adapter")``). Every contestant loads
that folder and draws the same batch: DDIM, classifier-free guidance with the zero profile on
the negative branch (PSAlign's guidance), one user's profile for every prompt.

* ``psa_jax``: ``Pipeline.from_pretrained(folder, adapter=...)``; its compiled sampling loop.
* ``torch-psalign``: diffusers' pipeline with ``load_ip_adapter``, eager (PSAlign's inference
  is an eager diffusers pipeline).
* ``torch-fair``: the same with ``torch.compile`` on the UNet where it works.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any

import numpy as np

from psa_jax.bench.measure import Contestant, torch_peak_memory, torch_sync
from psa_jax.bench.shapes import BenchShape, random_params
from psa_jax.bench.torch_models import torch_dtype, torch_text_encoders, torch_unet, torch_vae

PROMPTS = [
    "a photo of a cat sitting on a wooden table",
    "a watercolor painting of a lighthouse at dawn",
    "an astronaut riding a horse on the moon",
    "a bowl of ramen with a soft boiled egg",
    "a city street at night in the rain",
    "a portrait of an old fisherman smiling",
    "a red sports car parked by the sea",
    "a cozy cabin in a snowy forest",
]
GUIDANCE = 7.5


def prompts(n: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(n)]


def write_folder(shape: BenchShape, params: Any, root: str, seed: int = 0) -> str:
    """The random pipeline folder and ``<root>/ip/ip_adapter.safetensors``; returns the file."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from flax.core import meta

    from psa_jax.data.tokenizer import build_word_tokenizer
    from psa_jax.models.convert import flax_to_torch
    from psa_jax.models.psa_unet import PSAUNet, abstract_variables, unet_module_from_config

    tok = build_word_tokenizer([*PROMPTS, ""], max_length=shape.text_len)
    texts = torch_text_encoders(shape.text_encoders, seed)
    parts = dict(
        vae=torch_vae(shape.vae, seed),
        text_encoder=texts[0],
        tokenizer=tok,
        unet=torch_unet(shape.unet, flax_to_torch(params, np.float32)),
        scheduler=DDIMScheduler(
            **dict(shape.config.noise), clip_sample=False, set_alpha_to_one=False, steps_offset=1
        ),
    )
    if shape.sdxl:
        pipe = StableDiffusionXLPipeline(text_encoder_2=texts[1], tokenizer_2=tok, **parts)
    else:
        pipe = StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipe.save_pretrained(root)
    del pipe, parts
    module = unet_module_from_config(shape.config.model, "float32", shape.unet)
    adapter = random_params(meta.unbox(abstract_variables(module)["adapter"]), seed + 7)
    unet = PSAUNet(shape.unet, params, adapter=adapter, num_user_tokens=shape.num_user_tokens)
    return unet.save_adapter(os.path.join(root, "ip"), format="diffusers-ip-adapter")


def profile(shape: BenchShape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape.user_embed_dim).astype(np.float32)


def psa_jax_sampler(
    shape: BenchShape, root: str, adapter: str, batch: int, steps: int, device: Any = None
) -> Contestant:
    import jax

    from psa_jax.core import parallel
    from psa_jax.sample.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(root, adapter=adapter, dtype=shape.config.model.dtype)
    attention = str(shape.config.model.attention)  # a folder's UNet samples with XLA's
    pipe = dataclasses.replace(pipe, module=pipe.module.clone(attention=attention))
    # Every local device of the contestant's platform splits the batch (one: no mesh).
    local = None if device is None else jax.local_devices(backend=device.platform)
    pipe.mesh = parallel.local_data_mesh(local)
    users = np.tile(profile(shape), (batch, 1))
    texts, seeds = prompts(batch), np.arange(batch)

    def call() -> np.ndarray:
        with jax.default_device(device):
            return pipe(
                texts,
                users,
                seeds,
                scheduler="ddim",
                steps=steps,
                guidance_scale=GUIDANCE,
                batch_size=batch,
            )

    def peak() -> tuple[int | None, str]:
        stats = device.memory_stats() if device is not None else None
        if stats and "peak_bytes_in_use" in stats:
            return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
        return None, "n/a (CPU: see rss_peak_delta_bytes)"

    kind = device.device_kind if device is not None else "default"
    split = "1 device" if pipe.mesh is None else f"data-parallel over {pipe.mesh.size} devices"
    return Contestant(
        "psa_jax",
        call,
        call,
        lambda out: None,
        peak_memory=peak,
        info={
            "notes": f"Pipeline (compiled fori_loop sampler); attention {attention}; {split}",
            "device": kind,
        },
    )


def diffusers_sampler(
    name: str, shape: BenchShape, root: str, batch: int, steps: int, device: str, compile_unet: bool
) -> Contestant:
    """diffusers' pipeline with the exported adapter; ``compile_unet``: torch.compile its UNet,
    falling back to eager (named) when compilation fails."""
    import torch
    from diffusers import DiffusionPipeline

    dtype = torch_dtype(shape.config.model.dtype)
    with warnings.catch_warnings():  # diffusers >= 0.42 renames torch_dtype; 0.40 needs it
        warnings.simplefilter("ignore", FutureWarning)
        pipe = DiffusionPipeline.from_pretrained(root, torch_dtype=dtype, local_files_only=True)
    pipe.load_ip_adapter(
        root, subfolder="ip", weight_name="ip_adapter.safetensors", image_encoder_folder=None
    )
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    user = torch.from_numpy(profile(shape))[None, None].repeat(batch, 1, 1)
    embeds = [torch.cat([torch.zeros_like(user), user]).to(device, dtype)]  # [2B, 1, D]
    eager, notes = pipe.unet, ["eager"]
    if compile_unet:
        pipe.unet, notes = torch.compile(eager), ["torch.compile(unet)"]

    def call() -> np.ndarray:
        gen = torch.Generator(device).manual_seed(0)
        with torch.no_grad():
            return pipe(
                prompts(batch),
                num_inference_steps=steps,
                guidance_scale=GUIDANCE,
                ip_adapter_image_embeds=embeds,
                output_type="np",
                generator=gen,
            ).images

    def first() -> np.ndarray:
        try:
            return call()
        except Exception as e:
            if not compile_unet:
                raise
            pipe.unet = eager
            notes[:] = [f"eager (torch.compile failed: {type(e).__name__}: {str(e)[:80]})"]
            return call()

    info = {
        "notes": lambda: "; ".join(["diffusers + load_ip_adapter", *notes]),
        "device": device,
        "torch_dtype": str(dtype),
    }
    return Contestant(
        name,
        first,
        call,
        torch_sync(device),
        peak_memory=lambda: torch_peak_memory(device),
        info=info,
    )
