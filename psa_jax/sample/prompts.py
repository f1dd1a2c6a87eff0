"""Prompt rows and image plans for ``psa-jax sample``: which (caption, user, seed) goes to which
file (rows: each prompt's own user; grid: every prompt for every listed user, one seed per
prompt across users), and writing them."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from psa_jax.core.errors import PsaJaxError

BASE_USER = "base"  # --users entry for the base model (adapter off)
GRID_LIMIT = 32  # at most this many rows or columns go into grid.png


class SampleInputError(PsaJaxError, ValueError):
    """What ``psa-jax sample`` was given cannot be sampled: the message names the flag, file,
    column or user."""


class AdapterFileError(SampleInputError):
    """An adapter file (or folder) that is missing or cannot be read."""


def read_prompts(path: str, limit: int | None = None) -> list[dict[str, str]]:
    """Rows of a PSAlign prompts CSV; ``caption`` is required, ``file_name``/``user_id``
    optional (a missing ``file_name`` becomes ``<row>.png``). A missing, unreadable or
    caption-less file is a :class:`SampleInputError` naming it."""
    if not os.path.isfile(path):
        raise SampleInputError(f"prompts file {path!r} does not exist")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if "caption" not in (reader.fieldnames or []):
                raise SampleInputError(
                    f"{path}: no 'caption' column (columns: {reader.fieldnames})"
                )
            rows = [dict(r) for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise SampleInputError(f"prompts file {path!r} cannot be read: {err}") from None
    rows = rows[:limit] if limit else rows
    if not rows:
        raise SampleInputError(f"{path}: no prompt rows")
    for i, r in enumerate(rows):
        r["file_name"] = r.get("file_name") or f"{i:07d}.png"
    return rows


def _user_key(user: str) -> str:
    from psa_jax.data.profiles import format_user_id

    return format_user_id(user) if str(user).strip().isdigit() else str(user)


def profile_embeddings(users: list[str], table: dict[str, np.ndarray] | None) -> np.ndarray:
    """``[N, D]`` embeddings of ``users`` from ``table``; a user without one is an error."""
    from psa_jax.data.embed_format import MissingEmbeddingError

    if table is None:
        raise SampleInputError("no profile embeddings: pass --embeddings DIR (from embed-profiles)")
    keys = [_user_key(u) for u in users]
    missing = sorted({k for k in keys if k not in table})
    if missing:
        raise MissingEmbeddingError(missing, "the embedding table")
    return np.stack([np.asarray(table[k], np.float32) for k in keys])


def plan_users(plan: Sequence[Mapping[str, Any]]) -> list[str]:
    """The users of ``plan`` that need a profile embedding (``base`` rows need none)."""
    return list(dict.fromkeys(p["user"] for p in plan if p["user"] is not None))


def check_users(
    users: Sequence[str], table: Mapping[str, np.ndarray] | None, where: str
) -> int | None:
    """Every user has an embedding in ``table`` (else :class:`MissingEmbeddingError` naming
    them and ``where``) and all have one size, which is returned (None: no users)."""
    from psa_jax.data.embed_format import MissingEmbeddingError

    if not users:
        return None
    if table is None:
        raise SampleInputError(
            f"users {', '.join(users[:5])} need profile embeddings: pass --embeddings DIR "
            "(from embed-profiles), or --users base"
        )
    missing = sorted({_user_key(u) for u in users if _user_key(u) not in table})
    if missing:
        raise MissingEmbeddingError(missing, where)
    dims = {int(np.shape(table[_user_key(u)])[-1]) for u in users}
    if len(dims) > 1:
        raise SampleInputError(f"the embeddings in {where} have different sizes {sorted(dims)}")
    return dims.pop()


def check_pipeline(pipeline: Any, plan: Sequence[Mapping[str, Any]], where: str) -> None:
    """Before any image is drawn: the pipeline has an adapter for ``plan``'s users, an
    embedding of each (in ``where``, its table), and of the size its adapter takes."""
    users = plan_users(plan)
    if not users:
        return
    if pipeline.adapter is None:
        raise SampleInputError(
            f"{where} has no adapter, so users ({', '.join(users[:5])}) cannot be sampled: "
            "give --adapter FILE, or --users base"
        )
    dim = check_users(users, pipeline.embeddings, where)
    if dim is not None and dim != pipeline.user_embed_dim:
        raise SampleInputError(
            f"the profile embeddings of {where} have size {dim}, but the adapter takes "
            f"{pipeline.user_embed_dim}: they come from different encoders"
        )


def check_adapter(path: str) -> int | None:
    """A cheap look at ``--adapter`` before any model is built: a run folder with a
    checkpoint, or a (folder holding one) PSAlign/IP-Adapter ``.safetensors``/``.bin`` file whose
    header parses and names adapter weights. Returns the profile embedding size D the file's
    projection takes (None for a run folder). Raises :class:`AdapterFileError` naming the file."""
    from psa_jax.core.checkpoint import checkpoint_dir, require_run

    if os.path.isdir(checkpoint_dir(path)):
        require_run(path)
        return None
    if os.path.isdir(path):
        found = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".bin")))
        if len(found) != 1:
            raise AdapterFileError(
                f"--adapter {path!r}: expected a run folder or exactly one .safetensors/.bin "
                f"file in it, found {found or 'none'}"
            )
        path = os.path.join(path, found[0])
    if not os.path.isfile(path):
        raise AdapterFileError(f"adapter file {path!r} does not exist")
    shapes = _weight_shapes(path)
    key = next((k for k in ("user_proj.proj.weight", "image_proj.proj.weight") if k in shapes), "")
    if not key:
        shown = ", ".join(list(shapes)[:5]) or "nothing"
        raise AdapterFileError(
            f"adapter file {path!r} holds no PSAlign or IP-Adapter weights (no "
            f"user_proj.proj.weight or image_proj.proj.weight; keys start {shown})"
        )
    return int(shapes[key][-1]) if len(shapes[key]) == 2 else None


def _weight_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a weights file: a safetensors header alone, else the whole file."""
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="np") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        from psa_jax.models.convert import read_state_dict

        return {k: tuple(np.shape(v)) for k, v in read_state_dict(path).items()}
    except PsaJaxError:
        raise  # already names the file
    except Exception as err:  # safetensors, torch.load, pickle: a library's own error
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AdapterFileError(f"adapter file {path!r} cannot be read: {reason}") from None


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
        raise SampleInputError(
            "the prompts CSV has no user_id column: pass --users (or --users base)"
        )
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
    """Generate ``plan`` (users first grouped: base rows run without the adapter) into ``out``.
    Each record holds ``kw`` with the scheduler actually used (``scheduler=None``: the folder's)."""
    from psa_jax.sample.images import save_png

    settings = dict(kw)
    if "scheduler" in kw and kw["scheduler"] is None:
        settings["scheduler"] = pipeline.scheduler_name(None)
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
            records.append({k: p[k] for k in ("file", "caption", "user", "seed")} | settings)
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


