"""Loading ``configs/<name>.py`` files (ml_collections, ``get_config(arg)``) by path, and
reading the config a run saved.

Config files import their shared pieces as ``from configs import common``, so the folder that
holds ``configs/`` is put on ``sys.path`` while the file is loaded.

A run saves its resolved config with the ``schema_version`` it was written with. Reading an
older run's config never fills a missing key silently: each key a newer schema needs is either
set by a named migration rule (logged, with the value that reproduces how such runs behaved) or
the library's plain attribute access fails on it, naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Mapping

import ml_collections

from psa_jax.core.errors import PsaJaxError

log = logging.getLogger(__name__)

# v1: runs written before the version was recorded. v2: every key below is in the saved config.
# v3: train.unsafe_weights. v4: model.init_adapter. v5: train.dpo_balance. v6: model.attention.
# v7: train.user_proj_space.
SCHEMA_VERSION = 7


class ConfigFileError(PsaJaxError, FileNotFoundError):
    """A config file that is missing or defines no ``get_config``."""


class ConfigKeyError(PsaJaxError, KeyError):
    """An override naming a key the config does not have (a typo must not train the default)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ConfigOverrideError(PsaJaxError, ValueError):
    """An override that is not ``KEY=VALUE`` or whose value has the wrong type."""


class RunConfigError(PsaJaxError, ValueError):
    """A saved run config that this psa_jax cannot read (newer schema, malformed version)."""


@dataclasses.dataclass(frozen=True)
class Migration:
    """``apply`` brings a config dict to ``to_version`` in place and returns the keys it set."""

    name: str
    to_version: int
    why: str
    apply: Callable[[dict], list[str]]


def _fill(d: dict, path: str, value, done: list[str]) -> None:
    *parents, leaf = path.split(".")
    node = d
    for name in parents:
        node = node.setdefault(name, {})
    if leaf not in node:
        node[leaf] = value() if callable(value) else value
        done.append(f"{path}={node[leaf]!r}")


def _pre_schema(d: dict) -> list[str]:
    done: list[str] = []
    model = d.get("model", {})
    # Before model.init, a named base (folder or denoise run) meant pretrained weights.
    named = bool(model.get("pretrained") or model.get("base_workdir"))
    _fill(d, "model.init", "pretrained" if named else "random", done)
    for path, value in (
        ("model.dtype", "float32"),
        ("model.init_seed", 0),
        ("model.text_layer", "last"),
        ("model.remat_policy", "none"),
        ("model.pretrained", ""),
        ("model.base_workdir", ""),
        ("model.vae_path", ""),
        ("data.cache_dir", ""),
        ("data.users_csv", ""),
        ("data.eval_split", ""),
        ("data.resolution", None),
        ("data.toy", {}),
        ("data.flip", True),
        ("data.flip_pair", "joint"),  # pairs were flipped together before the choice existed
        ("data.caption_dropout", 0.0),
        ("data.num_threads", 2),
        ("train.denoise_target", "unet"),
        ("train.vae_kl_weight", 1e-6),
        ("train.dpo_chosen_weight", 0.0),  # PSAlign's loss: no chosen-image term
    ):
        _fill(d, path, value, done)
    if "adapter" in model:
        _fill(d, "model.adapter.proj_init", "torch", done)  # PyTorch's Linear init
    return done


def _unsafe_weights(d: dict) -> list[str]:
    done: list[str] = []
    _fill(d, "train.unsafe_weights", dict, done)  # every image weighed 1.0 before
    return done


def _init_adapter(d: dict) -> list[str]:
    done: list[str] = []
    _fill(d, "model.init_adapter", "", done)  # adapters started fresh before
    return done


def _dpo_balance(d: dict) -> list[str]:
    done: list[str] = []
    _fill(d, "train.dpo_balance", "none", done)  # every DPO pair weighed 1.0 before
    return done


def _attention(d: dict) -> list[str]:
    done: list[str] = []
    if "model" in d:
        _fill(d, "model.attention", "xla", done)  # XLA's attention was the only one
    return done


