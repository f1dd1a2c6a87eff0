"""Sage-mini: counts, determinism, pair logic, user splits, and the marker oracle."""

import argparse
import csv
import json
import os
import time

import numpy as np
import pytest
from PIL import Image
from snapshots import tree_digest

from psa_jax.cli.data import register_toy
from psa_jax.data import toy_scenes, toy_world
from psa_jax.data.oracle import (
    MARKER_HUES_DEG,
    OracleScorer,
    hue_chroma,
    marker_rates,
    to_unit,
)
from psa_jax.data.profiles import CATEGORIES, LEVEL_USERS, packaged_users_csv, read_users
from psa_jax.data.toy_scenes import ToyWorldConfig
from psa_jax.data.toy_world import ensure_toy_world, make_toy_world

USERS_CSV = packaged_users_csv()  # PSAlign's 1,001 users, shipped with the package
SMALL = ToyWorldConfig(
    num_users=20,
    num_unseen_users=5,
    num_eval_seen_users=5,
    concepts_per_category=2,
    captions_per_concept=2,
    num_benign=8,
)
BIG = ToyWorldConfig(concepts_per_category=6, captions_per_concept=8, eval_captions_per_concept=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("sage_mini") / "a"
    return out, make_toy_world(out, USERS_CSV, SMALL)


def _jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _expected(scenes_, unsafe: bool) -> np.ndarray:
    exp = np.zeros((len(scenes_), len(CATEGORIES)), bool)
    if unsafe:
        exp[np.arange(len(scenes_)), [CATEGORIES.index(s.category) for s in scenes_]] = True
    return exp


def _render_all(config):
    scenes_ = toy_scenes.scenes(config)
    pairs = [toy_scenes.render_pair(s, config) for s in scenes_]
    return scenes_, np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def _blur_noise(images, sigma=0.8, noise=0.04, seed=0):
    """Stand-in for a tiny model's samples: Gaussian blur + Gaussian noise, back to uint8."""
    x = images.astype(np.float32) / 255.0
    radius = 2
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (radius, radius)
        xp = np.pad(x, pad, mode="edge")
        n = x.shape[axis]
        x = sum(w * np.take(xp, np.arange(i, i + n), axis=axis) for i, w in enumerate(k))
    x = x + np.random.default_rng(seed).normal(0.0, noise, x.shape)
    return np.rint(np.clip(x, 0, 1) * 255).astype(np.uint8)


def _per_category_accuracy(det, exp, scenes_):
    cats = np.array([s.category for s in scenes_])
    return {c: float((det == exp).all(1)[cats == c].mean()) for c in CATEGORIES}


def test_counts_per_split_category_and_user(world):
    out, summary = world
    seen_n = 20 + len(set(LEVEL_USERS) - {f"{i:07d}" for i in range(1, 21)})
    per_user_train = len(CATEGORIES) * 2 * 2
    train = _jsonl(out / "train" / "metadata.jsonl")
    assert len(train) == seen_n * per_user_train == summary["splits"]["train"]["pairs"]
    for c in CATEGORIES:
        assert sum(r["category"] == c for r in train) == seen_n * 4
        assert summary["splits"]["train"]["per_category"][c] == seen_n * 4
    users = {r["user_data"]["User_ID"] for r in train}
    assert len(users) == seen_n
    assert all(sum(r["user_data"]["User_ID"] == u for r in train) == per_user_train for u in users)
    assert len(list((out / "train").glob("*_s.png"))) == len(list((out / "train").glob("*_u.png")))
    assert len(list((out / "train").glob("*.png"))) == 2 * len(CATEGORIES) * 2 * 2
    for split in ("test_seen", "test_unseen"):
        prompts = _csv(out / split / "prompts.csv")
        assert list(prompts[0]) == ["file_name", "caption", "user_id", "category"]
        assert len(prompts) == 5 * len(CATEGORIES) * 2 == summary["splits"][split]["prompts"]
        assert len({p["user_id"] for p in prompts}) == 5
        assert len(_jsonl(out / split / "metadata.jsonl")) == len(prompts)
        assert len(list((out / split).glob("*.png"))) == 2 * len(CATEGORIES) * 2
    img = Image.open(next((out / "train").glob("*_u.png")))
    assert (img.mode, img.size) == ("RGB", (32, 32))
    benign = _jsonl(out / "benign" / "metadata.jsonl")
    assert len(benign) == 8 and all((out / "benign" / r["image"]).is_file() for r in benign)
    assert summary["version"] == toy_world.VERSION and summary["seed"] == 0
    assert len(summary["per_user"]) == seen_n + 5


def test_pairs_follow_each_users_banned_list(world):
    out, _ = world
    profiles = {p.user_id: p for p in read_users(USERS_CSV)}
    for split in ("train", "test_seen", "test_unseen"):
        for r in _jsonl(out / split / "metadata.jsonl"):
            user = profiles[r["user_data"]["User_ID"]]
            assert r["user_data"] == user.user_data()
            banned = r["category"] in user.banned
            assert r["chosen"].endswith("_s.png" if banned else "_u.png")
            assert r["rejected"] == r["chosen"][:-6] + ("_u.png" if banned else "_s.png")
            assert (out / split / r["chosen"]).is_file()
            assert r["concept"] in r["caption"]


def test_users_split_disjoint_and_round_trip(world):
    out, summary = world
    seen, unseen = set(summary["users"]["seen"]), set(summary["users"]["unseen"])
    assert not seen & unseen and len(unseen) == 5
    assert set(LEVEL_USERS) <= seen
    assert set(summary["users"]["eval_seen"]) <= seen
    prompts_unseen = {f"{int(p['user_id']):07d}" for p in _csv(out / "test_unseen/prompts.csv")}
    assert prompts_unseen == unseen
    written = {p.user_id: p for p in read_users(out / "users.csv")}
    original = {p.user_id: p for p in read_users(USERS_CSV)}
    assert set(written) == seen | unseen
    assert all(written[u] == original[u] for u in written)
    splits = {r["User_ID"]: r["Split"] for r in _csv(out / "users.csv")}
    assert {u for u, s in splits.items() if s == "unseen"} == unseen


def test_same_seed_same_bytes_other_seed_differs(world, tmp_path):
    out, summary = world
    again = make_toy_world(tmp_path / "b", USERS_CSV, SMALL)
    assert again == summary
    assert tree_digest(tmp_path / "b") == tree_digest(out)
    other = make_toy_world(tmp_path / "c", USERS_CSV, ToyWorldConfig(**{**vars(SMALL), "seed": 1}))
    assert other["users"]["unseen"] != summary["users"]["unseen"]
    a, c = tree_digest(out), tree_digest(tmp_path / "c")
    assert a["train/metadata.jsonl"] != c["train/metadata.jsonl"]
    common = sorted(set(a) & set(c) - {"users.csv", "summary.json"})
    assert sum(a[k] != c[k] for k in common) > 0.9 * len(common)


def test_ensure_reuses_a_matching_world(tmp_path):
    target = tmp_path / "cache"
    first = ensure_toy_world(target, USERS_CSV, SMALL)
    stamp = os.stat(target / "train" / "metadata.jsonl").st_mtime_ns
    assert ensure_toy_world(target, USERS_CSV, SMALL) == first
    assert os.stat(target / "train" / "metadata.jsonl").st_mtime_ns == stamp
    assert not list(tmp_path.glob("cache.tmp-*"))


def test_oracle_exact_on_clean_images():
    scenes_, safe, unsafe = _render_all(BIG)
    oracle = OracleScorer()
    det_s, det_u = oracle.detect(safe), oracle.detect(unsafe)
    acc_u = _per_category_accuracy(det_u, _expected(scenes_, True), scenes_)
    acc_s = _per_category_accuracy(det_s, _expected(scenes_, False), scenes_)
    print("clean accuracy unsafe", acc_u, "safe", acc_s)
    assert min(acc_u.values()) >= 0.98 and min(acc_s.values()) >= 0.98
    benign = np.stack([img for _, _, img in toy_scenes.benign_items(BIG)])
    assert not oracle.detect(benign).any()
    _, chroma = hue_chroma(to_unit(np.concatenate([safe, benign])))
    assert chroma.max() <= 0.3  # scenes are muted: far from the 0.4 marker threshold


@pytest.mark.parametrize("sigma,noise", [(0.8, 0.04), (1.5, 0.1)])
def test_oracle_robust_to_blur_and_noise(sigma, noise):
    scenes_, safe, unsafe = _render_all(BIG)
    oracle = OracleScorer()
    det_s = oracle.detect(_blur_noise(safe, sigma, noise, seed=1))
    det_u = oracle.detect(_blur_noise(unsafe, sigma, noise, seed=2))
    acc_u = _per_category_accuracy(det_u, _expected(scenes_, True), scenes_)
    acc_s = _per_category_accuracy(det_s, _expected(scenes_, False), scenes_)
    print(f"blur {sigma} + noise {noise} accuracy unsafe", acc_u, "safe", acc_s)
    assert min(acc_u.values()) >= 0.95 and min(acc_s.values()) >= 0.95


def test_oracle_detects_faded_markers():
    """A model may draw the marker washed out: 60% marker over the scene still counts."""
    scenes_, safe, unsafe = _render_all(BIG)
    faded = np.rint(0.6 * unsafe + 0.4 * safe.astype(np.float32)).astype(np.uint8)
    acc = _per_category_accuracy(OracleScorer().detect(faded), _expected(scenes_, True), scenes_)
    print("faded (0.6) accuracy", acc)
    assert min(acc.values()) >= 0.95


def test_oracle_value_conventions_and_scores():
    scenes_, _, unsafe = _render_all(SMALL)
    oracle = OracleScorer()
    ref = oracle.scores(unsafe)
    unit = unsafe.astype(np.float32) / 255.0
    np.testing.assert_allclose(oracle.scores(unit), ref, atol=1e-6)
    np.testing.assert_allclose(oracle(unit * 2 - 1, value_range=(-1, 1)), ref, atol=1e-6)
    np.testing.assert_array_equal(oracle.detect(unsafe[0]), oracle.detect(unsafe[:1]))
    assert ref.shape == (len(scenes_), 7) and ref.min() >= 0 and ref.max() <= 1
    np.testing.assert_array_equal(ref >= 0.5, oracle.detect(unsafe))
    with pytest.raises(ValueError, match="NHWC"):
        oracle.scores(np.zeros((2, 3, 32, 32), np.uint8))
    rates = marker_rates(oracle.detect(unsafe))
    assert rates["any"] == 1.0 and all(rates[c] == 1 / 7 for c in CATEGORIES)
    assert len(MARKER_HUES_DEG) == len(CATEGORIES)


def test_oracle_is_fast():
    images = np.random.default_rng(0).integers(0, 256, (4000, 32, 32, 3), dtype=np.uint8)
    OracleScorer().scores(images[:10])
    start = time.perf_counter()
    OracleScorer().scores(images)
    rate = len(images) / (time.perf_counter() - start)
    print(f"oracle: {rate:.0f} images/s")
    assert rate > 1000


def test_cli_subcommand(tmp_path, capsys, monkeypatch):
    parser = argparse.ArgumentParser()
    register_toy(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "cli"
    argv = f"make-toy-data --out {out} --num-users 8 --num-unseen-users 3 --seed 2".split()
    args = parser.parse_args([*argv, "--users", USERS_CSV])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["splits"]["test_unseen"]["users"] == 3
    assert json.loads((out / "summary.json").read_text())["seed"] == 2
    # Without --users or $PSA_JAX_USERS_CSV: PSAlign's users.csv shipped with the package.
    monkeypatch.delenv(toy_world.USERS_ENV, raising=False)
    assert open(toy_world.default_users_csv()).read() == open(USERS_CSV).read()
    args = parser.parse_args(["make-toy-data", "--out", str(tmp_path / "x"), "--num-users", "8"])
    assert args.func(args) == 0


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="concepts_per_category"):
        ToyWorldConfig(concepts_per_category=99)
    with pytest.raises(ValueError, match="captions_per_concept"):
        ToyWorldConfig(captions_per_concept=10, eval_captions_per_concept=1)
    with pytest.raises(ValueError, match="num_unseen_users"):
        make_toy_world(tmp_path, USERS_CSV, ToyWorldConfig(num_users=1000, num_unseen_users=50))


def test_train_captions_are_distinct_from_held_out_ones():
    scenes_ = toy_scenes.scenes(SMALL)
    train = {s.caption for s in scenes_ if s.k < SMALL.captions_per_concept}
    held = {s.caption for s in scenes_ if s.k >= SMALL.captions_per_concept}
    assert not train & held and len(train) == len(CATEGORIES) * 2 * 2


def test_marker_radius_sets_the_marker_size_and_is_checked():
    import dataclasses

    big = dataclasses.replace(SMALL, marker_radius=[0.3, 0.38])  # a list, as from JSON
    assert big.marker_radius == (0.3, 0.38)
    oracle = OracleScorer()
    _, _, small_u = _render_all(SMALL)
    _, _, big_u = _render_all(big)
    frac = lambda imgs: oracle.marker_fractions(imgs).sum(1).mean()  # noqa: E731
    # Area grows with the radius squared: (0.34 / 0.18)^2 ~ 3.6x.
    assert frac(big_u) > 2.5 * frac(small_u)
    with pytest.raises(ValueError, match="marker_radius"):
        ToyWorldConfig(marker_radius=(0.3, 0.2))


def test_world_folder_is_keyed_by_the_users_content(tmp_path, monkeypatch):
    """Two checkouts' copies of the same users file share one cached world; other users do not."""
    import shutil

    from configs import tiny
    from psa_jax.data import prepare

    made = []
    monkeypatch.setattr(toy_world, "ensure_toy_world", lambda out, *a: made.append(out))
    text = open(USERS_CSV, encoding="utf-8").read()
    copies = [tmp_path / "a" / "users.csv", tmp_path / "b" / "users.csv"]
    for path in copies:
        path.parent.mkdir()
        shutil.copyfile(USERS_CSV, path)
    other = tmp_path / "other.csv"
    other.write_text(text.replace("\n", "\r\n", 1), encoding="utf-8")  # one byte more
    folders = []
    for users in (*copies, other):
        cfg = tiny.get_config()
        cfg.data.users_csv, cfg.data.cache_dir = str(users), str(tmp_path / "cache")
        folders.append(prepare.toy_world_dir(cfg))
    assert folders[0] == folders[1] != folders[2]
    assert made == folders
