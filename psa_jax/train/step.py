"""The train state and the one pure train step, shared by every task.

``train_step(state, frozen, batch) -> (state, metrics)``: ``state`` holds only what trains
(params, optimizer state, step, rng); ``frozen`` (the base UNet, possibly bf16) is a separate
argument that is never differentiated, never donated and never checkpointed. A task says how a
batch becomes a loss:

* :class:`DPOTask` -- Diffusion-DPO of the PSA adapter; the reference is the same frozen base
  with the adapter off (``user_embeds=None``), so no second UNet lives in memory.
* :class:`DenoiseTask` -- the plain diffusion loss, training the full base (``"unet"``: tiny
  base pretraining) or LoRA factors merged into the frozen base inside the loss (``"lora"``).
* :class:`VAETask` -- the tiny VAE of the embedded world: reconstruction + a small KL, on pixels.

Batches are NHWC, as the loader and the caches give them: ``chosen_moments``/``rejected_moments``
(``[B, h, w, 2C]`` VAE mean and log-variance; a latent is sampled from them every step, as
diffusers' ``latent_dist.sample()``), or pixels ``chosen``/``rejected`` for pixel-space models;
``text_states`` ``[B, L, D]``; ``user_embeds`` ``[B, D]``; SDXL adds ``text_pooled`` and
``time_ids``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from psa_jax.core import diffusion as noise_lib
from psa_jax.core.parallel import interleave_rows, split_rows
from psa_jax.models.unet import UNet2DConditionModel
from psa_jax.models.vae import AutoencoderKL, DiagonalGaussian
from psa_jax.train import lora as lora_lib
from psa_jax.train.losses import denoise_loss, dpo_loss, per_sample_improvement

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint needs to continue bit-exactly (with the data iterator state)."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # the trainable tree only
    opt_state: Any
    rng: jax.Array  # uint32[2] raw key; each step folds in ``step``


def clean_latents(
    batch: Batch, key: str, rng: jax.Array, scaling_factor: float, shift_factor: float = 0.0
) -> jax.Array:
    """``[B, h, w, C]`` training latents of ``batch[key + "_moments"]``: ``z`` sampled from the
    VAE posterior, then ``(z - shift_factor) * scaling_factor`` (what the sampler's decode
    inverts: ``z = latents / scaling_factor + shift_factor``); or the pixels ``batch[key]``
    themselves for pixel-space models."""
    moments = batch.get(f"{key}_moments")
    if moments is None:
        return batch[key].astype(jnp.float32)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, jnp.float32)
    return (z - shift_factor) * scaling_factor


def _noised(schedule: noise_lib.NoiseSchedule, x0: jax.Array, rng: jax.Array, pairs: int = 1):
    """``(noisy, t, target)`` for clean latents ``x0``; with ``pairs=2``
    (``x0 = interleave_rows(w, l)``) a pair's two rows share one noise and timestep draw, as
    Diffusion-DPO needs."""
    r_noise, r_t = jax.random.split(rng)
    b = x0.shape[0] // pairs
    noise = jax.random.normal(r_noise, (b, *x0.shape[1:]), jnp.float32)
    noise = interleave_rows(*[noise] * pairs)
    t = interleave_rows(*[noise_lib.sample_timesteps(r_t, b, schedule)] * pairs)
    noisy = noise_lib.add_noise(schedule, x0, noise, t)
    return noisy, t, noise_lib.training_target(schedule, x0, noise, t)


def _added_cond(batch: Batch, repeat: int) -> dict[str, jax.Array] | None:
    """SDXL's added conditioning, each row ``repeat`` times in a row (``interleave_rows``)."""
    if "time_ids" not in batch:
        return None
    tile = lambda x: interleave_rows(*[x] * repeat)  # noqa: E731
    return {"text_embeds": tile(batch["text_pooled"]), "time_ids": tile(batch["time_ids"])}


