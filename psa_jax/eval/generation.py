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
