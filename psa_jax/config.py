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


def parse_value(text: str):
    """A command-line value: a Python literal (``5``, ``1e-4``, ``True``, ``[1, 2]``, ``None``)
    where it parses as one, else the string itself (``adamw``, ``/tmp/x``)."""
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: list[str]
) -> ml_collections.ConfigDict:
    """Apply ``KEY=VALUE`` pairs (``train.steps=10``, ``optim.learning_rate=1e-4``) in order.

    An unknown key is an error naming the keys that exist at that level: a typo must not train
    with the default. Types are checked by ``ConfigDict`` (an int field takes ``5``, not ``"x"``).
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"config override {item!r} is not KEY=VALUE")
        *parents, leaf = key.split(".")
        node = config
        for i, name in enumerate(parents):
            if name not in node:
                where = ".".join(parents[:i]) or "<config>"
                raise KeyError(f"unknown config key {key!r}: {where} has {sorted(node.keys())}")
            node = node[name]
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or leaf not in node:
            have = sorted(node.keys()) if hasattr(node, "keys") else type(node).__name__
            raise KeyError(
                f"unknown config key {key!r}: {'.'.join(parents) or '<config>'} has {have}"
            )
        value = parse_value(text)
        if isinstance(node[leaf], float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        node[leaf] = value
    return config
