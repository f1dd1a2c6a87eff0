"""The per-user sampler: one jit-compiled denoising loop with classifier-free guidance.

Guidance follows PSAlign's pipeline: the conditional branch gets the prompt and the user's profile
embedding, the unconditional branch the negative prompt and a *zero* profile, which the adapter
still projects (``LayerNorm(Linear(0))`` is the projection's bias, not "adapter off"). Both
branches run as one batch of 2B through the UNet.

Every sample owns its PRNG key (initial latents and any scheduler noise derive from it), and
nothing mixes samples, so a sample is the same whatever else is in its batch: different users,
prompts, user scales and seeds can share one compiled call.

Latents are NHWC inside the loop (the Flax modules' layout); :func:`generate` takes and returns
diffusers' NCHW at its boundary.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from psa_jax.core.parallel import interleave_rows, split_rows
from psa_jax.sample import schedulers as sched_lib


@flax.struct.dataclass
class Conditioning:
    """Per-sample inputs of the loop (leading axis B everywhere).

    ``user_embeds=None`` samples the base model (no adapter branch at all). ``added`` /
    ``neg_added`` are SDXL's ``{"text_embeds", "time_ids"}`` for each branch, else None.
    """

    text_states: jax.Array  # [B, L, D] prompt
    neg_text_states: jax.Array  # [B, L, D] negative prompt ("" for plain CFG)
    user_embeds: jax.Array | None = None  # [B, Du] raw profile embeddings
    user_scale: jax.Array | None = None  # [B] adapter strength; None = 1
    added: dict[str, jax.Array] | None = None
    neg_added: dict[str, jax.Array] | None = None


@dataclasses.dataclass(frozen=True)
class Sampler:
    """What to run: the UNet module, the scheduler tables and the guidance scale.

    Hashable (the module is a linen dataclass, the schedule is kept out), so it can be a static
    argument; ``guidance_scale <= 1`` runs the conditional branch only.
    """

    module: Any
    guidance_scale: float = 7.5

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0


def _pair(a: Any, b: Any) -> Any:
    """CFG's two branches row by row (``interleave_rows``: a device keeps its own samples)."""
    return jax.tree.map(interleave_rows, a, b)


def guided_prediction(
    sampler: Sampler, variables: dict, x: jax.Array, t: jax.Array, cond: Conditioning
) -> jax.Array:
    """The model output for NHWC ``x`` at timestep ``t`` with classifier-free guidance."""
    b = x.shape[0]
    scale = jnp.ones((b,), jnp.float32) if cond.user_scale is None else cond.user_scale
    user = cond.user_embeds
    if not sampler.guided:
        return sampler.module.apply(
            variables, x, t, cond.text_states, cond.added, user_embeds=user, user_scale=scale
        )
    if user is not None:  # the unconditional branch projects a zero profile (PSAlign)
        user = _pair(jnp.zeros_like(user), user)
    added = None if cond.added is None else _pair(cond.neg_added, cond.added)
    out = sampler.module.apply(
        variables,
        _pair(x, x),
        t,
        _pair(cond.neg_text_states, cond.text_states),
        added,
        user_embeds=user,
        user_scale=_pair(scale, scale),
    )
    neg, pos = split_rows(out, 2)
    return neg + sampler.guidance_scale * (pos - neg)


def initial_latents(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Standard normal NHWC latents ``[B, *shape]``, one draw per sample key (batch-independent)."""
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


def denoise(
    sampler: Sampler,
    schedule: Any,
    variables: dict,
    latents: jax.Array,
    cond: Conditioning,
    keys: jax.Array,
) -> jax.Array:
    """The whole reverse process from NHWC ``latents`` (already scaled by the scheduler's
    ``init_noise_sigma``) to clean NHWC latents; ``keys [B]`` feed stochastic schedulers."""
    state = sched_lib.init_state(schedule, latents)

    def body(i, carry):
        x, state = carry
        t = schedule.timesteps[i]
        model_in = sched_lib.scale_model_input(schedule, x, i)
        out = guided_prediction(sampler, variables, model_in, t, cond)
        noise = None
        if schedule.stochastic:  # per-sample noise: a sample's draws ignore its batch
            draw = lambda k: jax.random.normal(jax.random.fold_in(k, i), x.shape[1:])  # noqa: E731
            noise = jax.vmap(draw)(keys)
        return sched_lib.step(schedule, state, i, out, x, noise=noise)

    x, _ = jax.lax.fori_loop(0, schedule.timesteps.shape[0], body, (latents, state))
    return x


def _sample_fn(sampler: Sampler, latent_shape: tuple[int, ...]):
    def run(schedule, variables, cond, keys):
        x = initial_latents(keys, latent_shape) * sched_lib.init_noise_sigma(schedule)
        return denoise(sampler, schedule, variables, x, cond, keys)

    return run


@functools.cache
def _compiled(sampler: Sampler, latent_shape: tuple[int, ...], shardings: tuple | None):
    """One jitted loop per (sampler, latent shape, placement), reused across calls."""
    fn = _sample_fn(sampler, latent_shape)
    if shardings is None:
        return jax.jit(fn)
    batch, rep = shardings
    return jax.jit(fn, in_shardings=(rep, rep, batch, batch), out_shardings=batch)


def sample_latents(
    sampler: Sampler,
    schedule: Any,
    variables: dict,
    cond: Conditioning,
    seeds: np.ndarray | list[int],
    latent_shape: tuple[int, int, int],
    *,
    shardings: tuple[Any, Any] | None = None,
) -> jax.Array:
    """Clean NHWC latents for B samples from per-sample ``seeds`` (``latent_shape`` is HWC).

    ``shardings = (batch, replicated)`` NamedShardings place the per-sample inputs along the
    mesh's data axis and everything else replicated, so many prompts spread over the devices.
    """
    keys = jax.vmap(jax.random.key)(jnp.asarray(np.asarray(seeds, np.uint32)))
    fn = _compiled(sampler, tuple(latent_shape), None if shardings is None else tuple(shardings))
    return fn(schedule, variables, cond, keys)
