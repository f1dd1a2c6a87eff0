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
import csv
import json
import os
from typing import Any

import numpy as np

BASE_USER = "base"  # --users entry for the base model (adapter off)
GRID_LIMIT = 32  # at most this many rows or columns go into grid.png


def read_prompts(path: str, limit: int | None = None) -> list[dict[str, str]]:
    """Rows of a PSAlign prompts CSV; ``caption`` is required, ``file_name``/``user_id``
    optional (a missing ``file_name`` becomes ``<row>.png``)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if "caption" not in (reader.fieldnames or []):
            raise ValueError(f"{path}: no 'caption' column (columns: {reader.fieldnames})")
        rows = [dict(r) for r in reader]
    rows = rows[:limit] if limit else rows
    for i, r in enumerate(rows):
        r["file_name"] = r.get("file_name") or f"{i:07d}.png"
    return rows


def _user_key(user: str) -> str:
    from psa_jax.data.profiles import format_user_id

    return format_user_id(user) if str(user).strip().isdigit() else str(user)


def profile_embeddings(users: list[str], table: dict[str, np.ndarray] | None) -> np.ndarray:
    """``[N, D]`` embeddings of ``users`` from ``table``; a user without one is an error."""
    from psa_jax.data.embed import MissingEmbeddingError

    if table is None:
        raise ValueError("no profile embeddings: pass --embeddings DIR (from embed-profiles)")
    keys = [_user_key(u) for u in users]
    missing = sorted({k for k in keys if k not in table})
    if missing:
        raise MissingEmbeddingError(missing, "the embedding table")
    return np.stack([np.asarray(table[k], np.float32) for k in keys])


def _plan(args: argparse.Namespace, rows: list[dict[str, str]]) -> list[dict[str, Any]]:
    """One entry per image: caption, user (or None: base), seed, output path."""
    stem = lambda r: os.path.splitext(r["file_name"])[0]  # noqa: E731
    if args.users:
        users = [u.strip() for u in args.users.split(",") if u.strip()]
        return [
            {
                "caption": r["caption"],
                "user": None if u == BASE_USER else u,
                "seed": args.seed + i,
                "file": os.path.join("images", u, f"{stem(r)}.png"),
                "row": u,
                "col": i,
            }
            for u in users
            for i, r in enumerate(rows)
        ]
    if rows and "user_id" not in rows[0]:
        raise ValueError("the prompts CSV has no user_id column: pass --users (or --users base)")
    return [
        {
            "caption": r["caption"],
            "user": r["user_id"],
            "seed": args.seed + i,
            "file": os.path.join("images", f"{stem(r)}.png"),
        }
        for i, r in enumerate(rows)
    ]


def sample_to_folder(pipeline: Any, plan: list[dict[str, Any]], out: str, **kw) -> list[dict]:
    """Generate ``plan`` (users first grouped: base rows run without the adapter) into ``out``."""
    from psa_jax.sample.images import save_png

    records = []
    for with_user in (False, True):
        part = [p for p in plan if (p["user"] is not None) == with_user]
        if not part:
            continue
        embeds = None
        if with_user:
            embeds = profile_embeddings([p["user"] for p in part], pipeline.embeddings)
        images = pipeline([p["caption"] for p in part], embeds, [p["seed"] for p in part], **kw)
        for p, image in zip(part, images):
            save_png(image, os.path.join(out, p["file"]))
            p["image"] = image
            records.append({k: p[k] for k in ("file", "caption", "user", "seed")} | kw)
    return records


def _grid(plan: list[dict[str, Any]], rows: list[dict[str, str]], out: str) -> str | None:
    from psa_jax.sample.images import labelled_grid

    users = list(dict.fromkeys(p["row"] for p in plan))
    if len(users) > GRID_LIMIT or len(rows) > GRID_LIMIT:
        print(f"grid.png skipped: {len(users)}x{len(rows)} is over {GRID_LIMIT}x{GRID_LIMIT}")
        return None
    cells = {(p["row"], p["col"]): p["image"] for p in plan}
    images = np.stack([np.stack([cells[(u, c)] for c in range(len(rows))]) for u in users])
    path = os.path.join(out, "grid.png")
    labelled_grid(
        images, [u if u == BASE_USER else f"user {u}" for u in users], [r["caption"] for r in rows]
    ).save(path)
    return path


def with_adapter(pipeline: Any, path: str) -> Any:
    """``pipeline`` with the adapter read from ``path`` (its slots sized by the file)."""
    import dataclasses

    from psa_jax.models.psa_unet import PSAUNet

    unet = PSAUNet(pipeline.module.config, pipeline.params)
    unet.load_adapter(path)
    return dataclasses.replace(pipeline, module=unet.module, adapter=unet.adapter)


def _sample_cmd(args: argparse.Namespace) -> int:
    from psa_jax.sample.pipeline import Pipeline

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
        from psa_jax.data.embed import load_embeddings

        pipeline.embeddings = load_embeddings(args.embeddings)
    plan = _plan(args, rows)
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
    grid = _grid(plan, rows, args.out) if args.users else None
    print(json.dumps({"images": len(records), "out": args.out, "grid": grid}))
    return 0


def register(subparsers: Any) -> None:
    from psa_jax.sample.schedulers import SCHEDULERS

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
