"""A sweep as one file: ``configs/sweeps/<name>.py`` defines ``get_sweep()`` returning

    {"config": "configs/tiny.py",            # path[:arg], as `psa-jax train --config`
     "overrides": {"train.steps": 200},      # every run (optional)
     "grid": {"train.beta": [1000.0, 5000.0], "optim.learning_rate": [1e-3, 2e-3]}}

(the product of the values, in key order) or ``"runs": [{...}, {...}]`` (a list of override
dicts), or both (grid runs first). Paths in it are relative to the folder holding ``configs/``.

:func:`plan` checks every run's overrides against the config (an unknown key or a value of the
wrong type is a :class:`SweepError` before anything runs) and names each run after what it
changes, so every run has its own workdir and its resolved config written beside it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from psa_jax.config import apply_overrides, load_config
from psa_jax.core.errors import PsaJaxError

SPEC_KEYS = ("config", "overrides", "grid", "runs")


class SweepError(PsaJaxError, ValueError):
    """A sweep file that cannot run: no ``get_sweep``, an unknown key, an empty grid, ..."""


@dataclasses.dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: its name (= its workdir under the sweep folder) and overrides."""

    name: str
    config: str  # absolute path[:arg]
    overrides: dict[str, Any]  # every override of this run, shared ones included
    swept: dict[str, Any]  # the keys this sweep varies, with this run's values

    def override_args(self) -> list[str]:
        """``KEY=VALUE`` items ``apply_overrides`` (and ``--config.KEY=VALUE``) read back as
        the same values."""
        return [f"{k}={format_value(v)}" for k, v in self.overrides.items()]


def format_value(value: Any) -> str:
    """A value as ``config.parse_value`` reads it back: a Python literal (strings that a
    literal would misread are quoted)."""
    if isinstance(value, str):
        from psa_jax.config import parse_value

        return value if parse_value(value) == value else repr(value)
    if isinstance(value, Mapping):
        return repr(dict(value))
    return repr(value)


def load_spec(path: str) -> dict[str, Any]:
    """``get_sweep()`` of a sweep file, its keys checked."""
    if not os.path.isfile(path):
        raise SweepError(f"no sweep file at {path}")
    spec_mod = importlib.util.spec_from_file_location("_psa_jax_sweep", path)
    module = importlib.util.module_from_spec(spec_mod)
    spec_mod.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise SweepError(f"{path} defines no get_sweep()")
    spec = dict(module.get_sweep())
    unknown = set(spec) - set(SPEC_KEYS)
    if unknown:
        raise SweepError(f"{path}: unknown keys {sorted(unknown)}; a sweep has {SPEC_KEYS}")
    if "config" not in spec:
        raise SweepError(f"{path}: get_sweep() names no 'config'")
    if not spec.get("grid") and not spec.get("runs"):
        raise SweepError(f"{path}: get_sweep() has neither a 'grid' nor 'runs'")
    for key, values in (spec.get("grid") or {}).items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise SweepError(f"{path}: grid[{key!r}] must be a non-empty list of values")
    return spec


def _slug(key: str, value: Any) -> str:
    text = f"{key.rsplit('.', 1)[-1]}={format_value(value)}"
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", text).strip("_")[:60]


def plan(path: str, root: str | None = None) -> list[SweepRun]:
    """The runs of the sweep file ``path``, each checked against its config.

    ``root``: where the spec's relative config path starts (default: the folder holding the
    sweep file's ``configs/`` folder, i.e. the sweep file's grandparent)."""
    spec = load_spec(path)
    root = root or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(path))))
    config_path, sep, arg = str(spec["config"]).partition(":")
    if not os.path.isabs(config_path):
        config_path = os.path.join(root, config_path)
    config = config_path + (sep + arg if sep else "")
    shared = dict(spec.get("overrides") or {})
    grid = dict(spec.get("grid") or {})
    variants = [dict(zip(grid, vals)) for vals in itertools.product(*grid.values())] if grid else []
    variants += [dict(r) for r in spec.get("runs") or []]
    swept_keys = list(dict.fromkeys(k for v in variants for k in v))
    runs, names = [], set()
    for i, var in enumerate(variants):
        name = f"{i:03d}-" + "-".join(_slug(k, var[k]) for k in swept_keys if k in var)
        if name in names:
            raise SweepError(f"{path}: two runs would share the name {name}")
        names.add(name)
        run = SweepRun(name.rstrip("-"), config, {**shared, **var}, var)
        resolve(run)  # an unknown key or a wrong type fails here, before any run starts
        runs.append(run)
    return runs


def resolve(run: SweepRun) -> Any:
    """The run's config with its overrides applied and its values checked as ``psa-jax train``
    checks them (a named error if one cannot apply or cannot train)."""
    from psa_jax.train.checks import check_config

    path, _, arg = run.config.partition(":")
    try:
        config = apply_overrides(load_config(path, arg or None), run.override_args())
        check_config(config)
        return config
    except PsaJaxError as err:
        raise SweepError(f"sweep run {run.name}: {err}") from err


def run_record(run: SweepRun) -> dict[str, Any]:
    """What ``sweep_run.json`` starts with: the run's overrides and resolved config."""
    return {
        "name": run.name,
        "config": run.config,
        "overrides": run.overrides,
        "swept": run.swept,
        "resolved_config": json.loads(resolve(run).to_json()),
    }
