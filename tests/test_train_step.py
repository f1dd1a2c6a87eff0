"""DPO loss against NumPy, the trainable tree, gradient accumulation, the non-finite guard."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import meta

from configs import tiny
from psa_jax.core import diffusion as noise
from psa_jax.data.profiles import ProfileError
from psa_jax.models.psa_unet import _adapter_init, init_variables, unet_module_from_config
from psa_jax.train.losses import dpo_loss
from psa_jax.train.step import (
    DenoiseTask,
    DPOTask,
    VAETask,
    init_state,
    latent_scaling_factor,
    make_train_step,
)


def numpy_dpo(pw, pl, rw, rl, tw, tl, beta):
    """PSAlign's formula, written out in float64 NumPy."""
    mse = lambda a, b: ((a - b) ** 2).reshape(len(a), -1).mean(1)  # noqa: E731
    mw, ml, refw, refl = mse(pw, tw), mse(pl, tl), mse(rw, tw), mse(rl, tl)
    inside = -0.5 * beta * ((mw - ml) - (refw - refl))
    loss = np.mean(np.logaddexp(0.0, -inside))  # -log sigmoid(x) = log(1 + e^-x)
    acc = np.mean((inside > 0) + 0.5 * (inside == 0))
    return loss, {
        "implicit_acc": acc,
        "mse_w": mw.mean(),
        "mse_l": ml.mean(),
        "ref_mse_w": refw.mean(),
        "ref_mse_l": refl.mean(),
        "inside": inside.mean(),
    }


@pytest.mark.parametrize("beta", [5000.0, 1.0])
def test_dpo_loss_and_metrics_equal_numpy(beta):
    r = np.random.default_rng(0)
    shape = (6, 4, 5, 3)
    tw, tl = r.normal(size=shape), r.normal(size=shape)
    rw, rl = tw + 0.3 * r.normal(size=shape), tl + 0.3 * r.normal(size=shape)
    pw = rw + 1e-3 * r.normal(size=shape)  # small policy moves: inside spans both signs
    pl = rl + 1e-3 * r.normal(size=shape)
    pl[2], pw[2] = rl[2], rw[2]  # one pair exactly at the reference: inside == 0
    args = [x.astype(np.float32) for x in (pw, pl, rw, rl, tw, tl)]
    loss, metrics = jax.jit(dpo_loss, static_argnums=6)(*args, beta)
    want_loss, want = numpy_dpo(*[a.astype(np.float64) for a in args], beta)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    for k, v in want.items():
        np.testing.assert_allclose(float(metrics[k]), v, rtol=1e-4, atol=1e-6, err_msg=k)
    assert 0 < float(metrics["implicit_acc"]) < 1


def test_dpo_gradient_pushes_toward_chosen():
    """d loss / d policy_w points away from the target (lower chosen error lowers the loss)."""
    r = np.random.default_rng(1)
    t = r.normal(size=(2, 3, 3, 2)).astype(np.float32)
    ref = t + 0.5
    grad = jax.grad(lambda pw: dpo_loss(pw, ref, ref, ref, t, t, 10.0)[0])(ref)
    assert float(jnp.sum(grad * (ref - t))) > 0


