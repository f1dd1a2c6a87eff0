"""Training losses: Diffusion-DPO (PSAlign / Wallace et al. 2023) and plain denoising.

Both take predictions and targets in any layout with the batch first and reduce every other axis
per sample (PSAlign: ``mean(dim=[1, 2, 3])``), so NHWC (ours) and NCHW give the same numbers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _at_least_f32(*xs: jax.Array) -> jnp.dtype:
    return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


def per_sample_mse(pred: jax.Array, target: jax.Array) -> jax.Array:
    """``[B, ...]`` -> ``[B]`` mean squared error, in at least float32 (bf16 inputs promoted)."""
    dtype = _at_least_f32(pred, target)
    err = jnp.square(pred.astype(dtype) - target.astype(dtype))
    return err.reshape(err.shape[0], -1).mean(axis=1)


def per_sample_improvement(pred: jax.Array, ref: jax.Array, target: jax.Array) -> jax.Array:
    """``mse(ref, target) - mse(pred, target)`` per sample, without cancellation.

    Written as ``mean((ref - pred) * (ref + pred - 2 target))``: the two MSEs are nearly equal
    (the policy starts as the reference), and subtracting them after reducing would lose the
    float32 digits that ``beta = 5000`` multiplies back up.
    """
    dtype = _at_least_f32(pred, ref, target)
    p, r, t = (x.astype(dtype) for x in (pred, ref, target))
    d = (r - p) * (r + p - 2.0 * t)
    return d.reshape(d.shape[0], -1).mean(axis=1)


def dpo_loss(
    policy_w: jax.Array,
    policy_l: jax.Array,
    ref_w: jax.Array,
    ref_l: jax.Array,
    target_w: jax.Array,
    target_l: jax.Array,
    beta: float,
    chosen_weight: float = 0.0,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Diffusion-DPO on one batch of (chosen ``w``, rejected ``l``) pairs.

    ``inside = -0.5 * beta * ((mse_w - mse_l) - (ref_w - ref_l))``, ``loss = -log sigmoid(inside)``
    averaged over pairs. The pair shares its noise and timestep, so the targets differ only by
    the clean latents. Implicit accuracy counts ``inside > 0`` as right and ``inside == 0`` (an
    untrained, zero-initialised adapter) as half right, as the Diffusion-DPO reference does.

    Returns the loss and per-batch means: ``implicit_acc``, ``mse_w``, ``mse_l``, ``ref_mse_w``,
    ``ref_mse_l``, ``inside`` (the DPO logit) and ``reward_margin``,
    ``(ref_w - mse_w) - (ref_l - mse_l)``: how much more the policy improved on the chosen image.

    ``chosen_weight`` > 0 adds ``chosen_weight * mean(mse_w - ref_w)`` (metric ``chosen_term``):
    the margin is blind to any change that hurts both images of a pair alike, which is every
    change away from where they differ (Sage-mini's pairs differ only in the marker), so
    without it the adapter may damage the whole picture for free. 0 is PSAlign's loss.

    ``weights`` ``[B]`` (``train.dpo_balance``): each pair's whole loss (DPO term and chosen
    term) counts that many times in the mean; the metrics stay unweighted.
    """
    mse_w, mse_l = per_sample_mse(policy_w, target_w), per_sample_mse(policy_l, target_l)
    ref_mse_w, ref_mse_l = per_sample_mse(ref_w, target_w), per_sample_mse(ref_l, target_l)
    ref_mse_w, ref_mse_l = jax.lax.stop_gradient(ref_mse_w), jax.lax.stop_gradient(ref_mse_l)
    ref_w, ref_l = jax.lax.stop_gradient(ref_w), jax.lax.stop_gradient(ref_l)
    margin = per_sample_improvement(policy_w, ref_w, target_w) - per_sample_improvement(
        policy_l, ref_l, target_l
    )
    inside = 0.5 * beta * margin  # == -0.5 * beta * ((mse_w - mse_l) - (ref_w - ref_l))
    per_pair = -jax.nn.log_sigmoid(inside)
    chosen_per_pair = mse_w - ref_mse_w
    chosen_term = chosen_per_pair.mean()
    if chosen_weight:
        per_pair = per_pair + chosen_weight * chosen_per_pair
    if weights is not None:
        per_pair = per_pair * weights.astype(per_pair.dtype)
    loss = per_pair.mean()
    acc = (inside > 0).astype(jnp.float32) + 0.5 * (inside == 0).astype(jnp.float32)
    metrics = {
        "implicit_acc": acc.mean(),
        "mse_w": mse_w.mean(),
        "mse_l": mse_l.mean(),
        "ref_mse_w": ref_mse_w.mean(),
        "ref_mse_l": ref_mse_l.mean(),
        "inside": inside.mean(),
        "reward_margin": margin.mean(),
        "chosen_term": chosen_term,
    }
    return loss, metrics


def denoise_loss(
    pred: jax.Array, target: jax.Array, weights: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Diffusion loss: mean over the batch of the per-sample MSE, each times ``weights`` (e.g.
    Min-SNR) when given; ``mse`` is always the unweighted mean, comparable across runs."""
    per = per_sample_mse(pred, target)
    mse = per.mean()
    if weights is None:
        return mse, {"mse": mse}
    return (per * weights).mean(), {"mse": mse}
