"""``psa-jax demo``: its metrics and targets on hand-built detections, stage caching, and the
shipped tiny base (its recipe, and that psa_jax and diffusers load it alike)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from psa_jax.data.profiles import CATEGORIES
from psa_jax.demo.cache import cached
from psa_jax.demo.metrics import (
    RECORDED_ABLATION,
    ablation_rows,
    demo_metrics,
    level_summary,
    level_table,
    own_rates,
    targets,
)
from psa_jax.demo.run import run_demo
from psa_jax.demo.settings import DemoError, DemoSettings, dpo_config
from psa_jax.demo.stages import stage_data
from psa_jax.eval.plans import EvalItem


def _items_and_dets(psa_banned_rate: float, psa_allowed_rate: float, base_rate: float = 0.5):
    """PSAlign's six level users (their real banned categories) x 7
    categories x 10 seeds: the base shows the prompt's own marker on ``base_rate`` of its
    images; PSA on ``psa_banned_rate`` where the user bans the category, else
    ``psa_allowed_rate``."""
    from psa_jax.data.profiles import LEVEL_USERS, packaged_users_csv
    from psa_jax.eval.plans import profiles_table

    banned = profiles_table(packaged_users_csv())
    items, psa, base = [], [], []
    seeds = 10
    for level, user in enumerate(LEVEL_USERS):
        for c, cat in enumerate(CATEGORIES):
            for s in range(seeds):
                items.append(EvalItem(f"cap {cat}", s, f"level-{level}", user, cat, banned[user]))
                row_b, row_p = np.zeros(7, bool), np.zeros(7, bool)
                row_b[c] = s < base_rate * seeds
                rate = psa_banned_rate if cat in banned[user] else psa_allowed_rate
                row_p[c] = s < rate * seeds
                base.append(row_b)
                psa.append(row_p)
    return items, {"psa": np.array(psa), "base": np.array(base)}


def test_own_rates_and_level_table_count_the_prompts_own_category():
    items, det = _items_and_dets(psa_banned_rate=0.1, psa_allowed_rate=0.5)
    assert own_rates(items, det, [5], banned=True) == pytest.approx((0.1, 0.5))
    assert own_rates(items, det, [1, 2, 3, 4], banned=False) == pytest.approx((0.5, 0.5))
    assert own_rates(items, det, [5], banned=False) == (None, None)  # L5 allows nothing
    table = level_table(items, det)
    l2 = table["2"]["categories"]
    assert l2["Sexuality"]["banned"] and not l2["Hate"]["banned"]
    assert l2["Sexuality"]["psa"] == pytest.approx(0.1)
    assert l2["Hate"]["psa"] == pytest.approx(0.5)
    assert l2["Hate"]["base"] == pytest.approx(0.5)


def _fake_results(items, det):
    """The eval summary keys demo_metrics reads, computed like summary.group_summary."""
    groups = {}
    for level in range(6):
        idx = [i for i, it in enumerate(items) if it.group == f"level-{level}"]
        groups[f"level-{level}"] = {
            f"marker_rates_{m}": {"any": float(det[m][idx].any(1).mean())} for m in det
        }
    groups["seen"] = {"pass_rate_psa": 0.40, "pass_rate_base": 0.2}
    groups["unseen"] = {"pass_rate_psa": 0.35, "pass_rate_base": 0.2}
    axes = {"S": 0.5, "P": 0.9, "Q": 0.8, "R": 0.5, "score": 0.6}
    base_rates = {"rates": {c: 0.5 for c in CATEGORIES}, "images_per_category": 45}
    fid = {"base": 8.2, "before": 8.7, "after": 8.1}
    spqr = {"before": axes, "after": {**axes, "R": 0.4}, "levels": {}, "fid": fid}
    return {"groups": groups}, spqr, base_rates


def test_metrics_and_targets_of_a_suppressing_adapter():
    items, det = _items_and_dets(psa_banned_rate=0.1, psa_allowed_rate=0.5)
    m = demo_metrics(items, det, *_fake_results(items, det))
    assert m["suppression_ratio"] == pytest.approx(0.2)
    assert m["allowed_retention"] == pytest.approx(1.0)
    # Any-marker rate per level = share of its prompts' categories allowed (x .5) + banned (x .1)
    n_banned = [0, 2, 4, 4, 5, 7]
    want = [((7 - b) * 0.5 + b * 0.1) / 7 for b in n_banned]
    assert m["level_marker_rates"] == pytest.approx(want)
    assert m["level_marker_rates_base"] == pytest.approx([0.5] * 6)
    assert set(m["spqr"]) == {"before", "after"}
    m["round_trip_max_abs_diff"] = 1e-6
    t = targets(m)
    assert {k for k, v in t.items() if not v["ok"]} == set()
    # L2 and L3 both ban 4 categories: equal rates are a tie, still "non-increasing".
    assert t["calibration"]["ok"]
    # "Measurable" reads the base_rates stage (its own seeds), not the level images' 3 seeds.
    assert m["base_own_marker_images"] == 45
    m["base_own_marker_rate"]["Shocking"] = 0.25
    assert not targets(m)["measurable"]["ok"]


def test_targets_fail_where_the_adapter_does_not_personalise():
    # "Draw more markers" for everyone (what issue 15 measured on the first tiny run).
    items, det = _items_and_dets(psa_banned_rate=0.6, psa_allowed_rate=0.6)
    m = demo_metrics(items, det, *_fake_results(items, det))
    m["round_trip_max_abs_diff"] = 5e-3
    t = targets(m)
    assert not t["suppression"]["ok"] and m["suppression_ratio"] == pytest.approx(1.2)
    assert t["no_over_suppression"]["ok"]
    assert not t["calibration"]["ok"] or m["level_marker_rates"][1] == m["level_marker_rates"][5]
    assert not t["round_trip"]["ok"]
    # Over-suppression: allowed content lost too.
    items, det = _items_and_dets(psa_banned_rate=0.0, psa_allowed_rate=0.3)
    m = demo_metrics(items, det, *_fake_results(items, det))
    m["round_trip_max_abs_diff"] = 0.0
    assert not targets(m)["no_over_suppression"]["ok"]


def test_ablation_rows_show_this_run_then_the_trained_or_the_recorded_ablation(
    tmp_path, monkeypatch
):
    items, det = _items_and_dets(psa_banned_rate=0.1, psa_allowed_rate=0.5)
    m = demo_metrics(items, det, *_fake_results(items, det))
    m["pair_accuracy"] = [[0, 0.5], [800, 0.7]]
    settings = DemoSettings(out=str(tmp_path))
    tokens = dpo_config(settings).model.adapter.num_user_tokens
    recorded = {"source": "recorded: psa-jax demo --ablation-tokens 1 (test)",
                "rows": [{"num_user_tokens": t, "suppression_ratio": 0.9, "allowed_retention": 1.2,
                          "level_marker_rates": [0.5] * 6, "pair_accuracy": 0.6,
                          "adherence_ratio_per_level": {str(lv): 1.0 for lv in range(6)}}
                         for t in (1, tokens)]}  # fmt: skip
    path = tmp_path / "recorded.json"
    path.write_text(json.dumps(recorded))
    monkeypatch.setattr("psa_jax.demo.metrics.RECORDED_ABLATION", str(path))
    rows = ablation_rows(settings, m, {})
    assert [r["num_user_tokens"] for r in rows] == [tokens, 1]  # the recorded twin of this run
    assert rows[0]["source"] == "this run" and rows[0]["suppression_ratio"] == pytest.approx(0.2)
    assert rows[0]["pair_accuracy"] == 0.7
    assert rows[1]["source"] == recorded["source"] and rows[1]["suppression_ratio"] == 0.9
    # An ablation trained in this run replaces the recorded row.
    trained = {
        **level_summary(items, det),
        "num_user_tokens": 1,
        "pair_accuracy": 0.55,
        "adherence_ratio_per_level": {str(lv): 0.9 for lv in range(6)},
    }
    rows = ablation_rows(settings, m, {"ablation": trained})
    assert [r["source"] for r in rows] == ["this run", "this run"]
    assert rows[1]["pair_accuracy"] == 0.55 and rows[1]["level_marker_rates"] == m[
        "level_marker_rates"]  # fmt: skip


def test_the_package_ships_a_recorded_ablation_of_another_token_count():
    with open(RECORDED_ABLATION, encoding="utf-8") as f:
        recorded = json.load(f)
    tokens = dpo_config(DemoSettings(out="unused")).model.adapter.num_user_tokens
    assert recorded["source"].startswith("recorded: psa-jax demo --ablation-tokens")
    assert any(r["num_user_tokens"] != tokens for r in recorded["rows"])
    for r in recorded["rows"]:
        assert len(r["level_marker_rates"]) == 6 and r["suppression_ratio"] is not None
        assert len(r["adherence_ratio_per_level"]) == 6


def test_stage_cache_reuses_a_done_stage_and_redoes_a_changed_one(tmp_path):
    calls, log = [], []
    folder = str(tmp_path / "stage")

    def make():
        calls.append(1)
        return {"value": len(calls)}

    first = cached(folder, {"a": 1}, make, log.append)
    again = cached(folder, {"a": 1}, make, log.append)
    assert first["value"] == again["value"] == 1 and len(calls) == 1
    changed = cached(folder, {"a": 2}, make, log.append)
    assert changed["value"] == 2 and any("changed" in line for line in log)


def test_fresh_refuses_to_delete_a_folder_the_demo_did_not_write(tmp_path):
    (tmp_path / "thesis.tex").write_text("years of work")
    with pytest.raises(DemoError, match="no demo output"):
        run_demo(DemoSettings(out=str(tmp_path)), fresh=True)
    assert (tmp_path / "thesis.tex").exists()


# -- the shipped base ------------------------------------------------------------------------


def test_shipped_tiny_base_matches_its_recipe_and_the_tiny_config():
    """The packaged folder was made by launch/tiny.sh from configs/tiny.py: the recipe's stage
    configs are today's (architecture, world, steps, seeds), and the files hold that UNet."""
    from configs import tiny
    from psa_jax.export.pipeline import RECIPE
    from psa_jax.models.packaged import TINY_BASE, resolve

    folder = resolve(TINY_BASE)
    with open(os.path.join(folder, RECIPE), encoding="utf-8") as f:
        recipe = json.load(f)
    from psa_jax.data.toy_world import VERSION

    assert recipe["world_version"] == VERSION
    assert len(recipe["continued"]) == 1  # base -> calibrate (launch/tiny.sh)
    stages = {"vae": recipe["vae"], "base": recipe["base"], "calibrate": recipe["continued"][0]}
    for stage, got in stages.items():
        cfg = tiny.get_config(stage)
        assert got["data"]["toy"] == json.loads(cfg.data.toy.to_json())
        assert got["train"]["steps"] == cfg.train.steps
        assert got["seed"] == cfg.seed and got["model"]["init_seed"] == cfg.model.init_seed
        assert got["optim"] == json.loads(cfg.optim.to_json())
    want_unet = json.loads(tiny.get_config("base").model.unet.to_json())
    with open(os.path.join(folder, "unet", "config.json"), encoding="utf-8") as f:
        shipped = json.load(f)
    for key, value in want_unet.items():
        assert shipped[key] == value, key
    assert recipe["base"]["model"]["unet"] == want_unet
    cal = tiny.get_config("calibrate")
    assert stages["calibrate"]["train"]["unsafe_weights"] == dict(cal.train.unsafe_weights)
    assert stages["calibrate"]["task"] == "denoise" and stages["calibrate"]["model"]["unet"] == (
        want_unet
    )
    # The DPO stage trains on exactly this folder, by name.
    assert tiny.get_config().model.pretrained == TINY_BASE


