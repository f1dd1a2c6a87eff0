"""A VAE with a ``shift_factor`` (SD3/Flux-style): training latents ``(z - shift) * scale`` and
the sampler's decode ``z = latents / scale + shift`` are inverse, and the training tasks get
both factors from the VAE."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from psa_jax.config import apply_overrides
from psa_jax.models import loading
from psa_jax.sample.pipeline import Pipeline
from psa_jax.train import tasks
from psa_jax.train.step import clean_latents

SCALE, SHIFT = 0.3611, 0.1159  # FLUX.1's VAE


def shifted(stage: str | None = None):
    cfg = apply_overrides(tiny.get_config(stage), ["model.init=random"])
    cfg.model.vae.scaling_factor, cfg.model.vae.shift_factor = SCALE, SHIFT
    return cfg


def test_training_latents_and_decoding_are_inverse():
    models = loading.load_base_models(shifted())
    vae = models.vae
    assert (models.scaling_factor, models.shift_factor) == (pytest.approx(SCALE), SHIFT)
    for cfg in (apply_overrides(shifted(), ["model.adapter.proj_init=torch"]), shifted("base")):
        task = tasks.build_task(cfg, models).task
        assert (task.scaling_factor, task.shift_factor) == (models.scaling_factor, SHIFT)

    images = jax.random.uniform(jax.random.key(0), (2, 3, 32, 32), minval=-1.0, maxval=1.0)
    mean = vae.encode(images).mean  # NCHW
    mean_nhwc = jnp.transpose(mean, (0, 2, 3, 1))
    # A posterior of (numerically) zero variance: the sampled z is the mean.
    batch = {"chosen_moments": jnp.concatenate([mean_nhwc, jnp.full_like(mean_nhwc, -60.0)], -1)}
    latents = clean_latents(batch, "chosen", jax.random.key(1), vae.scaling_factor, SHIFT)
    np.testing.assert_allclose(latents / vae.scaling_factor + SHIFT, mean_nhwc, atol=1e-6)

    pipe = types.SimpleNamespace(vae=vae, scaling_factor=vae.scaling_factor, shift_factor=SHIFT)
    got = Pipeline.decode(pipe, latents, output="float")  # the sampler's decode
    want = np.transpose(np.clip(np.asarray(vae.decode(mean)) / 2 + 0.5, 0, 1), (0, 2, 3, 1))
    np.testing.assert_allclose(got, want, atol=1e-5)
    unshifted = clean_latents(batch, "chosen", jax.random.key(1), vae.scaling_factor)
    assert np.abs(Pipeline.decode(pipe, unshifted, output="float") - want).max() > 1e-3
