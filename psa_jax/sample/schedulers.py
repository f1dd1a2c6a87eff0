"""Sampling schedulers in pure JAX, equal to diffusers 0.42.1 in float32.

Four samplers, named as in :data:`SCHEDULERS`: ``"ddpm"`` (``DDPMScheduler``), ``"ddim"``
(``DDIMScheduler``), ``"euler"`` (``EulerDiscreteScheduler``) and ``"dpmpp_2m"``
(``DPMSolverMultistepScheduler`` with ``algorithm_type="dpmsolver++"``, midpoint solver).

Everything that depends only on the step index -- timesteps, sigmas, every scalar coefficient --
is computed once on the host with numpy in float32, in diffusers' operation order, and stored as
per-step tables in a :class:`SamplerSchedule` pytree. :func:`step` then only indexes the tables
with a (possibly traced) step index and does the elementwise tensor math, again in diffusers'
order, so it runs inside ``jax.lax.fori_loop``/``scan`` with no Python branching on the index and
a schedule with other steps' values (spacing, betas) reuses the compiled loop.

Not bitwise equal to torch: torch's CPU float32 ``sqrt``/``log``/``exp`` (MKL/SLEEF) are not
correctly rounded, ours are (``log``/``exp`` are evaluated in float64 and rounded once, which also
makes the tables independent of numpy's CPU-dispatched float32 kernels), and XLA contracts
``a * b + c`` into FMAs. A step from the same inputs agrees to a few ulps (<= ~4e-7 relative);
whole loops drift apart as any two float32 implementations do (``tests/test_schedulers.py``).

Option defaults are what ``<Scheduler>.from_config(sd15_scheduler_config)`` gives -- diffusers'
class defaults overridden by Stable Diffusion 1.x's ``scheduler_config.json`` (``steps_offset=1``,
``clip_sample=False``, ``set_alpha_to_one=False``) -- matching ``make_noise_schedule``'s SD
defaults. Left out: thresholding, Karras/exponential/beta/Lu/flow sigmas, Euler's stochastic
churn (``s_churn``, always 0: Euler here is deterministic), DDIM's ``use_clipped_model_output``,
learned variances, third-order and SDE DPM-Solver, custom timestep lists.
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

_f32 = np.float32
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")


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
        return self.timesteps.shape[0]


@flax.struct.dataclass
class SamplerState:
    """What a step carries to the next: DPM-Solver++'s previous x0 prediction, else nothing."""

    prev_x0: jax.Array | None = None


def _log(x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(x, np.float64)).astype(_f32)


def _exp(x: np.ndarray) -> np.ndarray:
    return np.exp(np.asarray(x, np.float64)).astype(_f32)