def test_dpo_margin_is_blind_to_damage_shared_by_the_pair_and_the_chosen_term_is_not():
    """Pairs that differ only in a patch (Sage-mini: the marker): a policy that adds the same
    error to both images away from the patch keeps the DPO margin exactly, so PSAlign's loss
    (``chosen_weight=0``) does not see it; ``chosen_weight`` adds ``w * mean(mse_w - ref_w)``,
    which grows with the damage."""
    r = np.random.default_rng(2)
    shape = (4, 6, 6, 2)
    tw = r.normal(size=shape)
    tl = tw.copy()
    tl[:, :2, :2] += 1.0  # the pair differs in one corner only
    ref_w = tw + 0.2 * r.normal(size=shape)
    ref_l = ref_w.copy()  # the same noisy input away from the corner: the same prediction
    ref_l[:, :2, :2] = tl[:, :2, :2] + 0.2 * r.normal(size=(4, 2, 2, 2))
    damage = np.zeros(shape)
    damage[:, 3:, 3:] = 0.5  # away from the corner, the same for both images
    args = [x.astype(np.float32) for x in (ref_w + damage, ref_l + damage, ref_w, ref_l, tw, tl)]
    clean = [x.astype(np.float32) for x in (ref_w, ref_l, ref_w, ref_l, tw, tl)]
    loss_d, m_d = dpo_loss(*args, 1000.0)
    loss_c, _ = dpo_loss(*clean, 1000.0)
    np.testing.assert_allclose(float(loss_d), float(loss_c), rtol=1e-5)  # blind to the damage
    want = float(np.mean((args[0] - tw) ** 2) - np.mean((ref_w - tw) ** 2))
    np.testing.assert_allclose(float(m_d["chosen_term"]), want, rtol=1e-4)
    assert want > 0
    loss_w, _ = dpo_loss(*args, 1000.0, chosen_weight=50.0)
    np.testing.assert_allclose(float(loss_w), float(loss_d) + 50.0 * want, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_dpo():
    cfg = tiny.get_config()
    module = unet_module_from_config(cfg.model)
    params = meta.unbox(init_variables(module, 0))["params"]
    adapter = meta.unbox(_adapter_init(module)(params, jax.random.key(1)))
    task = DPOTask(module, noise.make_noise_schedule(), 5000.0, 1.0)
    r = np.random.default_rng(0)
    batch = {
        "chosen_moments": r.normal(size=(4, 16, 16, 8)).astype(np.float32),
        "rejected_moments": r.normal(size=(4, 16, 16, 8)).astype(np.float32),
        "text_states": r.normal(size=(4, 8, 32)).astype(np.float32),
        "user_embeds": r.normal(size=(4, 384)).astype(np.float32),
    }
    return task, params, adapter, batch


def _count(tree) -> int:
    return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


def test_only_the_adapter_trains(tiny_dpo):
    task, params, adapter, batch = tiny_dpo
    opt = optax.adamw(1e-3)
    state = init_state(adapter, opt, 0)
    assert jax.tree.structure(state.params) == jax.tree.structure(adapter)
    assert set(state.params) == {"user_proj", *[k for k in adapter if k != "user_proj"]}
    n_adapter, n_base = _count(adapter), _count(params)
    assert n_adapter < n_base / 10
    # AdamW keeps two moments per trainable weight (+ scalar counts): nothing for the base.
    assert 2 * n_adapter <= _count(state.opt_state) <= 2 * n_adapter + 8
    grads = jax.grad(lambda a: task.loss(a, params, batch, jax.random.PRNGKey(0))[0])(adapter)
    assert jax.tree.structure(grads) == jax.tree.structure(adapter)
    # The base never reaches the optimizer, and a step leaves it bitwise unchanged.
    step = jax.jit(make_train_step(task.loss, opt))
    before = jax.tree.map(np.array, params)
    new, metrics = step(state, params, batch)
    assert float(metrics["finite"]) == 1.0 and np.isfinite(float(metrics["loss"]))
    assert all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(params))
    )
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(adapter))
    ]
    assert any(changed) and int(new.step) == 1


