"""The training forward process against diffusers' DDPMScheduler (torch, CPU)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from helpers import SD15_SCHEDULER_CONFIG

from psa_jax.core import diffusion as N

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SCHEDULES = [
    dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=777
    ),
    dict(beta_schedule="linear", num_train_timesteps=1),
]


def _reference(**kw):
    kw = {"beta_start": 0.00085, "beta_end": 0.012, **kw}
    return diffusers.DDPMScheduler(**kw)


@pytest.mark.parametrize("kw", SCHEDULES, ids=lambda kw: "-".join(map(str, kw.values())))
def test_alphas_cumprod_bitwise_equal_to_diffusers(kw):
    ours = np.asarray(N.make_noise_schedule(**kw).alphas_cumprod)
    ref = _reference(**kw).alphas_cumprod.numpy()
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("kw", SCHEDULES[:3], ids=lambda kw: kw["beta_schedule"])
def test_zero_terminal_snr_matches_diffusers_to_one_ulp_of_sqrt(kw):
    # Not bitwise: torch's CPU float32 sqrt is not correctly rounded (~1 ulp off for ~20% of
    # inputs), numpy's is; the rescale's cancellation near t=T turns that into ~4e-6 relative.
    ours = np.asarray(N.make_noise_schedule(rescale_betas_zero_snr=True, **kw).alphas_cumprod)
    ref = _reference(rescale_betas_zero_snr=True, **kw).alphas_cumprod.numpy()
    assert ours[-1] == 0.0 == ref[-1]
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_trained_betas_match_diffusers():
    betas = np.linspace(1e-4, 0.03, 50) ** 1.5
    ours = N.make_noise_schedule(trained_betas=list(betas), num_train_timesteps=50)
    ref = _reference(trained_betas=betas, num_train_timesteps=50)
    np.testing.assert_array_equal(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy())


def test_defaults_are_stable_diffusion():
    ours = N.make_noise_schedule()
    ref = _reference(beta_schedule="scaled_linear")
    np.testing.assert_array_equal(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy())
    assert ours.num_train_timesteps == 1000 and ours.prediction_type == "epsilon"


def _rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("kw", SCHEDULES[:3], ids=lambda kw: kw["beta_schedule"])
def test_add_noise_and_velocity_match_diffusers(kw, layout):
    ref = _reference(**kw)
    s = N.make_noise_schedule(**kw)
    rng = np.random.default_rng(0)
    shape = (64, 4, 8, 8) if layout == "NCHW" else (64, 8, 8, 4)
    x0 = rng.standard_normal(shape, dtype=np.float32)
    eps = rng.standard_normal(shape, dtype=np.float32)
    t = np.concatenate([[0, 1, 500, 998, 999], rng.integers(0, 1000, 59)]).astype(np.int32)
    tt = torch.from_numpy(t.astype(np.int64))
    want_noisy = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(eps), tt).numpy()
    want_v = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(eps), tt).numpy()
    add_noise = jax.jit(N.add_noise)
    got_noisy = add_noise(s, x0, eps, t)
    got_v = jax.jit(N.velocity)(s, x0, eps, t)
    assert got_noisy.dtype == jnp.float32 and got_noisy.shape == shape
    assert _rel_err(got_noisy, want_noisy) <= 1e-6
    assert _rel_err(got_v, want_v) <= 1e-6
    # Per sample too, so a wrong broadcast axis cannot hide behind the global max.
    for i in (0, 4, 17):
        assert _rel_err(got_noisy[i], want_noisy[i]) <= 1e-6


def test_training_targets_by_prediction_type():
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal((3, 2, 4, 4), dtype=np.float32)
    eps = rng.standard_normal((3, 2, 4, 4), dtype=np.float32)
    t = np.array([3, 400, 999], np.int32)
    for ptype in ("epsilon", "v_prediction", "sample"):
        s = N.make_noise_schedule(prediction_type=ptype)
        got = np.asarray(N.training_target(s, x0, eps, t))
        if ptype == "epsilon":
            np.testing.assert_array_equal(got, eps)
        elif ptype == "sample":
            np.testing.assert_array_equal(got, x0)
        else:
            want = _reference(prediction_type=ptype, beta_schedule="scaled_linear").get_velocity(
                torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(t.astype(np.int64))
            )
            assert _rel_err(got, want.numpy()) <= 1e-6


def test_bfloat16_inputs_keep_dtype_and_use_float32_math():
    s = N.make_noise_schedule()
    x0 = jnp.ones((2, 3), jnp.bfloat16)
    out = N.add_noise(s, x0, jnp.zeros((2, 3), jnp.bfloat16), jnp.array([0, 999]))
    assert out.dtype == jnp.bfloat16
    want = np.sqrt(np.asarray(s.alphas_cumprod)[[0, 999]])[:, None]
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.broadcast_to(want, (2, 3)), rtol=1e-2
    )


def test_from_config_ignores_unrelated_keys():
    s = N.noise_schedule_from_config(SD15_SCHEDULER_CONFIG)
    np.testing.assert_array_equal(
        np.asarray(s.alphas_cumprod), np.asarray(N.make_noise_schedule().alphas_cumprod)
    )
    section = ml_collections.ConfigDict(
        {"beta_schedule": "linear", "prediction_type": "v_prediction", "num_train_timesteps": 10}
    )
    s = N.noise_schedule_from_config(section)
    assert s.prediction_type == "v_prediction" and s.num_train_timesteps == 10


def test_bad_names_raise():
    with pytest.raises(ValueError, match="scaled_linear"):
        N.make_noise_schedule(beta_schedule="cosine")
    with pytest.raises(ValueError, match="v_prediction"):
        N.make_noise_schedule(prediction_type="flow")
    with pytest.raises(ValueError, match="trained_betas"):
        N.make_noise_schedule(trained_betas=[0.1, 0.2])


def test_sample_timesteps_range_and_dtype():
    s = N.make_noise_schedule(num_train_timesteps=7, beta_schedule="linear")
    t = N.sample_timesteps(jax.random.key(0), 4096, s)
    assert t.dtype == jnp.int32 and t.shape == (4096,)
    assert set(np.unique(np.asarray(t))) == set(range(7))


def test_schedule_is_a_pytree_with_static_prediction_type():
    s = N.make_noise_schedule(prediction_type="v_prediction")
    leaves, treedef = jax.tree_util.tree_flatten(s)
    assert len(leaves) == 1
    assert jax.tree_util.tree_unflatten(treedef, leaves).prediction_type == "v_prediction"
