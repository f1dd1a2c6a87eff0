"""The frozen base models of a config, loaded explicitly.

``config.model.init`` says where they come from: ``"pretrained"`` reads ``model.pretrained`` (a
local diffusers pipeline folder: ``unet/``, ``text_encoder/``, ``vae/``, ``tokenizer/``, and
for SDXL ``text_encoder_2/``, ``tokenizer_2/``; or ``packaged:<name>``) or, without it,
``model.base_workdir`` (the UNet of a ``denoise`` run) with ``model.vae_path`` (a ``vae``
run's folder or a diffusers VAE folder); ``"random"`` initialises the config's architecture
at ``init_seed`` (tests, smoke runs, the tiny world's base training). Anything else, or
``"pretrained"`` with nothing named, is an error that says which key to set.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
from flax.core import meta

from psa_jax.core import diffusion as noise_lib
from psa_jax.core import paths
from psa_jax.core.checkpoint import restore_host_params
from psa_jax.core.errors import PsaJaxError
from psa_jax.data.prepare import open_tokenizer
from psa_jax.models import convert
from psa_jax.models.clip import CLIPTextConfig, FlaxCLIPTextModel, load_text_encoder
from psa_jax.models.packaged import resolve as resolve_packaged
from psa_jax.models.psa_unet import init_variables, load_unet, unet_module_from_config
from psa_jax.models.unet import UNet2DConditionModel, UNetConfig
from psa_jax.models.vae import AutoencoderKL, FlaxAutoencoderKL, VAEConfig, load_vae


@dataclasses.dataclass
class BaseModels:
    """The frozen pieces of a run (host arrays) and the UNet module with adapter slots.
    ``load_base_models(..., unet_only=True)``: text encoder, VAE and tokenizer None."""

    module: UNet2DConditionModel
    unet_params: Any
    text_encoder: FlaxCLIPTextModel | None
    vae: FlaxAutoencoderKL | None
    tokenizer: Any | None  # None: the toy world's word tokenizer, built with the data
    schedule: noise_lib.NoiseSchedule
    scaling_factor: float
    # SDXL (a pretrained folder with text_encoder_2/): CLIPTextModelWithProjection, its
    # tokenizer, and model_index.json's force_zeros_for_empty_prompt (see prepare.open_caches)
    text_encoder_2: FlaxCLIPTextModel | None = None
    tokenizer_2: Any | None = None
    force_zeros_for_empty_prompt: bool = False

    @property
    def shift_factor(self) -> float:
        """The VAE's ``shift_factor`` (0.0 without a VAE or where its config has None):
        training latents are ``(z - shift_factor) * scaling_factor``, decoding inverts it."""
        return self.vae.shift_factor if self.vae is not None else 0.0


def load_base_models(
    config: Any, *, unet_only: bool = False, unet_params: bool = True
) -> BaseModels:
    """Frozen UNet / text encoder / VAE in ``config.model.dtype`` (see module docstring).

    ``unet_only``: the UNet alone (``text_encoder``, ``vae`` and ``tokenizer`` None,
    ``scaling_factor`` 1.0), for what needs no text or pixels (a UNet export).
    ``unet_params=False``: the UNet's weights are neither read nor initialised (``unet_params``
    None, ``module`` as always), for a caller that has its own (a full-UNet ``denoise`` run's
    checkpoint): a random base UNet costs a compile of its init. Everything else is the same
    either way."""
    model = config.model
    dtype = model.dtype
    seed = int(model.init_seed)
    schedule = noise_lib.noise_schedule_from_config(dict(config.noise))
    init = model_init(model)
    if init == "pretrained" and model.pretrained:
        root = resolve_packaged(model.pretrained)
        sched_file = os.path.join(root, "scheduler", "scheduler_config.json")
        if os.path.isfile(sched_file):
            with open(sched_file, encoding="utf-8") as f:
                schedule = noise_lib.noise_schedule_from_config(
                    {**json.load(f), **_prediction(config)}
                )
        if unet_params:
            unet = load_unet(root, dtype=dtype)
            module = unet_module_from_config(model, dtype, unet.config)
            params = unet.params
        else:
            module, params = unet_module_from_config(model, dtype, unet_config(config)), None
        if unet_only:
            return BaseModels(module, params, None, None, None, schedule, 1.0)
        text = load_text_encoder(os.path.join(root, "text_encoder"), dtype=dtype)
        vae = load_vae(root, dtype=dtype)
        tokenizer = open_tokenizer(root)
        return BaseModels(module, params, text, vae, tokenizer, schedule, vae.scaling_factor,
                          **_sdxl_text(root, dtype))  # fmt: skip

    module = unet_module_from_config(model, dtype)
    params = None
    if unet_params and init == "pretrained":
        params, _ = restore_host_params(model.base_workdir)
    elif unet_params:
        # Initialised in float32 (then cast): the same weights whatever the compute dtype.
        params = meta.unbox(init_variables(unet_module_from_config(model), seed))["params"]
    if params is not None:
        params = jax.tree.map(lambda x: np.asarray(x).astype(dtype), params)
    if unet_only:
        return BaseModels(module, params, None, None, None, schedule, 1.0)
    text_cfg = CLIPTextConfig.from_hf_config(dict(model.text_encoder))
    text = FlaxCLIPTextModel.init_random(text_cfg, seed=seed + 1, dtype=dtype)
    vae = None
    if model.vae_path:  # a trained VAE (a vae run's folder, or a diffusers VAE folder)
        vae = load_vae(os.path.expanduser(model.vae_path), dtype=dtype)
    elif model.get("vae"):
        vae_cfg = VAEConfig.from_diffusers_config(dict(model.vae))
        side = vae_cfg.sample_size
        vae_init = jax.jit(AutoencoderKL(vae_cfg, dtype=jax.numpy.dtype(dtype)).init)
        vae_params = vae_init(jax.random.key(seed + 2), np.zeros((1, side, side, 3), np.float32))
        vae = FlaxAutoencoderKL(vae_cfg, meta.unbox(vae_params["params"]), dtype)
    scaling = vae.scaling_factor if vae is not None else 1.0
    return BaseModels(module, params, text, vae, None, schedule, scaling)


def unet_config(config: Any) -> UNetConfig:
    """The architecture of a config's UNet, read without building it: a pretrained folder's
    ``unet/config.json``, else ``model.unet`` (the ``config`` of
    ``load_base_models(config).module``). What an adapter export needs of the base."""
    model = config.model
    if model_init(model) == "pretrained" and model.pretrained:
        folder = convert.component_folder(resolve_packaged(model.pretrained), "unet")
        return UNetConfig.from_diffusers_config(convert.read_config(folder))
    return UNetConfig.from_diffusers_config(dict(model.unet))


INITS = ("pretrained", "random")


class ModelInitError(PsaJaxError, ValueError):
    """A config whose base models cannot be loaded as written; says which key to set."""


def model_init(model: Any) -> str:
    """``model.init``: ``"pretrained"`` (``model.pretrained``, a diffusers folder or
    ``packaged:<name>``; or ``model.base_workdir``, a denoise run's UNet) or ``"random"`` (the
    config's architecture at ``init_seed``). Never inferred: runs saved before the key existed
    get it from the named migration in :mod:`psa_jax.config`."""
    if "init" not in model:
        raise ModelInitError(
            "the config has no model.init: set model.init='pretrained' (with model.pretrained "
            "or model.base_workdir) or model.init='random'"
        )
    init = model.init
    if init not in INITS:
        raise ModelInitError(f"model.init {init!r} unknown; one of {INITS}")
    for key in ("pretrained", "vae_path"):  # model.base_workdir, a run, may be gs://
        if key in model:
            paths.require_local(model[key], f"model.{key}", "diffusers folders are read as "
                                "local files; copy it to a local disk first")  # fmt: skip
    if init == "pretrained" and model.pretrained and model.base_workdir:
        raise ModelInitError(
            f"model.pretrained ({model.pretrained!r}) and model.base_workdir "
            f"({model.base_workdir!r}) both name a base: set one (model.pretrained='' to train "
            "on a base run)"
        )
    if init == "pretrained" and not (model.pretrained or model.base_workdir):
        raise ModelInitError(
            "model.init='pretrained' needs model.pretrained (a local diffusers folder, or "
            "packaged:tiny-base) or model.base_workdir (a denoise run); set model.init='random' "
            "to train on random weights"
        )
    return init


def _sdxl_text(root: str, dtype: Any) -> dict[str, Any]:
    """A pipeline folder's second text encoder and tokenizer (SDXL), read as diffusers'
    ``StableDiffusionXLPipeline`` reads them, or nothing for a one-encoder folder."""
    if not os.path.isdir(os.path.join(root, "text_encoder_2")):
        return {}
    index = os.path.join(root, "model_index.json")
    flags = {}
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            flags = json.load(f)
    return {
        "text_encoder_2": load_text_encoder(
            os.path.join(root, "text_encoder_2"), dtype=dtype, with_projection=True
        ),
        "tokenizer_2": open_tokenizer(os.path.join(root, "tokenizer_2")),
        # diffusers' default for an SDXL pipeline whose config does not say
        "force_zeros_for_empty_prompt": bool(flags.get("force_zeros_for_empty_prompt", True)),
    }


def _prediction(config: Any) -> dict:
    pred = config.noise.get("prediction_type")
    return {"prediction_type": pred} if pred else {}