def test_accumulation_equals_the_mean_of_micro_batch_gradients(tiny_dpo):
    task, params, adapter, batch = tiny_dpo
    opt = optax.sgd(1.0)  # the update is minus the gradient: compare gradients directly
    state = init_state(adapter, opt, 0)
    new, metrics = jax.jit(make_train_step(task.loss, opt, accum_steps=2))(state, params, batch)
    rng = jax.random.fold_in(state.rng, 0)
    keys = jax.random.split(rng, 2)
    grad_fn = jax.jit(jax.value_and_grad(task.loss, has_aux=True))  # jit vs jit: same math
    grads, losses = [], []
    for a in range(2):  # micro-batch a holds rows a, a + 2 (each device keeps its rows)
        mb = {k: v[a::2] for k, v in batch.items()}
        (loss, _), g = grad_fn(adapter, params, mb, keys[a])
        grads.append(g)
        losses.append(float(loss))
    got = np.concatenate(
        [np.ravel(p - n) for p, n in zip(jax.tree.leaves(adapter), jax.tree.leaves(new.params))]
    )
    want = np.concatenate([np.ravel(g0 + g1) / 2 for g0, g1 in zip(*map(jax.tree.leaves, grads))])
    assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)
    np.testing.assert_allclose(float(metrics["loss"]), np.mean(losses), rtol=1e-6)


def test_non_finite_step_changes_nothing(tiny_dpo):
    task, params, adapter, batch = tiny_dpo
    opt = optax.adamw(1e-3)
    state = init_state(adapter, opt, 0)
    bad = {**batch, "user_embeds": batch["user_embeds"].copy()}
    bad["user_embeds"][1, 3] = np.nan
    new, metrics = jax.jit(make_train_step(task.loss, opt))(state, params, bad)
    assert float(metrics["finite"]) == 0.0 and int(new.step) == 0
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state)):
        assert np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)


def test_denoise_on_both_images_is_one_batch_of_pairs_side_by_side(tiny_dpo):
    """``image_key="both"`` learns rejected images exactly as extra chosen rows would be, each
    pair's two images in adjacent rows (``interleave_rows``: a device keeps its own pairs)."""
    _, params, _, batch = tiny_dpo
    module, sched = tiny_dpo[0].module, noise.make_noise_schedule()
    r = np.random.default_rng(3)
    pix = {k: r.normal(size=(4, 16, 16, 4)).astype(np.float32) for k in ("chosen", "rejected")}
    both = {**pix, "text_states": batch["text_states"]}
    side_by_side = lambda a, b: np.stack([a, b], axis=1).reshape(-1, *a.shape[1:])  # noqa: E731
    stacked = {
        "chosen": side_by_side(pix["chosen"], pix["rejected"]),
        "text_states": side_by_side(batch["text_states"], batch["text_states"]),
    }
    key = jax.random.PRNGKey(5)
    got, _ = DenoiseTask(module, sched, image_key="both").loss(params, {}, both, key)
    want, _ = DenoiseTask(module, sched, image_key="chosen").loss(params, {}, stacked, key)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    with pytest.raises(ValueError, match="image_key"):
        DenoiseTask(module, sched, image_key="safe")


def test_vae_task_kl_matches_numpy_and_training_lowers_the_loss():
    from psa_jax.models.vae import AutoencoderKL, VAEConfig

    cfg = VAEConfig.from_diffusers_config(dict(tiny.get_config().model.vae))
    module = AutoencoderKL(cfg)
    r = np.random.default_rng(0)
    images = np.tanh(r.normal(size=(2, 32, 32, 3))).astype(np.float32)
    params = meta.unbox(module.init(jax.random.key(0), images)["params"])
    task = VAETask(module, kl_weight=0.5)
    batch = {"chosen": images[:1], "rejected": images[1:]}
    loss, m = task.loss(params, {}, batch, jax.random.PRNGKey(0))
    moments = np.asarray(module.apply({"params": params}, images, method=AutoencoderKL.encode))
    mean, logvar = np.split(moments.astype(np.float64), 2, axis=-1)
    kl = 0.5 * np.mean(mean**2 + np.exp(logvar) - 1.0 - logvar)
    np.testing.assert_allclose(float(m["kl"]), kl, rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(m["recon_mse"]) + 0.5 * kl, rtol=1e-6)
    opt = optax.adam(1e-3)
    state = init_state(params, opt, 0)
    step = jax.jit(make_train_step(task.loss, opt))
    first = None
    for _ in range(20):
        state, metrics = step(state, {}, batch)
        first = first if first is not None else float(metrics["recon_mse"])
    assert float(metrics["recon_mse"]) < 0.85 * first
    # The scaling factor gives the posterior means unit standard deviation.
    scale = latent_scaling_factor(module, state.params, images)
    moments = module.apply({"params": state.params}, images, method=AutoencoderKL.encode)
    np.testing.assert_allclose(np.std(np.split(np.asarray(moments), 2, -1)[0]) * scale, 1.0,
                               rtol=1e-5)  # fmt: skip


