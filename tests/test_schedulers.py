"""Sampling schedulers against diffusers 0.42.1 (torch float32, CPU), step by step."""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SD15_SCHEDULER_CONFIG

from psa_jax.core.diffusion import make_noise_schedule
from psa_jax.sample import schedulers as S

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
ddpm_module = pytest.importorskip("diffusers.schedulers.scheduling_ddpm")

CLASSES = {
    "ddpm": diffusers.DDPMScheduler,
    "ddim": diffusers.DDIMScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
    "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
    "pndm": diffusers.PNDMScheduler,
}
BETAS = {
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "linear": dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
}
SHAPE = (2, 4, 8, 8)
# Same-input steps differ from diffusers by a few float32 ulps: torch's CPU sqrt/log/exp are not
# correctly rounded (ours are), and XLA contracts a*b+c into FMAs. A free-running loop
# accumulates that, like any two float32 implementations: over 25 steps up to ~1.3e-6 here,
# where diffusers' own float32 trajectory is ~5e-7 away from the same math in float64. PNDM's
# first v-prediction step over 3 linspace steps cancels more: ours and diffusers' are each
# 2.4e-6 / 2.8e-6 from its float64 value and 1.7e-6 from each other on an AVX-512 CPU (under
# 1e-6 on another), so a step may differ by 4e-6; both are well inside the 1e-5 model standard.
STEP_TOL = 4e-6
LOOP_TOL = 4e-6
SD15_CONFIG = SD15_SCHEDULER_CONFIG


def _fake_model(x, t):
    """A deterministic nonlinear stand-in for the UNet, evaluated by JAX for both sides."""
    return 0.3 * jnp.tanh(x) + 0.01 * t.astype(jnp.float32) / 1000


_fake_model_jit = jax.jit(_fake_model)


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


def _schedules(name, n, beta, pred, zero_snr=False, **opts):
    """(ours, diffusers') built from the same options; DDIM's eta is a step argument there."""
    noise_kw = dict(BETAS[beta], prediction_type=pred, rescale_betas_zero_snr=zero_snr)
    ours = S.make_sampler_schedule(name, n, make_noise_schedule(**noise_kw), **opts)
    cfg = {**S.SCHEDULERS[name].defaults, **opts}
    cfg.pop("eta", None)
    if name == "pndm":  # PNDMScheduler has no zero-SNR rescaling
        assert not noise_kw.pop("rescale_betas_zero_snr")
    ref = CLASSES[name](**noise_kw, **cfg)
    ref.set_timesteps(n)
    return ours, ref


def _reference_loop(ref, name, latents, noises, eta, monkeypatch):
    """diffusers' sampling loop; returns each step's input sample, model output and result."""
    x = torch.from_numpy(latents) * ref.init_noise_sigma
    inputs, outputs, results = [], [], []
    for i, t in enumerate(ref.timesteps):
        model_in = ref.scale_model_input(x, t).numpy()
        mo = np.array(_fake_model_jit(jnp.asarray(model_in), jnp.asarray(t.numpy())))
        kwargs = {}
        if name == "ddpm":
            noise = torch.from_numpy(noises[i])
            monkeypatch.setattr(ddpm_module, "randn_tensor", lambda *a, _n=noise, **k: _n)
        elif name == "ddim" and eta > 0:
            kwargs = dict(eta=eta, variance_noise=torch.from_numpy(noises[i]))
        inputs.append(x.numpy().copy())
        outputs.append(mo)
        x = ref.step(torch.from_numpy(mo), t, x, **kwargs).prev_sample
        results.append(x.numpy().copy())
    return np.stack(inputs), np.stack(outputs), np.stack(results)


@jax.jit
def _free_run(schedule, latents, noises):
    """Our sampling loop (scan over a traced step index), returning every step's sample."""
    x = latents * S.init_noise_sigma(schedule)

    def body(carry, xs):
        x, state = carry
        i, noise = xs
        mo = _fake_model(S.scale_model_input(schedule, x, i), schedule.timesteps[i])
        x, state = S.step(schedule, state, i, mo, x, noise=noise)
        return (x, state), x

    steps = jnp.arange(schedule.num_inference_steps)
    _, xs = jax.lax.scan(body, (x, S.init_state(schedule, x)), (steps, noises))
    return xs


