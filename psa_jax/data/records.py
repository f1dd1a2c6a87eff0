"""Reading a dataset built by ``build-data`` (TFDS array_record): random access to its records,
its users, and image decoding. Read-only: nothing here builds or downloads."""

from __future__ import annotations

import io
import json
import logging
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from psa_jax.data.sage import REPORT, VERSION, fit_square

log = logging.getLogger(__name__)


def decode_image(png: bytes, resolution: int | None = None) -> np.ndarray:
    """PNG (or any PIL-readable) bytes -> float32 ``[H, W, 3]`` in [-1, 1] (diffusers' range)."""
    with Image.open(io.BytesIO(png)) as im:
        image = im.convert("RGB")
    if resolution is not None and image.size != (resolution, resolution):
        image = fit_square(image, resolution)
    return np.asarray(image, np.float32) / 127.5 - 1.0


def open_source(data_dir: str | os.PathLike, name: str, split: str) -> Any:
    """Random-access source over a built dataset; reads files only, never builds or downloads."""
    return tfds.data_source(name, split=split, data_dir=os.fspath(data_dir), download=False)


def split_user_ids(data_dir: str | os.PathLike, name: str, split: str, source: Any) -> list[str]:
    """Every distinct user id of ``split`` (sorted): from the build report, which lists them
    (builds since it does), else by reading all of ``source``'s records, never a sample: a
    user the list misses would be left out of what is computed from it."""
    path = os.path.join(os.fspath(data_dir), name, VERSION, REPORT)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            users = json.load(f).get("users", {})
        if split in users:
            return list(users[split])
    log.info("%s: the build report lists no users of split %r: reading all %d records",
             path, split, len(source))  # fmt: skip
    return sorted({text(source[i]["user_id"]) for i in range(len(source))})


def text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
