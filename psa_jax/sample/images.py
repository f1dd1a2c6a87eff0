"""Writing samples: PNG files and a labelled grid (rows: users, columns: prompts)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw


def save_png(image: np.ndarray, path: str | os.PathLike) -> str:
    """Write a uint8 ``[H, W, 3]`` image; the parent folder is created."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(np.asarray(image, np.uint8)).save(path)
    return path


def load_png(path: str | os.PathLike) -> np.ndarray:
    """A PNG written by :func:`save_png` back as uint8 ``[H, W, 3]``."""
    with Image.open(os.fspath(path)) as im:
        return np.asarray(im.convert("RGB"), np.uint8)


def labelled_grid(
    images: np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    cell: int = 96,
    label_width: int = 120,
    label_height: int = 28,
) -> Image.Image:
    """uint8 ``[R, C, H, W, 3]`` -> one picture, each image resized to ``cell`` pixels (nearest:
    tiny samples stay crisp), row labels on the left and column labels on top (truncated)."""
    rows, cols = images.shape[:2]
    if (len(row_labels), len(col_labels)) != (rows, cols):
        raise ValueError(
            f"{len(row_labels)} row / {len(col_labels)} column labels for a {rows}x{cols} grid"
        )
    grid = Image.new("RGB", (label_width + cols * cell, label_height + rows * cell), "white")
    draw = ImageDraw.Draw(grid)
    for c, text in enumerate(col_labels):
        draw.text((label_width + c * cell + 2, 2), _fit(text, cell), fill="black")
    for r, text in enumerate(row_labels):
        draw.text((2, label_height + r * cell + cell // 2 - 6), _fit(text, label_width), "black")
        for c in range(cols):
            tile = Image.fromarray(images[r, c]).resize((cell, cell), Image.NEAREST)
            grid.paste(tile, (label_width + c * cell, label_height + r * cell))
    return grid


def _fit(text: str, width: int, char_px: int = 6) -> str:
    n = max(4, width // char_px)
    return text if len(text) <= n else text[: n - 3] + "..."
