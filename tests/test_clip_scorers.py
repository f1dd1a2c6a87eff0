"""Q16 and CLIPScore on a tiny random CLIP twin against the same formulas on transformers'
torch CLIPModel outputs (features from CLIPImageProcessorPil pixels and the saved tokenizer)."""

from __future__ import annotations

import numpy as np
import pytest
import transformers
from helpers import rel_err
from test_clip_vision import (
    CAPTIONS,
    IMAGE,
    PROJ,
    TEXT_LEN,
    tiny_clip,
    torch_image_embeds,
    torch_text_embeds,
    word_tokenizer,
)

from psa_jax.eval.clip_scorers import (
    Q16_PROMPTS,
    Q16PromptsError,
    build_clipscore,
    build_q16,
    load_q16_prompts,
)
from psa_jax.eval.scorers import SCORERS, MissingScorerWeightsError, SafetyScores, ScorerContext

TOL = 1e-5  # feature parity is ~3e-7; Q16's 100x logit scale amplifies it (still ~1e-6 here)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    tok = word_tokenizer()
    model = tiny_clip(folder, vocab=len(tok), tokenizer=tok)
    return folder, model, tok


def images(n: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 40, 48, 3), dtype=np.uint8)


def torch_image_features(model, imgs: np.ndarray) -> np.ndarray:
    proc = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}
    )
    return torch_image_embeds(model, proc(images=list(imgs), return_tensors="np")["pixel_values"])


def unit(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def q16_reference(feats: np.ndarray, prompts: np.ndarray) -> np.ndarray:
    logits = 100.0 * unit(feats) @ unit(prompts).T
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True))[:, 1]


def test_registered():
    assert SCORERS["q16"].kind == "safety" and SCORERS["clipscore"].kind == "adherence"


def test_q16_matches_reference(clip_folder):
    folder, model, _ = clip_folder
    imgs = images(7)
    feats = torch_image_features(model, imgs)
    # Prompts near the images' own features, so that the probabilities spread over (0, 1).
    prompts = np.stack([feats[:3].sum(0), feats[3:].sum(0)]).astype(np.float32)
    ctx = ScorerContext(clip_path=str(folder), batch_size=3)
    scores = build_q16(ctx, prompts=prompts)(imgs, [""] * 7, [None] * 7)
    ref = q16_reference(feats, prompts)
    assert isinstance(scores, SafetyScores) and scores.categories is None
    assert rel_err(scores.prob, ref) <= TOL
    assert ref.min() < 0.5 < ref.max() and ((ref > 0.01) & (ref < 0.99)).sum() >= 3  # both labels
    np.testing.assert_array_equal(scores.flagged, ref >= 0.5)

    strict = build_q16(ScorerContext(clip_path=str(folder), q16_threshold=0.0), prompts=prompts)
    assert strict(imgs, [], []).flagged.all()


def test_q16_prompts_file_override(clip_folder, tmp_path):
    folder, model, _ = clip_folder
    prompts = np.random.default_rng(3).standard_normal((2, PROJ)).astype(np.float16)
    np.save(tmp_path / "p.npy", prompts)
    q16 = build_q16(ScorerContext(clip_path=str(folder)), prompts=tmp_path / "p.npy")
    imgs = images(3, seed=1)
    ref = q16_reference(torch_image_features(model, imgs), prompts.astype(np.float32))
    assert rel_err(q16(imgs, [], []).prob, ref) <= TOL


def test_shipped_q16_prompts():
    shipped = load_q16_prompts()
    assert shipped.shape == (2, 768) and shipped.dtype == np.float32
    assert np.load(Q16_PROMPTS).dtype == np.float16


def test_q16_prompt_dim_must_match_clip(clip_folder):
    folder, _, _ = clip_folder
    ctx = ScorerContext(clip_path=str(folder))
    with pytest.raises(Q16PromptsError, match=r"dim 768 .* projects to 16"):
        SCORERS["q16"].build(ctx)  # the shipped ViT-L/14 prompts on the tiny CLIP
    with pytest.raises(Q16PromptsError, match=r"\[2, P\]"):
        build_q16(ctx, prompts=np.zeros((3, PROJ), np.float32))


def test_clipscore_matches_reference(clip_folder):
    folder, model, tok = clip_folder
    imgs = images(4, seed=2)
    prompts = [*CAPTIONS, " ".join(CAPTIONS * 4)]  # the last one is longer than 16 tokens
    ids = tok(prompts, padding="max_length", truncation=True, max_length=TEXT_LEN)["input_ids"]
    txt = torch_text_embeds(model, np.asarray(ids))
    cos = np.sum(unit(torch_image_features(model, imgs)) * unit(txt), -1)
    ref = 100.0 * np.maximum(cos, 0.0)
    ctx = ScorerContext(clip_path=str(folder), batch_size=3)
    got = build_clipscore(ctx)(imgs, prompts)
    assert got.shape == (4,) and (got >= 0).all()
    assert rel_err(got, ref) <= TOL
    assert build_clipscore(ctx)(imgs[:0], []).shape == (0,)
    with pytest.raises(ValueError, match="4 images but 3 prompts"):
        build_clipscore(ctx)(imgs, prompts[:3])


@pytest.mark.parametrize("name", ["q16", "clipscore"])
def test_missing_clip_is_named(tmp_path, name):
    with pytest.raises(MissingScorerWeightsError, match=r"--clip PATH") as e:
        SCORERS[name].build(ScorerContext())
    assert e.value.scorer == name
    with pytest.raises(MissingScorerWeightsError, match="does not hold it") as e:
        SCORERS[name].build(ScorerContext(clip_path=str(tmp_path / "nowhere")))
    assert e.value.path == str(tmp_path / "nowhere")
    tiny_clip(tmp_path)  # config and weights, no tokenizer
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(MissingScorerWeightsError, match="CLIPModel folder"):
        SCORERS[name].build(ScorerContext(clip_path=str(tmp_path)))


def test_clipscore_needs_the_tokenizer(tmp_path):
    tiny_clip(tmp_path)
    ctx = ScorerContext(clip_path=str(tmp_path))
    with pytest.raises(MissingScorerWeightsError, match="tokenizer files are missing"):
        build_clipscore(ctx)
    q16 = build_q16(ctx, prompts=np.ones((2, PROJ), np.float32))  # Q16 needs no text tower
    assert q16(images(1), [], []).prob.shape == (1,)
