"""Parity of the Flax CLIP text encoder with transformers on tiny random models."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import transformers
from helpers import rel_err
from safetensors.torch import load_file, save_file

from psa_jax.models.clip import CLIPTextConfig, FlaxCLIPTextModel, load_text_encoder
from psa_jax.models.convert import WeightMismatchError

VOCAB, LENGTH, BATCH = 99, 16, 3
TOL = 1e-5


def tiny_config(act: str = "quick_gelu", eos: int = 2, **kw) -> transformers.CLIPTextConfig:
    return transformers.CLIPTextConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=LENGTH,
        projection_dim=24,
        hidden_act=act,
        eos_token_id=eos,
        bos_token_id=0,
        pad_token_id=1,
        **kw,
    )


def torch_model(with_projection: bool, act: str = "quick_gelu", eos: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    cls = (
        transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    )
    return cls(tiny_config(act, eos, attn_implementation="eager")).eval()


def make_inputs(eos: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids with one EOS per row (legacy eos=2: the EOT is the largest id)."""
    rng = np.random.default_rng(seed)
    eot = VOCAB - 1 if eos == 2 else eos
    ids = rng.integers(3, VOCAB - 1, size=(BATCH, LENGTH))
    if eos != 2:
        ids[ids == eos] = eos + 1
    ids[:, 0] = 0  # BOS
    mask = np.ones((BATCH, LENGTH), np.int64)
    for row, end in enumerate((LENGTH - 1, 5, 9)):
        ids[row, end] = eot
        ids[row, end + 1 :] = eot if row == 1 and eos != 2 else 1  # padding may repeat EOS
        mask[row, end + 1 :] = 0
    return ids, mask


def torch_outputs(model, ids: np.ndarray, mask: np.ndarray | None) -> dict[str, list[np.ndarray]]:
    text = model.text_model if hasattr(model, "text_model") else model
    t_ids = torch.from_numpy(ids)
    t_mask = None if mask is None else torch.from_numpy(mask)
    with torch.no_grad():
        out = text(t_ids, attention_mask=t_mask, output_hidden_states=True)
        res = {
            "last_hidden_state": [out.last_hidden_state],
            "hidden_states": list(out.hidden_states),
            "pooled": [out.pooler_output],
        }
        if hasattr(model, "text_projection"):
            res["text_embeds"] = [model(t_ids, attention_mask=t_mask).text_embeds]
    return {k: [v.numpy() for v in vs] for k, vs in res.items()}


def compare(flax_model: FlaxCLIPTextModel, model, ids, mask, tol: float = TOL) -> float:
    ref = torch_outputs(model, ids, mask)
    out = flax_model(ids, mask)
    got = {
        "last_hidden_state": [out.last_hidden_state],
        "hidden_states": list(out.hidden_states),
        "pooled": [out.pooled],
    }
    if out.text_embeds is not None:
        got["text_embeds"] = [out.text_embeds]
    assert got.keys() == ref.keys()
    worst = 0.0
    for name in ref:
        assert len(got[name]) == len(ref[name]), name
        for i, (a, b) in enumerate(zip(got[name], ref[name])):
            assert a.shape == b.shape, (name, i)
            err = rel_err(a, b)
            assert err <= tol, f"{name}[{i}]: relative error {err:.2e}"
            worst = max(worst, err)
    print(f"max relative error {worst:.2e}")
    return worst


@pytest.mark.parametrize("with_projection", [False, True])
@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("eos", [2, 7])
def test_parity_with_transformers(tmp_path, with_projection, act, eos):
    model = torch_model(with_projection, act, eos)
    model.save_pretrained(tmp_path)
    flax_model = load_text_encoder(tmp_path)
    assert flax_model.with_projection == with_projection
    assert flax_model.config.hidden_act == act and flax_model.config.eos_token_id == eos
    ids, mask = make_inputs(eos)
    compare(flax_model, model, ids, None)
    compare(flax_model, model, ids, mask)
    out = flax_model(ids)
    assert len(out.hidden_states) == 4
    assert (out.text_embeds is not None) == with_projection


def test_left_padding_matches_eager(tmp_path):
    """Fully masked query rows (left padding) behave as transformers' eager attention."""
    model = torch_model(False, eos=7)
    model.save_pretrained(tmp_path)
    ids, _ = make_inputs(7)
    ids[:, -1] = 7
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :2] = 0
    flax_model = load_text_encoder(tmp_path)
    compare(flax_model, model, ids, mask)

    # transformers' default sdpa attention differs on those padded rows only.
    model.config._attn_implementation = "sdpa"
    ref, out = torch_outputs(model, ids, mask), flax_model(ids, mask)
    keep = mask.astype(bool)
    assert rel_err(np.asarray(out.last_hidden_state)[keep], ref["last_hidden_state"][0][keep]) < TOL
    assert rel_err(out.pooled, ref["pooled"][0]) < TOL


@pytest.mark.parametrize("layout", ["bin", "sharded", "prefixed"])
def test_other_file_layouts(tmp_path, layout):
    model = torch_model(False, "gelu", 7)
    if layout == "bin":
        model.save_pretrained(tmp_path)
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
        os.remove(tmp_path / "model.safetensors")
    elif layout == "sharded":
        model.save_pretrained(tmp_path, max_shard_size="20KB")
        assert (tmp_path / "model.safetensors.index.json").exists()
    else:  # transformers 4 / SD checkpoint layout, with the old position_ids buffer
        model.save_pretrained(tmp_path)
        sd = {"text_model." + k: v for k, v in model.state_dict().items()}
        sd["text_model.embeddings.position_ids"] = torch.arange(LENGTH)[None]
        save_file(sd, tmp_path / "model.safetensors")
    ids, mask = make_inputs(7)
    compare(load_text_encoder(tmp_path), model, ids, mask)


