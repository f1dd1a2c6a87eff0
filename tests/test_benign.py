"""Benign fine-tuning profiles (SPQR): each trains exactly the parameters it names, the LoRA
with dropout 0 equals the merged LoRA, and fine-tuning learns (loss down on its data)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from psa_jax.core.diffusion import noise_schedule_from_config
from psa_jax.models import convert
from psa_jax.models.psa_unet import init_variables
from psa_jax.models.unet import UNet2DConditionModel, UNetConfig
from psa_jax.train import benign
from psa_jax.train import lora as lora_lib

TINY = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(16, 16),
    layers_per_block=1,
    attention_head_dim=2,
    cross_attention_dim=8,
    norm_num_groups=8,
)
SCHEDULE = noise_schedule_from_config(
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
)


@pytest.fixture(scope="module")
def unet():
    module = UNet2DConditionModel(UNetConfig.from_diffusers_config(TINY), user_embed_dim=6)
    variables = meta.unbox(init_variables(module, 0))
    params = jax.tree.map(np.asarray, variables["params"])
    return module, params, variables["adapter"]


def _data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    moments = np.concatenate(
        [rng.standard_normal((n, 8, 8, 4)), np.full((n, 8, 8, 4), -8.0)], -1
    ).astype(np.float32)  # nearly deterministic latents
    return moments, rng.standard_normal((n, 5, 8)).astype(np.float32)


def _changed(before, after) -> set[str]:
    a, b = convert.flat_leaves(before), convert.flat_leaves(after)
    assert a.keys() == b.keys()
    return {convert.torch_key(k) for k in a if not np.array_equal(a[k], b[k])}


def _names(params, pred) -> set[str]:
    return {convert.torch_key(k) for k in convert.flat_leaves(params) if pred(convert.torch_key(k))}


@pytest.mark.parametrize("profile", ["lite", "moderate", "standard"])
def test_profile_trains_exactly_what_it_names(unet, profile):
    module, params, _ = unet
    moments, states = _data()
    cfg = benign.finetune_config(profile, steps=3, batch_size=8)
    cfg.optim.learning_rate = 1e-2  # large enough that every trained leaf visibly moves
    out = benign.finetune(module, params, SCHEDULE, 1.0, moments, states, cfg, progress=False)
    changed = _changed(params, out.params)
    if profile == "lite":
        attn = ("attn1", "attn2")
        dense = ("to_q", "to_k", "to_v", "to_out.0")
        want = _names(params, lambda k: any(f".{a}.{d}.weight" in k for a in attn for d in dense))
        assert set(out.trainable) == {k.removesuffix(".weight") for k in want}
        assert all(set(v) == {"down", "up"} for v in out.trainable.values())
        assert all(v["down"].shape[1] == 8 for v in out.trainable.values())  # rank 8
    elif profile == "moderate":
        prefixes = (".attn2.to_k.", ".attn2.to_v.", ".attn2.to_out.0.")
        want = _names(params, lambda k: any(p in k for p in prefixes))
        assert any(k.endswith("to_out.0.bias") for k in want)
        trained = {f"{m}.{'weight' if leaf == 'kernel' else leaf}"
                   for m, leaves in out.trainable.items() for leaf in leaves}  # fmt: skip
        assert trained == want
    else:
        want = _names(params, lambda k: True)
        assert jax.tree.structure(out.trainable) == jax.tree.structure(params)
    assert changed == want, sorted(changed ^ want)[:5]
    assert len(out.losses) == 3 and all(np.isfinite(out.losses))


def test_lora_dropout_zero_equals_merged(unet):
    module, params, _ = unet
    lora = lora_lib.init_lora(params, 4, rng=jax.random.key(1))
    rng = np.random.default_rng(0)
    lora = jax.tree.map(lambda v: jnp.asarray(0.1 * rng.standard_normal(v.shape), v.dtype), lora)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    t = jnp.array([10, 500])
    ctx = jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32)
    merged = module.apply({"params": lora_lib.merge_lora(params, lora, 2.0)}, x, t, ctx)
    icpt = benign.lora_dropout_interceptor(lora, 2.0, 0.0, jax.random.key(0))
    with benign.nn.intercept_methods(icpt):
        unmerged = module.apply({"params": params}, x, t, ctx)
    err = float(jnp.linalg.norm(merged - unmerged) / jnp.linalg.norm(merged))
    assert err < 1e-5
    with benign.nn.intercept_methods(
        benign.lora_dropout_interceptor(lora, 2.0, 0.5, jax.random.key(0))
    ):
        dropped = module.apply({"params": params}, x, t, ctx)
    assert float(jnp.abs(dropped - merged).max()) > 1e-4  # dropout really acts


def test_finetune_learns_its_data(unet):
    """A full fine-tune on 16 fixed latents lowers the denoising loss on them (fixed draws)."""
    module, params, _ = unet
    moments, states = _data()
    cfg = benign.finetune_config("standard", steps=40, batch_size=16)
    cfg.optim.learning_rate = 1e-3
    task = benign.BenignTask(module, SCHEDULE, benign.get_profile("standard"), 1.0)
    batch = {"image_moments": moments, "text_states": states}

    def loss(p):
        keys = jax.random.split(jax.random.key(7), 8)
        return float(np.mean([task.loss(p, None, batch, k)[0] for k in keys]))

    out = benign.finetune(module, params, SCHEDULE, 1.0, moments, states, cfg, progress=False)
    before, after = loss(jax.tree.map(jnp.asarray, params)), loss(out.trainable)
    assert after < 0.9 * before, (before, after)


def test_bad_config_is_named():
    with pytest.raises(benign.UnknownProfileError, match="heavy"):
        benign.finetune_config("heavy")
    with pytest.raises(ValueError, match="unknown fine-tune keys"):
        benign.finetune_config("lite", lr=1)
