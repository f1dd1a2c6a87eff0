"""Every weight carries logical axis names, and the config's rules cover every name used."""

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn
from flax.traverse_util import flatten_dict

from configs import common, tiny
from psa_jax.models.clip import CLIPTextConfig, CLIPTextModule
from psa_jax.models.clip import abstract_params as clip_abstract
from psa_jax.models.psa_unet import abstract_variables, unet_module_from_config
from psa_jax.models.vae import AutoencoderKL, VAEConfig


def _trees():
    model = tiny.get_config().model
    unet = abstract_variables(unet_module_from_config(model))
    text = clip_abstract(
        CLIPTextModule(CLIPTextConfig.from_hf_config(dict(model.text_encoder)), True)
    )
    vae_cfg = VAEConfig.from_diffusers_config(dict(model.vae))
    vae = jax.eval_shape(AutoencoderKL(vae_cfg).init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))[
        "params"
    ]
    return {"unet": unet["params"], "adapter": unet["adapter"], "text": text, "vae": vae}


@pytest.mark.parametrize("name", ["unet", "adapter", "text", "vae"])
def test_every_weight_has_logical_axes(name):
    rules = dict((k, v) for k, v in common.mesh_config().logical_axis_rules)
    tree = _trees()[name]
    leaves = flatten_dict(tree)
    assert leaves
    for path, leaf in leaves.items():
        assert isinstance(leaf, nn.LogicallyPartitioned), f"{'/'.join(path)} has no axis names"
        assert len(leaf.names) == len(leaf.value.shape), path
        unknown = [a for a in leaf.names if a is not None and a not in rules]
        assert not unknown, f"{'/'.join(path)} uses axis names without a rule: {unknown}"
