"""A trained base (a ``denoise`` run on its VAE run) as a diffusers StableDiffusionPipeline
folder: what the package ships as the tiny base (``psa_jax.models.packaged``) and what
``psa-jax demo --pretrain`` rebuilds.

The folder holds ``unet/``, ``text_encoder/``, ``vae/``, ``tokenizer/``, ``scheduler/`` and
``model_index.json``, so that diffusers' ``StableDiffusionPipeline.from_pretrained``, psa_jax's
``Pipeline.from_pretrained`` and a training config's ``model.pretrained`` all read the same files.
``recipe.json`` records how it was made (each stage's config, steps and the world's version).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from psa_jax.core.checkpoint import require_run
from psa_jax.core.errors import PsaJaxError
from psa_jax.core.outputs import atomic_folder, check_folder_out

RECIPE = "recipe.json"
# What the export writes: an existing folder holding only these is an earlier one, replaced.
PIPELINE_FILES = frozenset(
    {"unet", "text_encoder", "vae", "tokenizer", "scheduler", "model_index.json", RECIPE}
)


class ExportError(PsaJaxError, ValueError):
    """A run that has nothing to export in the asked format, or an unknown format (the message
    names the run). Also :data:`psa_jax.export.formats.ExportError`."""


# diffusers' DDIM as Stable Diffusion ships it, on the run's own forward-process betas.
_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def model_index(tokenizer_class: str) -> dict[str, Any]:
    return {
        "_class_name": "StableDiffusionPipeline",
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", tokenizer_class],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _clean(config: Mapping[str, Any]) -> dict[str, Any]:
    """A run's config minus what is machine-local (paths, progress bars)."""
    d = json.loads(json.dumps(dict(config), default=str))
    d.get("data", {}).pop("cache_dir", None)
    d.get("model", {}).pop("vae_path", None)
    d.get("train", {}).pop("progress", None)
    return d


def recipe_of(base_workdir: str) -> dict[str, Any]:
    """How a base was made: the base run's config and, when ``model.vae_path`` is a ``vae``
    run's ``<workdir>/vae`` folder, that run's config; plus the toy world's version. A run that
    trained on from a packed base (``model.pretrained``, a folder with ``recipe.json``) has
    that folder's recipe with this run's config appended to its ``continued`` list."""
    from psa_jax.core.checkpoint import Checkpointer, RunNotFoundError
    from psa_jax.data.toy_world import VERSION

    def config_of(workdir: str) -> dict[str, Any]:
        with Checkpointer(workdir, read_only=True) as ckpt:
            step = ckpt.latest_step()
            if step is None:
                raise RunNotFoundError(f"{workdir} holds no complete checkpoint")
            return ckpt.read_config(step)

    base = config_of(base_workdir)
    parent = _parent_recipe(base)
    if parent is not None:
        return {**parent, "continued": [*parent.get("continued", []), _clean(base)]}
    out = {"world_version": VERSION, "recipe": "launch/tiny.sh", "base": _clean(base)}
    vae_path = base.get("model", {}).get("vae_path") or ""
    if vae_path:  # a vae run's folder, or the diffusers folder it wrote inside
        for run in (vae_path, os.path.dirname(os.path.abspath(vae_path))):
            if os.path.isdir(os.path.join(run, "checkpoints")):
                out["vae"] = _clean(config_of(run))
                break
    return out


def _parent_recipe(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``recipe.json`` of the packed base a run started from, if it started from one."""
    from psa_jax.models.packaged import resolve

    model = config.get("model", {})
    if model.get("init") != "pretrained" or not model.get("pretrained"):
        return None
    path = os.path.join(resolve(model["pretrained"]), RECIPE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def check_base_run(workdir: str, config: Mapping[str, Any]) -> None:
    """A base is a full-UNet ``denoise`` run; anything else is an :class:`ExportError`."""
    task = config.get("task")
    if task != "denoise" or (config.get("train") or {}).get("denoise_target") != "unet":
        raise ExportError(f"{workdir} is a {task!r} run, not a full-UNet denoise run (a base)")


def export_base_pipeline(
    base_workdir: str, out: str, recipe: Mapping[str, Any] | None = None
) -> str:
    """Write the UNet of ``base_workdir`` (a ``denoise`` run with ``denoise_target="unet"``),
    its frozen text encoder, VAE and tokenizer as a diffusers pipeline folder ``out``, with
    ``recipe.json`` (default: :func:`recipe_of` the run).

    Written to ``<out>.partial-<pid>`` first and renamed, so a killed export leaves no half
    folder; an existing ``out`` is replaced only when it holds nothing but an earlier such
    export (:data:`PIPELINE_FILES`). The run folder, its checkpoint and task, and ``out`` are
    checked before any model is built."""
    from psa_jax.data.prepare import prepare_tokenizer
    from psa_jax.train.restore import load_run

    _, config = require_run(base_workdir)
    check_base_run(base_workdir, config)
    check_folder_out(out, PIPELINE_FILES)
    run = load_run(base_workdir, data=False)  # of the data, only the tokenizer is needed
    if run.models.vae is None:
        raise ExportError(f"{base_workdir} was trained without a VAE (model.vae_path)")
    if run.models.text_encoder_2 is not None:  # this writes a StableDiffusionPipeline folder
        raise ExportError(
            f"{base_workdir} is an SDXL base (two text encoders): diffusers-pipeline writes "
            "SD 1.x/2.x pipelines only; export its UNet with --format diffusers-unet"
        )
    tokenizer = prepare_tokenizer(run.config, run.models)
    recipe = dict(recipe or recipe_of(base_workdir))
    with atomic_folder(out, PIPELINE_FILES) as tmp:
        _write_pipeline(run, tokenizer, tmp, recipe)
    return out


def _write_pipeline(run: Any, tokenizer: Any, tmp: str, recipe: Mapping[str, Any]) -> None:
    from psa_jax.models.psa_unet import PSAUNet

    PSAUNet(run.models.module.config, run.unet_params).save_pretrained(os.path.join(tmp, "unet"))
    run.models.text_encoder.save_pretrained(os.path.join(tmp, "text_encoder"))
    run.models.vae.save_pretrained(os.path.join(tmp, "vae"))
    tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
    noise = dict(run.config.noise)
    sched = {
        **_SCHEDULER,
        **{k: noise[k] for k in ("beta_schedule", "beta_start", "beta_end")},
        "num_train_timesteps": int(noise["num_train_timesteps"]),
        "prediction_type": noise.get("prediction_type", "epsilon"),
    }
    os.makedirs(os.path.join(tmp, "scheduler"))
    _write_json(os.path.join(tmp, "scheduler", "scheduler_config.json"), sched)
    _write_json(os.path.join(tmp, "model_index.json"), model_index(type(tokenizer).__name__))
    _write_json(os.path.join(tmp, RECIPE), dict(recipe))


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