def _user_proj_space(d: dict) -> list[str]:
    done: list[str] = []
    if "train" in d:
        _fill(d, "train.user_proj_space", "raw", done)  # the optimizer saw the raw Linear
    return done


MIGRATIONS = (
    Migration(
        "pre-schema-defaults",
        2,
        "runs saved before schema_version existed lack keys added since; each gets the value "
        "that code used for a run without it",
        _pre_schema,
    ),
    Migration(
        "unsafe-weights",
        3,
        "train.unsafe_weights did not exist: every image's loss weighed the same",
        _unsafe_weights,
    ),
    Migration(
        "init-adapter",
        4,
        "model.init_adapter did not exist: every dpo run started from a fresh adapter",
        _init_adapter,
    ),
    Migration(
        "dpo-balance",
        5,
        "train.dpo_balance did not exist: every DPO pair's loss weighed the same",
        _dpo_balance,
    ),
    Migration(
        "attention",
        6,
        "model.attention did not exist: the UNet's attention was XLA's",
        _attention,
    ),
    Migration(
        "user-proj-space",
        7,
        "train.user_proj_space did not exist: the optimizer stepped the user projection's "
        "Linear as it is",
        _user_proj_space,
    ),
)


def migrate_run_config(saved: Mapping, where: str) -> dict:
    """A run's saved config dict brought to :data:`SCHEMA_VERSION` by :data:`MIGRATIONS`; what
    each rule set is logged. A config from a newer psa_jax is an error."""
    d = copy.deepcopy(dict(saved))
    version = d.get("schema_version", 1)  # absent: written before versions were recorded
    if not isinstance(version, int) or version < 1:
        raise RunConfigError(f"{where}: schema_version {version!r} is not a positive integer")
    if version > SCHEMA_VERSION:
        raise RunConfigError(
            f"{where}: config schema v{version} was written by a newer psa_jax "
            f"(this one reads up to v{SCHEMA_VERSION})"
        )
    for rule in MIGRATIONS:
        if version < rule.to_version:
            filled = rule.apply(d)
            if filled:
                set_keys = ", ".join(filled)
                log.warning("%s: config schema v%d -> v%d by rule %r (%s): set %s", where,
                            version, rule.to_version, rule.name, rule.why, set_keys)  # fmt: skip
            version = rule.to_version
    d["schema_version"] = version
    return d


def stamp_schema(config_dict: Mapping) -> dict:
    """The dict a run saves: its config plus the schema version this psa_jax writes."""
    return {**config_dict, "schema_version": SCHEMA_VERSION}


def load_config(path: str | os.PathLike, arg: str | None = None) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of the config file at ``path`` (``path:arg`` also works)."""
    path = os.fspath(path)
    if ":" in path and not os.path.exists(path):
        path, arg = path.split(":", 1)
    if not os.path.isfile(path):
        raise ConfigFileError(f"no config file at {path}")
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
        raise ConfigFileError(f"{path} defines no get_config(arg=None)")
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
            raise ConfigOverrideError(f"config override {item!r} is not KEY=VALUE")
        *parents, leaf = key.split(".")
        node = config
        for i, name in enumerate(parents):
            if name not in node:
                where = ".".join(parents[:i]) or "<config>"
                raise ConfigKeyError(
                    f"unknown config key {key!r}: {where} has {sorted(node.keys())}"
                )
            node = node[name]
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or leaf not in node:
            have = sorted(node.keys()) if hasattr(node, "keys") else type(node).__name__
            raise ConfigKeyError(
                f"unknown config key {key!r}: {'.'.join(parents) or '<config>'} has {have}"
            )
        value = parse_value(text)
        if isinstance(node[leaf], float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        try:
            node[leaf] = value
        except TypeError as err:  # ConfigDict keeps a field's type: an int field takes 5, not "x"
            raise ConfigOverrideError(f"config override {item!r}: {err}") from None
    return config
