"""A ``psa-jax train`` run rebuilt from its folder: the saved config's base models and data
(tokenizer, profile embeddings), and the newest (or a given) checkpoint applied to them.

Sampling, evaluation and export all start here; reading the raw checkpoint is
:func:`psa_jax.core.checkpoint.restore_host_params`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from psa_jax.core.checkpoint import restore_host_params
from psa_jax.data import prepare
from psa_jax.models import loading
from psa_jax.train.lora import lora_scale, merge_lora


@dataclasses.dataclass
class Run:
    """What a finished (or running) ``psa-jax train`` run holds, rebuilt from its folder."""

    config: Any  # the run's resolved ConfigDict
    models: Any  # psa_jax.models.loading.BaseModels of the config
    splits: Any  # psa_jax.data.prepare.Splits: tokenizer and profile embeddings (or None)
    unet_params: Any  # the UNet to sample: the base, or the run's (LoRA merged)
    adapter: Any | None  # a dpo run's adapter, else None


def load_run(
    workdir: str | os.PathLike,
    step: int | None = None,
    *,
    data: bool = True,
    build_splits: bool = True,
    unet_only: bool = False,
) -> Run:
    """Rebuild a run's models from its saved config and apply its newest checkpoint (or
    ``step``): a ``dpo`` run gives an adapter, a ``denoise`` run a new UNet. ``data=False``
    skips the data preparation (tokenizer, embeddings; ``splits`` is then None): exports.
    ``build_splits=False`` prepares the tokenizer and embeddings but not the TFDS splits
    (``splits.data_dirs`` empty): sampling. ``unet_only=True`` loads no text encoder, VAE or
    tokenizer (``models`` has None there): a UNet export."""
    trained, config = restore_host_params(os.fspath(workdir), step)
    cfg = ml_collections.ConfigDict(config)
    full_unet = cfg.task == "denoise" and cfg.train.denoise_target == "unet"
    # A full-UNet run's checkpoint is its UNet: the base UNet's weights are not needed.
    models = loading.load_base_models(cfg, unet_only=unet_only, unet_params=not full_unet)
    splits = None  # data: the toy tokenizer, embeddings (and the TFDS splits)
    if data:
        splits = prepare.prepare_data(cfg, models, build_splits=build_splits)
    params, adapter = models.unet_params, None
    task = cfg.task
    if task == "dpo":
        adapter = trained
    elif full_unet:
        params = trained
    elif task == "denoise":
        scale = lora_scale(cfg.train.lora.rank, cfg.train.lora.alpha)
        params = jax.tree.map(np.asarray, merge_lora(params, trained, scale))
    else:
        raise ValueError(f"{workdir} is a {task!r} run: only dpo and denoise runs have a UNet")
    return Run(cfg, models, splits, params, adapter)


@dataclasses.dataclass
class RunAdapter:
    """A ``dpo`` run's adapter and what its base UNet is, with no model loaded or built."""

    config: Any  # the run's resolved ConfigDict
    unet_config: Any  # psa_jax.models.unet.UNetConfig of the base (load_run's module.config)
    adapter: Any  # host arrays, as the checkpoint holds them


def load_run_adapter(workdir: str | os.PathLike, step: int | None = None) -> RunAdapter:
    """The adapter of a ``dpo`` run's newest checkpoint (or ``step``) and its base's UNet
    architecture (a config file): what an adapter export needs, in a fraction of a second,
    where :func:`load_run` reads and shapes every base model. The adapter is the one
    ``load_run(...).adapter`` gives."""
    trained, config = restore_host_params(os.fspath(workdir), step)
    cfg = ml_collections.ConfigDict(config)
    if cfg.task != "dpo":
        raise ValueError(f"{workdir} is a {cfg.task!r} run: only dpo runs have an adapter")
    return RunAdapter(cfg, loading.unet_config(cfg), trained)