def test_min_snr_weights_equal_the_formula_and_weight_the_denoise_loss(tiny_dpo):
    """Min-SNR-gamma: min(SNR, gamma) / SNR (epsilon), / (SNR + 1) (v); the loss is the
    weighted mean of the per-sample MSEs while the logged ``mse`` stays unweighted."""
    from psa_jax.train.step import min_snr_weights

    sched = noise.make_noise_schedule()
    t = jnp.asarray([0, 10, 100, 500, 999])
    a = np.asarray(sched.alphas_cumprod, np.float64)[np.asarray(t)]
    snr = a / (1 - a)
    np.testing.assert_allclose(min_snr_weights(sched, t, 5.0), np.minimum(snr, 5) / snr, rtol=1e-5)
    v = noise.make_noise_schedule(prediction_type="v_prediction")
    np.testing.assert_allclose(
        min_snr_weights(v, t, 5.0), np.minimum(snr, 5) / (snr + 1), rtol=1e-5
    )
    assert float(min_snr_weights(sched, t, 5.0)[0]) < 0.01  # t=0: almost no noise, weight tiny
    assert float(min_snr_weights(sched, t, 5.0)[-1]) == pytest.approx(1.0)  # SNR < gamma

    _, params, _, batch = tiny_dpo
    module = tiny_dpo[0].module
    r = np.random.default_rng(4)
    b = {"chosen": r.normal(size=(4, 16, 16, 4)).astype(np.float32),
         "text_states": batch["text_states"]}  # fmt: skip
    key = jax.random.PRNGKey(6)
    plain, m_plain = DenoiseTask(module, sched).loss(params, {}, b, key)
    weighted, m_w = DenoiseTask(module, sched, snr_gamma=5.0).loss(params, {}, b, key)
    assert float(m_w["mse"]) == pytest.approx(float(m_plain["mse"]), rel=1e-6)
    assert float(plain) == pytest.approx(float(m_plain["mse"]), rel=1e-6)
    assert float(weighted) != pytest.approx(float(plain), rel=1e-3)
    with pytest.raises(ValueError, match="snr_gamma"):
        DenoiseTask(module, sched, snr_gamma=-1.0)