@pytest.mark.slow
def test_shipped_tiny_base_draws_the_same_image_in_psa_jax_and_diffusers():
    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import StableDiffusionPipeline

    from psa_jax.models.packaged import TINY_BASE, resolve
    from psa_jax.sample.pipeline import Pipeline
    from psa_jax.sample.sampler import initial_latents

    folder = resolve(TINY_BASE)
    ours = Pipeline.from_pretrained(folder)
    prompt = "a violent fight near a house at dawn"
    img = ours([prompt], None, [7], scheduler="ddim", steps=6, guidance_scale=3.0, output="float")
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    keys = jax.vmap(jax.random.key)(jnp.asarray([7], jnp.uint32))
    lat = np.asarray(initial_latents(keys, ours.latent_shape())).transpose(0, 3, 1, 2)
    with torch.no_grad():
        theirs = pipe(
            prompt,
            num_inference_steps=6,
            guidance_scale=3.0,
            latents=torch.from_numpy(lat.copy()),
            output_type="np",
        ).images
    assert np.abs(np.asarray(theirs) - img).max() <= 2e-3


# -- the demo end to end (small settings) ------------------------------------------------------

API_KEYS = {  # ../shared/API.md: DIR/metrics.json written by psa-jax demo has at least these
    "level_marker_rates",
    "suppression_ratio",
    "allowed_retention",
    "seen_pass_rate",
    "unseen_pass_rate",
    "spqr",
    "wall_seconds",
}


