"""Frozen-encoder caches: equal a fresh encoder run, dedupe, reuse, versioning, loader batches."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
from helpers import tiny_torch_vae
from test_sage_data import EMBEDS, NUM, _line, make_sage

from psa_jax.data import cache as C
from psa_jax.data.loader import SageLoader, augment_draws
from psa_jax.data.records import decode_image, open_source
from psa_jax.data.sage import build_data
from psa_jax.data.tokenizer import build_word_tokenizer, tokenize
from psa_jax.models.clip import CLIPTextConfig, FlaxCLIPTextModel
from psa_jax.models.vae import load_vae

RES = 16  # build-data resizes the 16x20 fixture images to 16x16
TOL = 1e-6


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _lines() -> list[dict]:
    """12 records over 7 distinct images and 5 captions: images are shared across records, one
    is used as chosen and as rejected, and one is a byte-identical copy under another name."""
    lines = []
    for i in range(NUM):
        rec = _line(i)
        rec["chosen"] = f"img/{i % 3:03d}_s.png"
        rec["rejected"] = f"img/{i % 4:03d}_u.png"
        rec["caption"] = f"a photo number {i % 5}"
        lines.append(rec)
    lines[10]["rejected"] = "img/001_s.png"  # chosen image of other records
    lines[11]["chosen"] = "img/copy_of_002_s.png"
    return lines


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cache")
    src = make_sage(str(root / "src"), _lines())
    shutil.copy(os.path.join(src, "img/002_s.png"), os.path.join(src, "img/copy_of_002_s.png"))
    build_data(src, root / "data", resolution=RES)
    tokenizer = build_word_tokenizer([r["caption"] for r in _lines()], max_length=16)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        eos_token_id=1,
        bos_token_id=0,
        pad_token_id=1,
    )
    tvae = tiny_torch_vae(RES)
    tvae.save_pretrained(root / "vae")
    return {
        "data": str(root / "data"),
        "tokenizer": tokenizer,
        "text": FlaxCLIPTextModel.init_random(config, seed=0),
        "vae": load_vae(root / "vae"),
    }


def build(world: dict, **kw) -> dict:
    args = dict(text_encoder=world["text"], tokenizer=world["tokenizer"], vae=world["vae"])
    return C.build_caches(world["data"], "sage", "train", batch_size=8, **{**args, **kw})


@pytest.fixture(scope="module")
def built(world) -> dict:
    return build(world)


def fresh_text(world: dict, captions, layer: str = "last") -> np.ndarray:
    out = world["text"](tokenize(world["tokenizer"], list(captions)))
    return np.asarray(out.last_hidden_state if layer == "last" else out.hidden_states[-2])


def fresh_moments(world: dict, images_nhwc: np.ndarray) -> np.ndarray:
    """Direct VAE run -> NHWC (mean, logvar), the cache's layout."""
    post = world["vae"].encode(np.transpose(images_nhwc, (0, 3, 1, 2)))
    return np.concatenate([post.mean, post.logvar], axis=1).transpose(0, 2, 3, 1)


