"""Sampling schedulers in pure JAX, equal to diffusers 0.42.1 in float32.

Five samplers, named as in :data:`SCHEDULERS`: ``"ddpm"`` (``DDPMScheduler``), ``"ddim"``
(``DDIMScheduler``), ``"euler"`` (``EulerDiscreteScheduler``), ``"dpmpp_2m"``
(``DPMSolverMultistepScheduler`` with ``algorithm_type="dpmsolver++"``, midpoint solver) and
``"pndm"`` (``PNDMScheduler``: PLMS with ``skip_prk_steps``, as Stable Diffusion 1.x ships it,
or with its Runge-Kutta warm-up). A schedule's ``timesteps`` are its model calls: PLMS makes
``n + 1`` of them for ``n`` inference steps (the first timestep twice), the warm-up ``n + 9``.

Everything that depends only on the step index -- timesteps, sigmas, every scalar coefficient --
is computed once on the host with numpy in float32, in diffusers' operation order, and stored as
per-step tables in a :class:`SamplerSchedule` pytree (the builders live in
:mod:`psa_jax.sample.scheduler_tables`). :func:`step` then only indexes the tables with a
(possibly traced) step index and does the elementwise tensor math, again in diffusers' order, so
it runs inside ``jax.lax.fori_loop``/``scan`` with no Python branching on the index and a
schedule with other steps' values (spacing, betas) reuses the compiled loop.

Not bitwise equal to torch: torch's CPU float32 ``sqrt``/``log``/``exp`` (MKL/SLEEF) are not
correctly rounded, ours are (``log``/``exp`` are evaluated in float64 and rounded once, which also
makes the tables independent of numpy's CPU-dispatched float32 kernels), and XLA contracts
``a * b + c`` into FMAs. A step from the same inputs agrees to a few ulps (<= ~4e-7 relative);
whole loops drift apart as any two float32 implementations do (``tests/test_schedulers.py``).

Option defaults are what ``<Scheduler>.from_config(sd15_scheduler_config)`` gives -- diffusers'
class defaults overridden by Stable Diffusion 1.x's ``scheduler_config.json`` (``steps_offset=1``,
``clip_sample=False``, ``set_alpha_to_one=False``, PNDM's ``skip_prk_steps=True``) -- matching
``make_noise_schedule``'s SD defaults. Left out: thresholding, Karras/exponential/beta/Lu/flow
sigmas, Euler's stochastic churn (``s_churn``, always 0: Euler here is deterministic), DDIM's
``use_clipped_model_output``, learned variances, third-order and SDE DPM-Solver, custom timestep
lists.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from psa_jax.core.diffusion import NoiseSchedule, make_noise_schedule, noise_schedule_from_config
from psa_jax.core.errors import PsaJaxError
from psa_jax.sample.scheduler_tables import (
    ddim_tables,
    ddpm_tables,
    dpm_tables,
    euler_tables,
    pndm_tables,
)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@flax.struct.dataclass
class SamplerSchedule:
    """Per-step tables of one sampler for a fixed number of steps; a pytree for ``jit``.

    ``timesteps[i]`` is what the model is called with at step ``i`` (int32, float32 for Euler,
    whose interpolated timesteps can be fractional). ``tables`` holds float32 ``[n]`` arrays whose
    keys depend on the sampler. Strings and flags are static: they pick code, not values.
    """

    timesteps: jax.Array
    tables: dict[str, jax.Array]
    init_sigma: jax.Array  # scalar float32: scale of the initial Gaussian latents
    name: str = flax.struct.field(pytree_node=False)
    prediction_type: str = flax.struct.field(pytree_node=False)
    clip_range: float | None = flax.struct.field(pytree_node=False, default=None)
    stochastic: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def num_inference_steps(self) -> int:
        """The number of model calls (PNDM: more than the inference steps it was made for)."""
        return self.timesteps.shape[0]


@flax.struct.dataclass
class SamplerState:
    """What a step carries to the next: DPM-Solver++'s previous x0 prediction; PNDM's last 4
    stored model outputs (``ets [4, *shape]``, newest last), the sample its PLMS start or
    Runge-Kutta step leaves from (``cur_sample``) and its Runge-Kutta sum (``acc``); else
    nothing."""

    prev_x0: jax.Array | None = None
    ets: jax.Array | None = None
    cur_sample: jax.Array | None = None
    acc: jax.Array | None = None


def _x0_from(pred: str, mo: jax.Array, sample: jax.Array, a, b) -> jax.Array:
    """x0 from the model output at signal scale ``a`` and noise scale ``b``."""
    if pred == "epsilon":
        return (sample - b * mo) / a
    if pred == "v_prediction":
        return a * sample - b * mo
    return mo


def _clip(s: SamplerSchedule, x0: jax.Array) -> jax.Array:
    return x0 if s.clip_range is None else jnp.clip(x0, -s.clip_range, s.clip_range)


def _ddpm_step(s, state, c, mo, sample, noise):
    x0 = _clip(s, _x0_from(s.prediction_type, mo, sample, c["sqrt_a"], c["sqrt_b"]))
    prev = c["c_x0"] * x0 + c["c_xt"] * sample
    return prev + c["std"] * noise, state


def _ddim_step(s, state, c, mo, sample, noise):
    a, b = c["sqrt_a"], c["sqrt_b"]
    x0 = _x0_from(s.prediction_type, mo, sample, a, b)
    if s.prediction_type == "epsilon":
        eps = mo
    elif s.prediction_type == "v_prediction":
        eps = a * mo + b * sample
    else:
        eps = (sample - a * x0) / b
    x0 = _clip(s, x0)  # diffusers clips x0 after deriving eps from the unclipped one
    prev = c["sqrt_a_prev"] * x0 + c["c_dir"] * eps
    if s.stochastic:
        prev = prev + c["std"] * noise
    return prev, state


def _euler_step(s, state, c, mo, sample, noise):
    del noise
    sigma = c["sigma"]
    if s.prediction_type == "epsilon":
        x0 = sample - sigma * mo
    elif s.prediction_type == "v_prediction":
        x0 = mo * c["c_out"] + sample / c["v_div"]
    else:
        x0 = mo
    derivative = (sample - x0) / sigma
    return sample + derivative * c["dt"], state


def _dpm_step(s, state, c, mo, sample, noise):
    del noise
    x0 = _x0_from(s.prediction_type, mo, sample, c["alpha"], c["sig"])
    first = c["c_sample"] * sample - c["c_d0"] * x0
    # On first-order steps c_d1 = c_r = 0, which leaves ``first`` bit for bit unchanged.
    prev = first - c["c_d1"] * (c["c_r"] * (x0 - state.prev_x0))
    return prev, SamplerState(prev_x0=x0)


def _pndm_output(kind, mo, prev_ets, ets, acc):
    """PNDM's model output for the update, in diffusers' operation order (see ``_pndm_program``
    in :mod:`psa_jax.sample.scheduler_tables` for the kinds)."""
    e1, e2, e3, e4 = ets[-1], ets[-2], ets[-3], ets[-4]
    branches = [
        lambda: mo,
        lambda: (mo + prev_ets[-1]) / 2,
        lambda: (3 * e1 - e2) / 2,
        lambda: (23 * e1 - 16 * e2 + 5 * e3) / 12,
        lambda: (1 / 24) * (55 * e1 - 59 * e2 + 37 * e3 - 9 * e4),
        lambda: acc + 1 / 6 * mo,
    ]
    return jax.lax.switch(kind, branches)


def _pndm_step(s, state, c, mo, sample, noise):
    del noise
    on = lambda flag: flag > 0.5  # noqa: E731  (0/1 flags in float32 tables)
    ets = jnp.where(on(c["push"]), jnp.concatenate([state.ets[1:], mo[None]]), state.ets)
    cur = jnp.where(on(c["set_cur"]), sample, state.cur_sample)
    x = jnp.where(on(c["use_cur"]), cur, sample)
    out = _pndm_output(c["kind"].astype(jnp.int32), mo, state.ets, ets, state.acc)
    acc = jnp.where(on(c["acc_reset"]), 0.0, state.acc + c["acc_w"] * mo)
    if s.prediction_type == "v_prediction":
        out = c["sqrt_a"] * out + c["sqrt_b"] * x
    prev = c["c_sample"] * x - (c["c_num"] * out) / c["denom"]
    return prev, SamplerState(ets=ets, cur_sample=cur, acc=acc)


def _dpm_init(sample: jax.Array) -> SamplerState:
    return SamplerState(prev_x0=jnp.zeros(sample.shape, jnp.float32))


def _pndm_init(sample: jax.Array) -> SamplerState:
    zeros = jnp.zeros(sample.shape, jnp.float32)
    return SamplerState(ets=jnp.zeros((4, *sample.shape), jnp.float32), cur_sample=zeros, acc=zeros)


@dataclasses.dataclass(frozen=True)
class _Sampler:
    build: Callable
    step: Callable
    defaults: Mapping[str, Any]  # accepted options -> default (SD 1.x from_config)
    unsupported: Mapping[str, Any]  # diffusers config keys we accept only at these values
    init: Callable[[jax.Array], SamplerState] | None = None  # None: a stateless sampler
    scales_input: bool = False
    predictions: tuple[str, ...] = PREDICTION_TYPES

    @property
    def has_state(self) -> bool:
        return self.init is not None


_COMMON = {"timestep_spacing": "leading", "steps_offset": 1}
_CLIP = {"clip_sample": False, "clip_sample_range": 1.0}
_NOT_THRESHOLDED = {"thresholding": False}
_PLAIN_SIGMAS = {
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
}

SCHEDULERS: dict[str, _Sampler] = {
    "ddpm": _Sampler(
        ddpm_tables,
        _ddpm_step,
        {**_COMMON, **_CLIP, "variance_type": "fixed_small"},
        _NOT_THRESHOLDED,
    ),
    "ddim": _Sampler(
        ddim_tables,
        _ddim_step,
        {**_COMMON, **_CLIP, "set_alpha_to_one": False, "eta": 0.0},
        _NOT_THRESHOLDED,
    ),
    "euler": _Sampler(
        euler_tables,
        _euler_step,
        {"timestep_spacing": "linspace", "steps_offset": 1, "final_sigmas_type": "zero"},
        {**_PLAIN_SIGMAS, "interpolation_type": "linear", "timestep_type": "discrete"},
        scales_input=True,
    ),
    "dpmpp_2m": _Sampler(
        dpm_tables,
        _dpm_step,
        {
            "timestep_spacing": "linspace",
            "steps_offset": 1,
            "solver_order": 2,
            "lower_order_final": True,
            "euler_at_final": False,
            "final_sigmas_type": "zero",
            "lambda_min_clipped": -float("inf"),
        },
        {
            **_NOT_THRESHOLDED,
            **_PLAIN_SIGMAS,
            "algorithm_type": "dpmsolver++",
            "solver_type": "midpoint",
            "use_lu_lambdas": False,
            "use_flow_sigmas": False,
            "variance_type": None,
            "use_dynamic_shifting": False,
        },
        init=_dpm_init,
    ),
    "pndm": _Sampler(
        pndm_tables,
        _pndm_step,
        {**_COMMON, "skip_prk_steps": True, "set_alpha_to_one": False},
        {},
        init=_pndm_init,
        predictions=("epsilon", "v_prediction"),
    ),
}

DIFFUSERS_CLASS_NAMES = {
    "DDPMScheduler": "ddpm",
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "PNDMScheduler": "pndm",
}


class UnsupportedSchedulerError(PsaJaxError, ValueError):
    """A diffusers scheduler class (a folder's ``scheduler_config.json``) with no sampler here;
    the message lists the classes that have one."""


def _sampler(name: str) -> _Sampler:
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose from {sorted(SCHEDULERS)}")
    return SCHEDULERS[name]


def make_sampler_schedule(
    name: str,
    num_inference_steps: int,
    noise_schedule: NoiseSchedule | Mapping | None = None,
    **options: Any,
) -> SamplerSchedule:
    """Tables of sampler ``name`` for ``num_inference_steps`` steps, as diffusers sets them.

    ``noise_schedule`` is a :class:`NoiseSchedule`, a diffusers scheduler config dict (see
    ``noise_schedule_from_config``) or None for Stable Diffusion's; its ``prediction_type`` is
    the model's. ``options`` are the sampler's diffusers config options (``SCHEDULERS[name]
    .defaults`` lists them), plus DDIM's ``eta`` (a step argument in diffusers).
    """
    spec = _sampler(name)
    unknown = sorted(set(options) - set(spec.defaults))
    if unknown:
        raise ValueError(
            f"unknown options {unknown} for {name!r}; choose from {sorted(spec.defaults)}"
        )
    if noise_schedule is None:
        noise_schedule = make_noise_schedule()
    elif not isinstance(noise_schedule, NoiseSchedule):
        noise_schedule = noise_schedule_from_config(noise_schedule)
    pred = noise_schedule.prediction_type
    if pred not in spec.predictions:
        raise ValueError(
            f"unsupported prediction_type {pred!r} for {name!r}; choose from {spec.predictions}"
        )
    acp = np.asarray(noise_schedule.alphas_cumprod, np.float32)
    n = int(num_inference_steps)
    if not 1 <= n <= len(acp):
        raise ValueError(
            f"num_inference_steps must be in [1, num_train_timesteps={len(acp)}], got {n}"
        )
    opts = {**spec.defaults, **options}
    ts, tables, init_sigma, static = spec.build(acp, n, opts)
    clip = float(opts["clip_sample_range"]) if opts.get("clip_sample") else None
    return SamplerSchedule(
        timesteps=jnp.asarray(ts),
        tables={k: jnp.asarray(np.asarray(v, np.float32)) for k, v in tables.items()},
        init_sigma=jnp.asarray(init_sigma, jnp.float32),
        name=name,
        prediction_type=pred,
        clip_range=clip,
        **static,
    )


def scheduler_for_class(class_name: str | None, where: str = "the scheduler config") -> str:
    """Our sampler for a diffusers scheduler class name, or :class:`UnsupportedSchedulerError`
    naming it, ``where`` it came from and every class we sample with."""
    if class_name not in DIFFUSERS_CLASS_NAMES:
        supported = ", ".join(f"{k} ({v})" for k, v in DIFFUSERS_CLASS_NAMES.items())
        raise UnsupportedSchedulerError(
            f"{where}: no sampler for scheduler class {class_name!r}; supported: {supported}. "
            f"Name one explicitly (scheduler= / --scheduler, one of {sorted(SCHEDULERS)})"
        )
    return DIFFUSERS_CLASS_NAMES[class_name]


def from_diffusers_config(
    config: Mapping,
    num_inference_steps: int,
    name: str | None = None,
    *,
    noise_schedule: NoiseSchedule | None = None,
    **options: Any,
) -> SamplerSchedule:
    """Schedule from a diffusers ``scheduler_config.json`` dict, as ``from_config`` would build.

    ``name`` defaults to the one of ``config["_class_name"]`` (an unknown class is an
    :class:`UnsupportedSchedulerError`); pass it to switch samplers. Keys the sampler does not
    use are ignored; keys selecting a variant not implemented here (``thresholding``, Karras
    sigmas, ...) raise unless at their default. ``options`` override the config;
    ``noise_schedule`` replaces the config's betas and prediction type (a run's own).
    """
    if name is None:
        name = scheduler_for_class(config.get("_class_name"))
    spec = _sampler(name)
    for key, ok in spec.unsupported.items():
        if key in config and config[key] != ok and not (ok is False and config[key] is None):
            raise ValueError(f"{key}={config[key]!r} is not supported by {name!r} (only {ok!r})")
    picked = {k: config[k] for k in spec.defaults if config.get(k) is not None}
    if noise_schedule is None:
        noise_schedule = noise_schedule_from_config(config)
    return make_sampler_schedule(name, num_inference_steps, noise_schedule, **{**picked, **options})


def init_noise_sigma(schedule: SamplerSchedule) -> jax.Array:
    """Scale of the initial latents: ``latents = init_noise_sigma * N(0, I)``."""
    return schedule.init_sigma


def init_state(schedule: SamplerSchedule, sample: jax.Array) -> SamplerState:
    """The state before step 0: zeros for DPM-Solver++ and PNDM (never read before written)."""
    init = SCHEDULERS[schedule.name].init
    return SamplerState() if init is None else init(sample)


def scale_model_input(schedule: SamplerSchedule, sample: jax.Array, i) -> jax.Array:
    """The model's input at step ``i``: Euler divides by ``sqrt(sigma^2 + 1)``, others pass."""
    if not SCHEDULERS[schedule.name].scales_input:
        return sample
    div = schedule.tables["in_div"][i]
    return (sample.astype(jnp.float32) / div).astype(sample.dtype)


def step(
    schedule: SamplerSchedule,
    state: SamplerState,
    i,
    model_output: jax.Array,
    sample: jax.Array,
    key: jax.Array | None = None,
    noise: jax.Array | None = None,
) -> tuple[jax.Array, SamplerState]:
    """One denoising step from ``sample`` at step ``i`` (int or traced) to step ``i + 1``.

    Math is float32 whatever the input dtype; the result has ``sample``'s dtype. Stochastic
    samplers (DDPM, DDIM with eta > 0) need ``key`` or the standard-normal ``noise`` itself
    (to reproduce another implementation's draws); deterministic ones ignore both.
    """
    if schedule.stochastic and noise is None:
        if key is None:
            raise ValueError(f"{schedule.name!r} with this schedule is stochastic: pass key=")
        noise = jax.random.normal(key, sample.shape, jnp.float32)
    if noise is not None:
        noise = jnp.asarray(noise, jnp.float32)
    row = {k: v[i] for k, v in schedule.tables.items()}
    mo, x = (jnp.asarray(a, jnp.float32) for a in (model_output, sample))
    prev, state = SCHEDULERS[schedule.name].step(schedule, state, row, mo, x, noise)
    return prev.astype(jnp.asarray(sample).dtype), state
