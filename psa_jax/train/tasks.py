"""The task a config names (``dpo``, ``denoise``, ``vae``) and its trees: what is trained
(host values and logical-axis boxes) and what stays frozen."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax.core import meta

from psa_jax.data import prepare, profiles
from psa_jax.data.loader import lookup_embeddings
from psa_jax.models import loading
from psa_jax.models.adapter import PROJ_INITS, population_stats, standardize_projection
from psa_jax.models.convert import WeightFileError, WeightMismatchError
from psa_jax.models.psa_unet import _adapter_init, abstract_variables, read_adapter
from psa_jax.train import lora as lora_lib
from psa_jax.train.optim import in_standardized_coordinates
from psa_jax.train.step import (
    DenoiseTask,
    DPOTask,
    VAETask,
    balanced_pair_weights,
    unsafe_loss_weights,
)

TASKS = ("dpo", "denoise", "vae")


@dataclasses.dataclass
class Setup:
    """What ``train`` builds before its loop (tests use it to drive steps directly)."""

    task: Any
    trainable: Any  # host values of the trainable tree at step 0
    trainable_boxes: Any  # the same tree with logical-axis boxes (for shardings)
    frozen: Any  # host values of the frozen tree
    frozen_boxes: Any


def build_task(
    config: Any, models: loading.BaseModels, user_embeds: Any = None, *, resuming: bool = False
) -> Setup:
    """The task named by ``config.task`` and its trainable / frozen trees (host arrays).

    ``user_embeds`` ``[N, D]``: the training users' profile embeddings, needed by a DPO run
    whose ``model.adapter.proj_init`` is ``"standardized"`` (see ``standardize_projection``).
    ``model.init_adapter`` (task ``dpo``, not ``""``): the adapter starts as that file or run
    holds it (:func:`start_adapter`), projection included; ``proj_init`` is then not applied.
    ``resuming``: a checkpoint replaces the initial trainable values, so that initialisation
    (and its embeddings, and ``init_adapter``'s file) is skipped; shapes and boxes are unchanged.
    """
    train = config.train
    module, params = models.module, models.unet_params
    if config.task == "dpo":
        task = DPOTask(module, models.schedule, float(train.beta), models.scaling_factor,
                       float(train.dpo_chosen_weight), models.shift_factor)  # fmt: skip
        frozen_boxes = abstract_variables(module)["params"]
        if config.model.init_adapter and not resuming:
            boxed = abstract_variables(module)["adapter"]
            return Setup(task, start_adapter(config, module), boxed, params, frozen_boxes)
        rng = jax.random.key(int(config.model.init_seed) + 3)
        boxed = _adapter_init(module)(params, rng)
        adapter = meta.unbox(boxed)
        if _proj_init(config) == "standardized" and not resuming:
            if user_embeds is None:
                raise ValueError("proj_init='standardized' needs the training users' embeddings")
            proj = standardize_projection(adapter["user_proj"], user_embeds)
            adapter = {**adapter, "user_proj": jax.tree.map(np.asarray, proj)}
        return Setup(task, adapter, boxed, params, frozen_boxes)
    if config.task == "denoise":
        target = train.denoise_target
        lcfg = train.lora
        task = DenoiseTask(
            module,
            models.schedule,
            target,
            lora_lib.lora_scale(lcfg.rank, lcfg.alpha),
            train.image_key,
            models.scaling_factor,
            float(train.snr_gamma),
            models.shift_factor,
        )
        boxes = abstract_variables(module)["params"]
        if target == "unet":
            return Setup(task, params, boxes, {}, {})
        rng = jax.random.key(int(config.model.init_seed) + 4)
        lora = lora_lib.init_lora(params, lcfg.rank, tuple(lcfg.targets), rng=rng)
        return Setup(task, lora, lora, params, boxes)
    if config.task == "vae":
        if models.vae is None:
            raise ValueError("task 'vae' needs a VAE in the config (config.model.vae)")
        task = VAETask(models.vae.module, float(train.vae_kl_weight))
        boxes = jax.eval_shape(lambda p: p, models.vae.params)  # replicated: a tiny model
        return Setup(task, models.vae.params, boxes, {}, {})
    raise ValueError(f"unknown task {config.task!r}; tasks: {TASKS}")


def start_adapter(config: Any, module: Any) -> dict[str, Any]:
    """The adapter ``model.init_adapter`` names (a PSAlign or diffusers IP-Adapter file, a
    folder with one, or a ``dpo`` run folder: what ``PSAUNet.load_adapter`` reads), as host
    float32 arrays in ``module``'s adapter tree.

    Raises:
      ModelInitError: the file cannot be read, or its shapes do not fit the config's adapter
        (``model.adapter.user_embed_dim``, ``num_user_tokens``, the UNet's cross-attention).
    """
    path = os.path.expanduser(config.model.init_adapter)
    try:
        return read_adapter(path, module)
    except WeightFileError as e:
        raise loading.ModelInitError(f"model.init_adapter={path!r}: {e}") from e
    except WeightMismatchError as e:
        adapter = config.model.adapter
        detail = "; ".join(line.strip() for line in str(e).splitlines())
        raise loading.ModelInitError(
            f"model.init_adapter={path!r} does not fit the config's adapter "
            f"(model.adapter.user_embed_dim={adapter.user_embed_dim}, "
            f"num_user_tokens={adapter.num_user_tokens}, cross_attention_dim="
            f"{module.config.cross_attention_dim}): {detail}"
        ) from e


def _proj_init(config: Any) -> str:
    """``model.adapter.proj_init`` checked against PROJ_INITS."""
    proj_init = config.model.adapter.proj_init
    if proj_init not in PROJ_INITS:
        raise ValueError(f"model.adapter.proj_init {proj_init!r} unknown; one of {PROJ_INITS}")
    return proj_init


def training_user_embeds(
    config: Any, splits: prepare.Splits, loader: Any, *, resuming: bool = False
) -> np.ndarray | None:
    """``[N, D]`` embeddings of the users in ``loader``'s split when something reads them: the
    projection's initialisation (``proj_init="standardized"``, no ``model.init_adapter``, not
    ``resuming``) or the optimizer's coordinates (``train.user_proj_space="standardized"``,
    resuming too: the same users give the same statistics, so a resumed run steps as the
    uninterrupted one). Else None. Only training users: a held-out user shapes neither."""
    if config.task != "dpo":
        return None
    init = not resuming and not config.model.init_adapter and _proj_init(config) == "standardized"
    if not init and config.train.user_proj_space != "standardized":
        return None
    return lookup_embeddings(loader.user_ids(), splits.embeddings)


def user_proj_optimizer(
    config: Any, optimizer: optax.GradientTransformation, user_embeds: Any
) -> optax.GradientTransformation:
    """``optimizer`` as ``train.user_proj_space`` says: as it is (``"raw"``) or stepping the
    user projection in the training users' standardized coordinates (``"standardized"``,
    :func:`~psa_jax.train.optim.in_standardized_coordinates`)."""
    if config.task != "dpo" or config.train.user_proj_space != "standardized":
        return optimizer
    if user_embeds is None:
        raise ValueError("train.user_proj_space='standardized' needs the training users' "
                         "embeddings")  # fmt: skip
    mean, std = population_stats(user_embeds, int(config.model.adapter.user_embed_dim))
    return in_standardized_coordinates(optimizer, mean, std)


def safe_shares(bans: Mapping[str, frozenset[str]], user_ids: Sequence[str]) -> dict[str, float]:
    """Per category, the share of a Sage-mini training split's pairs whose chosen image is the
    safe one: the share of its users who ban the category (Sage-mini pairs every user with
    the same captions, so each user holds the same number of pairs per category)."""
    if not user_ids:
        raise ValueError("the training split has no users")
    return {c: float(np.mean([c in bans[str(u)] for u in user_ids])) for c in profiles.CATEGORIES}


def pair_weigher(
    config: Any, splits: prepare.Splits, user_ids: Callable[[], Sequence[str]]
) -> Callable[[dict], np.ndarray] | None:
    """``batch -> loss_weight`` from the users' bans, or None when the config weighs nothing:
    ``train.unsafe_weights`` (task denoise, ``[B, K]``: :func:`unsafe_loss_weights`) or
    ``train.dpo_balance="category"`` (task dpo, ``[B]``: :func:`balanced_pair_weights` over the
    training split's users, ``user_ids()``, read only then)."""
    weights = dict(config.train.unsafe_weights)
    balance = config.task == "dpo" and config.train.dpo_balance != "none"
    if not weights and not balance:
        return None
    if not splits.users_csv:
        what = "train.unsafe_weights" if weights else "train.dpo_balance"
        raise ValueError(f"{what} needs the users' banned categories: set data.users_csv")
    bans = profiles.bans_by_user(profiles.read_users(splits.users_csv))
    if balance:
        shares = safe_shares(bans, user_ids())

        def balanced(batch: dict) -> np.ndarray:
            chosen_safe = ~profiles.chosen_is_unsafe(bans, batch["user_id"], batch["category"])
            return balanced_pair_weights(chosen_safe, batch["category"], shares)

        return balanced
    image_key = config.train.image_key

    def weigh(batch: dict) -> np.ndarray:
        unsafe = profiles.chosen_is_unsafe(bans, batch["user_id"], batch["category"])
        return unsafe_loss_weights(unsafe, batch["category"], weights, image_key)

    return weigh