@jax.jit
def _teacher_forced(schedule, samples, model_outputs, noises):
    """Each step from diffusers' own input sample and model output."""

    def body(state, xs):
        i, x, mo, noise = xs
        x, state = S.step(schedule, state, i, mo, x, noise=noise)
        return state, x

    steps = jnp.arange(schedule.num_inference_steps)
    state = S.init_state(schedule, samples[0])
    return jax.lax.scan(body, state, (steps, samples, model_outputs, noises))[1]


def _compare(name, n, beta, pred, monkeypatch, seed=0, tol=(STEP_TOL, LOOP_TOL), **opts):
    ours, ref = _schedules(name, n, beta, pred, **opts)
    np.testing.assert_array_equal(np.asarray(ours.timesteps), ref.timesteps.numpy())
    assert ours.timesteps.dtype == (jnp.float32 if name == "euler" else jnp.int32)
    np.testing.assert_allclose(float(S.init_noise_sigma(ours)), ref.init_noise_sigma, rtol=1e-6)
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal(SHAPE, np.float32)
    calls = ours.num_inference_steps  # PNDM: more model calls than steps
    noises = rng.standard_normal((calls, *SHAPE), np.float32)
    inputs, outputs, results = _reference_loop(
        ref, name, latents, noises, opts.get("eta", 0.0), monkeypatch
    )
    forced = np.asarray(_teacher_forced(ours, inputs, outputs, noises))
    free = np.asarray(_free_run(ours, latents, noises))
    assert np.isfinite(results).all() and len(results) == calls
    for i in range(calls):
        assert _rel(forced[i], results[i]) <= tol[0], (i, _rel(forced[i], results[i]))
        assert _rel(free[i], results[i]) <= tol[1], (i, _rel(free[i], results[i]))


@pytest.mark.parametrize(
    "name,pred,spacing,n,beta",
    [
        (name, pred, spacing, n, beta)
        for name, pred, spacing, (n, beta) in itertools.product(
            CLASSES,
            ["epsilon", "v_prediction"],
            ["leading", "trailing", "linspace"],
            [(10, "scaled_linear"), (25, "linear")],
        )
    ],
)
def test_sampling_loop_matches_diffusers(name, pred, spacing, n, beta, monkeypatch):
    _compare(name, n, beta, pred, monkeypatch, timestep_spacing=spacing)


@pytest.mark.parametrize(
    "name,n,beta,pred,opts",
    [
        ("ddim", 10, "scaled_linear", "epsilon", dict(eta=1.0, timestep_spacing="linspace")),
        ("ddim", 12, "linear", "v_prediction", dict(eta=0.5, timestep_spacing="trailing")),
        ("ddim", 10, "linear", "epsilon", dict(set_alpha_to_one=True, clip_sample=True)),
        ("ddim", 7, "cosine", "sample", dict(steps_offset=0)),
        ("ddpm", 10, "linear", "epsilon", dict(variance_type="fixed_large", clip_sample=True)),
        ("ddpm", 8, "scaled_linear", "sample", dict(timestep_spacing="trailing")),
        ("euler", 10, "scaled_linear", "epsilon", dict(final_sigmas_type="sigma_min")),
        ("euler", 9, "cosine", "sample", dict(timestep_spacing="leading", steps_offset=0)),
        ("dpmpp_2m", 20, "scaled_linear", "epsilon", dict(final_sigmas_type="sigma_min")),
        ("dpmpp_2m", 16, "linear", "v_prediction", dict(lower_order_final=False)),
        ("dpmpp_2m", 10, "linear", "epsilon", dict(solver_order=1)),
        ("dpmpp_2m", 6, "cosine", "epsilon", dict(lambda_min_clipped=-5.1)),
        ("dpmpp_2m", 1, "scaled_linear", "epsilon", {}),
        ("dpmpp_2m", 2, "scaled_linear", "sample", dict(euler_at_final=True)),
        ("pndm", 50, "scaled_linear", "epsilon", {}),  # PSAlign's: SD 1.5's PLMS, 50 steps
        ("pndm", 10, "linear", "epsilon", dict(skip_prk_steps=False)),  # Runge-Kutta warm-up
        ("pndm", 4, "scaled_linear", "v_prediction", dict(skip_prk_steps=False)),
        ("pndm", 7, "cosine", "epsilon", dict(skip_prk_steps=False, set_alpha_to_one=True)),
        ("pndm", 9, "linear", "v_prediction", dict(steps_offset=0, set_alpha_to_one=True)),
        ("pndm", 1, "scaled_linear", "epsilon", {}),
        ("pndm", 2, "scaled_linear", "epsilon", dict(timestep_spacing="trailing")),
        ("pndm", 3, "linear", "v_prediction", dict(timestep_spacing="linspace")),
    ],
    ids=lambda v: v if isinstance(v, (str, int)) else "-".join(f"{k}={x}" for k, x in v.items()),
)
def test_options_match_diffusers(name, n, beta, pred, opts, monkeypatch):
    _compare(name, n, beta, pred, monkeypatch, seed=1, **opts)


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m"])
def test_zero_terminal_snr_matches_diffusers(name, monkeypatch):
    # Looser: the rescaled alphas_cumprod are ~4e-6 off near t = T (see core/diffusion.py), and
    # Euler's first step from sigma = 4096 cancels ~4096-sized terms down to ~18.
    opts = dict(timestep_spacing="trailing", zero_snr=True)
    _compare(name, 10, "scaled_linear", "v_prediction", monkeypatch, tol=(1e-4, 1e-4), **opts)


