"""configs/*.py build the intended architectures (checked abstractly, no weights allocated)."""

import numpy as np
from flax.core import meta
from flax.traverse_util import flatten_dict

from configs import sd15, sdxl, tiny
from psa_jax.models.psa_unet import abstract_variables, unet_module_from_config


def _count(tree, keep=lambda path: True) -> int:
    return sum(int(np.prod(x.shape)) for p, x in flatten_dict(tree).items() if keep(p))


def _counts(config):
    variables = meta.unbox(abstract_variables(unet_module_from_config(config.model)))
    adapter = variables["adapter"]
    kv = _count(adapter, lambda p: p[-2] in ("to_k_user", "to_v_user"))
    proj = _count(adapter, lambda p: p[0] == "user_proj")
    assert kv + proj == _count(adapter)
    return _count(variables["params"]), kv, proj


def test_sd15_matches_diffusers_parameter_counts():
    base, kv, proj = _counts(sd15.get_config())
    assert base == 859_520_964  # diffusers' SD1.5 UNet
    assert kv == 19_169_280  # 16 cross-attention layers, to_k_user + to_v_user (768 -> inner)
    assert proj == 2_754_816  # Linear(3584 -> 768) + LayerNorm(768)


def test_sdxl_matches_diffusers_parameter_counts():
    base, kv, proj = _counts(sdxl.get_config())
    assert base == 2_567_463_684  # diffusers' SDXL base UNet
    # 70 cross-attention layers with inner widths summing to 83,200; 2048-d user tokens.
    assert kv == 2 * 2048 * 83_200
    assert proj == 3584 * 2048 + 2048 + 2 * 2048


def test_tiny_is_few_hundred_k_params():
    base, kv, proj = _counts(tiny.get_config())
    assert 100_000 < base < 1_000_000, base
    assert kv > 0 and proj == 384 * 32 + 32 + 2 * 32