def test_cached_arrays_equal_a_fresh_encoder_run(world, built):
    tables = C.load_caches(built["path"])
    source = open_source(world["data"], "sage", "train")
    assert tables.captions[0] == "" and tables.manifest["text_encoder"]["layer"] == "last"
    for pos in range(len(source)):
        rec = source[pos]
        row = tables.position(int(rec["index"]))
        for key in ("chosen", "rejected"):
            image = decode_image(rec[key])
            want = fresh_moments(world, np.stack([image, image[:, ::-1]]))
            got = tables.moments[getattr(tables, f"{key}_row")[row]]
            assert got.shape == (2, RES // 2, RES // 2, 8)
            assert rel_err(got, want) <= TOL
        caption = rec["caption"].decode()
        assert tables.captions[tables.caption_row[row]] == caption
        got = tables.text_states[tables.caption_row[row]]
        assert rel_err(got, fresh_text(world, [caption])[0]) <= TOL
    empty = tables.text_states[tables.EMPTY_ROW]
    assert rel_err(empty, fresh_text(world, [""])[0]) <= TOL
    pooled = np.asarray(world["text"](tokenize(world["tokenizer"], [""])).pooled)
    assert rel_err(tables.text_pooled[0], pooled[0]) <= TOL


def test_dedupe_counts_and_manifest(built):
    assert built["counts"] == {"records": NUM, "images": 7, "captions": 6}
    assert built["shapes"]["moments"] == [7, 2, RES // 2, RES // 2, 8]
    assert built["shapes"]["text_states"] == [6, 16, 32]
    path = built["path"]
    assert path.startswith(C.cache_root(os.path.dirname(path).split("/sage/")[0], "sage", "train"))
    with open(os.path.join(path, C.MANIFEST)) as f:
        on_disk = json.load(f)
    assert on_disk["dataset"]["fingerprint"] == built["dataset"]["fingerprint"]
    text_sum, vae_sum = on_disk["text_encoder"]["checksum"], on_disk["vae"]["checksum"]
    assert os.path.basename(path) == f"{text_sum[:12]}-{vae_sum[:12]}"
    assert not [d for d in os.listdir(os.path.dirname(path)) if d.startswith(".")]  # no temp


def test_second_build_reuses_without_encoding(world, built, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("an encoder ran although a matching cache exists")

    monkeypatch.setattr(C, "_encode_images", boom)
    monkeypatch.setattr(C, "encode_text", boom)
    again = build(world)
    assert again["path"] == built["path"] and again["build_seconds"] == built["build_seconds"]


def test_stale_manifest_is_rebuilt_not_used(world, built, tmp_path, monkeypatch):
    copy = tmp_path / "data"
    shutil.copytree(world["data"], copy)
    folder = os.path.join(C.cache_root(copy, "sage", "train"), os.path.basename(built["path"]))
    manifest_path = os.path.join(folder, C.MANIFEST)
    with open(manifest_path) as f:
        manifest = json.load(f)
    manifest["dataset"]["fingerprint"] = "0" * 64  # as if built from other records
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    calls = []
    real = C.encode_text
    monkeypatch.setattr(C, "encode_text", lambda *a: calls.append(1) or real(*a))
    with pytest.warns(UserWarning, match="does not match"):
        rebuilt = build({**world, "data": str(copy)})
    assert calls and rebuilt["dataset"]["fingerprint"] == built["dataset"]["fingerprint"]


def test_other_params_other_folder_and_pixel_space_text_only(world, built):
    other = dataclasses.replace(world["text"], params=FlaxCLIPTextModel.init_random(
        world["text"].config, seed=1).params)  # fmt: skip
    pixels = build({**world, "text": other}, vae=None, text_layer="penultimate")
    assert C.params_checksum(other.params) != C.params_checksum(world["text"].params)
    assert pixels["path"] != built["path"] and os.path.isdir(built["path"])
    assert os.path.basename(pixels["path"]).endswith("-pixels-pen")
    assert pixels["vae"] is None and "moments" not in pixels["shapes"]
    assert not os.path.exists(os.path.join(pixels["path"], "moments.npy"))
    tables = C.load_caches(os.path.join(pixels["path"], C.MANIFEST))
    assert tables.moments is None
    want = np.asarray(other(tokenize(world["tokenizer"], tables.captions)).hidden_states[-2])
    assert rel_err(tables.text_states, want) <= TOL


def test_params_checksum_is_stable_and_sensitive():
    tree = {"b": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}, "a": np.ones(2)}
    reordered = {"a": np.ones(2), "b": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    base = C.params_checksum(tree)
    assert base == C.params_checksum(reordered)
    assert (
        base == "ab0b59882b3be63debca0a5af1c927af91e4248eb88cbaa44d8a73ec88046507"
    )  # the same in every process and run
    changed = [
        {**tree, "a": np.ones(2, np.float32)},  # dtype
        {**tree, "a": np.ones((2, 1))},  # shape
        {**tree, "a": np.array([1.0, 2.0])},  # value
        {"b": tree["b"], "c": tree["a"]},  # path
    ]
    assert len({base, *map(C.params_checksum, changed)}) == 5


def collect(world, tables, n, **kw) -> list[dict]:
    args = dict(batch_size=4, seed=0, embeddings=EMBEDS, num_threads=2)
    it = SageLoader(world["data"], "sage", "train", caches=tables, **{**args, **kw})
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("flip_pair", ["joint", "independent"])
def test_loader_batches_with_caches_equal_a_direct_run(world, built, flip_pair):
    tables = C.load_caches(built["path"])
    batches = collect(world, tables, 6, caption_dropout=0.4, flip_pair=flip_pair)  # 2 epochs
    flips = drops = 0
    for b in batches:
        assert b["chosen_moments"].shape == (4, RES // 2, RES // 2, 8)
        assert b["text_states"].shape == (4, 16, 32) and b["text_pooled"].shape == (4, 32)
        for key in ("chosen", "rejected"):  # the decoded (maybe flipped) pixels, encoded now
            assert rel_err(b[f"{key}_moments"], fresh_moments(world, b[key])) <= TOL
        assert rel_err(b["text_states"], fresh_text(world, b["caption"])) <= TOL
        for i, e in zip(b["index"], b["epoch"]):
            flip, drop = augment_draws(0, int(i), int(e), 0.4)
            flips, drops = flips + flip, drops + drop
    assert 0 < flips < 24 and 0 < drops < 24  # both orientations and both prompts were seen
    lean = collect(world, tables, 6, caption_dropout=0.4, decode_pixels=False, flip_pair=flip_pair)
    for b, full in zip(lean, batches):
        assert "chosen" not in b and "rejected" not in b
        assert all(np.array_equal(v, full[k]) for k, v in b.items())


def test_loader_refuses_a_cache_for_other_data(world, built):
    tables = C.load_caches(built["path"])
    with pytest.raises(ValueError, match="this loader reads"):
        collect(world, tables, 1, resolution=RES)  # the cache was built with resolution=None
    shuffled = dataclasses.replace(tables, image_sha256=tables.image_sha256[::-1].copy())
    with pytest.raises(ValueError, match="stale"):
        collect(world, shuffled, 1)
    with pytest.raises(ValueError, match="needs caches with VAE moments"):
        collect(world, None, 1, decode_pixels=False)


# -- SDXL: two text encoders --------------------------------------------------------------------


def encoder_2(world: dict, seed: int = 3) -> FlaxCLIPTextModel:
    """A random CLIPTextModelWithProjection twin of the world's encoder (24 wide, pooled 20)."""
    cfg = dataclasses.replace(world["text"].config, hidden_size=24, projection_dim=20)
    return FlaxCLIPTextModel.init_random(cfg, seed=seed, with_projection=True)


def build_sdxl(world: dict, enc_2=None, **kw) -> dict:
    args = dict(text_encoder_2=enc_2 or encoder_2(world), tokenizer_2=world["tokenizer"])
    return build(world, text_layer="penultimate", vae=None, **{**args, **kw})  # text only


def test_sdxl_caches_hold_both_encoders_pooled_text_and_time_ids(world):
    enc_2 = encoder_2(world)
    built = build_sdxl(world, enc_2, empty_prompt="zeros")
    tables = C.load_caches(built["path"])
    ids = tokenize(world["tokenizer"], tables.captions)
    states, pooled = C.encode_text_pair(world["text"], enc_2, ids, ids)
    out_1, out_2 = world["text"](ids), enc_2(ids)
    assert tables.text_states.shape == (6, 16, 32 + 24) and tables.text_pooled.shape == (6, 20)
    np.testing.assert_array_equal(states[:, :, :32], out_1.hidden_states[-2])  # side by side
    np.testing.assert_array_equal(pooled, out_2.text_embeds)  # encoder 2's projection
    assert rel_err(tables.text_states[1:], states[1:]) <= TOL
    assert rel_err(tables.text_pooled[1:], pooled[1:]) <= TOL
    assert not tables.text_states[0].any() and not tables.text_pooled[0].any()  # "" -> zeros
    np.testing.assert_array_equal(tables.time_ids, [RES, RES, 0, 0, RES, RES])
    assert built["text_encoder_2"]["checksum"] == C.encoder_checksum(enc_2)
    assert built["tokenizer_2"]["length"] == 16 and built["empty_prompt"] == "zeros"
    assert os.path.basename(built["path"]).endswith("-pixels-pen-zeros")
    b = collect(world, tables, 1, caption_dropout=0.5)[0]
    np.testing.assert_array_equal(b["time_ids"], np.tile(tables.time_ids, (4, 1)))
    assert b["text_pooled"].shape == (4, 20)
    encoded = build_sdxl(world, enc_2)  # the encoded "" instead: its own folder
    assert encoded["path"] != built["path"] and encoded["empty_prompt"] is None
    empty = C.load_caches(encoded["path"])
    assert rel_err(empty.text_states[0], states[0]) <= TOL


def test_sdxl_cache_keys_cover_the_second_encoder_and_tokenizer(world, monkeypatch):
    first = build_sdxl(world)
    other = build_sdxl(world, encoder_2(world, seed=4))
    assert other["path"] != first["path"]  # encoder 2's weights name the folder too
    # Another second tokenizer (same vocabulary, other length) is detected by the manifest.
    tok_2 = build_word_tokenizer([r["caption"] for r in _lines()], max_length=16)
    tok_2.model_max_length = 12
    with pytest.raises(ValueError, match="pad to 16 and 12 tokens"):
        build_sdxl(world, tokenizer_2=tok_2)
    manifest_path = os.path.join(first["path"], C.MANIFEST)
    with open(manifest_path) as f:
        manifest = json.load(f)
    manifest["tokenizer_2"]["checksum"] = "0" * 64  # as if built with another tokenizer 2
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    with pytest.warns(UserWarning, match="does not match"):
        assert build_sdxl(world)["path"] == first["path"]
    with pytest.raises(ValueError, match="penultimate"):
        build(world, text_encoder_2=encoder_2(world), tokenizer_2=world["tokenizer"])
    with pytest.raises(ValueError, match="come together"):
        build(world, text_encoder_2=encoder_2(world), text_layer="penultimate")
