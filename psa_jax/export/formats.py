"""A run's checkpoint as files PyTorch users load; the formats are listed in
:mod:`psa_jax.cli.export`.

:func:`export_run` first checks, cheaply and before any model is built, that the run folder
holds a complete checkpoint (of ``step``), that its task has what the format exports, and that
``out`` may be written; a user error is an :class:`ExportError` (still a ``ValueError``) or a
:class:`~psa_jax.core.checkpoint.RunNotFoundError` naming the folder. The result is written under a
temporary name beside ``out`` and renamed into place when complete: a failed or killed export
leaves no half-written file or folder. An existing ``out`` file is replaced; an existing
folder only when it is empty or holds nothing but an earlier export of the same format. The
run and ``out`` may be ``gs://`` URIs (``out`` is then uploaded once complete; see
:mod:`psa_jax.core.outputs`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from psa_jax.core import paths
from psa_jax.core.checkpoint import require_run
from psa_jax.core.outputs import (
    atomic_file,
    atomic_folder,
    check_file_out,
    check_folder_out,
)
from psa_jax.export.pipeline import (
    PIPELINE_FILES,
    ExportError,
    check_base_run,
    export_base_pipeline,
)

FORMATS = ("psalign", "diffusers-ip-adapter", "diffusers-unet", "peft-lora", "diffusers-pipeline")
FILE_FORMATS = ("psalign", "peft-lora")
IP_ADAPTER_FILE = "ip_adapter.safetensors"
# What an export of each folder format writes: an existing --out holding only these is replaced.
FOLDER_FILES = {
    "diffusers-ip-adapter": frozenset({IP_ADAPTER_FILE}),
    "diffusers-unet": frozenset({"config.json", "diffusion_pytorch_model.safetensors"}),
    "diffusers-pipeline": PIPELINE_FILES,
}


def _task(config: Mapping[str, Any]) -> tuple[str | None, str | None]:
    return config.get("task"), (config.get("train") or {}).get("denoise_target")


def check_export(workdir: str, fmt: str, step: int | None = None) -> dict:
    """The run's config, once its folder, checkpoint and task are known to fit ``fmt``."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {FORMATS}")
    if fmt == "diffusers-pipeline" and step is not None:
        raise ExportError("diffusers-pipeline exports a base run's newest checkpoint only")
    _, config = require_run(workdir, step)
    task, target = _task(config)
    if fmt in ("psalign", "diffusers-ip-adapter") and task != "dpo":
        raise ExportError(
            f"{workdir} is a {task!r} run, not a dpo run: it has no adapter to export as {fmt}"
        )
    if fmt == "peft-lora" and (task != "denoise" or target != "lora"):
        raise ExportError(f"{workdir} is not a LoRA run (task {task!r}, target {target!r})")
    if fmt == "diffusers-pipeline":
        check_base_run(workdir, config)
    if fmt == "diffusers-unet" and task not in ("dpo", "denoise"):
        raise ExportError(f"{workdir} is a {task!r} run: only dpo and denoise runs have a UNet")
    return config


def _file_out(out: str, fmt: str) -> str:
    """The file ``out`` names: for ``peft-lora`` a folder ``out`` gets diffusers' file name."""
    if fmt == "peft-lora" and paths.isdir(out):
        from psa_jax.train.lora import WEIGHT_NAME

        return os.path.join(out, WEIGHT_NAME)
    return out


def export_run(workdir: str, fmt: str, out: str, step: int | None = None) -> str:
    """Write run ``workdir`` in format ``fmt`` to ``out``; returns the file or folder written."""
    check_export(workdir, fmt, step)
    if fmt in FILE_FORMATS:
        out = _file_out(out, fmt)
        check_file_out(out)
    else:
        check_folder_out(out, FOLDER_FILES[fmt])
    if fmt == "peft-lora":
        return _export_lora(workdir, out, step)
    if fmt == "diffusers-pipeline":
        return export_base_pipeline(workdir, out)
    from psa_jax.models.psa_unet import PSAUNet
    from psa_jax.train.restore import load_run, load_run_adapter

    if fmt == "diffusers-unet":  # the UNet alone: no text encoder, VAE, tokenizer or data
        run = load_run(workdir, step, data=False, unet_only=True)
        config = run.models.module.config  # a pretrained folder's, else the run's model.unet
        unet = PSAUNet(config, run.unet_params)
        with atomic_folder(out, FOLDER_FILES[fmt]) as tmp:
            unet.save_pretrained(tmp)
        return out
    # An adapter format: the adapter and the base's UNet config; no base weights are read.
    found = load_run_adapter(workdir, step)
    config = found.unet_config  # a pretrained folder's, else the run's model.unet
    width = found.adapter["user_proj"]["kernel"].shape[1]
    unet = PSAUNet(
        config, {}, adapter=found.adapter, num_user_tokens=width // config.cross_attention_dim
    )
    if fmt == "psalign":
        with atomic_file(out) as tmp:
            unet.save_adapter(tmp, format=fmt)
        return out
    with atomic_folder(out, FOLDER_FILES[fmt]) as tmp:
        written = unet.save_adapter(tmp, format=fmt)
    return os.path.join(out, os.path.basename(written))


def _export_lora(workdir: str, out: str, step: int | None) -> str:
    from psa_jax.core.checkpoint import restore_host_params
    from psa_jax.train.lora import export_lora

    lora, config = restore_host_params(workdir, step)
    task, target = _task(config)
    if task != "denoise" or target != "lora":
        raise ExportError(f"{workdir} is not a LoRA run (task {task!r}, target {target!r})")
    lcfg = config["train"]["lora"]
    with atomic_file(out) as tmp:
        export_lora(lora, tmp, rank=int(lcfg["rank"]), alpha=float(lcfg["alpha"]))
    return out
