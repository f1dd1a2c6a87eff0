"""Stage caching: each stage's folder holds ``done.json`` (its record and the key of the settings
that made it), so a killed demo resumes and a stage of other settings is redone."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from typing import Any

from psa_jax.demo.settings import DemoSettings

DONE = "done.json"


def _done(folder: str) -> dict[str, Any] | None:
    path = os.path.join(folder, DONE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _mark_done(folder: str, record: Mapping[str, Any]) -> dict[str, Any]:
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, DONE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(dict(record), f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, os.path.join(folder, DONE))
    return dict(record)


def cached(
    folder: str,
    key: Mapping[str, Any],
    make: Callable[[], Mapping[str, Any]],
    log,
    name: str | None = None,
) -> dict[str, Any]:
    """``make()``'s record, or the one a previous run of the same ``key`` left in ``folder``.
    A record of another key (other settings) is redone, never silently reused. ``name``: the
    stage's name in the log (default: the folder's)."""
    key = json.loads(json.dumps(dict(key), default=str))
    prev = _done(folder)
    name = name or os.path.basename(folder)
    if prev is not None and prev.get("key") == key:
        log(f"[{name}] done before: reusing {folder}")
        return prev
    if prev is not None:
        log(f"[{name}] settings changed since the last run: redoing it")
    t0 = time.time()
    record = dict(make())
    return _mark_done(folder, {**record, "key": key, "seconds": round(time.time() - t0, 1)})


def eval_key(settings: DemoSettings) -> dict[str, Any]:
    """The settings every image-drawing stage's result depends on."""
    return {
        "draws": settings.draws,
        "users_per_group": settings.users_per_group,
        "sampler": dict(settings.sampler),
        "seed": settings.seed,
    }


def adapter_key(model: Any) -> str:
    from psa_jax.eval.benchmark import adapter_digest

    return adapter_digest(model.pipeline.adapter)


def replace_dir(src: str, dst: str) -> None:
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(src, dst)
