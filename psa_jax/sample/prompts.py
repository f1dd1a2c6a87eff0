"""Prompt rows and image plans for ``psa-jax sample``: which (caption, user, seed) goes to which
file (rows: each prompt's own user; grid: every prompt for every listed user, one seed per
prompt across users), and writing them."""

from __future__ import annotations

import csv
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


def plan_images(rows: list[dict[str, str]], users: str | None, seed: int) -> list[dict[str, Any]]:
    """One entry per image: caption, user (or None: base), seed, output path. ``users``
    (``"a,b,c"``) crosses every row with every user (a grid); else each row names its user."""
    stem = lambda r: os.path.splitext(r["file_name"])[0]  # noqa: E731
    if users:
        listed = [u.strip() for u in users.split(",") if u.strip()]
        return [
            {
                "caption": r["caption"],
                "user": None if u == BASE_USER else u,
                "seed": seed + i,
                "file": os.path.join("images", u, f"{stem(r)}.png"),
                "row": u,
                "col": i,
            }
            for u in listed
            for i, r in enumerate(rows)
        ]
    if rows and "user_id" not in rows[0]:
        raise ValueError("the prompts CSV has no user_id column: pass --users (or --users base)")
    return [
        {
            "caption": r["caption"],
            "user": r["user_id"],
            "seed": seed + i,
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


def write_grid(plan: list[dict[str, Any]], rows: list[dict[str, str]], out: str) -> str | None:
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
