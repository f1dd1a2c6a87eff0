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

A folder that is not a run, a run without a checkpoint (or without ``--step``), a run whose task
does not fit the format, or an ``--out`` folder of other files is one line on stderr and exit
status 2, before any model is built. The result is written under a temporary name beside
``--out`` (``<out>.partial-<pid>``) and renamed into place when complete; a ``gs://`` ``--out``
is written locally and uploaded when complete (see :mod:`psa_jax.core.outputs`).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from psa_jax.core import paths
from psa_jax.export.formats import FORMATS, export_run


def _export_cmd(args: argparse.Namespace) -> int:
    path = export_run(args.workdir, args.format, args.out, args.step)
    print(json.dumps({"format": args.format, "written": paths.absolute(path)}))
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
