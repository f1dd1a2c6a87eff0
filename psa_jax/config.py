"""Loading ``configs/<name>.py`` files (ml_collections, ``get_config(arg)``) by path.

Config files import their shared pieces as ``from configs import common``, so the folder that
holds ``configs/`` is put on ``sys.path`` while the file is loaded.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import ml_collections


def load_config(path: str | os.PathLike, arg: str | None = None) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of the config file at ``path`` (``path:arg`` also works)."""
    path = os.fspath(path)
    if ":" in path and not os.path.exists(path):
        path, arg = path.split(":", 1)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config file at {path}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    added = root not in sys.path
    if added:
        sys.path.insert(0, root)
    try:
        name = f"_psa_jax_config_{os.path.splitext(os.path.basename(path))[0]}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if added:
            sys.path.remove(root)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"{path} defines no get_config(arg=None)")
    return module.get_config(arg) if arg is not None else module.get_config()
