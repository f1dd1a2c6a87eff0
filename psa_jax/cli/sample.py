"""``psa-jax sample``: images for (prompt, user) pairs from a run or a diffusers folder.

Two layouts, as PSAlign's evaluation uses them:

* rows: a prompts CSV with a ``user_id`` column (``sage_seen.csv``) gives one image per row, for
  that row's user, written as ``images/<file_name stem>.png``;
* grid: ``--users 1,2,3`` (or ``--users base``) crosses every prompt with every listed user.
  Each prompt keeps one seed across users, so the grid compares users on the same noise;
  images go to ``images/<user>/<stem>.png`` and ``grid.png`` labels rows by user and columns by
  prompt.

``samples.jsonl`` lists every image with its caption, user, seed and sampler settings.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from psa_jax.data.embed import load_embeddings
from psa_jax.sample.pipeline import Pipeline
from psa_jax.sample.prompts import (
    BASE_USER,
    plan_images,
    read_prompts,
    sample_to_folder,
    with_adapter,
    write_grid,
)
from psa_jax.sample.schedulers import SCHEDULERS


def _sample_cmd(args: argparse.Namespace) -> int:
    if bool(args.workdir) == bool(args.pretrained):
        raise SystemExit("psa-jax sample: give exactly one of --workdir and --pretrained")
    if args.prompts:
        rows = read_prompts(args.prompts, args.limit)
    elif args.prompt:
        rows = [{"caption": c, "file_name": f"{i:07d}.png"} for i, c in enumerate(args.prompt)]
    else:
        raise SystemExit("psa-jax sample: give --prompts CSV or --prompt TEXT")
    if args.workdir:
        pipeline = Pipeline.from_run(args.workdir)
        if args.adapter:  # the run's base with another adapter (a file, or another run)
            pipeline = with_adapter(pipeline, args.adapter)
    else:
        pipeline = Pipeline.from_pretrained(args.pretrained, args.adapter)
    if args.embeddings:
        pipeline.embeddings = load_embeddings(args.embeddings)
    plan = plan_images(rows, args.users, args.seed)
    settings = dict(
        scheduler=args.scheduler,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        user_scale=args.user_scale,
        negative_prompt=args.negative_prompt,
        batch_size=args.batch_size,
    )
    os.makedirs(args.out, exist_ok=True)
    records = sample_to_folder(pipeline, plan, args.out, **settings)
    with open(os.path.join(args.out, "samples.jsonl"), "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    grid = write_grid(plan, rows, args.out) if args.users else None
    print(json.dumps({"images": len(records), "out": args.out, "grid": grid}))
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "sample",
        help="generate images per (prompt, user) from a run or a diffusers folder + adapter",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--workdir", help="a psa-jax train run (dpo: its adapter; denoise: its UNet)")
    p.add_argument("--pretrained", help="a local diffusers pipeline folder")
    p.add_argument("--adapter", help="a PSAlign/IP-Adapter file or run folder (replaces a run's)")
    p.add_argument("--prompts", help="prompts CSV (caption[, file_name][, user_id])")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable), instead of --prompts")
    p.add_argument("--users", help=f"user ids a,b,c for a grid ('{BASE_USER}': no adapter)")
    p.add_argument("--embeddings", help="profile embeddings folder (embed-profiles output)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--scheduler", default="ddim", choices=sorted(SCHEDULERS))
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--user-scale", type=float, default=1.0)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=int, default=0, help="seed of the first prompt (+1 per prompt)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, help="only the first N prompts")
    p.set_defaults(func=_sample_cmd)
