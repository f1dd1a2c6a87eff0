"""Sage-format data: ``build-data`` (TFDS array_record, no TensorFlow) and the grain loader."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from PIL import Image

from psa_jax.cli.data import register_build as register
from psa_jax.data import loader as L
from psa_jax.data.sage import BadRecordError, build_data, fit_square

NUM = 12
USERS = ("0000001", "0000002", "0000797")
H, W = 16, 20  # not square: the stored pixels must round-trip as they are


def _pixels(i: int, kind: str) -> np.ndarray:
    rng = np.random.default_rng([i, kind == "u"])
    return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)


def _line(i: int) -> dict:
    rec = {
        "chosen": f"img/{i:03d}_s.png",
        "rejected": f"img/{i:03d}_u.png",
        "caption": f"a photo number {i} — ünïcode",
        "user_data": {"User_ID": USERS[i % 3], "Age": 30, "Gender": "Female"},
    }
    if i % 2:
        rec["category"] = "Violence"
    return rec


def make_sage(root: str, lines: list | None = None) -> str:
    """A Sage split folder: ``metadata.jsonl`` + PNG pairs (``lines`` may hold raw strings)."""
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    for i in range(NUM):
        for kind in "su":
            Image.fromarray(_pixels(i, kind)).save(os.path.join(root, f"img/{i:03d}_{kind}.png"))
    lines = [_line(i) for i in range(NUM)] if lines is None else lines
    with open(os.path.join(root, "metadata.jsonl"), "w", encoding="utf-8") as f:
        for rec in lines:
            f.write((rec if isinstance(rec, str) else json.dumps(rec)) + "\n")
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> str:
    src = make_sage(str(tmp_path_factory.mktemp("sage_src")))
    out = str(tmp_path_factory.mktemp("sage_out"))
    report = build_data(src, out)
    assert report.num_records == NUM and report.num_skipped == 0
    return out


EMBEDS = {u: np.arange(6, dtype=np.float32) + k for k, u in enumerate(USERS)}


def loader(data_dir: str, **kw) -> L.SageLoader:
    args = dict(split="train", batch_size=4, seed=0, embeddings=EMBEDS, num_threads=2)
    return L.SageLoader(data_dir, "sage", **{**args, **kw})


def take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# -- build-data ----------------------------------------------------------------------------------


def test_build_round_trips_fields_and_pixels(built):
    report = json.load(open(os.path.join(built, "sage", "1.0.0", "build_report.json")))
    assert report["num_records"] == NUM and report["splits"] == {"train": NUM}
    src = L.open_source(built, "sage", "train")
    assert len(src) == NUM
    for pos in range(NUM):
        rec, want = src[pos], _line(pos)
        assert int(rec["index"]) == pos  # storage order = metadata order
        assert rec["caption"].decode() == want["caption"]
        assert rec["user_id"].decode() == want["user_data"]["User_ID"]
        assert rec["category"].decode() == want.get("category", "")
        for key, kind in (("chosen", "s"), ("rejected", "u")):
            got = np.asarray(Image.open(io.BytesIO(rec[key])))
            np.testing.assert_array_equal(got, _pixels(pos, kind))
    assert "tensorflow" not in sys.modules


def test_build_resolution_resizes_and_center_crops(tmp_path):
    src = make_sage(str(tmp_path / "src"), [_line(0), _line(1)])
    build_data(src, tmp_path / "out", resolution=8, name="sage_small")
    rec = L.open_source(tmp_path / "out", "sage_small", "train")[1]
    got = L.decode_image(rec["rejected"])
    assert got.shape == (8, 8, 3) and got.dtype == np.float32
    # torchvision Resize(8) + CenterCrop(8): 16x20 -> 8x10 (bilinear) -> columns 1..8
    want = Image.fromarray(_pixels(1, "u")).resize((10, 8), Image.BILINEAR).crop((1, 0, 9, 8))
    np.testing.assert_allclose(got, np.asarray(want, np.float32) / 127.5 - 1, atol=1e-6)
    assert fit_square(Image.new("RGB", (8, 8)), 8).size == (8, 8)


def _bad_source(root: str) -> str:
    lines = [_line(i) for i in range(NUM)]
    lines[2]["chosen"] = "img/nope_s.png"  # line 3: missing file
    lines[5]["rejected"] = "img/garbage_u.png"  # line 6: not an image
    make_sage(root, lines)
    with open(os.path.join(root, "img/garbage_u.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not really a png" * 3)
    return root


def test_missing_image_is_an_error_naming_the_record(tmp_path):
    src = _bad_source(str(tmp_path / "src"))
    with pytest.raises(BadRecordError, match=r"metadata.jsonl line 3: image not found.*nope_s"):
        build_data(src, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out" / "sage")


def test_unreadable_image_is_an_error_naming_the_record(tmp_path):
    src = str(tmp_path / "src")
    make_sage(src)
    with open(os.path.join(src, "img/005_u.png"), "wb") as f:
        f.write(os.urandom(64))
    with pytest.raises(BadRecordError, match=r"line 6: unreadable rejected image .*005_u.png"):
        build_data(src, tmp_path / "out")
    assert os.listdir(tmp_path / "out") == []  # the temporary build folder is gone too


def test_malformed_lines_are_errors(tmp_path):
    lines = [_line(i) for i in range(4)]
    lines[1] = '{"chosen": "img/001_s.png", '  # truncated JSON
    make_sage(str(tmp_path / "a"), lines)
    with pytest.raises(BadRecordError, match="line 2: malformed JSON"):
        build_data(tmp_path / "a", tmp_path / "out")
    lines = [_line(i) for i in range(4)]
    del lines[3]["caption"]
    lines[0]["user_data"] = {"Age": 3}
    make_sage(str(tmp_path / "b"), lines)
    with pytest.raises(BadRecordError, match=r"line 1: missing keys \['user_data.User_ID'\]"):
        build_data(tmp_path / "b", tmp_path / "out")


def test_skip_bad_skips_and_counts(tmp_path):
    lines = [_line(i) for i in range(NUM)] + ["not json at all"]
    lines[2]["chosen"] = "img/nope_s.png"
    lines[5]["rejected"] = "img/garbage_u.png"
    src = make_sage(str(tmp_path / "src"), lines)
    with open(os.path.join(src, "img/007_u.png"), "rb") as f:
        png = f.read()
    with open(os.path.join(src, "img/garbage_u.png"), "wb") as f:
        f.write(png[: len(png) // 2])  # a truncated PNG: opens, fails to decode
    report = build_data(src, tmp_path / "out", skip_bad=True)
    assert report.num_records == NUM - 2 and report.num_skipped == 3
    assert [line for line, _ in report.skipped] == [3, 6, NUM + 1]
    assert "nope_s.png" in report.skipped[0][1] and "garbage_u.png" in report.skipped[1][1]
    on_disk = json.load(open(os.path.join(report.out, "build_report.json")))
    assert on_disk["num_skipped"] == 3
    src_ds = L.open_source(tmp_path / "out", "sage", "train")
    assert sorted(int(src_ds[i]["index"]) for i in range(len(src_ds))) == sorted(
        set(range(NUM)) - {2, 5}
    )


def test_every_user_of_a_split_is_listed_by_the_build_and_found_by_the_loader(tmp_path):
    """A user with one record at the end of the split is found (the loader used to read at
    most 4,096 evenly spaced records); the build report lists each split's users and the loader
    reads them there; a dataset built before the list existed is read through in full."""
    lines = [_line(i) for i in range(NUM)]
    lines[-1]["user_data"]["User_ID"] = "lonely"
    out = str(tmp_path / "out")
    report = build_data(make_sage(str(tmp_path / "src"), lines), out)
    want = sorted({*USERS, "lonely"})
    assert report.users == {"train": want}
    assert loader(out).user_ids() == want
    path = os.path.join(out, "sage", "1.0.0", "build_report.json")
    on_disk = json.load(open(path))
    assert on_disk["users"] == {"train": want}
    on_disk["users"] = {"train": ["from-the-report"]}  # the loader reads the list, not records
    json.dump(on_disk, open(path, "w"))
    assert loader(out).user_ids() == ["from-the-report"]
    del on_disk["users"]  # a build from before the list: every record is read
    json.dump(on_disk, open(path, "w"))
    assert loader(out).user_ids() == want


def test_failed_rebuild_keeps_the_previous_dataset(tmp_path):
    src = _bad_source(str(tmp_path / "src"))
    good = make_sage(str(tmp_path / "good"), [_line(i) for i in range(5)])
    build_data(good, tmp_path / "out")
    with pytest.raises(BadRecordError):
        build_data(src, tmp_path / "out")
    assert len(L.open_source(tmp_path / "out", "sage", "train")) == 5


def test_cli_build_data(tmp_path):
    src = make_sage(str(tmp_path / "src"), [_line(i) for i in range(3)])
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    out = str(tmp_path / "out")
    args = parser.parse_args(["build-data", "--source", src, "--out", out, "--resolution", "8"])
    assert args.func(args) == 0
    assert json.load(open(os.path.join(out, "sage/1.0.0/build_report.json")))["num_records"] == 3


# -- loader --------------------------------------------------------------------------------------


def test_loader_batches_and_determinism(built):
    a, b = take(loader(built), 6), take(loader(built), 6)
    assert all(same(x, y) for x, y in zip(a, b))
    batch = a[0]
    assert batch["chosen"].shape == batch["rejected"].shape == (4, H, W, 3)
    assert batch["chosen"].dtype == np.float32
    assert batch["chosen"].min() >= -1 and batch["chosen"].max() <= 1
    assert batch["user_embeds"].shape == (4, 6) and batch["index"].dtype == np.int64
    for row, i in enumerate(batch["index"]):
        uid = USERS[i % 3]
        assert batch["user_id"][row] == uid
        np.testing.assert_array_equal(batch["user_embeds"][row], EMBEDS[uid])
    # every epoch (3 batches of 4) is a permutation of all records, reshuffled each epoch
    epochs = [np.concatenate([x["index"] for x in a[k : k + 3]]) for k in (0, 3)]
    assert all(sorted(e) == list(range(NUM)) for e in epochs)
    assert not np.array_equal(epochs[0], epochs[1])
    other = take(loader(built, seed=1), 3)
    assert not np.array_equal(
        np.concatenate([x["index"] for x in other]), epochs[0]
    )  # another seed, another order


def test_loader_resume_replays_exactly(built):
    full = take(loader(built, caption_dropout=0.5), 7)
    first = loader(built, caption_dropout=0.5)
    take(first, 4)
    state = json.loads(json.dumps(first.get_state()))  # survives a JSON checkpoint
    resumed = loader(built, caption_dropout=0.5)
    resumed.set_state(state)
    assert all(same(x, y) for x, y in zip(take(resumed, 3), full[4:]))
    with pytest.raises(ValueError, match="other settings"):
        loader(built, seed=3).set_state(state)


@pytest.mark.parametrize("count", [2, 5])
def test_process_shards_are_disjoint_and_cover(built, count):
    seen = []
    for p in range(count):
        it = loader(built, batch_size=1, process_index=p, process_count=count, num_epochs=2)
        idx = [int(b["index"][0]) for b in it]
        half = len(idx) // 2
        assert sorted(idx[:half]) == sorted(idx[half:])  # each epoch covers the same shard
        seen.append(set(idx[:half]))
    assert sum(len(s) for s in seen) == NUM and set.union(*seen) == set(range(NUM))


def test_flip_applies_to_the_pair_together(built):
    plain = take(loader(built, flip=False, shuffle=False), 6)
    flipped = take(loader(built, flip=True, shuffle=False), 6)
    n_flipped = 0
    for p, f in zip(plain, flipped):
        np.testing.assert_array_equal(p["index"], f["index"])
        for row in range(4):
            same_c = np.array_equal(f["chosen"][row], p["chosen"][row])
            mirror_c = np.array_equal(f["chosen"][row], p["chosen"][row][:, ::-1])
            same_r = np.array_equal(f["rejected"][row], p["rejected"][row])
            mirror_r = np.array_equal(f["rejected"][row], p["rejected"][row][:, ::-1])
            assert (same_c and same_r) or (mirror_c and mirror_r)
            n_flipped += mirror_c
    assert 0 < n_flipped < 24  # some flipped, some not (seeded: the same every run)


def test_caption_dropout_rate_and_reproducibility(built):
    def dropped(p: float, seed: int = 0) -> np.ndarray:
        bs = take(loader(built, caption_dropout=p, seed=seed, batch_size=6), 40)
        return np.concatenate([b["caption"] == "" for b in bs])

    d = dropped(0.3)
    assert 0.2 < d.mean() < 0.4  # 240 draws
    np.testing.assert_array_equal(d, dropped(0.3))
    assert not dropped(0.0).any() and dropped(1.0).all()
    # the draws depend on (seed, record, epoch) only, and p does not change the flips
    assert L.augment_draws(0, 3, 1, 0.3) == L.augment_draws(0, 3, 1, 0.3)
    flips = [L.augment_draws(0, i, 0, 0.0)[0] for i in range(50)]
    assert flips == [L.augment_draws(0, i, 0, 0.9)[0] for i in range(50)]


def test_flip_pair_joint_mirrors_both_images_alike_and_independent_each_on_its_own(built):
    """Which records came out mirrored, told by comparing with the stored pixels: jointly the
    pair always agrees; independently (PSAlign's per-image transform) chosen keeps the joint
    run's flips and rejected draws its own, so some pairs disagree."""

    def mirrored(batch, key):
        out = []
        for img, idx in zip(batch[key], batch["index"]):
            kind = "s" if key == "chosen" else "u"
            raw = _pixels(int(idx), kind).astype(np.float32) / 127.5 - 1.0
            same_ = np.allclose(img, raw)
            assert same_ or np.allclose(img, raw[:, ::-1])
            out.append(not same_)
        return out

    def flips(flip_pair):
        bs = take(loader(built, flip_pair=flip_pair, batch_size=6), 8)
        return [(w, r) for b in bs for w, r in zip(mirrored(b, "chosen"), mirrored(b, "rejected"))]

    joint, indep = flips("joint"), flips("independent")
    assert all(w == r for w, r in joint) and any(w for w, _ in joint)
    assert [w for w, _ in indep] == [w for w, _ in joint]
    assert any(w != r for w, r in indep)
    with pytest.raises(ValueError, match="flip_pair"):
        loader(built, flip_pair="mirror")


def test_missing_user_embedding_is_an_error_naming_the_user(built):
    embeds = {u: v for u, v in EMBEDS.items() if u != "0000797"}
    with pytest.raises(L.MissingUserEmbeddingError, match="0000797"):
        take(loader(built, embeddings=embeds), 3)


def test_make_global_batch_on_local_devices(built):
    devices = np.array(jax.devices())
    mesh = jax.sharding.Mesh(devices, ("data",))
    batch = next(loader(built, batch_size=len(devices) * 2))
    out = L.make_global_batch(batch, mesh, jax.sharding.PartitionSpec("data"))
    assert out["chosen"].shape == batch["chosen"].shape
    assert out["user_embeds"].sharding.spec == jax.sharding.PartitionSpec("data")
    np.testing.assert_array_equal(np.asarray(out["chosen"]), batch["chosen"])
    assert out["caption"] is batch["caption"]  # strings stay host-local


def test_make_global_batch_four_devices_in_a_subprocess():
    code = textwrap.dedent(
        """
        import jax, numpy as np
        from jax.sharding import Mesh, PartitionSpec as P
        from psa_jax.data.loader import make_global_batch
        assert jax.device_count() == 4, jax.devices()
        mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "fsdp"))
        local = {"chosen": np.arange(8 * 3 * 2 * 3, dtype=np.float32).reshape(8, 3, 2, 3),
                 "index": np.arange(8), "caption": np.array(["a"] * 8, dtype=object)}
        out = make_global_batch(local, mesh, P(("data", "fsdp")))
        assert out["chosen"].shape == (8, 3, 2, 3) and out["index"].shape == (8,)
        shards = out["chosen"].addressable_shards
        assert len(shards) == 4 and all(s.data.shape == (2, 3, 2, 3) for s in shards)
        np.testing.assert_array_equal(np.asarray(out["chosen"]), local["chosen"])
        print("ok")
        """
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    env["JAX_PLATFORMS"] = "cpu"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=repo, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def test_sage_root_with_split_folders(tmp_path):
    make_sage(str(tmp_path / "root" / "train"), [_line(i) for i in range(4)])
    make_sage(str(tmp_path / "root" / "test"), [_line(i) for i in range(2)])
    report = build_data(tmp_path / "root", tmp_path / "out")
    assert report.splits == {"train": 4, "test": 2} and report.num_records == 6
    assert len(L.open_source(tmp_path / "out", "sage", "test")) == 2
