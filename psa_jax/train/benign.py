"""Benign fine-tuning profiles (SPQR, arXiv 2511.19558): what a downstream user does to a
safety-aligned model on harmless data, so that evaluation can ask whether safety survives.

Each profile names exactly which base-UNet parameters train; the PSA adapter is never among
them (it lives in its own ``adapter`` collection and is left in place, bit-identical):

* ``lite``: a real LoRA -- rank 8, alpha 16, dropout 0.1 on the LoRA input (PEFT's
  ``lora_dropout``), on ``to_q/to_k/to_v/to_out.0`` of every self- and cross-attention. Only the
  LoRA factors train (the authors' own trainer silently fine-tunes the whole UNet for it).
* ``moderate``: the cross-attention ``attn2`` ``to_k``, ``to_v`` and ``to_out.0`` parameters
  (kernels and the ``to_out.0`` bias: the modules' weights as PyTorch ``requires_grad`` sees them).
* ``standard``: the full UNet.

All use AdamW lr 1e-4, weight decay 1e-2, batch 16, gradient clip 1.0, seed 42 (SPQR's
recipe); steps and data come from the config. The loss is the plain denoising loss on the
benign images' VAE latents and captions, with the adapter off (``user_embeds=None``): the
fine-tuner trains the base model and knows nothing of users.

Pure functions of arrays: the caller encodes images and captions (``psa_jax.eval`` does, with
the run's frozen encoders) and gets back the new UNet params (LoRA merged) and the trainable tree.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from psa_jax.core import diffusion as noise_lib
from psa_jax.core.errors import PsaJaxError
from psa_jax.models import convert
from psa_jax.train import lora as lora_lib
from psa_jax.train.losses import denoise_loss
from psa_jax.train.optim import make_optimizer, optim_config
from psa_jax.train.step import _added_cond, _noised, clean_latents, init_state, make_train_step


@dataclasses.dataclass(frozen=True)
class Profile:
    """Which parameters a benign fine-tune trains. ``kind``: "lora", "modules" or "full"."""

    name: str
    kind: str
    rank: int = 0
    alpha: float = 0.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ()  # Dense names (lora) or "<attn>.<dense>" suffixes (modules)
    attn: tuple[str, ...] = ()  # lora only: which attention modules


PROFILES: dict[str, Profile] = {
    "lite": Profile(
        "lite", "lora", 8, 16.0, 0.1, ("to_q", "to_k", "to_v", "to_out.0"), ("attn1", "attn2")
    ),
    "moderate": Profile(
        "moderate", "modules", targets=("attn2.to_k", "attn2.to_v", "attn2.to_out.0")
    ),
    "standard": Profile("standard", "full"),
}


class UnknownProfileError(PsaJaxError, ValueError):
    def __init__(self, name: str):
        super().__init__(f"unknown benign fine-tuning profile {name!r}; known: {sorted(PROFILES)}")


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise UnknownProfileError(name)
    return PROFILES[name]


def finetune_config(profile: str = "lite", **overrides) -> ml_collections.ConfigDict:
    """The fine-tune section: profile, SPQR's optimiser recipe, steps, batch, seed, data."""
    get_profile(profile)
    cfg = ml_collections.ConfigDict(
        {
            "profile": profile,
            "steps": 200,
            "batch_size": 16,
            "seed": 42,
            "data": "",  # "": the toy world's benign split; else an image+caption folder
            "optim": optim_config(
                learning_rate=1e-4, weight_decay=1e-2, grad_clip_norm=1.0, schedule="constant"
            ),
        }
    )
    unknown = sorted(set(overrides) - set(cfg.keys()))
    if unknown:
        raise ValueError(f"unknown fine-tune keys {unknown}; known: {sorted(cfg.keys())}")
    cfg.update(overrides)
    return cfg


# -- which parameters train ------------------------------------------------------------------


def _module_paths(params: Mapping[str, Any], suffixes: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Flax module paths whose PyTorch name ends with one of ``suffixes`` (e.g. attn2.to_k)."""
    found = set()
    for path in convert.flat_leaves(params):
        name = convert.torch_key(path).rsplit(".", 1)[0]
        if any(name == s or name.endswith("." + s) for s in suffixes):
            found.add(path[:-1])
    if not found:
        raise ValueError(f"no UNet module ends with any of {suffixes}")
    return sorted(found)


def init_trainable(params: Mapping[str, Any], profile: Profile, rng: jax.Array) -> Any:
    """The profile's trainable tree at step 0 (float32): LoRA factors (zero ``up``: the model
    starts as the base), the named modules' parameters, or the whole UNet."""
    if profile.kind == "lora":
        return lora_lib.init_lora(params, profile.rank, profile.targets, rng=rng, attn=profile.attn)
    if profile.kind == "modules":
        flat = convert.flat_leaves(params)
        return {
            convert.torch_key((*p, "kernel")).removesuffix(".weight"): {
                leaf: np.asarray(flat[(*p, leaf)], np.float32)
                for leaf in ("kernel", "bias")
                if (*p, leaf) in flat
            }
            for p in _module_paths(params, profile.targets)
        }
    if profile.kind == "full":
        return jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    raise ValueError(f"profile {profile.name!r} has unknown kind {profile.kind!r}")


def apply_trainable(params: Mapping[str, Any], trainable: Any, profile: Profile) -> Any:
    """The UNet params with the trainable tree in place (LoRA merged at its ``alpha/rank``)."""
    if profile.kind == "lora":
        return lora_lib.merge_lora(
            params, trainable, lora_lib.lora_scale(profile.rank, profile.alpha)
        )
    if profile.kind == "full":
        return trainable
    index = {
        convert.torch_key((*p, "kernel")).removesuffix(".weight"): p
        for p in _module_paths(params, profile.targets)
    }
    for name, leaves in trainable.items():
        for leaf, value in leaves.items():
            params = lora_lib._set_in(
                params, (*index[name], leaf), lambda old, v=value: jnp.asarray(v).astype(old.dtype)
            )
    return params


