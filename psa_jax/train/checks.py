"""Config values checked before a run builds anything: a batch of 0, a negative learning rate
or an unknown task fails in milliseconds naming the key, not after minutes of set-up."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from psa_jax.core.errors import PsaJaxError
from psa_jax.data.profiles import CATEGORIES
from psa_jax.models.layers import ATTENTION_IMPLS
from psa_jax.train.optim import OPTIMIZERS, SCHEDULES, make_optimizer
from psa_jax.train.tasks import TASKS


class ConfigValueError(PsaJaxError, ValueError):
    """A config value a run cannot train with (a batch of 0, a negative learning rate, an
    unknown task); the message names the key and the value."""


def _value(config: Any, path: str) -> Any:
    node = config
    for name in path.split("."):
        if not hasattr(node, "keys") or name not in node:
            raise ConfigValueError(f"config has no key {path}")
        node = node[name]
    return node


def _check_int(config: Any, path: str, low: int) -> int:
    v = _value(config, path)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
        raise ConfigValueError(f"{path}={v!r}: must be an integer >= {low}")
    return int(v)


def _check_number(config: Any, path: str, low: float, *, above: bool) -> float:
    v = _value(config, path)
    ok = isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
    ok = ok and math.isfinite(v) and (v > low if above else v >= low)
    if not ok:
        raise ConfigValueError(f"{path}={v!r}: must be a finite number {'>' if above else '>='} "
                               f"{low}")  # fmt: skip
    return float(v)


def check_config(config: Any) -> None:
    """Raise :class:`ConfigValueError` naming the first key whose value cannot train: the task,
    the loop's counts (``train.steps``, ``batch_size``, ``accum_steps``, ``checkpoint_every``
    >= 1; ``eval_every`` >= 0; ``keep_checkpoints`` None or >= 1; the eval sizes >= 1 when it
    evaluates), the loss weights, ``model.init_adapter`` (an existing file or folder, task
    ``dpo`` only), ``model.attention``, and the ``optim`` section (``learning_rate`` > 0, known
    optimizer and schedule, a schedule that can be built). Reads the config only: milliseconds,
    before any model, data or folder."""
    task = _value(config, "task")
    if task not in TASKS:
        raise ConfigValueError(f"task={task!r}: unknown; tasks: {list(TASKS)}")
    for key in ("steps", "batch_size", "accum_steps", "checkpoint_every"):
        _check_int(config, f"train.{key}", 1)
    if _check_int(config, "train.eval_every", 0) and config.data.get("eval_split"):
        for key in ("eval_batches", "eval_batch_size", "eval_draws"):
            _check_int(config, f"train.{key}", 1)
    if _value(config, "train.keep_checkpoints") is not None:
        _check_int(config, "train.keep_checkpoints", 1)
    if task == "dpo":
        _check_number(config, "train.beta", 0.0, above=True)
        _check_number(config, "train.dpo_chosen_weight", 0.0, above=False)
    if task == "denoise":
        _check_number(config, "train.snr_gamma", 0.0, above=False)
    if task == "vae":
        _check_number(config, "train.vae_kl_weight", 0.0, above=False)
    _check_unsafe_weights(config, task)
    _check_dpo_balance(config, task)
    _check_user_proj_space(config, task)
    _check_init_adapter(config, task)
    if _value(config, "model.attention") not in ATTENTION_IMPLS:
        raise ConfigValueError(f"model.attention={config.model.attention!r}: one of "
                               f"{ATTENTION_IMPLS}")  # fmt: skip
    _check_number(config, "optim.learning_rate", 0.0, above=True)
    for key, known in (("name", OPTIMIZERS), ("schedule", SCHEDULES)):
        if _value(config, f"optim.{key}") not in known:
            raise ConfigValueError(f"optim.{key}={config.optim[key]!r}: unknown; known: "
                                   f"{sorted(known)}")  # fmt: skip
    _check_int(config, "optim.warmup_steps", 0)
    try:  # the rest of the optimizer's own checks (cosine total_steps, unknown keys, ...)
        make_optimizer(config.optim)
    except (ValueError, TypeError) as e:
        raise ConfigValueError(f"optim: {e}") from e


def _check_unsafe_weights(config: Any, task: str) -> None:
    """``train.unsafe_weights``: known category names to finite weights >= 0, only for
    ``task=denoise`` (no other loss reads them) on Sage-mini (whose pairs' unsafe image follows
    from the user's bans)."""
    weights = _value(config, "train.unsafe_weights")
    if not hasattr(weights, "items"):
        raise ConfigValueError(f"train.unsafe_weights={weights!r}: must be a mapping "
                               "{category: weight}")  # fmt: skip
    if not weights:
        return
    if task != "denoise":
        raise ConfigValueError(f"train.unsafe_weights is set but task={task!r} does not read "
                               "it (only task=denoise weighs its images)")  # fmt: skip
    for name in weights:
        if name not in CATEGORIES:
            raise ConfigValueError(f"train.unsafe_weights: unknown category {name!r}; "
                                   f"categories: {list(CATEGORIES)}")  # fmt: skip
        _check_number(config, f"train.unsafe_weights.{name}", 0.0, above=False)
    if config.data.source != "toy":
        raise ConfigValueError(
            "train.unsafe_weights needs to know which image of each pair is the unsafe one: "
            "Sage-mini's pairs say it through their user's bans (data.source='toy'); real SAGE "
            "records do not (their safe-caption records choose the safe image for every user)"
        )


DPO_BALANCES = ("none", "category")
USER_PROJ_SPACES = ("raw", "standardized")


def _check_user_proj_space(config: Any, task: str) -> None:
    """``train.user_proj_space``: ``"raw"`` or (task ``dpo``, which trains the projection)
    ``"standardized"``."""
    space = _value(config, "train.user_proj_space")
    if space not in USER_PROJ_SPACES:
        raise ConfigValueError(f"train.user_proj_space={space!r}: one of {USER_PROJ_SPACES}")
    if space != "raw" and task != "dpo":
        raise ConfigValueError(f"train.user_proj_space={space!r} but task={task!r} trains no "
                               "user projection (only task=dpo does)")  # fmt: skip


def _check_dpo_balance(config: Any, task: str) -> None:
    """``train.dpo_balance``: ``"none"`` or (task ``dpo`` on Sage-mini, whose pairs' chosen
    image follows from the user's bans) ``"category"``."""
    balance = _value(config, "train.dpo_balance")
    if balance not in DPO_BALANCES:
        raise ConfigValueError(f"train.dpo_balance={balance!r}: one of {DPO_BALANCES}")
    if balance == "none":
        return
    if task != "dpo":
        raise ConfigValueError(f"train.dpo_balance={balance!r} but task={task!r} does not read "
                               "it (only task=dpo weighs its pairs)")  # fmt: skip
    if config.data.source != "toy":
        raise ConfigValueError(
            "train.dpo_balance='category' needs to know which image of each pair is the safe "
            "one: Sage-mini's pairs say it through their user's bans (data.source='toy'); real "
            "SAGE records do not"
        )


def _check_init_adapter(config: Any, task: str) -> None:
    """``model.init_adapter``: ``""``, or (task ``dpo`` only) an adapter file or a folder (one
    adapter file, or a dpo run) that exists; its contents are read when the task is built."""
    path = _value(config, "model.init_adapter")
    if not isinstance(path, str):
        raise ConfigValueError(f"model.init_adapter={path!r}: must be a path or ''")
    if not path:
        return
    if task != "dpo":
        raise ConfigValueError(f"model.init_adapter is set but task={task!r} does not read it "
                               "(only task=dpo starts from an adapter)")  # fmt: skip
    if not os.path.exists(os.path.expanduser(path)):
        raise ConfigValueError(f"model.init_adapter={path!r}: no such file or folder (an "
                               "adapter file, or a dpo run folder)")  # fmt: skip