@dataclasses.dataclass(frozen=True)
class DPOTask:
    """Diffusion-DPO of the PSA adapter (trainable = the ``adapter`` collection)."""

    module: UNet2DConditionModel
    schedule: noise_lib.NoiseSchedule
    beta: float = 5000.0
    scaling_factor: float = 0.18215
    chosen_weight: float = 0.0  # > 0: keep the chosen image's MSE near the reference's
    shift_factor: float = 0.0  # the VAE's (SD3/Flux-style VAEs; 0 for SD1.x/SDXL)

    def _predictions(self, adapter: Any, frozen: Any, batch: Batch, rng: jax.Array):
        """Policy and reference predictions and the target, a pair's chosen and rejected rows
        side by side (``interleave_rows``: each device keeps its own pairs)."""
        r_w, r_l, r_noise = jax.random.split(rng, 3)
        lat_w = clean_latents(batch, "chosen", r_w, self.scaling_factor, self.shift_factor)
        lat_l = clean_latents(batch, "rejected", r_l, self.scaling_factor, self.shift_factor)
        noisy, tt, target = _noised(self.schedule, interleave_rows(lat_w, lat_l), r_noise, 2)
        ctx = interleave_rows(*[batch["text_states"]] * 2)
        user = interleave_rows(*[batch["user_embeds"]] * 2)
        added = _added_cond(batch, 2)
        pred = self.module.apply(
            {"params": frozen, "adapter": adapter}, noisy, tt, ctx, added, user_embeds=user
        )
        ref = jax.lax.stop_gradient(self.module.apply({"params": frozen}, noisy, tt, ctx, added))
        return pred, ref, target

    def loss(self, adapter: Any, frozen: Any, batch: Batch, rng: jax.Array):
        pred, ref, target = self._predictions(adapter, frozen, batch, rng)
        weights = batch.get("loss_weight")  # [B]: train.dpo_balance (balanced_pair_weights)
        return dpo_loss(*split_rows(pred, 2), *split_rows(ref, 2), *split_rows(target, 2),
                        self.beta, self.chosen_weight, weights)  # fmt: skip

    def margins(self, adapter: Any, frozen: Any, batch: Batch, rng: jax.Array) -> jax.Array:
        """``[B]`` per-pair reward margin ``(ref_w - mse_w) - (ref_l - mse_l)`` for one
        (noise, timestep) draw; its sign is the pair's implicit preference."""
        pred, ref, target = self._predictions(adapter, frozen, batch, rng)
        improve_w, improve_l = split_rows(per_sample_improvement(pred, ref, target), 2)
        return improve_w - improve_l


IMAGE_KEYS = ("chosen", "rejected", "both")


@dataclasses.dataclass(frozen=True)
class DenoiseTask:
    """Plain diffusion loss on ``image_key`` latents; trainable = the full UNet params
    (``target="unet"``, ``frozen`` unused) or LoRA factors (``target="lora"``).

    ``image_key="both"`` learns chosen and rejected images alike (each with its caption): the
    embedded world's base then draws a category's marker for about half of its samples, as a
    base model that has seen both kinds of picture for a prompt.
    """

    module: UNet2DConditionModel
    schedule: noise_lib.NoiseSchedule
    target: str = "unet"
    lora_scale: float = 1.0
    image_key: str = "chosen"
    scaling_factor: float = 0.18215
    snr_gamma: float = 0.0  # > 0: Min-SNR-gamma loss weights (Hang et al. 2023); 0: plain MSE
    shift_factor: float = 0.0  # the VAE's (SD3/Flux-style VAEs; 0 for SD1.x/SDXL)

    def __post_init__(self):
        if self.snr_gamma < 0:
            raise ValueError(f"DenoiseTask.snr_gamma must be >= 0, got {self.snr_gamma}")
        if self.target not in ("unet", "lora"):
            raise ValueError(f"DenoiseTask.target must be 'unet' or 'lora', got {self.target!r}")
        if self.image_key not in IMAGE_KEYS:
            raise ValueError(f"DenoiseTask.image_key must be one of {IMAGE_KEYS}, "
                             f"got {self.image_key!r}")  # fmt: skip

    def loss(self, trainable: Any, frozen: Any, batch: Batch, rng: jax.Array):
        r_x, r_noise = jax.random.split(rng)
        keys = denoise_image_keys(self.image_key)
        x0 = interleave_rows(*[
            clean_latents(batch, k, jax.random.fold_in(r_x, i), self.scaling_factor,
                          self.shift_factor)
            for i, k in enumerate(keys)
        ])  # fmt: skip
        noisy, t, target = _noised(self.schedule, x0, r_noise)
        if self.target == "unet":
            params = trainable
        else:
            params = lora_lib.merge_lora(frozen, trainable, self.lora_scale)
        added = _added_cond(batch, len(keys))
        ctx = interleave_rows(*[batch["text_states"]] * len(keys))
        pred = self.module.apply({"params": params}, noisy, t, ctx, added)
        weights = None
        if self.snr_gamma:
            weights = min_snr_weights(self.schedule, t, self.snr_gamma)
        if "loss_weight" in batch:  # [B, len(keys)]: train.unsafe_weights (unsafe_loss_weights)
            lw = batch["loss_weight"].astype(jnp.float32).reshape(-1)  # rows as x0 interleaves
            weights = lw if weights is None else weights * lw
        return denoise_loss(pred, target, weights)


