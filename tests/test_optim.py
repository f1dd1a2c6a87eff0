"""Optimizer and schedules against the torch recipe PSAlign trains with."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from psa_jax.train import optim as O

torch = pytest.importorskip("torch")
diffusers_optimization = pytest.importorskip("diffusers.optimization")


def _torch_lrs(make_scheduler, lr, steps):
    """The lr torch uses for optimizer steps 0..steps-1 (scheduler stepped after each)."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    sched = make_scheduler(opt)
    lrs = []
    for _ in range(steps):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return np.array(lrs)


def _ours(cfg, steps):
    schedule = jax.jit(O.make_lr_schedule(cfg))
    return np.array([float(schedule(jnp.int32(i))) for i in range(steps)])


@pytest.mark.parametrize("warmup", [0, 1, 10])
def test_constant_with_warmup_matches_diffusers(warmup):
    cfg = O.optim_config(learning_rate=3e-4, schedule="constant_with_warmup", warmup_steps=warmup)
    want = _torch_lrs(
        lambda opt: diffusers_optimization.get_constant_schedule_with_warmup(opt, warmup), 3e-4, 25
    )
    np.testing.assert_allclose(_ours(cfg, 25), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("warmup", [0, 7])
def test_cosine_matches_diffusers(warmup):
    cfg = O.optim_config(learning_rate=2e-4, schedule="cosine", warmup_steps=warmup, total_steps=40)
    want = _torch_lrs(
        lambda opt: diffusers_optimization.get_cosine_schedule_with_warmup(
            opt, warmup, 40, num_cycles=0.5
        ),
        2e-4,
        41,
    )
    np.testing.assert_allclose(_ours(cfg, 41), want, rtol=1e-6, atol=1e-12)


def test_cosine_end_factor_and_hold_after_total():
    cfg = O.optim_config(
        learning_rate=1.0, schedule="cosine", warmup_steps=2, total_steps=12, end_lr_factor=0.1
    )
    lrs = _ours(cfg, 20)
    np.testing.assert_allclose(lrs[:3], [0.0, 0.5, 1.0])
    np.testing.assert_allclose(lrs[7], 0.55, rtol=1e-6)  # halfway through the decay
    np.testing.assert_allclose(lrs[12:], 0.1, rtol=1e-6)
    assert np.all(np.diff(lrs[2:]) <= 1e-7)


def test_constant():
    lrs = _ours(O.optim_config(learning_rate=5e-6, schedule="constant", warmup_steps=9), 4)
    np.testing.assert_allclose(lrs, 5e-6, rtol=1e-7)


# Steps are recovered from float32 parameters of magnitude up to ~4 (spacing 4.8e-7, rounded
# twice): that is the floor for comparing steps.
_ULP = 1e-6


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((8, 16), dtype=np.float32),
        "b": rng.standard_normal((16,), dtype=np.float32),
    }


def _grad_sequence(steps, scale):
    rng = np.random.default_rng(1)
    return [
        {k: scale * rng.standard_normal(v.shape, dtype=np.float32) for k, v in _params().items()}
        for _ in range(steps)
    ]


def _run_ours(cfg, params, grads):
    tx = O.make_optimizer(cfg)
    state = tx.init(params)

    @jax.jit
    def step(params, state, g):
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    out = []
    for g in grads:
        params, state = step(params, state, g)
        out.append(jax.tree.map(np.asarray, params))
    return out


@pytest.mark.parametrize("grad_scale", [1e-2, 1e3], ids=["unclipped", "clipped"])
def test_adamw_matches_torch(grad_scale):
    cfg = O.optim_config(
        learning_rate=1e-2,
        warmup_steps=2,
        weight_decay=0.1,
        b1=0.8,
        b2=0.99,
        eps=1e-6,
        grad_clip_norm=1.0,
    )
    params, grads = _params(), _grad_sequence(5, grad_scale)
    tparams = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
    topt = torch.optim.AdamW(
        tparams.values(), lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1
    )
    tsched = diffusers_optimization.get_constant_schedule_with_warmup(topt, 2)
    ours = _run_ours(cfg, params, grads)
    for i, g in enumerate(grads):
        for k, p in tparams.items():
            p.grad = torch.from_numpy(g[k].copy())
        torch.nn.utils.clip_grad_norm_(list(tparams.values()), 1.0)
        topt.step()
        tsched.step()
        for k, p in tparams.items():
            want = p.detach().numpy()
            np.testing.assert_allclose(ours[i][k], want, rtol=1e-6, atol=1e-7)
            # The step itself, not only the parameters it lands on.
            np.testing.assert_allclose(
                ours[i][k] - params[k], want - params[k], rtol=1e-4, atol=_ULP
            )