def lora_dropout_interceptor(
    lora: Mapping[str, Mapping[str, jax.Array]], scale: float, rate: float, rng: jax.Array
) -> Callable:
    """A Flax method interceptor adding ``scale * dropout(x) @ down @ up`` to every LoRA'd
    Dense, as PEFT's ``lora_dropout`` (the frozen path sees the undropped input). Each module
    draws its own mask from ``rng`` folded with a CRC of its name."""

    def intercept(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, nn.Dense):
            return out
        name = convert.torch_key((*module.path, "kernel")).removesuffix(".weight")
        ab = lora.get(name)
        if ab is None:
            return out
        x = args[0].astype(jnp.float32)
        if rate > 0:
            keep = jax.random.bernoulli(
                jax.random.fold_in(rng, zlib.crc32(name.encode())), 1.0 - rate, x.shape
            )
            x = jnp.where(keep, x / (1.0 - rate), 0.0)
        delta = (x @ ab["down"].astype(jnp.float32)) @ ab["up"].astype(jnp.float32)
        return out + (scale * delta).astype(out.dtype)

    return intercept


# -- the loop ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BenignTask:
    """Denoising loss of the base UNet with the profile's trainable tree; adapter off."""

    module: Any
    schedule: noise_lib.NoiseSchedule
    profile: Profile
    scaling_factor: float
    shift_factor: float = 0.0  # the VAE's, as in training and decoding

    def loss(self, trainable: Any, frozen: Any, batch: Mapping[str, jax.Array], rng: jax.Array):
        r_x, r_noise, r_drop = jax.random.split(rng, 3)
        x0 = clean_latents(batch, "image", r_x, self.scaling_factor, self.shift_factor)
        noisy, t, target = _noised(self.schedule, x0, r_noise)
        ctx = batch["text_states"]
        added = _added_cond(batch, 1)  # SDXL: pooled text + time ids; None otherwise
        if self.profile.kind == "lora":
            p = self.profile
            scale = lora_lib.lora_scale(p.rank, p.alpha)
            with nn.intercept_methods(
                lora_dropout_interceptor(trainable, scale, p.dropout, r_drop)
            ):
                pred = self.module.apply({"params": frozen}, noisy, t, ctx, added)
        else:
            params = apply_trainable(frozen, trainable, self.profile)
            pred = self.module.apply({"params": params}, noisy, t, ctx, added)
        return denoise_loss(pred, target)


@dataclasses.dataclass
class FinetuneResult:
    params: Any  # the UNet params after fine-tuning (LoRA merged), host arrays
    trainable: Any  # the trained tree (LoRA factors / module params / the UNet)
    losses: list[float]  # per step
    profile: Profile


def finetune(
    module: Any,
    params: Any,
    schedule: noise_lib.NoiseSchedule,
    scaling_factor: float,
    image_moments: np.ndarray,
    text_states: np.ndarray,
    config: Mapping,
    *,
    shift_factor: float = 0.0,
    added: Mapping[str, np.ndarray] | None = None,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune ``params`` per ``config`` (see :func:`finetune_config`) on NHWC VAE
    ``image_moments [N, h, w, 2C]`` with their ``text_states [N, L, D]`` (latents
    ``(z - shift_factor) * scaling_factor``, the VAE's two factors); SDXL's per-image
    ``added`` conditions (``text_pooled``, ``time_ids``; see ``eval.benign_data``) when given.

    Batches are drawn without replacement within each pass over the data (a fresh permutation
    per pass, from ``config.seed``); a dataset smaller than the batch is an error.
    """
    profile = get_profile(config["profile"])
    n, steps, bsz = len(image_moments), int(config["steps"]), int(config["batch_size"])
    if n != len(text_states):
        raise ValueError(f"{n} images but {len(text_states)} captions")
    if n < bsz:
        raise ValueError(f"benign data has {n} images, fewer than the batch size {bsz}")
    seed = int(config["seed"])
    trainable = init_trainable(params, profile, jax.random.key(seed))
    optimizer = make_optimizer(config["optim"])
    state = init_state(trainable, optimizer, seed)
    task = BenignTask(module, schedule, profile, float(scaling_factor), float(shift_factor))
    step = jax.jit(make_train_step(task.loss, optimizer), donate_argnums=0)
    frozen = jax.tree.map(jnp.asarray, params)
    order = np.random.default_rng(seed)
    perm, pos, losses = order.permutation(n), 0, []
    for _ in tqdm(range(steps), desc=f"benign fine-tune ({profile.name})", disable=not progress):
        if pos + bsz > n:
            perm, pos = order.permutation(n), 0
        idx = perm[pos : pos + bsz]
        pos += bsz
        batch = {"image_moments": image_moments[idx], "text_states": text_states[idx],
                 **{k: v[idx] for k, v in (added or {}).items()}}  # fmt: skip
        state, metrics = step(state, frozen, batch)
        if not bool(metrics["finite"]):
            raise FloatingPointError(
                f"benign fine-tune: non-finite loss or gradient at step {len(losses) + 1}"
            )
        losses.append(float(metrics["loss"]))
    trained = jax.tree.map(np.asarray, state.params)
    new_params = jax.tree.map(np.asarray, apply_trainable(params, trained, profile))
    return FinetuneResult(new_params, trained, losses, profile)
