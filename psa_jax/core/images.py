"""Image conversion shared by the data world and the samplers."""

from __future__ import annotations

import numpy as np


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] (clipped) -> uint8, rounded to nearest."""
    return np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