# -- many processes: each draws a shard of the plan, process 0 merges -------------------------


def shard_plan(plan: list[dict[str, Any]], index: int, count: int) -> list[dict[str, Any]]:
    """Process ``index`` of ``count``'s share of the plan: every ``count``-th image from
    ``index`` (balanced, and each image in exactly one shard)."""
    if not 0 <= index < count:
        raise ValueError(f"process index {index} not in 0..{count - 1}")
    return plan[index::count]


def shard_folder(out: str, index: int, count: int) -> str:
    """Where process ``index`` writes its shard before process 0 merges it into ``out``."""
    return f"{os.path.abspath(out)}.shard-{index}-of-{count}"


def merge_shards(out_tmp: str, shards: list[str]) -> list[dict]:
    """Move every shard's images into ``out_tmp`` and return their ``samples.jsonl`` records
    (shard order); an image named by two shards, or a shard without its records, is an
    error. The shard folders are removed."""
    import shutil

    records, seen = [], set()
    for shard in shards:
        path = os.path.join(shard, "samples.jsonl")
        if not os.path.isfile(path):
            raise SampleInputError(f"{shard} has no samples.jsonl: its process did not finish")
        with open(path, encoding="utf-8") as f:
            part = [json.loads(line) for line in f if line.strip()]
        for r in part:
            if r["file"] in seen:
                raise SampleInputError(f"{r['file']} was drawn by two processes")
            seen.add(r["file"])
            dest = os.path.join(out_tmp, r["file"])
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.replace(os.path.join(shard, r["file"]), dest)
        records.extend(part)
        shutil.rmtree(shard)
    return records
