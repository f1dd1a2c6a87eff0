"""Byte-level snapshots of files, for tests that a failed command changed nothing on disk."""

from __future__ import annotations

import hashlib
import os


def tree_digest(root) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root`` (hidden ones too)."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def digests(*paths) -> dict[str, str]:
    """Path -> sha256 of every file at or under each of ``paths``."""
    out = {}
    for p in map(os.fspath, paths):
        if os.path.isdir(p):
            out.update({os.path.join(p, k): v for k, v in tree_digest(p).items()})
        else:
            with open(p, "rb") as f:
                out[p] = hashlib.sha256(f.read()).hexdigest()
    return out