def _spaced(spacing: str, T: int, n: int, offset: int, *, dpm_last: int | None = None, **kw):
    """``set_timesteps``' numpy code (float64, then cast) as each diffusers scheduler has it.

    DPM-Solver (``dpm_last`` given) spaces n + 1 points over ``[0, dpm_last)`` and drops the
    last; Euler (``round_linspace=False``) keeps linspace's fractional float32 timesteps.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep_spacing {spacing!r}; choose from {list(SPACINGS)}")
    m, top = (n, T) if dpm_last is None else (n + 1, dpm_last)
    if spacing == "trailing":
        return np.arange(top, 0, -T / n).round().astype(np.int64) - 1
    if spacing == "linspace" and not kw.get("round_linspace", True):
        return np.linspace(0, T - 1, n, dtype=_f32)[::-1].copy()
    if spacing == "linspace":
        ts = np.linspace(0, top - 1, m).round()[::-1].astype(np.int64)
    else:
        ts = (np.arange(0, m) * (top // m)).round()[::-1].astype(np.int64) + offset
    return ts if dpm_last is None else ts[:-1]


def _check_timesteps(ts: np.ndarray, T: int) -> None:
    if ts.size == 0 or ts.min() < 0 or ts.max() > T - 1:
        raise ValueError(f"timesteps {ts.tolist()} fall outside [0, {T - 1}]; lower steps_offset")


def _clamp_terminal(acp: np.ndarray) -> np.ndarray:
    # Zero-terminal-SNR schedules end at acp = 0 (infinite sigma); Euler and DPM-Solver set it
    # to 2**-24 as diffusers does when rescale_betas_zero_snr is set.
    if acp[-1] != 0:
        return acp
    acp = acp.copy()
    acp[-1] = _f32(2**-24)
    return acp


def _final_sigma(kind: str, acp: np.ndarray) -> np.float32:
    if kind == "zero":
        return _f32(0)
    if kind == "sigma_min":
        return np.sqrt((1 - acp[0]) / acp[0])
    raise ValueError(f"unknown final_sigmas_type {kind!r}; choose from ['zero', 'sigma_min']")


def _inference_sigmas(ts: np.ndarray, acp: np.ndarray, final_sigmas_type: str) -> np.ndarray:
    """Train sigmas linearly interpolated at ``ts`` (np.interp in float64), then the final one."""
    train = _clamp_terminal(acp)
    sig = np.interp(ts, np.arange(0, len(acp)), np.sqrt((1 - train) / train))
    return np.concatenate([sig, [_final_sigma(final_sigmas_type, acp)]]).astype(_f32)


def _ddpm_tables(acp: np.ndarray, n: int, o: Mapping[str, Any]):
    T = len(acp)
    ts = _spaced(o["timestep_spacing"], T, n, o["steps_offset"])
    _check_timesteps(ts, T)
    prev = np.concatenate([ts[1:], [-1]])  # diffusers' previous_timestep: the next in the list
    a_t = acp[ts]
    a_prev = np.where(prev >= 0, acp[np.maximum(prev, 0)], _f32(1))
    b_t, b_prev = 1 - a_t, 1 - a_prev
    cur_alpha = a_t / a_prev
    cur_beta = 1 - cur_alpha
    if o["variance_type"] == "fixed_small":
        var = np.maximum((1 - a_prev) / (1 - a_t) * cur_beta, _f32(1e-20))
    elif o["variance_type"] == "fixed_large":
        var = cur_beta
    else:
        raise ValueError(f"variance_type {o['variance_type']!r}: use fixed_small or fixed_large")
    tables = {
        "sqrt_a": np.sqrt(a_t),
        "sqrt_b": np.sqrt(b_t),
        "c_x0": (np.sqrt(a_prev) * cur_beta) / b_t,
        "c_xt": np.sqrt(cur_alpha) * b_prev / b_t,
        "std": np.where(ts > 0, np.sqrt(var), _f32(0)),  # diffusers adds no noise at t == 0
    }
    return ts.astype(np.int32), tables, _f32(1), {"stochastic": True}


def _ddim_tables(acp: np.ndarray, n: int, o: Mapping[str, Any]):
    T = len(acp)
    ts = _spaced(o["timestep_spacing"], T, n, o["steps_offset"])
    _check_timesteps(ts, T)
    prev = ts - T // n  # diffusers steps back by T // n whatever the spacing
    final = _f32(1) if o["set_alpha_to_one"] else acp[0]
    a_t = acp[ts]
    a_prev = np.where(prev >= 0, acp[np.maximum(prev, 0)], final)
    b_t, b_prev = 1 - a_t, 1 - a_prev
    var = (b_prev / b_t) * (1 - a_t / a_prev)
    eta = _f32(o["eta"])
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {o['eta']}")
    std = eta * np.sqrt(var)
    tables = {
        "sqrt_a": np.sqrt(a_t),
        "sqrt_b": np.sqrt(b_t),
        "sqrt_a_prev": np.sqrt(a_prev),
        "c_dir": np.sqrt(1 - a_prev - std * std),
        "std": std,
    }
    return ts.astype(np.int32), tables, _f32(1), {"stochastic": bool(eta > 0)}


def _euler_tables(acp: np.ndarray, n: int, o: Mapping[str, Any]):
    T = len(acp)
    spacing = o["timestep_spacing"]
    ts = _spaced(spacing, T, n, o["steps_offset"], round_linspace=False).astype(_f32)
    _check_timesteps(ts, T)
    sigmas = _inference_sigmas(ts, acp, o["final_sigmas_type"])
    s = sigmas[:-1]
    s2p1 = s * s + 1
    tables = {
        "sigma": s,
        "in_div": np.sqrt(s2p1),  # scale_model_input: sample / sqrt(sigma^2 + 1)
        "dt": sigmas[1:] - s,
        "c_out": -s / np.sqrt(s2p1),  # v-prediction: x0 = v c_out + sample / (sigma^2 + 1)
        "v_div": s2p1,
    }
    top = sigmas.max()
    init = top if spacing in ("linspace", "trailing") else np.sqrt(top * top + 1)
    return ts, tables, init, {}


def _dpm_tables(acp: np.ndarray, n: int, o: Mapping[str, Any]):
    T = len(acp)
    order = o["solver_order"]
    if order not in (1, 2):
        raise ValueError(f"solver_order must be 1 or 2 (DPM-Solver++ 2M), got {order}")
    clip = _f32(o["lambda_min_clipped"])
    last = T
    if np.isfinite(clip):  # -inf, the default, clips nothing
        a2 = _clamp_terminal(acp)
        lam_train = _log(np.sqrt(a2)) - _log(np.sqrt(1 - a2))
        last = T - int(np.searchsorted(lam_train[::-1], clip))
    ts = _spaced(o["timestep_spacing"], T, n, o["steps_offset"], dpm_last=last)
    _check_timesteps(ts, T)
    sigmas = _inference_sigmas(ts, acp, o["final_sigmas_type"])
    alpha = 1 / np.sqrt(sigmas * sigmas + 1)
    sig = sigmas * alpha
    lam = _log(alpha) - _log(sig)  # +inf at a final sigma of zero
    n = len(ts)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = lam[1:] - lam[:-1]
        c_d0 = alpha[1:] * (_exp(-h) - 1)
        r0 = np.concatenate([[_f32(1)], lam[1:-1] - lam[:-2]]) / h
        c_r = 1 / r0
    idx = np.arange(n)
    low_final = (idx == n - 1) & (
        o["euler_at_final"]
        or (o["lower_order_final"] and n < 15)
        or o["final_sigmas_type"] == "zero"
    )
    second = (order == 2) & (idx >= 1) & ~low_final
    tables = {
        "alpha": alpha[:-1],  # x0 conversion at sigma_s0
        "sig": sig[:-1],
        "c_sample": sig[1:] / sig[:-1],
        "c_d0": c_d0,
        "c_d1": np.where(second, _f32(0.5) * c_d0, _f32(0)),  # zero: first-order step
        "c_r": np.where(second, c_r, _f32(0)),
    }
    return ts.astype(np.int32), tables, _f32(1), {}


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


@dataclasses.dataclass(frozen=True)
class _Sampler:
    build: Callable
    step: Callable
    defaults: Mapping[str, Any]  # accepted options -> default (SD 1.x from_config)
    unsupported: Mapping[str, Any]  # diffusers config keys we accept only at these values
    has_state: bool = False
    scales_input: bool = False


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
        _ddpm_tables,
        _ddpm_step,
        {**_COMMON, **_CLIP, "variance_type": "fixed_small"},
        _NOT_THRESHOLDED,
    ),
    "ddim": _Sampler(
        _ddim_tables,
        _ddim_step,
        {**_COMMON, **_CLIP, "set_alpha_to_one": False, "eta": 0.0},
        _NOT_THRESHOLDED,
    ),
    "euler": _Sampler(
        _euler_tables,
        _euler_step,
        {"timestep_spacing": "linspace", "steps_offset": 1, "final_sigmas_type": "zero"},
        {**_PLAIN_SIGMAS, "interpolation_type": "linear", "timestep_type": "discrete"},
        scales_input=True,
    ),
    "dpmpp_2m": _Sampler(
        _dpm_tables,
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
        has_state=True,
    ),
}

DIFFUSERS_CLASS_NAMES = {
    "DDPMScheduler": "ddpm",
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
}


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
    if pred not in PREDICTION_TYPES:
        raise ValueError(f"unsupported prediction_type {pred!r}; choose from {PREDICTION_TYPES}")
    acp = np.asarray(noise_schedule.alphas_cumprod, _f32)
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
        tables={k: jnp.asarray(np.asarray(v, _f32)) for k, v in tables.items()},
        init_sigma=jnp.asarray(init_sigma, jnp.float32),
        name=name,
        prediction_type=pred,
        clip_range=clip,
        **static,
    )


def from_diffusers_config(
    config: Mapping, num_inference_steps: int, name: str | None = None, **options: Any
) -> SamplerSchedule:
    """Schedule from a diffusers ``scheduler_config.json`` dict, as ``from_config`` would build.

    ``name`` defaults to the one of ``config["_class_name"]``; pass it to switch samplers (SD's
    folders ship a PNDM config). Keys the sampler does not use are ignored; keys selecting a
    variant not implemented here (``thresholding``, Karras sigmas, ...) raise unless at their
    default. ``options`` override the config.
    """
    if name is None:
        cls = config.get("_class_name")
        if cls not in DIFFUSERS_CLASS_NAMES:
            raise ValueError(
                f"no sampler for _class_name {cls!r}; pass name= one of {sorted(SCHEDULERS)}"
            )
        name = DIFFUSERS_CLASS_NAMES[cls]
    spec = _sampler(name)
    for key, ok in spec.unsupported.items():
        if key in config and config[key] != ok and not (ok is False and config[key] is None):
            raise ValueError(f"{key}={config[key]!r} is not supported by {name!r} (only {ok!r})")
    picked = {k: config[k] for k in spec.defaults if config.get(k) is not None}
    return make_sampler_schedule(
        name, num_inference_steps, noise_schedule_from_config(config), **{**picked, **options}
    )


def init_noise_sigma(schedule: SamplerSchedule) -> jax.Array:
    """Scale of the initial latents: ``latents = init_noise_sigma * N(0, I)``."""
    return schedule.init_sigma


def init_state(schedule: SamplerSchedule, sample: jax.Array) -> SamplerState:
    """The state before step 0 (zeros for DPM-Solver++, unused by its first-order step 0)."""
    if SCHEDULERS[schedule.name].has_state:
        return SamplerState(prev_x0=jnp.zeros(sample.shape, jnp.float32))
    return SamplerState()


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
