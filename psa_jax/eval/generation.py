"""Paired drawing: every item by the PSA model with its user's embedding, and by the base model
on the same caption and seed."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from psa_jax.eval.plans import BASE, PSA, EvalItem


def embeddings_for(users: Sequence[str], table: Mapping[str, np.ndarray] | None) -> np.ndarray:
    from psa_jax.sample.prompts import profile_embeddings

    return profile_embeddings(list(users), dict(table) if table is not None else None)


def generate(
    pipeline: Any,
    items: Sequence[EvalItem],
    settings: Mapping[str, Any],
    *,
    chunk: int = 64,
    desc: str = "sampling",
    progress: bool = True,
    params: Any | None = None,
    base: bool = True,
) -> dict[str, np.ndarray]:
    """``{"psa": [N, H, W, 3], "base": [N, H, W, 3]}`` uint8: each item drawn with its user's
    embedding, and by the base model on the same caption and seed (each distinct (caption,
    seed) drawn once). ``params`` replaces the pipeline's UNet (a fine-tuned one); ``base=False``
    draws the PSA images only (every item then needs a user)."""
    if params is not None:
        pipeline = dataclasses.replace(pipeline, params=params)
    with_user = [i for i, it in enumerate(items) if it.user is not None]
    embeds = None
    if with_user:
        embeds = embeddings_for([items[i].user for i in with_user], pipeline.embeddings)
    keys = list(dict.fromkeys((it.caption, it.seed) for it in items)) if base else []
    if not base and len(with_user) != len(items):
        raise ValueError("base=False needs a user for every item")
    total = len(with_user) + len(keys)
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress)

    def draw(captions, seeds, user_embeds):
        out = []
        for lo in range(0, len(captions), chunk):
            e = None if user_embeds is None else user_embeds[lo : lo + chunk]
            out.append(pipeline(captions[lo : lo + chunk], e, seeds[lo : lo + chunk], **settings))
            bar.update(len(out[-1]))
        return np.concatenate(out) if out else None

    out = {}
    if base:
        base_imgs = draw([c for c, _ in keys], [s for _, s in keys], None)
        index = {k: j for j, k in enumerate(keys)}
        out[BASE] = base_imgs[[index[(it.caption, it.seed)] for it in items]]
    user_imgs = None
    if with_user:
        user_imgs = draw(
            [items[i].caption for i in with_user], [items[i].seed for i in with_user], embeds
        )
    if base:
        out[PSA] = out[BASE].copy()  # items without a user are the base model's images
        if with_user:
            out[PSA][with_user] = user_imgs
    else:
        out[PSA] = user_imgs
    bar.close()
    return out


# -- many processes: each draws a share, process 0 gathers ------------------------------------


def shard_items(items: Sequence[EvalItem], index: int, count: int) -> list[int]:
    """Indices of the items process ``index`` of ``count`` draws: whole (caption, seed) groups
    (every user of one caption and seed, so that group's base image is drawn once), dealt
    round-robin in order of first appearance."""
    keys = list(dict.fromkeys((it.caption, it.seed) for it in items))
    mine = {k for j, k in enumerate(keys) if j % count == index}
    return [i for i, it in enumerate(items) if (it.caption, it.seed) in mine]


def generate_across_processes(
    pipeline: Any,
    items: Sequence[EvalItem],
    settings: Mapping[str, Any],
    shard_dir: str,
    **kw: Any,
) -> dict[str, np.ndarray] | None:
    """:func:`generate` over ``jax.process_count()`` processes: each draws its
    :func:`shard_items` into ``shard_dir/<index>.npz`` (a folder every process sees); after a
    barrier process 0 gathers them in item order and returns what one process would have
    drawn; the others return None. The shard files are removed."""
    import os

    import jax

    from psa_jax.core import parallel

    index, count = jax.process_index(), jax.process_count()
    os.makedirs(shard_dir, exist_ok=True)
    mine = shard_items(items, index, count)
    drawn = generate(pipeline, [items[i] for i in mine], settings, **kw) if mine else {}
    from psa_jax.core.outputs import atomic_file

    with atomic_file(os.path.join(shard_dir, f"{index}.npz")) as tmp:
        np.savez(tmp, idx=np.asarray(mine, np.int64), **drawn)
    parallel.barrier(f"eval-generate:{os.path.abspath(shard_dir)}")
    if index != 0:
        return None
    out: dict[str, np.ndarray] = {}
    seen = np.zeros(len(items), bool)
    for k in range(count):
        with np.load(os.path.join(shard_dir, f"{k}.npz")) as part:
            idx = part["idx"]
            if seen[idx].any():
                raise ValueError(f"process {k} drew items another process drew")
            seen[idx] = True
            for name in part.files:
                if name == "idx":
                    continue
                if name not in out:
                    out[name] = np.zeros((len(items), *part[name].shape[1:]), part[name].dtype)
                out[name][idx] = part[name]
    if not seen.all():
        raise ValueError(f"{int((~seen).sum())} items were drawn by no process")
    for k in range(count):
        os.remove(os.path.join(shard_dir, f"{k}.npz"))
    os.rmdir(shard_dir)
    return out