def min_snr_weights(schedule: noise_lib.NoiseSchedule, t: jax.Array, gamma: float) -> jax.Array:
    """Per-sample Min-SNR-gamma weights: ``min(SNR, gamma) / SNR`` for epsilon targets,
    ``/ (SNR + 1)`` for v. Low-noise steps (large SNR), whose small details dominate a plain
    MSE, are weighted down, so that layout and colour -- decided at high noise -- learn sooner."""
    a = schedule.alphas_cumprod[t].astype(jnp.float32)
    snr = a / (1.0 - a)
    clipped = jnp.minimum(snr, gamma)
    if schedule.prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    if schedule.prediction_type != "epsilon":
        raise ValueError(f"Min-SNR weights for {schedule.prediction_type!r} are not defined here")
    return clipped / snr


@dataclasses.dataclass(frozen=True)
class VAETask:
    """The tiny VAE of the embedded world, trained on pixels (``chosen`` and ``rejected``,
    ``[B, H, W, 3]`` in [-1, 1]): MSE of the decoded posterior sample + ``kl_weight`` x KL,
    both means over elements.

    A tiny KL weight keeps the posterior nearly deterministic (a noisy posterior would bury the
    marker in every sampled latent); the latent scale is then set afterwards by
    :func:`latent_scaling_factor`, as SD's 0.18215 was.
    """

    module: AutoencoderKL
    kl_weight: float = 1e-6

    def loss(self, params: Any, frozen: Any, batch: Batch, rng: jax.Array):
        del frozen
        x = interleave_rows(batch["chosen"], batch["rejected"]).astype(jnp.float32)
        post = _posterior(self.module, params, x)
        recon = self.module.apply({"params": params}, post.sample(rng), method=AutoencoderKL.decode)
        mse = jnp.mean(jnp.square(recon.astype(jnp.float32) - x))
        # KL(q || N(0, I)) per latent element.
        kl = 0.5 * jnp.mean(jnp.square(post.mean) + post.var - 1.0 - post.logvar)
        metrics = {"recon_mse": mse, "kl": kl, "latent_std": jnp.std(post.mean),
                   "posterior_std": jnp.mean(post.std)}  # fmt: skip
        return mse + self.kl_weight * kl, metrics


def _posterior(module: AutoencoderKL, params: Any, images: jax.Array) -> DiagonalGaussian:
    """The VAE posterior of NHWC ``images`` in [-1, 1]."""
    moments = module.apply({"params": params}, images, method=AutoencoderKL.encode)
    return DiagonalGaussian.from_moments(moments, axis=-1)


def latent_scaling_factor(module: AutoencoderKL, params: Any, images: jax.Array) -> float:
    """``1 / std`` of the posterior means of ``images`` (NHWC, [-1, 1]): diffusion latents of
    unit variance, the rule behind SD's ``scaling_factor``."""
    mean = _posterior(module, params, images).mean
    return float(1.0 / jnp.std(mean.astype(jnp.float32)))