def corrupt(tmp_path, edit):
    model = torch_model(True)
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    sd = load_file(path)
    edit(sd)
    save_file(sd, path)


def test_renamed_key_is_named(tmp_path):
    key = "text_model.final_layer_norm.weight"
    corrupt(tmp_path, lambda sd: sd.update({key.replace("weight", "gamma"): sd.pop(key)}))
    with pytest.raises(WeightMismatchError) as e:
        load_text_encoder(tmp_path)
    assert e.value.missing == [key]
    assert e.value.unexpected == ["text_model.final_layer_norm.gamma"]
    assert key in str(e.value) and "final_layer_norm.gamma" in str(e.value)


def test_missing_key_is_named(tmp_path):
    key = "text_model.encoder.layers.1.mlp.fc2.bias"
    corrupt(tmp_path, lambda sd: sd.pop(key))
    with pytest.raises(WeightMismatchError, match=key.replace(".", r"\.")):
        load_text_encoder(tmp_path)


def test_misshaped_key_is_named(tmp_path):
    key = "text_model.encoder.layers.0.self_attn.q_proj.weight"
    corrupt(tmp_path, lambda sd: sd.update({key: torch.zeros(32, 31)}))
    with pytest.raises(WeightMismatchError) as e:
        load_text_encoder(tmp_path)
    assert e.value.mismatched == [(key, (32, 31), (32, 32))]
    assert key in str(e.value)


def test_bare_layout_errors_use_file_names(tmp_path):
    """transformers 5 CLIPTextModel files have no ``text_model.`` prefix; errors say so too."""
    model = torch_model(False)
    model.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd.pop("encoder.layers.2.layer_norm1.bias")
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(WeightMismatchError) as e:
        load_text_encoder(tmp_path)
    assert e.value.missing == ["encoder.layers.2.layer_norm1.bias"]


@pytest.mark.parametrize("with_projection", [False, True])
def test_save_pretrained_round_trip(tmp_path, with_projection):
    model = torch_model(with_projection, "gelu", 7)
    model.save_pretrained(tmp_path / "src")
    flax_model = load_text_encoder(tmp_path / "src")
    flax_model.save_pretrained(tmp_path / "out")

    cls = type(model)
    back, info = cls.from_pretrained(
        tmp_path / "out", attn_implementation="eager", output_loading_info=True
    )
    assert not any(info.values()), info
    ids, mask = make_inputs(7, seed=1)
    compare(flax_model, back.eval(), ids, mask)
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k

    again = load_text_encoder(tmp_path / "out")
    assert again.config == flax_model.config and again.with_projection == with_projection
    a, b = again(ids, mask), flax_model(ids, mask)
    np.testing.assert_array_equal(a.last_hidden_state, b.last_hidden_state)


def test_random_init_saves_and_loads(tmp_path):
    config = CLIPTextConfig.from_hf_config(tiny_config("gelu", 7).to_dict())
    flax_model = FlaxCLIPTextModel.init_random(config, with_projection=True, seed=3)
    flax_model.save_pretrained(tmp_path)
    back = transformers.CLIPTextModelWithProjection.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    ids, mask = make_inputs(7)
    compare(flax_model, back, ids, mask)


def test_bfloat16_load(tmp_path):
    model = torch_model(True)
    model.save_pretrained(tmp_path)
    flax_model = load_text_encoder(tmp_path, dtype="bfloat16")
    assert str(flax_model.dtype) == "bfloat16"
    ids, mask = make_inputs(2)
    out = flax_model(ids, mask)
    assert out.last_hidden_state.dtype.name == "bfloat16"
    ref = torch_outputs(model, ids, mask)
    assert rel_err(out.last_hidden_state, ref["last_hidden_state"][0]) < 3e-2
    assert rel_err(out.text_embeds, ref["text_embeds"][0]) < 3e-2


def test_config_validation():
    base = tiny_config().to_dict()
    cfg = CLIPTextConfig.from_hf_config({**base, "some_unrelated_key": 1})
    assert cfg.hidden_size == 32 and cfg.max_position_embeddings == LENGTH
    assert (
        CLIPTextConfig.from_hf_config({**base, "hidden_act": "gelu_new"}).hidden_act == "gelu_new"
    )
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig.from_hf_config({**base, "hidden_act": "relu"})
    with pytest.raises(ValueError, match="divisible"):
        CLIPTextConfig.from_hf_config({**base, "num_attention_heads": 5})
    with pytest.raises(ValueError, match="eos_token_id"):
        CLIPTextConfig.from_hf_config({**base, "eos_token_id": [2, 3]})
    with pytest.raises(ValueError, match="CLIPModel"):
        CLIPTextConfig.from_hf_config({"model_type": "clip", "text_config": base})
    with pytest.raises(ValueError, match="model_type"):
        CLIPTextConfig.from_hf_config({**base, "model_type": "bert"})
    # to_hf_config round-trips through transformers' own config class.
    hf = transformers.CLIPTextConfig(**cfg.to_hf_config(False))
    assert CLIPTextConfig.from_hf_config(hf.to_dict()) == cfg
    json.dumps(cfg.to_hf_config(True))


def test_gelu_new_parity(tmp_path):
    model = torch_model(False, "gelu_new", 7)
    model.save_pretrained(tmp_path)
    ids, mask = make_inputs(7)
    compare(load_text_encoder(tmp_path), model, ids, mask)


def test_too_long_input_raises(tmp_path):
    model = torch_model(False)
    model.save_pretrained(tmp_path)
    flax_model = load_text_encoder(tmp_path)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        flax_model(np.zeros((1, LENGTH + 1), np.int64))
