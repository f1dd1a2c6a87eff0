"""The CPU form of weight-bound convolutions (``layers._weight_bound_conv``): the same values
and gradients as autodiff of ``lax.conv_general_dilated``, taken only where it pays."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from psa_jax.models import layers


@pytest.mark.parametrize(
    "batch, side, cin, cout, kernel, weight_bound",
    [
        (2, 4, 256, 128, 3, True),  # SD's deep levels: the kernel outweighs the activations
        (1, 3, 64, 32, 3, True),  # odd side: the shifted slices crop at both borders
        (1, 2, 512, 256, 1, True),  # 1x1 (conv_shortcut)
        (2, 5, 40, 24, 3, False),  # activation-bound: XLA's own
    ],
)
def test_weight_bound_conv_matches_autodiff(monkeypatch, batch, side, cin, cout, kernel,
                                            weight_bound):  # fmt: skip
    calls = []
    real = layers._weight_bound_conv
    monkeypatch.setattr(layers, "_weight_bound_conv", lambda *a: calls.append(1) or real(*a))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, side, side, cin)), jnp.float32)
    ours = layers.conv(cout, kernel, name="c")
    variables = meta.unbox(ours.init(jax.random.PRNGKey(0), x))
    pad = kernel // 2
    reference = nn.Conv(cout, (kernel, kernel), padding=((pad, pad), (pad, pad)))
    cot = jnp.asarray(rng.standard_normal((batch, side, side, cout)), jnp.float32)
    y, vjp = jax.vjp(lambda v, x: ours.apply(v, x), variables, x)
    y_ref, vjp_ref = jax.vjp(lambda v, x: reference.apply(v, x), variables, x)
    assert bool(calls) == weight_bound
    np.testing.assert_array_equal(y, y_ref)  # the forward is XLA's convolution either way
    (dv, dx), (dv_ref, dx_ref) = vjp(cot), vjp_ref(cot)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(dx_ref).max()))
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(dv["params"][name], dv_ref["params"][name])


def test_weight_bound_conv_keeps_the_dtype():
    """A bf16 base keeps bf16 activations and gradients through the CPU form."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((1, 2, 2, 256)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((3, 3, 256, 128)) * 0.02, jnp.bfloat16)
    y, vjp = jax.vjp(layers._weight_bound_conv, x, w)
    dx, dw = vjp(jnp.ones_like(y))
    assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
    want = jax.vjp(lambda x: layers._same_conv(x, w), x)[1](jnp.ones_like(y))[0]
    np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(want, np.float32),
                               rtol=2e-2, atol=2e-2)  # fmt: skip