def test_huge_gradient_is_clipped_to_grad_clip_norm():
    # With eps >> |g| and lr 1, AdamW's first update is -g / eps: the clipped gradient itself.
    params = _params()
    huge = {k: 1e5 * np.ones_like(v) for k, v in params.items()}
    for clip, want_norm in ((2.5, 2.5), (None, float(O.global_norm(huge)))):
        cfg = O.optim_config(
            learning_rate=1.0, eps=1e7, weight_decay=0.0, grad_clip_norm=clip, b2=0.999
        )
        tx = O.make_optimizer(cfg)
        updates, _ = tx.update(huge, tx.init(params), params)
        grad_seen = jax.tree.map(lambda u: -u * 1e7, updates)
        got = float(O.global_norm(grad_seen))
        # Adam's denominator sqrt(v)+eps adds |g|/eps relative: ~2e-8 clipped, 1e-2 unclipped.
        np.testing.assert_allclose(got, want_norm, rtol=5e-2 if clip is None else 1e-5)


def test_adafactor_decreases_a_quadratic():
    rng = np.random.default_rng(0)
    target = {
        "w": rng.standard_normal((256, 160), dtype=np.float32),  # factored
        "b": rng.standard_normal((10,), dtype=np.float32),
    }
    params = jax.tree.map(jnp.zeros_like, target)
    tx = O.make_optimizer(O.optim_config(name="adafactor", learning_rate=3e-2, schedule="constant"))

    def loss_fn(p):
        return sum(jnp.sum((p[k] - target[k]) ** 2) for k in p)

    @jax.jit
    def step(params, state):
        loss, g = jax.value_and_grad(loss_fn)(params)
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state, loss

    state = tx.init(params)
    assert state[1][0].v["w"].shape == (1,)  # factored: row and column statistics only
    losses = []
    for _ in range(30):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0]


def test_adafactor_matches_transformers():
    transformers_optimization = pytest.importorskip("transformers.optimization")
    rng = np.random.default_rng(3)
    params = {
        "w": rng.standard_normal((128, 160), dtype=np.float32),
        "b": rng.standard_normal((7,), dtype=np.float32),
    }
    grads = [
        {k: rng.standard_normal(v.shape, dtype=np.float32) for k, v in params.items()}
        for _ in range(4)
    ]
    cfg = O.optim_config(
        name="adafactor", learning_rate=1e-2, schedule="constant", weight_decay=0.1
    )
    ours = _run_ours(cfg, params, grads)
    tparams = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
    topt = transformers_optimization.Adafactor(
        tparams.values(),
        lr=1e-2,
        weight_decay=0.1,
        clip_threshold=1.0,
        scale_parameter=False,
        relative_step=False,
    )
    for i, g in enumerate(grads):
        for k, p in tparams.items():
            p.grad = torch.from_numpy(g[k].copy())
        torch.nn.utils.clip_grad_norm_(list(tparams.values()), 1.0)
        topt.step()
        for k, p in tparams.items():
            want = p.detach().numpy()
            np.testing.assert_allclose(
                ours[i][k] - params[k], want - params[k], rtol=1e-4, atol=_ULP
            )


def test_accepts_plain_mapping_and_fills_defaults():
    tx = O.make_optimizer({"learning_rate": 1e-3, "grad_clip_norm": 0.0})
    params = _params()
    updates, _ = tx.update(params, tx.init(params), params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"name": "sgd"}, "adafactor"),
        ({"schedule": "linear"}, "constant_with_warmup"),
        ({"schedule": "cosine", "warmup_steps": 10, "total_steps": 10}, "total_steps"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"end_lr_factor": 2.0}, "end_lr_factor"),
    ],
)
def test_bad_configs_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        O.make_optimizer(O.optim_config(**overrides))


def test_unknown_keys_raise():
    with pytest.raises(ValueError, match="warmup_step"):
        O.optim_config(warmup_step=10)
    with pytest.raises(ValueError, match="lr"):
        O.make_optimizer({"lr": 1e-4})
