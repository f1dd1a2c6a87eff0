"""Build a config's three models with random weights and run them once, end to end.

Text encoder -> VAE encode -> UNet (base, and with the PSA adapter on a random profile) -> VAE
decode. Used by ``psa-jax info`` to check an installation and a config before training.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from psa_jax.models.clip import CLIPTextConfig, FlaxCLIPTextModel
from psa_jax.models.psa_unet import PSAUNet, init_variables, unet_module_from_config
from psa_jax.models.vae import AutoencoderKL, FlaxAutoencoderKL, VAEConfig


def _count(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def run_models(config: Any, seed: int = 0, batch: int = 2) -> dict[str, Any]:
    """Returns parameter counts, output shapes and timings; raises if an output is not finite."""
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    model = config.model
    text_cfg = CLIPTextConfig.from_hf_config(dict(model.text_encoder))
    text = FlaxCLIPTextModel.init_random(text_cfg, seed=seed)

    vae_cfg = VAEConfig.from_diffusers_config(dict(model.vae))
    vae_module = AutoencoderKL(vae_cfg)
    size = vae_cfg.sample_size
    images = rng.uniform(-1, 1, (batch, vae_cfg.in_channels, size, size)).astype(np.float32)
    vae_params = jax.jit(vae_module.init)(
        jax.random.key(seed), jnp.zeros((1, size, size, vae_cfg.in_channels))
    )["params"]
    vae = FlaxAutoencoderKL(vae_cfg, meta.unbox(vae_params))

    module = unet_module_from_config(model)
    variables = meta.unbox(init_variables(module, seed))
    unet = PSAUNet(
        module.config,
        variables["params"],
        adapter=variables["adapter"],
        user_embed_dim=module.user_embed_dim,
        num_user_tokens=module.num_user_tokens,
    )
    built = time.perf_counter()

    ids = rng.integers(0, text_cfg.vocab_size, (batch, 16))
    states = text(ids).last_hidden_state
    latents = vae.encode(images).sample(jax.random.key(seed)) * vae.scaling_factor
    profile = rng.standard_normal((batch, module.user_embed_dim)).astype(np.float32)
    t = np.array([500] * batch)
    eps_base = unet(latents, t, states)
    eps_user = unet(latents, t, states, user_embeds=profile)
    decoded = vae.decode(latents / vae.scaling_factor)
    outputs = {
        "text_states": states,
        "latents": latents,
        "eps_base": eps_base,
        "eps_user": eps_user,
        "decoded": decoded,
    }
    bad = [k for k, v in outputs.items() if not np.isfinite(np.asarray(v)).all()]
    if bad:
        raise FloatingPointError(f"non-finite outputs: {bad}")
    return {
        "config": config.get("name", "?"),
        "parameters": {
            "unet": _count(unet.params),
            "adapter": _count(unet.adapter),
            "text_encoder": _count(text.params),
            "vae": _count(vae.params),
        },
        "shapes": {k: list(np.shape(v)) for k, v in outputs.items()},
        # A fresh adapter has zero k/v projections: the PSA branch must not change the output.
        "adapter_changes_untrained_output": bool(np.any(np.asarray(eps_base != eps_user))),
        "seconds": {"build": round(built - start, 1), "run": round(time.perf_counter() - built, 1)},
    }
