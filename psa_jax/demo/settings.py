"""What ``psa-jax demo`` runs (``DemoSettings``) and the configs its stages derive from it: the
bottom of the demo, so the stages, the metrics and ``run`` all import it and not each other."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from psa_jax.core.errors import PsaJaxError

CONFIG_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "configs",
                           "tiny.py")  # fmt: skip


class DemoError(PsaJaxError, RuntimeError):
    """A demo stage that cannot run (a missing config file, an out folder of something else)."""


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """What ``psa-jax demo`` runs; every field is written to ``metrics.json``."""

    out: str
    pretrain: bool = False
    config: str = CONFIG_FILE  # the tiny config (path[:stage] is added per stage)
    dpo_steps: int | None = None  # None: the config's train.steps
    draws: int = 3  # seeds per held-out caption for each level user
    base_draws: int = 10  # seeds per held-out caption for the base's own-marker rates
    users_per_group: int = 5  # seen / unseen users, each over their own prompt rows
    sampler: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: {
            "scheduler": "ddim",
            "steps": 15,
            "guidance_scale": 3.0,
            "user_scale": 1.0,
            "batch_size": 32,
        }
    )
    # Train the DPO stage again with this many user tokens and add it as the report's ablation
    # row (None: the row recorded in metrics.RECORDED_ABLATION is shown, marked as recorded).
    ablation_tokens: int | None = None
    finetune_profile: str = "lite"
    finetune_steps: int = 100
    seed: int = 0
    progress: bool = True


def stage_dir(settings: DemoSettings, name: str) -> str:
    """The folder of stage ``name`` under ``--out``."""
    return os.path.join(settings.out, name)


# -- configs ---------------------------------------------------------------------------------


def load_tiny_config(settings: DemoSettings, stage: str | None = None) -> Any:
    """``configs/tiny.py[:stage]`` with the demo's cache folder (the world, embeddings and
    caches live under ``--out``, so ``--fresh`` really starts from nothing)."""
    from psa_jax.config import load_config

    if not os.path.isfile(settings.config):
        raise DemoError(
            f"no config file at {settings.config}: psa-jax demo reads configs/tiny.py of the "
            "source checkout (pip install -e .)"
        )
    config = load_config(settings.config, stage)
    config.data.cache_dir = os.path.abspath(os.path.join(settings.out, "cache"))
    config.train.progress = settings.progress
    return config


def base_folder(settings: DemoSettings) -> str:
    """The base pipeline folder the DPO stage trains on."""
    from psa_jax.models.packaged import TINY_BASE, resolve

    if settings.pretrain:
        return os.path.abspath(os.path.join(stage_dir(settings, "base"), "pipeline"))
    return resolve(TINY_BASE)


def dpo_config(settings: DemoSettings) -> Any:
    config = load_tiny_config(settings)
    config.model.init = "pretrained"
    config.model.pretrained = base_folder(settings)
    if settings.dpo_steps is not None:
        config.train.steps = settings.dpo_steps
        config.optim.total_steps = settings.dpo_steps
    return config


def ablation_config(settings: DemoSettings, tokens: int) -> Any:
    """The DPO stage's config with ``tokens`` user tokens (all else equal)."""
    config = dpo_config(settings)
    config.model.adapter.num_user_tokens = tokens
    return config


def eval_settings(settings: DemoSettings) -> Any:
    from psa_jax.eval import benchmark

    return benchmark.EvalSettings(
        draws=settings.draws,
        users_per_group=settings.users_per_group,
        seed=settings.seed,
        sampler=dict(settings.sampler),
        progress=settings.progress,
    )
