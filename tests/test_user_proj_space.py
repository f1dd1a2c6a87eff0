"""``train.user_proj_space``: the optimizer stepping the user projection in the training users'
standardized coordinates (``optim.in_standardized_coordinates``) while the saved Linear stays
an ordinary Linear on raw embeddings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from psa_jax.models.adapter import population_stats
from psa_jax.train import optim as O


def _population(rng, n=64, d=16):
    """Nearly parallel embeddings (as one encoder's profile embeddings are): a shared direction
    plus small per-user differences, and per-user targets that depend on the differences."""
    common = rng.standard_normal(d)
    e = common + 0.05 * rng.standard_normal((n, d))
    w_true = rng.standard_normal((d, 3))
    # An offset too, so the biases' gradients are not rounding noise (Adam would amplify it).
    y = (e - e.mean(0)) / e.std(0) @ w_true / np.sqrt(d) + np.array([0.5, -0.3, 0.2])
    return e.astype(np.float32), y.astype(np.float32)


def _loss(p, e, y):
    pred = e @ p["user_proj"]["kernel"] + p["user_proj"]["bias"] + p["other"]
    return jnp.mean((pred - y) ** 2)


def _inner():
    return O.make_optimizer({"learning_rate": 1e-2, "weight_decay": 1e-2, "grad_clip_norm": 1.0})


def test_steps_equal_the_optimizer_on_standardized_inputs():
    """Every step's Linear equals ``V / std``, ``c - (mean / std) @ V`` of the same optimizer run
    directly on ``z = (e - mean) / std`` (weight decay and clipping included), and differs
    from the optimizer on the raw Linear: the reparametrisation is exact and not a no-op."""
    rng = np.random.default_rng(0)
    e, y = _population(rng)
    mean, std = population_stats(e, e.shape[1])
    z = (e - mean) / std
    v0 = {"user_proj": {"kernel": jnp.asarray(rng.standard_normal((16, 3)) * 0.1, jnp.float32),
                        "bias": jnp.zeros(3)}, "other": jnp.zeros(3)}  # fmt: skip
    fold = lambda v: {"user_proj": {"kernel": v["user_proj"]["kernel"] / std[:, None],  # noqa: E731
                                    "bias": v["user_proj"]["bias"]
                                    - (mean / std) @ v["user_proj"]["kernel"]},
                      "other": v["other"]}  # fmt: skip
    tx_z, tx_w, tx_raw = _inner(), O.in_standardized_coordinates(_inner(), mean, std), _inner()
    v, w, raw = v0, fold(v0), fold(v0)
    sv, sw, sr = tx_z.init(v), tx_w.init(w), tx_raw.init(raw)
    for _ in range(30):
        u, sv = tx_z.update(jax.grad(_loss)(v, z, y), sv, v)
        v = jax.tree.map(jnp.add, v, u)
        u, sw = tx_w.update(jax.grad(_loss)(w, e, y), sw, w)
        w = jax.tree.map(jnp.add, w, u)
        u, sr = tx_raw.update(jax.grad(_loss)(raw, e, y), sr, raw)
        raw = jax.tree.map(jnp.add, raw, u)
    want = fold(v)
    for a, b in zip(jax.tree.leaves(w), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(e @ w["user_proj"]["kernel"] + w["user_proj"]["bias"],
                               z @ v["user_proj"]["kernel"] + v["user_proj"]["bias"],
                               rtol=1e-4, atol=1e-4)  # fmt: skip
    assert float(jnp.abs(raw["user_proj"]["kernel"] - w["user_proj"]["kernel"]).max()) > 1e-2


def test_standardized_coordinates_learn_the_user_differences_faster():
    """Why the option exists: on nearly parallel embeddings, Adam on the raw Linear moves all
    users alike and barely fits per-user targets; in standardized coordinates it does."""
    rng = np.random.default_rng(1)
    e, y = _population(rng)
    mean, std = population_stats(e, e.shape[1])
    losses = {}
    for name, tx in (("raw", _inner()), ("z", O.in_standardized_coordinates(_inner(), mean, std))):
        p = {
            "user_proj": {"kernel": jnp.zeros((16, 3)), "bias": jnp.zeros(3)},
            "other": jnp.zeros(3),
        }
        state = tx.init(p)
        for _ in range(100):
            u, state = tx.update(jax.grad(_loss)(p, e, y), state, p)
            p = jax.tree.map(jnp.add, p, u)
        losses[name] = float(_loss(p, e, y))
    start = float(np.mean((y - y.mean(0)) ** 2))  # what the biases alone cannot fit
    assert losses["z"] < 0.2 * start and losses["raw"] > 2 * losses["z"], (start, losses)


def test_user_proj_space_is_checked_and_migrated():
    from configs import common
    from psa_jax.config import migrate_run_config
    from psa_jax.train.checks import ConfigValueError, check_config

    assert common.train_config().user_proj_space == "raw"  # PSAlign's unless a config says
    cfg = tiny.get_config()
    assert cfg.train.user_proj_space == "standardized"  # the demo's recipe
    cfg.train.user_proj_space = "whitened"
    with pytest.raises(ConfigValueError, match=r"train\.user_proj_space='whitened'"):
        check_config(cfg)
    base = tiny.get_config("base")
    base.train.user_proj_space = "standardized"
    with pytest.raises(ConfigValueError, match="trains no user projection"):
        check_config(base)
    v6 = {**tiny.get_config().to_dict(), "schema_version": 6}
    del v6["train"]["user_proj_space"]
    assert migrate_run_config(v6, "r")["train"]["user_proj_space"] == "raw"