def test_step_in_fori_loop_with_traced_index_and_no_retrace():
    traces = []

    @jax.jit
    def sample(schedule, latents):
        traces.append(1)
        x = latents * S.init_noise_sigma(schedule)

        def body(i, carry):
            x, state = carry
            mo = _fake_model(S.scale_model_input(schedule, x, i), schedule.timesteps[i])
            return S.step(schedule, state, i, mo, x)

        return jax.lax.fori_loop(
            0, schedule.num_inference_steps, body, (x, S.init_state(schedule, x))
        )[0]

    latents = np.random.default_rng(2).standard_normal(SHAPE, np.float32)
    for spacing in ("leading", "trailing", "linspace"):
        sched = S.make_sampler_schedule("dpmpp_2m", 12, timestep_spacing=spacing)
        final = np.asarray(sample(sched, latents))
        scanned = np.asarray(_free_run(sched, latents, np.zeros((12, *SHAPE), np.float32)))[-1]
        np.testing.assert_allclose(final, scanned, rtol=0, atol=1e-6)
    assert len(traces) == 1  # other timesteps are other leaf values, not a new program


def test_stochastic_steps_need_a_key_and_use_it():
    sched = S.make_sampler_schedule("ddpm", 10)
    x = jnp.ones(SHAPE)
    state = S.init_state(sched, x)
    with pytest.raises(ValueError, match="key"):
        S.step(sched, state, 0, x, x)
    step = jax.jit(S.step)
    a, _ = step(sched, state, 0, x, x, key=jax.random.key(0))
    b, _ = step(sched, state, 0, x, x, key=jax.random.key(0))
    c, _ = step(sched, state, 0, x, x, key=jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    ddim = S.make_sampler_schedule("ddim", 10)  # eta = 0: deterministic, no key needed
    assert not ddim.stochastic
    S.step(ddim, S.init_state(ddim, x), 3, x, x)
    assert S.make_sampler_schedule("ddim", 10, eta=0.3).stochastic


def test_dtype_is_preserved():
    sched = S.make_sampler_schedule("euler", 5)
    x = jnp.ones(SHAPE, jnp.bfloat16)
    out, _ = S.step(sched, S.init_state(sched, x), 0, x, x)
    assert out.dtype == jnp.bfloat16
    assert S.scale_model_input(sched, x, 0).dtype == jnp.bfloat16


@pytest.mark.parametrize("name", list(CLASSES))
def test_defaults_are_stable_diffusion_from_config(name):
    ours = S.make_sampler_schedule(name, 30)
    ref = CLASSES[name].from_config(SD15_CONFIG)
    ref.set_timesteps(30)
    np.testing.assert_array_equal(np.asarray(ours.timesteps), ref.timesteps.numpy())
    np.testing.assert_allclose(float(S.init_noise_sigma(ours)), ref.init_noise_sigma, rtol=1e-6)
    via_config = S.from_diffusers_config(SD15_CONFIG, 30, name=name)
    assert jax.tree.all(jax.tree.map(np.array_equal, via_config, ours))


def test_sd15_folder_config_is_psaligns_plms():
    """SD 1.5's shipped config (no name given) is PNDM with skip_prk_steps: 50 steps are 51
    model calls, the first timestep twice, as diffusers' ``PNDMScheduler.from_config``."""
    ours = S.from_diffusers_config(SD15_CONFIG, 50)
    ref = diffusers.PNDMScheduler.from_config(SD15_CONFIG)
    ref.set_timesteps(50)
    assert ours.name == "pndm" and ours.num_inference_steps == 51
    np.testing.assert_array_equal(np.asarray(ours.timesteps), ref.timesteps.numpy())
    assert list(np.asarray(ours.timesteps)[:3]) == [981, 961, 961]
    with pytest.raises(S.UnsupportedSchedulerError, match="LMSDiscreteScheduler"):
        S.scheduler_for_class("LMSDiscreteScheduler")


def test_from_diffusers_config_infers_the_sampler_and_reads_options():
    ref = diffusers.DPMSolverMultistepScheduler(
        **BETAS["linear"], prediction_type="v_prediction", timestep_spacing="trailing"
    )
    config = json.loads(ref.to_json_string())  # what scheduler_config.json holds
    ours = S.from_diffusers_config(config, 20)
    assert ours.name == "dpmpp_2m" and ours.prediction_type == "v_prediction"
    ref.set_timesteps(20)
    np.testing.assert_array_equal(np.asarray(ours.timesteps), ref.timesteps.numpy())
    ddim = S.from_diffusers_config({**SD15_CONFIG, "_class_name": "DDIMScheduler"}, 10, eta=1.0)
    assert ddim.name == "ddim" and ddim.stochastic


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: S.make_sampler_schedule("plms", 10), r"unknown scheduler 'plms'.*'ddim'"),
        (lambda: S.make_sampler_schedule("ddim", 10, timestep_spacing="x"), "timestep_spacing"),
        (lambda: S.make_sampler_schedule("euler", 0), "num_inference_steps"),
        (lambda: S.make_sampler_schedule("ddpm", 1001), "num_inference_steps"),
        (lambda: S.make_sampler_schedule("ddim", 10, foo=1), r"unknown options \['foo'\]"),
        (lambda: S.make_sampler_schedule("ddpm", 10, variance_type="learned"), "variance_type"),
        (lambda: S.make_sampler_schedule("euler", 10, final_sigmas_type="x"), "final_sigmas"),
        (lambda: S.make_sampler_schedule("dpmpp_2m", 10, solver_order=3), "solver_order"),
        (lambda: S.make_sampler_schedule("ddim", 10, eta=-1.0), "eta"),
        (lambda: S.make_sampler_schedule("ddpm", 1000, steps_offset=1), "outside"),
        (
            lambda: S.from_diffusers_config(
                {**SD15_CONFIG, "_class_name": "LMSDiscreteScheduler"}, 4
            ),
            r"'LMSDiscreteScheduler'.*PNDMScheduler \(pndm\)",
        ),
        (lambda: S.make_sampler_schedule("pndm", 3, skip_prk_steps=False), "skip_prk_steps"),
        (
            lambda: S.make_sampler_schedule(
                "pndm", 10, make_noise_schedule(prediction_type="sample")
            ),
            "prediction_type 'sample' for 'pndm'",
        ),
        (
            lambda: S.from_diffusers_config({**SD15_CONFIG, "thresholding": True}, 10, "ddim"),
            "thresholding",
        ),
        (
            lambda: S.from_diffusers_config(
                {"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True}, 10
            ),
            "use_karras_sigmas",
        ),
    ],
)
def test_bad_names_and_options_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_unsupported_prediction_type_raises():
    bad = make_noise_schedule().replace(prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="prediction_type"):
        S.make_sampler_schedule("ddim", 10, bad)
