"""The DDPM forward process that training needs: noise schedule, ``add_noise`` and targets.

The schedule reproduces diffusers' ``DDPMScheduler`` float32 ``alphas_cumprod`` bit for bit
(checked in ``tests/test_noise.py``), so that a model trained here sees the same noisy latents
as one trained by PSAlign's torch script. Sampling schedulers live elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

_f32 = np.float32


@flax.struct.dataclass
class NoiseSchedule:
    """Cumulative signal fractions ``alphas_cumprod[t]`` and what the model is trained to predict.

    A pytree, so it can be passed into jitted steps; ``prediction_type`` is static because it
    picks code, not values.
    """

    alphas_cumprod: jax.Array  # [num_train_timesteps] float32
    prediction_type: str = flax.struct.field(pytree_node=False)

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` on CPU, bit for bit.

    Torch fills the first half forward from ``start`` and the second half backward from ``end``
    with a float32 step; its compiled kernel fuses ``start + step * i`` into one FMA, which we
    reproduce by evaluating in float64 (exact product) and rounding once to float32.
    """
    if steps == 1:
        return np.array([start], _f32)
    a, b = _f32(start), _f32(end)
    step = _f32((b - a) / _f32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    step64 = np.float64(step)
    forward = (np.float64(a) + step64 * i).astype(_f32)
    backward = (np.float64(b) - step64 * (steps - 1 - i)).astype(_f32)
    return np.where(np.arange(steps) < steps // 2, forward, backward)


def _cumprod_f32(x: np.ndarray) -> np.ndarray:
    # torch's CPU cumprod accumulates float32 inputs in float64 and rounds each output.
    return np.cumprod(x.astype(np.float64)).astype(_f32)


def _linear(beta_start: float, beta_end: float, n: int) -> np.ndarray:
    return _torch_linspace_f32(beta_start, beta_end, n)


def _scaled_linear(beta_start: float, beta_end: float, n: int) -> np.ndarray:
    # Linear in sqrt(beta): the latent-diffusion (Stable Diffusion) schedule.
    root = _torch_linspace_f32(beta_start**0.5, beta_end**0.5, n)
    return root * root


def _squaredcos_cap_v2(beta_start: float, beta_end: float, n: int) -> np.ndarray:
    # Glide's cosine alpha_bar, discretised in Python floats exactly as diffusers does.
    del beta_start, beta_end

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
    return np.asarray(betas, np.float64).astype(_f32)


BETA_SCHEDULES: dict[str, Callable[[float, float, int], np.ndarray]] = {
    "linear": _linear,
    "scaled_linear": _scaled_linear,
    "squaredcos_cap_v2": _squaredcos_cap_v2,
}


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1, in diffusers' float32 operation order.

    Equal to diffusers only to ~4e-7 absolute, not bitwise: torch's CPU float32 ``sqrt`` is not
    correctly rounded (MKL/SLEEF, ~1 ulp), numpy's is, and the shift by ``sqrt(acp[T-1])``
    amplifies that near ``t = T``. Only zero-terminal-SNR (turbo) models use this.
    """
    abar_sqrt = np.sqrt(_cumprod_f32(_f32(1) - betas))
    s0, s_last = abar_sqrt[0], abar_sqrt[-1]
    abar_sqrt = (abar_sqrt - s_last) * (s0 / (s0 - s_last))
    abar = abar_sqrt**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return _f32(1) - alphas


def make_noise_schedule(
    beta_schedule: str = "scaled_linear",
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    num_train_timesteps: int = 1000,
    prediction_type: str = "epsilon",
    trained_betas: Sequence[float] | np.ndarray | None = None,
    rescale_betas_zero_snr: bool = False,
) -> NoiseSchedule:
    """Build the schedule diffusers' ``DDPMScheduler`` builds from the same arguments.

    Defaults are Stable Diffusion's. The betas are computed with numpy in diffusers' float32
    operation order rather than in float64: float64 would be "more exact" but would differ from
    the torch reference by up to ~4e-7 relative, and bit-equality makes divergence easy to rule
    out. ``rescale_betas_zero_snr`` is the exception (see ``_rescale_zero_terminal_snr``).
    """
    if prediction_type not in TRAINING_TARGETS:
        raise ValueError(
            f"unknown prediction_type {prediction_type!r}; choose from {sorted(TRAINING_TARGETS)}"
        )
    if trained_betas is not None:
        betas = np.asarray(trained_betas, np.float64).astype(_f32)
        if betas.ndim != 1 or betas.shape[0] != num_train_timesteps:
            raise ValueError(
                f"trained_betas has shape {betas.shape}, expected ({num_train_timesteps},)"
            )
    else:
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(
                f"unknown beta_schedule {beta_schedule!r}; choose from {sorted(BETA_SCHEDULES)}"
            )
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
        betas = BETA_SCHEDULES[beta_schedule](beta_start, beta_end, num_train_timesteps)
    if rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    alphas_cumprod = _cumprod_f32(_f32(1) - betas)
    return NoiseSchedule(
        alphas_cumprod=jnp.asarray(alphas_cumprod), prediction_type=prediction_type
    )


_CONFIG_CASTS: dict[str, Callable] = {
    "beta_schedule": str,
    "beta_start": float,
    "beta_end": float,
    "num_train_timesteps": int,
    "prediction_type": str,
    "trained_betas": lambda v: v,
    "rescale_betas_zero_snr": bool,
}


def noise_schedule_from_config(cfg: Mapping) -> NoiseSchedule:
    """Schedule from a diffusers ``scheduler_config.json`` dict or a ConfigDict with its keys.

    Unrelated keys (``_class_name``, ``steps_offset``, ...) are ignored so a pipeline's
    scheduler config can be passed as is; missing keys take ``make_noise_schedule``'s defaults.
    """
    kwargs = {}
    for key, cast in _CONFIG_CASTS.items():
        if key in cfg and cfg[key] is not None:
            kwargs[key] = cast(cfg[key])
    return make_noise_schedule(**kwargs)


def _coefficients(s: NoiseSchedule, timesteps, ndim: int) -> tuple[jax.Array, jax.Array]:
    """sqrt(acp[t]) and sqrt(1 - acp[t]), shaped to broadcast over an array of rank ``ndim``."""
    acp = s.alphas_cumprod.astype(jnp.float32)[jnp.asarray(timesteps)]
    acp = acp.reshape(acp.shape + (1,) * (ndim - acp.ndim))
    return jnp.sqrt(acp), jnp.sqrt(1.0 - acp)


def _mix(s, a, b, timesteps, sign: float) -> jax.Array:
    # Shared by add_noise and velocity; math in float32 whatever the input dtype.
    a, b = jnp.asarray(a), jnp.asarray(b)
    out_dtype = jnp.result_type(a.dtype, b.dtype)
    sqrt_acp, sqrt_one_minus = _coefficients(s, timesteps, a.ndim)
    a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
    return (sqrt_acp * a32 + sign * sqrt_one_minus * b32).astype(out_dtype)


def add_noise(s: NoiseSchedule, x0, noise, timesteps) -> jax.Array:
    """``sqrt(acp[t]) x0 + sqrt(1 - acp[t]) noise``; ``timesteps`` indexes the leading axes.

    Broadcasts over all trailing dims, so NCHW and NHWC latents both work.
    """
    return _mix(s, x0, noise, timesteps, 1.0)


def velocity(s: NoiseSchedule, x0, noise, timesteps) -> jax.Array:
    """The v-prediction target ``sqrt(acp) noise - sqrt(1 - acp) x0`` (diffusers' get_velocity)."""
    return _mix(s, noise, x0, timesteps, -1.0)


def _epsilon_target(s, x0, noise, timesteps):
    del s, x0, timesteps
    return jnp.asarray(noise)


def _sample_target(s, x0, noise, timesteps):
    del s, noise, timesteps
    return jnp.asarray(x0)


TRAINING_TARGETS: dict[str, Callable] = {
    "epsilon": _epsilon_target,
    "v_prediction": velocity,
    "sample": _sample_target,
}


def training_target(s: NoiseSchedule, x0, noise, timesteps) -> jax.Array:
    """What the denoiser should output at ``add_noise(s, x0, noise, timesteps)``."""
    return TRAINING_TARGETS[s.prediction_type](s, x0, noise, timesteps)


def sample_timesteps(rng: jax.Array, batch: int, s: NoiseSchedule) -> jax.Array:
    """Training timesteps, uniform over ``[0, num_train_timesteps)``, int32 ``[batch]``."""
    return jax.random.randint(rng, (batch,), 0, s.num_train_timesteps, dtype=jnp.int32)
