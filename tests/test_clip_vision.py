"""Parity of the Flax CLIP vision tower, the CLIPModel loader and the preprocessing with
transformers, on tiny random CLIPModels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from helpers import perturb_, rel_err
from safetensors.torch import load_file, save_file

from psa_jax.data.tokenizer import build_word_tokenizer
from psa_jax.models.clip_preprocess import CLIPImagePreprocess
from psa_jax.models.clip_vision import FlaxCLIPModel, load_clip_model
from psa_jax.models.convert import WeightMismatchError

TOL = 1e-5
IMAGE, PATCH, PROJ, TEXT_LEN = 32, 8, 16, 16
# PIL resize and crop are exact integer steps; only (x/255 - mean)/std rounds in float32.
PREPROCESS_ATOL = 1e-6
CAPTIONS = ["a violent fight near a house at night", "a red car in the rain", "a calm lake"]


def tiny_clip(
    folder,
    *,
    act: str = "quick_gelu",
    eos: int = 1,
    vocab: int = 50,
    tokenizer=None,
    tower_proj: int = PROJ,
    seed: int = 0,
) -> transformers.CLIPModel:
    """A random (perturbed) CLIPModel saved to ``folder`` (with ``tokenizer`` if given)."""
    torch.manual_seed(seed)
    # The towers' own projection_dim is what CLIP*ModelWithProjection reads from this folder
    # (CLIPModel reads the top-level one): real CLIP folders keep all three equal.
    layers = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=tower_proj,
    )
    cfg = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=vocab,
            max_position_embeddings=TEXT_LEN,
            hidden_act=act,
            eos_token_id=eos,
            bos_token_id=0,
            pad_token_id=1,
            **layers,
        ),
        vision_config=dict(image_size=IMAGE, patch_size=PATCH, hidden_act=act, **layers),
        projection_dim=PROJ,
        attn_implementation="eager",
    )
    model = transformers.CLIPModel(cfg).eval()
    perturb_(model, seed)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return model


def word_tokenizer():
    return build_word_tokenizer(CAPTIONS, max_length=TEXT_LEN)


def text_ids(vocab: int, eos: int, n: int = 3, seed: int = 0) -> np.ndarray:
    """BOS, random words, one EOS (legacy eos=2: the EOT is the largest id), EOS padding."""
    rng = np.random.default_rng(seed)
    eot = vocab - 1 if eos == 2 else eos
    ids = rng.integers(3, vocab - 1, size=(n, TEXT_LEN))
    ids[:, 0] = 0
    for row, end in enumerate([TEXT_LEN - 1, 4, 9][:n]):
        ids[row, end:] = eot
    return ids


def torch_image_embeds(model, pixel_values: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.get_image_features(pixel_values=torch.from_numpy(pixel_values)).pooler_output


def torch_text_embeds(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.get_text_features(input_ids=torch.from_numpy(ids)).pooler_output


def random_images(seed: int = 0, shapes=((37, 53), (64, 48), (32, 32), (100, 31), (45, 45))):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


# tower_proj=512: the towers' stale projection_dim (transformers' default); CLIPModel and the
# loader use the top-level one.
@pytest.mark.parametrize("act,eos,tower_proj", [("quick_gelu", 1, PROJ), ("gelu", 2, 512)])
def test_towers_match_transformers(tmp_path, act, eos, tower_proj):
    model = tiny_clip(tmp_path, act=act, eos=eos, tower_proj=tower_proj)
    clip = load_clip_model(tmp_path)
    assert isinstance(clip, FlaxCLIPModel) and clip.projection_dim == PROJ
    assert clip.tokenizer is None
    assert clip.logit_scale == pytest.approx(float(model.logit_scale.detach()))

    pixels = np.random.default_rng(1).standard_normal((3, 3, IMAGE, IMAGE)).astype(np.float32)
    out = clip.vision(pixels)
    with torch.no_grad():
        ref = model.vision_model(pixel_values=torch.from_numpy(pixels))
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) <= TOL
    assert rel_err(out.pooled, ref.pooler_output) <= TOL
    assert rel_err(out.image_embeds, torch_image_embeds(model, pixels)) <= TOL

    ids = text_ids(50, eos)
    assert rel_err(clip.text_features(ids), torch_text_embeds(model, ids)) <= TOL


def test_vision_with_projection_class_loads_the_same_weights(tmp_path):
    """Equal to transformers' own CLIPVisionModelWithProjection read from the CLIPModel folder."""
    tiny_clip(tmp_path)
    ref_model = transformers.CLIPVisionModelWithProjection.from_pretrained(tmp_path).eval()
    pixels = np.random.default_rng(2).standard_normal((2, 3, IMAGE, IMAGE)).astype(np.float32)
    with torch.no_grad():
        ref = ref_model(pixel_values=torch.from_numpy(pixels)).image_embeds
    assert rel_err(load_clip_model(tmp_path).vision(pixels).image_embeds, ref) <= TOL