def test_unsafe_weights_weigh_each_pairs_unsafe_image(tiny_dpo):
    """``train.unsafe_weights``: a pair's unsafe image (chosen where its user allows the
    category, else rejected) weighs ``weights[category]``, its safe image 1; the denoise loss is
    then exactly that weighted mean of the per-image MSEs (weight 0 drops an image)."""
    from psa_jax.data.profiles import UserProfile, bans_by_user, chosen_is_unsafe
    from psa_jax.train import step as step_lib
    from psa_jax.train.step import unsafe_loss_weights

    def user(uid, banned):
        return UserProfile(uid, 30, "adult", "F", "None", "healthy", "healthy", banned, ())

    users = bans_by_user([user("0000001", ("Hate",)), user("0000002", ())])
    ids = np.array(["0000001", "0000002", "0000001", "0000002"], dtype=object)
    cats = np.array(["Hate", "Hate", "Shocking", "Violence"], dtype=object)
    unsafe = chosen_is_unsafe(users, ids, cats)
    np.testing.assert_array_equal(unsafe, [False, True, True, True])
    with pytest.raises(ProfileError, match="0000009"):
        chosen_is_unsafe(users, ["0000009"], ["Hate"])
    weights = {"Hate": 3.0, "Shocking": 0.0}
    lw = unsafe_loss_weights(unsafe, cats, weights, "both")
    np.testing.assert_array_equal(lw, [[1, 3], [3, 1], [0, 1], [1, 1]])  # (chosen, rejected)
    np.testing.assert_array_equal(unsafe_loss_weights(unsafe, cats, weights, "rejected"),
                                  [[3], [1], [1], [1]])  # fmt: skip

    _, params, _, batch = tiny_dpo
    module, sched = tiny_dpo[0].module, noise.make_noise_schedule()
    r = np.random.default_rng(7)
    pix = {k: r.normal(size=(4, 16, 16, 4)).astype(np.float32) for k in ("chosen", "rejected")}
    b = {**pix, "text_states": batch["text_states"]}
    key = jax.random.PRNGKey(8)
    task = DenoiseTask(module, sched, image_key="both")
    got, m = task.loss(params, {}, {**b, "loss_weight": lw}, key)
    per = {}
    orig = step_lib.denoise_loss

    def spy(pred, target, w=None):  # the per-image MSEs of the unweighted loss, rows as fed
        per["mse"] = np.asarray(jnp.mean((pred - target) ** 2, axis=(1, 2, 3)))
        return orig(pred, target, w)

    step_lib.denoise_loss = spy
    try:
        plain, _ = task.loss(params, {}, b, key)
    finally:
        step_lib.denoise_loss = orig
    want = np.mean(per["mse"] * lw.reshape(-1))  # rows: each pair's chosen, then its rejected
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    assert float(m["mse"]) == pytest.approx(float(per["mse"].mean()), rel=1e-5)  # unweighted
    assert float(got) != pytest.approx(float(plain), rel=1e-3)


def _no_users():
    raise AssertionError("the split's users are read only for train.dpo_balance")


def test_pair_weigher_reads_the_users_bans_and_needs_a_users_file():
    """The trainer's ``loss_weight`` for ``train.unsafe_weights``: from the run's users file,
    per pair (chosen, rejected); no users file is a named error, no weights no weigher."""
    import dataclasses

    from psa_jax.data.prepare import Splits
    from psa_jax.data.profiles import packaged_users_csv, read_users
    from psa_jax.train.tasks import pair_weigher

    users = {u.user_id: u for u in read_users(packaged_users_csv())}
    strict = next(u for u in users.values() if "Hate" in u.banned)
    loose = next(u for u in users.values() if "Hate" not in u.banned)
    cfg = tiny.get_config("calibrate")
    cfg.train.unsafe_weights = {"Hate": 4.0}
    splits = Splits({}, {}, None, None, packaged_users_csv())
    weigh = pair_weigher(cfg, splits, _no_users)
    batch = {"user_id": np.array([strict.user_id, loose.user_id], dtype=object),
             "category": np.array(["Hate", "Hate"], dtype=object)}  # fmt: skip
    np.testing.assert_array_equal(weigh(batch), [[1.0, 4.0], [4.0, 1.0]])
    with pytest.raises(ValueError, match="users_csv"):
        pair_weigher(cfg, dataclasses.replace(splits, users_csv=None), _no_users)
    cfg.train.unsafe_weights = {}
    assert pair_weigher(cfg, splits, _no_users) is None


