"""``psa-jax export``: a run's newest checkpoint as files PyTorch users load.

* ``psalign``: the adapter as PSAlign's safetensors (``--out`` a file);
* ``diffusers-ip-adapter``: the adapter as ``<out>/ip_adapter.safetensors`` for
  ``pipe.load_ip_adapter(out, subfolder="", weight_name="ip_adapter.safetensors",
  image_encoder_folder=None)``;
* ``diffusers-unet``: the run's UNet as a diffusers folder: a dpo run's frozen base, a
  ``denoise`` run's trained UNet (its LoRA merged in);
* ``peft-lora``: a LoRA ``denoise`` run's factors in diffusers/PEFT naming;
* ``diffusers-pipeline``: a full-UNet ``denoise`` run (a base) with its text encoder, VAE and
  tokenizer as a StableDiffusionPipeline folder plus ``recipe.json`` (how the tiny base ships).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

FORMATS = ("psalign", "diffusers-ip-adapter", "diffusers-unet", "peft-lora", "diffusers-pipeline")


def export_run(workdir: str, fmt: str, out: str, step: int | None = None) -> str:
    """Write run ``workdir`` in format ``fmt`` to ``out``; returns the file or folder written."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {FORMATS}")
    if fmt == "peft-lora":
        return _export_lora(workdir, out, step)
    if fmt == "diffusers-pipeline":
        if step is not None:
            raise ValueError("diffusers-pipeline exports a base run's newest checkpoint only")
        from psa_jax.export.pipeline import export_base_pipeline

        return export_base_pipeline(workdir, out)
    from psa_jax.models.psa_unet import PSAUNet
    from psa_jax.sample.pipeline import load_run

    run = load_run(workdir, step, data=False)
    config = run.models.module.config  # a pretrained folder's, else the run's model.unet
    if fmt == "diffusers-unet":
        PSAUNet(config, run.unet_params).save_pretrained(out)
        return out
    if run.adapter is None:
        raise ValueError(f"{workdir} is not a dpo run: it has no adapter to export as {fmt}")
    width = run.adapter["user_proj"]["kernel"].shape[1]
    unet = PSAUNet(
        config,
        run.unet_params,
        adapter=run.adapter,
        num_user_tokens=width // config.cross_attention_dim,
    )
    return unet.save_adapter(out, format=fmt)


def _export_lora(workdir: str, out: str, step: int | None) -> str:
    from psa_jax.train.checkpoint import restore_host_params
    from psa_jax.train.lora import export_lora

    lora, config = restore_host_params(workdir, step)
    train = config.get("train", {})
    if config.get("task") != "denoise" or train.get("denoise_target") != "lora":
        raise ValueError(f"{workdir} is not a LoRA run (task {config.get('task')!r})")
    lcfg = train["lora"]
    return export_lora(lora, out, rank=int(lcfg["rank"]), alpha=float(lcfg["alpha"]))


def _export_cmd(args: argparse.Namespace) -> int:
    path = export_run(args.workdir, args.format, args.out, args.step)
    print(json.dumps({"format": args.format, "written": os.path.abspath(path)}))
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a run's newest checkpoint (PSAlign, diffusers IP-Adapter/UNet, PEFT LoRA)",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--workdir", required=True, help="a psa-jax train run folder")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="file (psalign, peft-lora) or folder")
    p.add_argument("--step", type=int, help="a checkpoint step instead of the newest")
    p.set_defaults(func=_export_cmd)
