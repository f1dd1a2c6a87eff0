"""Named generation settings for ``psa-jax sample`` (``--preset``); a flag given explicitly
overrides its preset's value.

* ``psalign``: PSAlign's ``infer.py`` -- the base folder's own scheduler (SD 1.5 ships PNDM with
  ``skip_prk_steps``, i.e. PLMS), 50 steps, guidance 7.5, seed 2025 and the IP-Adapter negative
  prompt its ``generate`` uses. The default for real models: ``--pretrained DIR`` that is not
  ``packaged:...``, or a run whose ``model.pretrained`` is such a folder.
* ``tiny``: what ``psa-jax sample`` has always drawn the tiny world with -- DDIM, 25 steps,
  guidance 7.5, seed 0, no negative prompt. The default for ``packaged:`` bases and runs on
  them (or on a random / ``base_workdir`` base).

Only the settings a preset names live here; ``--user-scale`` and ``--batch-size`` keep their own
defaults.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from psa_jax.models import packaged
from psa_jax.models.packaged import resolve as resolve_packaged
from psa_jax.sample import schedulers as sched_lib
from psa_jax.sample.pipeline import DEFAULT_SCHEDULER, read_scheduler_config
from psa_jax.sample.prompts import SampleInputError


@dataclasses.dataclass(frozen=True)
class SamplePreset:
    """Generation settings; ``scheduler=None``: the base folder's ``scheduler_config.json``."""

    scheduler: str | None
    steps: int
    guidance_scale: float
    seed: int
    negative_prompt: str
    about: str


PSALIGN_NEGATIVE_PROMPT = "monochrome, lowres, bad anatomy, worst quality, low quality"

PRESETS: dict[str, SamplePreset] = {
    "psalign": SamplePreset(
        None,
        50,
        7.5,
        2025,
        PSALIGN_NEGATIVE_PROMPT,
        "PSAlign's infer.py: the folder's scheduler (PNDM for SD 1.5), 50 steps, CFG 7.5, "
        "seed 2025, its negative prompt",
    ),
    "tiny": SamplePreset("ddim", 25, 7.5, 0, "", "DDIM, 25 steps, CFG 7.5, seed 0"),
}
SETTINGS = ("scheduler", "steps", "guidance_scale", "seed", "negative_prompt")


def base_folder(pretrained: str | None = None, run_config: Mapping | None = None) -> str | None:
    """The diffusers folder the samples' base models come from: ``pretrained`` (a path or
    ``packaged:<name>``), or a run's ``model.pretrained``; None for a run whose base is random
    or another run's UNet (``model.base_workdir``)."""
    if pretrained:
        return resolve_packaged(pretrained)
    if run_config is None:
        return None
    model = run_config["model"]
    if model["init"] != "pretrained" or not model["pretrained"]:
        return None
    return resolve_packaged(model["pretrained"])


def is_packaged(path: str) -> bool:
    """``packaged:<name>``, or the path of a folder the package ships."""
    if path.startswith(packaged.PREFIX):
        return True
    here = os.path.dirname(os.path.realpath(packaged.__file__))
    shipped = {os.path.join(here, folder) for folder in packaged.FOLDERS.values()}
    return os.path.realpath(os.path.expanduser(path)) in shipped


def default_preset(pretrained: str | None = None, run_config: Mapping | None = None) -> str:
    """``psalign`` for a real model folder (not a packaged one), directly or as a run's base;
    ``tiny`` for everything else."""
    name = pretrained
    if not name and run_config is not None:
        model = run_config["model"]
        name = model["pretrained"] if model["init"] == "pretrained" else ""
    return "psalign" if name and not is_packaged(str(name)) else "tiny"


def preset_settings(preset: str, **given: Any) -> dict[str, Any]:
    """``preset``'s :data:`SETTINGS`, each replaced by ``given[key]`` unless that is None."""
    if preset not in PRESETS:
        raise SampleInputError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    unknown = sorted(set(given) - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown settings {unknown}; a preset sets {list(SETTINGS)}")
    values = dataclasses.asdict(PRESETS[preset])
    return {k: values[k] if given.get(k) is None else given[k] for k in SETTINGS}


def check_folder_scheduler(scheduler: str | None, folder: str | None) -> str:
    """The sampler that ``scheduler`` (None: ``folder``'s own) means, found before any model is
    built: a folder scheduler class we do not sample with is an
    :class:`~psa_jax.sample.schedulers.UnsupportedSchedulerError` naming the file."""
    if scheduler is not None:
        return scheduler
    config = None if folder is None else read_scheduler_config(folder)
    if config is None:
        return DEFAULT_SCHEDULER  # what Pipeline does without a folder config
    where = os.path.join(folder, "scheduler", "scheduler_config.json")
    return sched_lib.scheduler_for_class(config.get("_class_name"), where)