@pytest.mark.slow
def test_demo_runs_end_to_end_resumes_and_writes_the_api_keys(tmp_path):
    """Every stage on the shipped base with short settings: metrics.json has API.md's keys,
    the page links only files that exist, diffusers redraws psa_jax's image, and a second run
    reuses every stage."""
    import re

    out = str(tmp_path / "demo")
    settings = DemoSettings(
        out=out,
        dpo_steps=12,  # > the config's 10 warmup steps
        draws=1,
        base_draws=2,
        users_per_group=2,
        finetune_steps=3,
        ablation_tokens=1,
        sampler={"scheduler": "ddim", "steps": 4, "guidance_scale": 3.0, "user_scale": 1.0,
                 "batch_size": 32},
        progress=False,
    )  # fmt: skip
    log: list[str] = []
    metrics = run_demo(settings, log=log.append)
    with open(os.path.join(out, "metrics.json"), encoding="utf-8") as f:
        written = json.load(f)
    assert API_KEYS <= set(written)
    assert len(written["level_marker_rates"]) == 6
    assert set(written["spqr"]) == {"before", "after"}
    for phase in ("before", "after"):
        assert set(written["spqr"][phase]) == {"S", "P", "Q", "R", "score"}
    assert written["wall_seconds"] > 0
    assert written["round_trip_max_abs_diff"] <= 2e-3
    # The DPO curve starts at the untrained adapter: policy == reference, every margin a tie.
    assert written["pair_accuracy"][0] == [0, 0.5]
    assert os.path.isfile(os.path.join(out, "export", "psa_adapter.safetensors"))
    assert os.path.isfile(os.path.join(out, "export", "ip_adapter", "ip_adapter.safetensors"))
    page = open(os.path.join(out, "report.html"), encoding="utf-8").read()
    links = re.findall(r"(?:src|href)='([^']+)'", page)
    assert "grid_levels.png" in links and "levels.png" in links
    for link in links:
        assert os.path.isfile(os.path.join(out, link)), link
    assert set(metrics["targets"]) == {"measurable", "suppression", "no_over_suppression",
                                       "calibration", "generalisation", "round_trip"}  # fmt: skip
    # The ablation row was trained in this run (T=1), beside this run's own (T=4).
    rows = written["ablation_user_tokens"]
    assert [r["source"] for r in rows] == ["this run", "this run"]
    assert [r["num_user_tokens"] for r in rows] == [4, 1]
    assert rows[1]["suppression_ratio"] is not None and len(rows[1]["level_marker_rates"]) == 6
    assert all(v is not None for v in rows[1]["adherence_ratio_per_level"].values())
    assert "Ablation: user tokens" in page
    assert "cohort {base, before, after}" in page  # why one SPQR score can collapse
    # ... and the note asks the reader to read the FIDs beside Q: the three are on the page.
    assert set(written["spqr_fid"]) == {"base", "before", "after"}
    for name, value in written["spqr_fid"].items():
        assert f"{name} {value:.3f}" in page
    # A second run finds every stage done and rewrites the same measurements.
    log.clear()
    again = run_demo(settings, log=log.append)
    assert sum("done before" in line for line in log) == 8, log  # 6 stages + the ablation's 2
    for key in API_KEYS - {"wall_seconds"}:
        assert again[key] == metrics[key], key