def test_preprocess_matches_clip_image_processor():
    proc = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}
    )
    ours = CLIPImagePreprocess(IMAGE, (IMAGE, IMAGE))
    for image in random_images():
        ref = proc(images=[image], return_tensors="np")["pixel_values"]
        got = ours(image[None])
        assert got.shape == ref.shape == (1, 3, IMAGE, IMAGE) and got.dtype == np.float32
        np.testing.assert_allclose(got, ref, rtol=0, atol=PREPROCESS_ATOL)


def test_preprocessor_config_is_read(tmp_path):
    """A folder's preprocessor_config.json (other size, crop, mean, std) overrides the defaults."""
    tiny_clip(tmp_path)
    proc = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": 40},
        crop_size={"height": IMAGE, "width": IMAGE},
        image_mean=[0.5, 0.4, 0.3],
        image_std=[0.2, 0.25, 0.3],
    )
    proc.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["size"] == {"shortest_edge": 40}
    clip = load_clip_model(tmp_path)
    assert clip.preprocess.shortest_edge == 40 and clip.preprocess.image_mean == (0.5, 0.4, 0.3)
    for image in random_images(3):
        ref = proc(images=[image], return_tensors="np")["pixel_values"]
        np.testing.assert_allclose(clip.preprocess(image[None]), ref, atol=PREPROCESS_ATOL)


def test_image_and_text_features_batched(tmp_path):
    """uint8 images end to end (processor + torch as reference); padded last batches agree."""
    tok = word_tokenizer()
    model = tiny_clip(tmp_path, vocab=len(tok), tokenizer=tok)
    clip = load_clip_model(tmp_path)
    assert clip.tokenizer is not None
    images = np.stack([im[:32, :31] for im in random_images(4, [(40, 40)] * 5)])
    proc = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}
    )
    pixels = proc(images=list(images), return_tensors="np")["pixel_values"]
    ref = torch_image_embeds(model, pixels)
    assert rel_err(clip.image_features(images), ref) <= TOL
    assert rel_err(clip.image_features(images, batch_size=2), ref) <= TOL
    assert clip.image_features(images[:0]).shape == (0, PROJ)

    prompts = [*CAPTIONS, "a lake"]
    ids = tok(prompts, padding="max_length", max_length=TEXT_LEN, return_tensors="np")
    ref = torch_text_embeds(model, ids["input_ids"])
    assert rel_err(clip.text_features(prompts, batch_size=3), ref) <= TOL
    assert rel_err(clip.text_features("a lake"), ref[3:]) <= TOL


def test_long_prompts_are_truncated_to_max_positions(tmp_path):
    tok = build_word_tokenizer(CAPTIONS, max_length=77)  # longer than the model's 16 positions
    tiny_clip(tmp_path, vocab=len(tok))
    clip = load_clip_model(tmp_path, tokenizer=tok)
    long = " ".join(CAPTIONS * 5)
    ids = clip.tokenize([long])
    assert ids.shape == (1, TEXT_LEN) and ids[0, -1] == tok.eos_token_id
    np.testing.assert_array_equal(clip.text_features([long]), clip.text_features(ids))


def test_prompts_without_tokenizer_are_refused(tmp_path):
    tiny_clip(tmp_path)
    with pytest.raises(ValueError, match="no tokenizer"):
        load_clip_model(tmp_path).text_features(["a lake"])


def test_pytorch_bin_layout(tmp_path):
    model = tiny_clip(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    pixels = np.zeros((1, 3, IMAGE, IMAGE), np.float32)
    got = load_clip_model(tmp_path).vision(pixels).image_embeds
    assert rel_err(got, torch_image_embeds(model, pixels)) <= TOL


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no CLIP model folder at .*nowhere.*config\.json"):
        load_clip_model(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        load_clip_model(tmp_path)
    tiny_clip(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no CLIP weights in .*model\.safetensors"):
        load_clip_model(tmp_path)


def test_mismatched_keys_of_both_towers_are_named(tmp_path):
    tiny_clip(tmp_path)
    path = tmp_path / "model.safetensors"
    sd = load_file(path)
    sd.pop("vision_model.embeddings.class_embedding")
    sd.pop("text_model.final_layer_norm.bias")
    sd["visual_projection.weight"] = torch.zeros(PROJ, 31)
    sd["extra.weight"] = torch.zeros(1)
    save_file(sd, path)
    with pytest.raises(WeightMismatchError) as e:
        load_clip_model(tmp_path)
    assert e.value.missing == [
        "text_model.final_layer_norm.bias",
        "vision_model.embeddings.class_embedding",
    ]
    assert e.value.unexpected == ["extra.weight"]
    assert e.value.mismatched == [("visual_projection.weight", (PROJ, 31), (PROJ, 32))]


def test_bfloat16_load_is_close(tmp_path):
    tiny_clip(tmp_path)
    images = np.stack(random_images(5, [(40, 40)] * 2))
    ref = load_clip_model(tmp_path).image_features(images)
    got = load_clip_model(tmp_path, "bfloat16").image_features(images)
    assert got.dtype == np.float32 and rel_err(got, ref) < 5e-2
