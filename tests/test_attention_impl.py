"""``model.attention``: which attention implementation the UNet runs ("xla", "cudnn", "auto").

cuDNN itself needs a CUDA GPU (measured by ``psa-jax bench --attention``, never here); these
tests pin down the choice "auto" makes, that it changes nothing where it falls back, and that
the key is checked and migrated like every other."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from psa_jax.models import layers
from psa_jax.models.layers import attention_implementation


def test_auto_picks_cudnn_only_where_it_applies():
    bf16, f32 = jnp.bfloat16, jnp.float32
    assert attention_implementation("auto", bf16, 64, "cuda") == ("cudnn", None)
    assert attention_implementation("auto", jnp.float16, 128, "cuda") == ("cudnn", None)
    for dtype, head, platform, why in (
        (bf16, 64, "cpu", "backend is cpu"),
        (bf16, 64, "tpu", "backend is tpu"),
        (bf16, 64, "rocm", "backend is rocm"),
        (f32, 64, "cuda", "float32"),
        (bf16, 160, "cuda", "head dim 160"),  # SD1.5's deepest level
        (bf16, 20, "cuda", "head dim 20"),  # not a multiple of 8
    ):
        impl, reason = attention_implementation("auto", dtype, head, platform)
        assert impl == "xla" and why in reason, (dtype, head, platform, reason)
    # Asked by name, nothing is chosen for the user.
    assert attention_implementation("cudnn", f32, 160, "cpu") == ("cudnn", None)
    assert attention_implementation("xla", bf16, 64, "cuda") == ("xla", None)
    with pytest.raises(ValueError, match="unknown attention 'flash'"):
        attention_implementation("flash", bf16, 64, "cuda")


def test_auto_on_this_backend_is_xla_to_the_bit_and_says_why(caplog):
    """On CPU "auto" runs XLA's attention: the same UNet output, bit for bit, as "xla"; the
    fallback is logged with its reason."""
    from psa_jax.models.psa_unet import init_variables, unet_module_from_config

    cfg = tiny.get_config().model
    module = unet_module_from_config(cfg)
    assert module.attention == "xla"  # the configs' default until measured on a GPU
    variables = init_variables(module, 0)
    variables = jax.tree.map(lambda a: a + 0.01, variables)  # a non-zero adapter
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 16, 16, 4)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((2, 8, 32)), jnp.float32)
    user = jnp.asarray(rng.standard_normal((2, 384)), jnp.float32)
    layers._log_fallback.cache_clear()
    outs = {}
    with caplog.at_level(logging.INFO, logger="psa_jax.models.layers"):
        for impl in ("xla", "auto"):
            outs[impl] = module.clone(attention=impl).apply(variables, x, 10, ctx, user_embeds=user)
    assert np.array_equal(np.asarray(outs["xla"]), np.asarray(outs["auto"]))
    assert "XLA instead of cuDNN where the backend is cpu" in caplog.text
    assert caplog.text.count("instead of cuDNN") == 1  # once per reason, not once per layer
    with pytest.raises(ValueError, match="unknown attention"):
        module.clone(attention="flash").apply(variables, x, 10, ctx, user_embeds=user)


def test_attention_is_checked_and_migrated():
    from psa_jax.config import migrate_run_config
    from psa_jax.train.checks import ConfigValueError, check_config

    cfg = tiny.get_config()
    cfg.model.attention = "flash"
    with pytest.raises(ConfigValueError, match=r"model\.attention='flash'"):
        check_config(cfg)
    v5 = {**tiny.get_config().to_dict(), "schema_version": 5}
    del v5["model"]["attention"]
    assert migrate_run_config(v5, "r")["model"]["attention"] == "xla"


@pytest.mark.parametrize("loop", [False, True])
def test_cpu_form_of_xla_attention_matches_jax_nn(monkeypatch, loop):
    """On a CPU, "xla" attention runs heads-major (and one head at a time for large score
    matrices): the same values and gradients as ``jax.nn.dot_product_attention``'s XLA path to
    float rounding, in both forms."""
    monkeypatch.setattr(layers, "CPU_HEAD_LOOP_MIN_SCORES", 1 if loop else 10**12)
    rng = np.random.default_rng(0)
    b, lq, lk, heads, dim = 3, 40, 24, 4, 8
    q = jnp.asarray(rng.standard_normal((b, lq, heads * dim)) * 2, jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, lk, heads * dim)) * 2, jnp.float32) for _ in "kv")
    split = lambda x: x.reshape(b, x.shape[1], heads, dim)  # noqa: E731

    def reference(q, k, v):
        out = jax.nn.dot_product_attention(split(q), split(k), split(v), implementation="xla")
        return out.reshape(b, lq, heads * dim)

    ours = lambda q, k, v: layers.sdpa(q, k, v, heads)  # noqa: E731
    calls = []
    real = layers._cpu_attention
    monkeypatch.setattr(layers, "_cpu_attention", lambda *a: calls.append(1) or real(*a))
    got, want = ours(q, k, v), reference(q, k, v)
    assert calls, "sdpa did not take the CPU form on this (CPU) backend"
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    cot = jnp.asarray(rng.standard_normal(got.shape), jnp.float32)
    g_ours = jax.vjp(ours, q, k, v)[1](cot)
    g_ref = jax.vjp(reference, q, k, v)[1](cot)
    for a, r in zip(g_ours, g_ref):
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5)
    # A mask or a causal flag keeps jax.nn's own XLA path.
    calls.clear()
    causal = layers.sdpa(q, q, q, heads, is_causal=True)
    want = jax.nn.dot_product_attention(split(q), split(q), split(q), is_causal=True)
    assert not calls
    np.testing.assert_array_equal(causal, want.reshape(b, lq, heads * dim))


def test_looped_cpu_attention_keeps_no_scores():
    """A large attention on a CPU runs one head at a time and its backward recomputes a head's
    probabilities: the compiled vjp's temporaries stay below one all-heads score matrix (the
    stacked probabilities autodiff of the loop would keep), where jax.nn's need several."""
    b, n, heads, dim = 2, 512, 4, 8
    assert n * n >= layers.CPU_HEAD_LOOP_MIN_SCORES
    rng = np.random.default_rng(0)
    q, k, v, cot = (jnp.asarray(rng.standard_normal((b, n, heads * dim)), jnp.float32)
                    for _ in range(4))  # fmt: skip
    split = lambda x: x.reshape(b, n, heads, dim)  # noqa: E731
    scores = b * heads * n * n * 4  # bytes of one fp32 score matrix over all heads

    def temp(f):
        step = jax.jit(lambda q, k, v: jax.vjp(f, q, k, v)[1](cot))
        return step.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    ours = temp(lambda q, k, v: layers.sdpa(q, k, v, heads))
    reference = temp(lambda q, k, v: jax.nn.dot_product_attention(
        split(q), split(k), split(v), implementation="xla").reshape(q.shape))  # fmt: skip
    assert ours < scores < reference / 2, (ours, scores, reference)
