"""Benign fine-tuning data for SPQR's robustness axis: images at the model's resolution, their
captions, and their VAE moments and text states from the run's frozen encoders."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image


def benign_data(model: Any, folder: str | None) -> tuple[np.ndarray, list[str]]:
    """uint8 images at the resolution of ``model`` (a :class:`~psa_jax.eval.benchmark.Model`)
    and their captions: ``folder`` (metadata.jsonl of ``{"image"|"file_name", "caption"}`` rows,
    or Sage rows whose ``chosen`` image is used), or the toy world's ``benign`` split."""
    if folder is None:
        if model.world_dir is None:
            raise ValueError("benign fine-tuning data: pass a folder (no toy world to default to)")
        folder = os.path.join(model.world_dir, "benign")
    meta = os.path.join(folder, "metadata.jsonl")
    if not os.path.isfile(meta):
        raise FileNotFoundError(f"benign data folder {folder!r} has no metadata.jsonl")
    side = model.pipeline.latent_shape()[0] * model.pipeline.vae.config.downscale
    images, captions = [], []
    with open(meta, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            name = row.get("image") or row.get("file_name") or row.get("chosen")
            if not name or "caption" not in row:
                raise ValueError(
                    f"{meta} line {n}: needs an image (image/file_name/chosen) and a caption"
                )
            with Image.open(os.path.join(folder, name)) as im:
                im = im.convert("RGB")
                if im.size != (side, side):
                    im = _center_square(im).resize((side, side), Image.BICUBIC)
                images.append(np.asarray(im))
            captions.append(row["caption"])
    return np.stack(images), captions


def _center_square(im):
    w, h = im.size
    s = min(w, h)
    return im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))


def encode_benign(pipeline: Any, images: np.ndarray, captions: Sequence[str], chunk: int = 32):
    """``(moments, text_states, added)``: NHWC VAE moments (mean, logvar) and text states with
    the run's frozen encoders; ``added`` is SDXL's ``{"text_pooled": [N, P], "time_ids":
    [N, 6]}`` (encoder 2's pooled text and the image-size ids, as its sampler conditions on
    them), ``{}`` for one text encoder."""
    moments, states, pooled = [], [], []
    for lo in range(0, len(images), chunk):
        x = images[lo : lo + chunk].astype(np.float32) / 127.5 - 1.0
        post = pipeline.vae.encode(np.transpose(x, (0, 3, 1, 2)))
        mom = np.concatenate([np.asarray(post.mean), np.asarray(post.logvar)], axis=1)
        moments.append(np.transpose(mom, (0, 2, 3, 1)))
        text, pool = pipeline.encode_prompts(list(captions[lo : lo + chunk]))
        states.append(np.asarray(text))
        pooled.append(np.asarray(pool))
    added = {}
    if pipeline.text_encoder_2 is not None:
        added = {"text_pooled": np.concatenate(pooled),
                 "time_ids": np.asarray(pipeline.time_ids(len(images)))}  # fmt: skip
    return np.concatenate(moments), np.concatenate(states), added