def _micro_batches(batch: Batch, accum: int) -> Batch:
    """``[accum * m, ...]`` -> ``[accum, m, ...]`` taking rows ``i * accum + a`` for micro-batch
    ``a``: each device's contiguous rows stay on that device (no resharding)."""

    def split(x: jax.Array) -> jax.Array:
        if x.shape[0] % accum:
            raise ValueError(f"batch of {x.shape[0]} does not split into {accum} micro-batches")
        return jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def make_train_step(
    loss_fn: Callable[[Any, Any, Batch, jax.Array], tuple[jax.Array, Metrics]],
    optimizer: optax.GradientTransformation,
    accum_steps: int = 1,
) -> Callable[[TrainState, Any, Batch], tuple[TrainState, Metrics]]:
    """The pure step: gradients of ``loss_fn`` w.r.t. ``state.params`` only (averaged over
    ``accum_steps`` micro-batches with a scan), one optimizer update.

    A non-finite loss or gradient norm leaves the state unchanged (``metrics["finite"] == 0``):
    the trainer stops on it, and whatever it saves is the last good state.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, frozen: Any, batch: Batch) -> tuple[TrainState, Metrics]:
        rng = jax.random.fold_in(state.rng, state.step)
        if accum_steps == 1:
            (loss, metrics), grads = grad_fn(state.params, frozen, batch, rng)
        else:
            micro = _micro_batches(batch, accum_steps)
            keys = jax.random.split(rng, accum_steps)

            def body(carry, xs):
                return jax.tree.map(jnp.add, carry, grad_fn(state.params, frozen, *xs)), None

            first = (jax.tree.map(lambda x: x[0], micro), keys[0])
            shapes = jax.eval_shape(grad_fn, state.params, frozen, *first)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            ((loss, metrics), grads), _ = jax.lax.scan(body, zeros, (micro, keys))
            loss, metrics, grads = jax.tree.map(lambda x: x / accum_steps, (loss, metrics, grads))
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
        metrics = {**metrics, "loss": loss, "grad_norm": grad_norm}
        metrics["param_norm"] = optax.tree.norm(new.params)
        metrics["finite"] = finite.astype(jnp.float32)
        return new, metrics

    return train_step


def init_state(params: Any, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    """Step 0: trainable ``params`` (master weights at least fp32, even for a bf16 base), fresh
    optimizer state, seeded rng."""
    params = jax.tree.map(
        lambda x: jnp.asarray(x, jnp.promote_types(jnp.result_type(x), jnp.float32)), params
    )
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.PRNGKey(seed),
    )


_BATCH_KEYS = (
    "chosen_moments",
    "rejected_moments",
    "chosen",
    "rejected",
    "text_states",
    "text_pooled",
    "user_embeds",
    "time_ids",
    "loss_weight",
)


def step_inputs(batch: dict) -> dict:
    """The arrays of a loader batch that a train step reads (not ids, hashes or captions)."""
    return {k: batch[k] for k in _BATCH_KEYS if k in batch}


def denoise_image_keys(image_key: str) -> tuple[str, ...]:
    """The images a :class:`DenoiseTask` learns per pair, in the order of its loss rows."""
    if image_key not in IMAGE_KEYS:
        raise ValueError(f"image_key must be one of {IMAGE_KEYS}, got {image_key!r}")
    return ("chosen", "rejected") if image_key == "both" else (image_key,)


def unsafe_loss_weights(
    chosen_unsafe: np.ndarray,
    categories: Any,
    weights: Mapping[str, float],
    image_key: str,
) -> np.ndarray:
    """``[B, K]`` float32 ``loss_weight`` of a denoise batch (``train.unsafe_weights``): each
    pair's unsafe image weighs ``weights[category]`` (unlisted category: 1.0), its safe image
    1.0; columns are the images ``image_key`` learns (``denoise_image_keys``).
    ``chosen_unsafe`` ``[B]`` bool: whether a pair's chosen image is its unsafe one."""
    unsafe_w = np.asarray([float(weights.get(str(c), 1.0)) for c in categories], np.float32)
    chosen_unsafe = np.asarray(chosen_unsafe, bool)
    cols = {"chosen": chosen_unsafe, "rejected": ~chosen_unsafe}
    return np.stack(
        [np.where(cols[k], unsafe_w, np.float32(1.0)) for k in denoise_image_keys(image_key)],
        axis=1,
    ).astype(np.float32)


def balanced_pair_weights(
    chosen_safe: np.ndarray, categories: Any, safe_share: Mapping[str, float]
) -> np.ndarray:
    """``[B]`` float32 ``loss_weight`` of a DPO batch (``train.dpo_balance="category"``): a pair
    whose chosen image is the safe one weighs ``0.5 / safe_share[category]``, the others
    ``0.5 / (1 - safe_share[category])``, so that within each category the pairs preferring the
    safe image and those preferring the unsafe one weigh the same in expectation (and the mean
    weight is 1). ``safe_share``: the training split's share of each category's pairs whose
    chosen image is the safe one (``tasks.safe_shares``). A category whose pairs are all of one
    kind (share 0 or 1) cannot be balanced: its pairs weigh 1."""
    share = np.asarray([safe_share[str(c)] for c in categories], np.float64)
    chosen_safe = np.asarray(chosen_safe, bool)
    mixed = (share > 0.0) & (share < 1.0)
    with np.errstate(divide="ignore"):
        w = np.where(chosen_safe, 0.5 / share, 0.5 / (1.0 - share))
    return np.where(mixed, w, 1.0).astype(np.float32)