@pytest.mark.slow
def test_dpo_stage_learns_on_the_shipped_base(tmp_path):
    """The demo's DPO stage, at the tiny config's full length on the shipped base: held-out
    pair accuracy (the config's >= 128 held-out pairs, margins averaged over 8 draws) rises
    from the untrained adapter's 0.5 to >= 0.65 (issue 15; measured 0.68)."""
    from psa_jax.demo.report import pair_accuracy_curve
    from psa_jax.train.trainer import train

    settings = DemoSettings(out=str(tmp_path / "demo"), progress=False)
    stage_data(settings, log=lambda _: None)
    config = dpo_config(settings)
    steps = config.train.steps
    assert config.train.eval_batches * config.train.eval_batch_size >= 128
    config.train.eval_every = steps  # step 0 and the last step only
    config.train.checkpoint_every = steps
    train(config, str(tmp_path / "dpo"))
    curve = dict((int(s), a) for s, a in pair_accuracy_curve(str(tmp_path / "dpo")))
    assert set(curve) == {0, steps}, curve
    assert curve[0] == 0.5  # zero-initialised adapter: policy == reference, every margin a tie
    assert curve[steps] > curve[0] and curve[steps] >= 0.65, curve


def test_demo_quiets_known_library_noise_and_keeps_everything_else():
    import logging

    from psa_jax.demo.logs import _DropNoise, quiet_library_noise

    quiet_library_noise()
    quiet_library_noise()  # idempotent: one filter per target
    targets = [logging.getLogger("absl"), *logging.getLogger("transformers").handlers,
               *logging.getLogger("diffusers").handlers]  # fmt: skip
    assert len(targets) >= 3
    for t in targets:
        assert sum(isinstance(f, _DropNoise) for f in t.filters) == 1, t
    record = lambda msg: logging.makeLogRecord({"msg": msg})  # noqa: E731
    drop = _DropNoise()
    for noise in (
        "CheckpointManagerOptions.read_only=True, setting save_interval_steps=0.",
        "`CLIPImageProcessor` requires torchvision (not installed); falling back to ...",
        "image_encoder is not loaded since `image_encoder_folder=None` passed. You will not ...",
    ):
        assert not drop.filter(record(noise)), noise
    for kept in ("checkpoint 7 is damaged", "Some weights were not initialized: ['x']"):
        assert drop.filter(record(kept)), kept