def test_dpo_balance_weighs_each_categorys_two_kinds_of_pair_equally():
    """``train.dpo_balance="category"``: over a split's pairs, each category's safe-chosen and
    unsafe-chosen pairs carry half of its weight each, and the mean weight is 1; a category
    that every user bans (or none does) weighs 1."""
    from psa_jax.data.prepare import Splits
    from psa_jax.data.profiles import CATEGORIES, packaged_users_csv, read_users
    from psa_jax.train.tasks import pair_weigher

    users = read_users(packaged_users_csv())[:40]
    ids = [u.user_id for u in users]
    cfg = tiny.get_config()
    cfg.train.dpo_balance = "category"
    weigh = pair_weigher(cfg, Splits({}, {}, None, None, packaged_users_csv()), lambda: ids)
    # Every user x category once: what one Sage-mini caption per category gives.
    uid = np.array([u for u in ids for _ in CATEGORIES], dtype=object)
    cat = np.array([c for _ in ids for c in CATEGORIES], dtype=object)
    w = weigh({"user_id": uid, "category": cat})
    assert w.shape == (len(uid),) and w.dtype == np.float32
    banned = np.array([c in u.banned for u in users for c in CATEGORIES])
    for c in CATEGORIES:
        sel = cat == c
        share = banned[sel].mean()
        if 0 < share < 1:
            assert w[sel & banned].sum() == pytest.approx(w[sel & ~banned].sum(), rel=1e-5), c
            assert w[sel].mean() == pytest.approx(1.0, rel=1e-5), c
            assert w[sel & banned][0] == pytest.approx(0.5 / share, rel=1e-5)
        else:
            np.testing.assert_array_equal(w[sel], 1.0)
    assert not np.allclose(w, 1.0)  # the packaged users ban categories unevenly


def test_dpo_loss_weights_scale_each_pairs_loss():
    """``dpo_loss(weights=w)`` is the mean of w times each pair's loss (DPO and chosen term);
    the metrics stay unweighted."""
    from psa_jax.train.losses import dpo_loss

    rng = np.random.default_rng(0)
    pw, pl, rw, rl, tw, tl = (jnp.asarray(rng.normal(size=(3, 2, 2, 4)), jnp.float32)
                              for _ in range(6))  # fmt: skip
    w = jnp.asarray([0.5, 2.0, 1.0], jnp.float32)
    per = [dpo_loss(pw[i:i + 1], pl[i:i + 1], rw[i:i + 1], rl[i:i + 1], tw[i:i + 1],
                    tl[i:i + 1], 10.0, 3.0)[0] for i in range(3)]  # fmt: skip
    got, m = dpo_loss(pw, pl, rw, rl, tw, tl, 10.0, 3.0, w)
    _, m_plain = dpo_loss(pw, pl, rw, rl, tw, tl, 10.0, 3.0)
    np.testing.assert_allclose(float(got), float(np.mean(np.asarray(per) * np.asarray(w))),
                               rtol=1e-5)  # fmt: skip
    assert float(m["implicit_acc"]) == float(m_plain["implicit_acc"])
    assert float(m["chosen_term"]) == pytest.approx(float(m_plain["chosen_term"]))


def test_dpo_balance_is_checked_and_migrated():
    """``train.dpo_balance``: a known value, task dpo on Sage-mini only; runs saved at schema
    v4 get "none" (how they trained) by the named rule."""
    from psa_jax.config import migrate_run_config
    from psa_jax.train.checks import ConfigValueError, check_config

    cfg = tiny.get_config()
    cfg.train.dpo_balance = "users"
    with pytest.raises(ConfigValueError, match="dpo_balance"):
        check_config(cfg)
    cfg = tiny.get_config("calibrate")
    cfg.model.pretrained = "x"
    cfg.train.dpo_balance = "category"
    with pytest.raises(ConfigValueError, match="only task=dpo"):
        check_config(cfg)
    cfg = tiny.get_config()
    cfg.train.dpo_balance = "category"
    cfg.data.source = "/data/sage"
    with pytest.raises(ConfigValueError, match="real SAGE"):
        check_config(cfg)
    v4 = {**tiny.get_config().to_dict(), "schema_version": 4}
    del v4["train"]["dpo_balance"]
    assert migrate_run_config(v4, "r")["train"]["dpo_balance"] == "none"
