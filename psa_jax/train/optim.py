"""Optimizer and learning-rate schedule from a config section, matching PSAlign's torch recipe.

PSAlign trains SD1.5 adapters with ``torch.optim.AdamW`` and SDXL adapters with
``transformers.Adafactor(scale_parameter=False, relative_step=False)``, clipping the global
gradient norm and stepping a diffusers LambdaLR schedule after each optimizer step. The
transformations here reproduce those updates (tests compare against torch/transformers), so
hyperparameters carry over unchanged. Gradient accumulation is the trainer's job (a scan over
micro-batches), not ``optax.MultiSteps``'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import ml_collections
import optax

from psa_jax.models.adapter import fold_standardization

# Re-exported so the trainer logs the same norm that clipping uses.
global_norm = optax.tree.norm

OPTIM_DEFAULTS: dict[str, Any] = {
    "name": "adamw",  # see OPTIMIZERS
    "learning_rate": 1e-5,
    "schedule": "constant_with_warmup",  # see SCHEDULES
    "warmup_steps": 0,  # optimizer steps of linear warmup from 0
    "total_steps": 0,  # cosine only: where the decay reaches learning_rate * end_lr_factor
    "end_lr_factor": 0.0,  # cosine only
    "b1": 0.9,  # adamw only (Adafactor runs without momentum, as in PSAlign)
    "b2": 0.999,  # adamw only
    "eps": 1e-8,  # adamw only
    "weight_decay": 1e-2,  # decoupled, scaled by the learning rate (torch AdamW semantics)
    "grad_clip_norm": 1.0,  # <= 0 or None: no clipping
}


def optim_config(**overrides) -> ml_collections.ConfigDict:
    """The ``optim`` config section; unknown keys raise.

    The optimizer constants are PSAlign ``train.py``'s defaults (AdamW 0.9/0.999/1e-8, weight
    decay 1e-2, ``max_grad_norm`` 1.0, ``constant_with_warmup``). The lr and warmup are not: its
    SD1.5 launcher uses lr 5e-6 with 500 warmup steps over 5000 steps, which a full-size config
    sets explicitly, while these defaults keep tiny runs learning from step 0.
    """
    unknown = sorted(set(overrides) - set(OPTIM_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown optim keys {unknown}; known: {sorted(OPTIM_DEFAULTS)}")
    return ml_collections.ConfigDict({**OPTIM_DEFAULTS, **overrides})


def _settings(cfg: Mapping) -> dict[str, Any]:
    """Defaults filled in and values checked, so a typo fails at start-up, not at step 5000."""
    given = {key: cfg[key] for key in cfg.keys()}
    unknown = sorted(set(given) - set(OPTIM_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown optim keys {unknown}; known: {sorted(OPTIM_DEFAULTS)}")
    s = {**OPTIM_DEFAULTS, **given}
    if s["learning_rate"] < 0:
        raise ValueError(f"learning_rate must be >= 0, got {s['learning_rate']}")
    if s["warmup_steps"] < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {s['warmup_steps']}")
    if not 0.0 <= s["end_lr_factor"] <= 1.0:
        raise ValueError(f"end_lr_factor must be in [0, 1], got {s['end_lr_factor']}")
    return s


def _constant(s: Mapping) -> optax.Schedule:
    lr = float(s["learning_rate"])
    return lambda count: jnp.full((), lr, jnp.float32)


def _constant_with_warmup(s: Mapping) -> optax.Schedule:
    # diffusers.get_constant_schedule_with_warmup: lr * step / warmup, so the first update
    # (count 0) has lr 0 when warmup_steps > 0, as in the torch loop.
    lr, warmup = float(s["learning_rate"]), int(s["warmup_steps"])

    def schedule(count):
        step = jnp.asarray(count, jnp.float32)
        return lr * jnp.where(step < warmup, step / max(1, warmup), 1.0)

    return schedule


def _cosine(s: Mapping) -> optax.Schedule:
    # diffusers.get_cosine_schedule_with_warmup (num_cycles 0.5) with an optional floor. Past
    # total_steps it holds the end lr, where diffusers' cosine would climb back up.
    lr, warmup, total = float(s["learning_rate"]), int(s["warmup_steps"]), int(s["total_steps"])
    if total <= warmup:
        raise ValueError(f"cosine needs total_steps > warmup_steps, got {total} <= {warmup}")
    end = float(s["end_lr_factor"])

    def schedule(count):
        step = jnp.asarray(count, jnp.float32)
        ramp = step / max(1, warmup)
        remaining = jnp.clip((total - step) / (total - warmup), 0.0, 1.0)
        # 0.5 (1 + cos(pi progress)) == sin(pi remaining / 2)^2: the same curve without float32
        # cancellation near the end, where the lr is small.
        decay = end + (1.0 - end) * jnp.sin(0.5 * math.pi * remaining) ** 2
        return lr * jnp.where(step < warmup, ramp, decay)

    return schedule


SCHEDULES: dict[str, Callable[[Mapping], optax.Schedule]] = {
    "constant": _constant,
    "constant_with_warmup": _constant_with_warmup,
    "cosine": _cosine,
}


def make_lr_schedule(cfg: Mapping) -> optax.Schedule:
    """Learning rate as a function of the optimizer step count (0 for the first update)."""
    s = _settings(cfg)
    if s["schedule"] not in SCHEDULES:
        raise ValueError(f"unknown schedule {s['schedule']!r}; choose from {sorted(SCHEDULES)}")
    return SCHEDULES[s["schedule"]](s)


def _adamw(s: Mapping, schedule: optax.Schedule, mask) -> optax.GradientTransformation:
    return optax.adamw(
        schedule,
        b1=s["b1"],
        b2=s["b2"],
        eps=s["eps"],
        weight_decay=s["weight_decay"],
        mask=mask,
    )


def _adafactor(s: Mapping, schedule: optax.Schedule, mask) -> optax.GradientTransformation:
    # transformers.Adafactor(lr, weight_decay, clip_threshold=1.0, scale_parameter=False,
    # relative_step=False, beta1=None) as PSAlign uses it. optax.adafactor does not fit: it adds
    # weight decay after the lr scaling (p -= wd p), transformers before (p -= lr wd p).
    # Difference left in: optax factors the two largest dims only when both are >= 128,
    # transformers the last two dims of any >= 2-D tensor (a cheaper, rougher estimate).
    return optax.chain(
        optax.scale_by_factored_rms(decay_rate=0.8, epsilon=1e-30),
        optax.clip_by_block_rms(1.0),
        optax.add_decayed_weights(s["weight_decay"], mask=mask),
        optax.scale_by_learning_rate(schedule),
    )


OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adamw": _adamw,
    "adafactor": _adafactor,
}


def make_optimizer(cfg: Mapping, *, weight_decay_mask=None) -> optax.GradientTransformation:
    """``chain(clip_by_global_norm, adamw | adafactor)`` with the configured schedule.

    ``weight_decay_mask`` (a pytree of bools or a function of the params) limits decay to some
    leaves; PSAlign decays every trainable parameter, which is the default here.
    """
    s = _settings(cfg)
    if s["name"] not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {s['name']!r}; choose from {sorted(OPTIMIZERS)}")
    tx = OPTIMIZERS[s["name"]](s, make_lr_schedule(s), weight_decay_mask)
    clip = s["grad_clip_norm"]
    if clip is None or clip <= 0:
        return tx
    # torch's clip_grad_norm_ divides by (norm + 1e-6); optax by norm: a 1e-6 relative gap.
    return optax.chain(optax.clip_by_global_norm(float(clip)), tx)


def in_standardized_coordinates(
    inner: optax.GradientTransformation, mean: Any, std: Any, key: str = "user_proj"
) -> optax.GradientTransformation:
    """``inner`` run on ``params[key]``'s Linear (``kernel [D, F]``, ``bias [F]``) as if it
    took standardized inputs ``z = (e - mean) / std``; the rest of ``params`` as it is.

    The Linear stays an ordinary Linear on raw embeddings (PSAlign and IP-Adapter files
    unchanged): with ``kernel = V / std[:, None]`` and ``bias = c - (mean / std) @ V`` it
    computes ``z @ V + c``, and ``inner`` sees the gradients of ``V`` and ``c`` (and their
    values, for weight decay), whose updates are mapped back. Why: profile embeddings of one
    encoder are nearly parallel (MiniLM over the toy world's users: mean cosine 0.98), so the
    gradient of the raw kernel is mostly the users' common direction, and Adam's per-weight
    step turns it into updates that move every user alike; in ``z`` coordinates the common part
    is the bias's alone. ``init`` needs only shapes (``V`` has the kernel's), so the state is
    the one ``inner`` makes for ``params``, checkpoints included."""
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
    shift = mean / std

    def replace(tree: Any, kernel: Any, bias: Any) -> Any:
        return {**tree, key: {**tree[key], "kernel": kernel, "bias": bias}}

    def grads_to_z(g: Any) -> Any:
        gk, gb = g[key]["kernel"], g[key]["bias"]
        return replace(g, gk / std[:, None] - shift[:, None] * gb[None, :], gb)

    def params_to_z(p: Any) -> Any:
        k, b = p[key]["kernel"], p[key]["bias"]
        return replace(p, k * std[:, None], b + mean @ k)

    def updates_from_z(u: Any) -> Any:
        return replace(u, *fold_standardization(u[key]["kernel"], u[key]["bias"], mean, std))

    def update(grads: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        z_params = None if params is None else params_to_z(params)
        updates, state = inner.update(grads_to_z(grads), state, z_params)
        return updates_from_z(updates), state

    return optax.GradientTransformation(inner.init, update)
