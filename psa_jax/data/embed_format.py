"""The profile-embeddings folder's format, below both of its users: the ``npy:`` import of
:mod:`psa_jax.data.encoders` checks PSAlign's files with it and :mod:`psa_jax.data.embed` writes
and loads ours, so neither has to import the other.

A folder holds PSAlign's layout, ``<7-digit user id>.npy`` (float32, shape ``(D,)``), next to a
``manifest.json`` that says which encoder made them (name, dim, a sha256 of its weight and
tokenizer files) so that a training run can tell which embeddings it used.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from psa_jax.core.errors import PsaJaxError

MANIFEST = "manifest.json"
FORMAT = "psa_jax.profile_embeddings/1"


class EmbeddingError(PsaJaxError, ValueError):
    """Embeddings that cannot be made or read; the message names the user, file or encoder."""


class MissingEmbeddingError(EmbeddingError):
    """Users without an embedding file. PSAlign substitutes zeros here; we stop instead."""

    def __init__(self, user_ids: Sequence[str], where: str):
        self.user_ids = list(user_ids)
        shown = ", ".join(self.user_ids[:20]) + (" ..." if len(self.user_ids) > 20 else "")
        super().__init__(f"no embedding for {len(self.user_ids)} user(s) in {where}: {shown}")


class EmbeddingFileError(EmbeddingError):
    """An ``.npy`` file of the wrong dtype, shape or content."""


def read_vector(path: str, dim: int | None, dim_from: str = "") -> np.ndarray:
    """One ``(dim,)`` float32 finite vector; ``dim_from`` says where ``dim`` came from."""
    try:
        vec = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise EmbeddingFileError(f"{path}: not a readable .npy file ({err})") from None
    if vec.dtype != np.float32 or vec.ndim != 1 or (dim is not None and vec.shape[0] != dim):
        want = f"({dim},)" if dim else "(D,)"
        why = f" ({dim_from})" if dim and dim_from else ""
        raise EmbeddingFileError(f"{path}: {vec.dtype} {vec.shape}, expected float32 {want}{why}")
    if not np.isfinite(vec).all():
        raise EmbeddingFileError(f"{path}: holds NaN or inf")
    return vec


def read_manifest(directory: str) -> dict:
    """The ``manifest.json`` of an embeddings folder, checked for format and required keys."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as err:
        raise EmbeddingError(f"{path}: not a readable manifest ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise EmbeddingError(f"{path}: format {got!r}, expected {FORMAT!r}")
    missing = [k for k in ("encoder", "dim", "checksum", "user_ids") if k not in manifest]
    if missing:
        raise EmbeddingError(f"{path}: missing keys {missing}")
    if not isinstance(manifest["dim"], int) or manifest["dim"] <= 0:
        raise EmbeddingError(f"{path}: dim {manifest['dim']!r} is not a positive integer")
    return manifest
