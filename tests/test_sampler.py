"""The per-user sampler: guidance with a projected zero profile, batch independence, the loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta
from helpers import SD15_LIKE, rel_err

from psa_jax.models.psa_unet import init_variables
from psa_jax.models.unet import UNet2DConditionModel, UNetConfig
from psa_jax.sample import schedulers as sched_lib
from psa_jax.sample.sampler import Conditioning, Sampler, guided_prediction, sample_latents

D, L = 12, 5  # profile size, prompt length


# SD1.5's block layout, one layer per block: the loop compiles in seconds.
SMALL = {**SD15_LIKE, "layers_per_block": 1, "block_out_channels": (16, 16, 32)}


@functools.cache
def _model():
    module = UNet2DConditionModel(UNetConfig.from_diffusers_config(SMALL), user_embed_dim=D)
    variables = meta.unbox(init_variables(module, 0))
    rng = np.random.default_rng(0)  # a non-zero adapter: zero init would hide the user branch
    variables["adapter"] = jax.tree.map(
        lambda x: np.asarray(x) + 0.3 * rng.standard_normal(np.shape(x)).astype(np.float32),
        variables["adapter"],
    )
    return module, variables


def _cond(n, seed=0, with_user=True):
    rng = np.random.default_rng(seed)
    dim = SD15_LIKE["cross_attention_dim"]
    return Conditioning(
        text_states=jnp.asarray(rng.standard_normal((n, L, dim), dtype=np.float32)),
        neg_text_states=jnp.asarray(rng.standard_normal((n, L, dim), dtype=np.float32)),
        user_embeds=jnp.asarray(3 * rng.standard_normal((n, D), dtype=np.float32))
        if with_user
        else None,
        user_scale=jnp.asarray(rng.uniform(0.5, 1.5, n).astype(np.float32)),
    )


def _take(cond, idx):
    return jax.tree.map(lambda x: x[np.asarray(idx)], cond)


def test_guidance_uses_the_projected_zero_profile_on_the_negative_branch():
    module, variables = _model()
    cond = _cond(2)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 16, 16, 4), dtype=np.float32))
    t = jnp.asarray(500)
    guided = jax.jit(guided_prediction, static_argnums=0)  # eager linen is op-by-op slow
    got = guided(Sampler(module, 4.0), variables, x, t, cond)
    apply = jax.jit(module.apply)

    def unet(ctx, user):
        return apply(variables, x, t, ctx, None, user_embeds=user, user_scale=cond.user_scale)

    pos = unet(cond.text_states, cond.user_embeds)
    neg = unet(cond.neg_text_states, jnp.zeros_like(cond.user_embeds))
    assert rel_err(got, neg + 4.0 * (pos - neg)) < 1e-5
    # proj(zeros) is not "adapter off": the negative branch still carries the projection's bias.
    off = apply({"params": variables["params"]}, x, t, cond.neg_text_states, None)
    assert rel_err(neg, off) > 1e-3
    # guidance_scale 1 runs the conditional branch only.
    assert rel_err(guided(Sampler(module, 1.0), variables, x, t, cond), pos) < 1e-6


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_mixed_user_batch_equals_each_sample_alone(name):
    """Different users, prompts, user scales and seeds in one batch: each sample is what it is
    when generated alone (ddpm also draws per-step noise from the sample's own key)."""
    module, variables = _model()
    schedule = sched_lib.make_sampler_schedule(name, 4)
    sampler = Sampler(module, 3.0)
    cond, seeds = _cond(3, seed=2), np.array([7, 11, 13])
    batch = np.asarray(sample_latents(sampler, schedule, variables, cond, seeds, (16, 16, 4)))
    assert np.isfinite(batch).all()
    for i in range(3):
        one = _take(cond, [i])
        alone = sample_latents(sampler, schedule, variables, one, seeds[[i]], (16, 16, 4))
        assert rel_err(np.asarray(alone)[0], batch[i]) < 1e-5, i
    assert rel_err(batch[0], batch[1]) > 0.1  # the samples really differ


def test_loop_equals_a_python_loop_of_steps():
    """The compiled fori_loop is the plain loop: scale input, guided eps, scheduler step."""
    module, variables = _model()
    schedule = sched_lib.make_sampler_schedule("dpmpp_2m", 5)
    sampler = Sampler(module, 2.5)
    cond, seeds = _cond(2, seed=3), np.array([1, 2])
    got = np.asarray(sample_latents(sampler, schedule, variables, cond, seeds, (16, 16, 4)))

    guided = jax.jit(guided_prediction, static_argnums=0)
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
    x = jax.vmap(lambda k: jax.random.normal(k, (16, 16, 4)))(keys)
    x = x * sched_lib.init_noise_sigma(schedule)
    state = sched_lib.init_state(schedule, x)
    for i in range(5):
        model_in = sched_lib.scale_model_input(schedule, x, i)
        eps = guided(sampler, variables, model_in, schedule.timesteps[i], cond)
        x, state = sched_lib.step(schedule, state, i, eps, x)
    assert rel_err(got, x) < 1e-5


def test_base_model_samples_without_user_embeds():
    module, variables = _model()
    schedule = sched_lib.make_sampler_schedule("euler", 3)
    cond = _cond(2, with_user=False)
    base = {"params": variables["params"]}
    out = sample_latents(Sampler(module, 2.0), schedule, base, cond, [0, 1], (16, 16, 4))
    assert out.shape == (2, 16, 16, 4) and np.isfinite(np.asarray(out)).all()


def test_sampling_split_over_a_mesh_equals_one_device():
    """8 samples over a (data 4, fsdp 2) mesh of 8 host devices: same latents as one device."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        PYTHONPATH=root,
        JAX_PLATFORMS="cpu",
    )
    script = os.path.join(root, "tests", "scripts", "mesh_sample.py")
    proc = subprocess.run(
        [sys.executable, script], env=env, capture_output=True, text=True, timeout=600, cwd=root
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT ") :])
    assert out["devices"] == 8 and out["rel_err"] < 1e-5
    assert out["local_shape"] == {"data": 8, "fsdp": 1, "tensor": 1}
    assert out["local_devices"] == 8 and out["local_rel_err"] < 1e-5


def test_one_local_device_has_no_data_mesh():
    """``Pipeline.mesh`` as the demo sets it: None on a one-device host (sampling unsplit)."""
    from psa_jax.core import parallel

    assert jax.local_device_count() == 1  # pytest runs JAX's single CPU device
    assert parallel.local_data_mesh() is None
