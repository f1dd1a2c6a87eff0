"""``psa-jax sample``: images for (prompt, user) pairs from a run or a diffusers folder.

Two layouts, as PSAlign's evaluation uses them:

* rows: a prompts CSV with a ``user_id`` column (``sage_seen.csv``) gives one image per row, for
  that row's user, written as ``images/<file_name stem>.png``;
* grid: ``--users 1,2,3`` (or ``--users base``) crosses every prompt with every listed user.
  Each prompt keeps one seed across users, so the grid compares users on the same noise;
  images go to ``images/<user>/<stem>.png`` and ``grid.png`` labels rows by user and columns by
  prompt.

``samples.jsonl`` lists every image with its caption, user, seed and sampler settings.

Bad input (a missing run or folder, a prompts file without a caption column, an unreadable
adapter file, a user without an embedding, a non-empty ``--out``) is one line on stderr and exit
status 2, found before any model is built (a run's own embedding table: once it is loaded, still
before any image is drawn). Images are drawn into ``<out>.partial-<pid>``, renamed to ``--out``
only when complete, so a failed or killed run never leaves a half-written ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from psa_jax.core.checkpoint import require_run
from psa_jax.core.outputs import atomic_folder, check_folder_out
from psa_jax.data.embed import load_embeddings
from psa_jax.models.packaged import resolve
from psa_jax.sample.pipeline import Pipeline
from psa_jax.sample.prompts import (
    BASE_USER,
    SampleInputError,
    check_adapter,
    check_pipeline,
    check_users,
    plan_images,
    plan_users,
    read_prompts,
    sample_to_folder,
    with_adapter,
    write_grid,
)
from psa_jax.sample.schedulers import SCHEDULERS


def _check_inputs(args: argparse.Namespace) -> tuple[list[dict], list[dict], dict | None]:
    """Everything cheap, before any model is built: the source, ``--out``, the prompts and
    their users, the adapter file, and (``--embeddings``) every user's embedding. Returns the
    prompt rows, the image plan and the embedding table (None: the run's own, known once the
    run is loaded)."""
    if bool(args.workdir) == bool(args.pretrained):
        raise SampleInputError("give exactly one of --workdir and --pretrained")
    if not args.prompts and not args.prompt:
        raise SampleInputError("give --prompts CSV or --prompt TEXT")
    check_folder_out(args.out)
    if args.workdir:
        require_run(args.workdir)
    else:
        args.pretrained = resolve(args.pretrained)  # also a packaged:<name>
        if not os.path.isdir(args.pretrained):
            raise SampleInputError(f"--pretrained {args.pretrained!r} is not a folder")
        for part in ("unet", "text_encoder", "vae"):
            if not os.path.isdir(os.path.join(args.pretrained, part)):
                raise SampleInputError(
                    f"--pretrained {args.pretrained!r} is not a diffusers pipeline folder "
                    f"(no {part}/)"
                )
    if args.prompts:
        rows = read_prompts(args.prompts, args.limit)
    else:
        rows = [{"caption": c, "file_name": f"{i:07d}.png"} for i, c in enumerate(args.prompt)]
    plan = plan_images(rows, args.users, args.seed)
    if not plan:
        raise SampleInputError(f"no images to draw (--users {args.users!r})")
    users = plan_users(plan)
    adapter_dim = check_adapter(args.adapter) if args.adapter else None
    if users and args.pretrained and not args.adapter:
        raise SampleInputError(
            f"users ({', '.join(users[:5])}) need an adapter: give --adapter FILE, or --users base"
        )
    table = None
    if args.embeddings:
        table = load_embeddings(args.embeddings)
        dim = check_users(users, table, args.embeddings)
        if dim is not None and adapter_dim is not None and dim != adapter_dim:
            raise SampleInputError(
                f"the embeddings in {args.embeddings} have size {dim}, but the adapter "
                f"{args.adapter} takes {adapter_dim}: they come from different encoders"
            )
    elif users and args.pretrained:
        raise SampleInputError(
            f"users ({', '.join(users[:5])}) need profile embeddings: pass --embeddings DIR "
            "(from embed-profiles), or --users base"
        )
    return rows, plan, table


def _sample_cmd(args: argparse.Namespace) -> int:
    rows, plan, table = _check_inputs(args)
    if args.workdir:
        pipeline = Pipeline.from_run(args.workdir)
        if args.adapter:  # the run's base with another adapter (a file, or another run)
            pipeline = with_adapter(pipeline, args.adapter)
    else:
        pipeline = Pipeline.from_pretrained(args.pretrained, args.adapter)
    if table is not None:
        pipeline.embeddings = table
    where = args.embeddings or (f"the run {args.workdir}" if args.workdir else args.pretrained)
    check_pipeline(pipeline, plan, where)  # the run's own table is known only now
    settings = dict(
        scheduler=args.scheduler,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        user_scale=args.user_scale,
        negative_prompt=args.negative_prompt,
        batch_size=args.batch_size,
    )
    # Into <out>.partial-<pid>, renamed to --out once complete: never a half-written --out.
    with atomic_folder(args.out) as tmp:
        records = sample_to_folder(pipeline, plan, tmp, **settings)
        with open(os.path.join(tmp, "samples.jsonl"), "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        grid = write_grid(plan, rows, tmp) if args.users else None
    grid = os.path.join(args.out, os.path.basename(grid)) if grid else None
    print(json.dumps({"images": len(records), "out": args.out, "grid": grid}))
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "sample",
        help="generate images per (prompt, user) from a run or a diffusers folder + adapter",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--workdir", help="a psa-jax train run (dpo: its adapter; denoise: its UNet)")
    p.add_argument("--pretrained", help="a local diffusers pipeline folder (or packaged:tiny-base)")
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
