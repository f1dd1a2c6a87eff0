"""UNet parity with diffusers' UNet2DConditionModel on random weights (fp32, rel L2 <= 1e-5)."""

import json

import jax
import numpy as np
import pytest
import torch
from helpers import SD15_LIKE, SDXL_LIKE, rel_err, tiny_torch_unet

import psa_jax
from psa_jax.models.unet import UNetConfig

TOL = 1e-5


def _inputs(cfg, batch=2, size=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, cfg["in_channels"], size, size), dtype=np.float32)
    ehs = rng.standard_normal((batch, 7, cfg["cross_attention_dim"]), dtype=np.float32)
    t = np.array([3, 981][:batch])
    added = None
    if cfg.get("addition_embed_type") == "text_time":
        text_dim = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        added = {
            "text_embeds": rng.standard_normal((batch, text_dim), dtype=np.float32),
            "time_ids": rng.uniform(0, 1024, (batch, 6)).astype(np.float32),
        }
    return x, t, ehs, added


def _torch_forward(unet, x, t, ehs, added=None, **extra_added):
    kw = {k: torch.from_numpy(v) for k, v in (added or {}).items()}
    kw.update(extra_added)
    with torch.no_grad():
        return unet(
            torch.from_numpy(x),
            torch.from_numpy(t),
            torch.from_numpy(ehs),
            added_cond_kwargs=kw or None,
        ).sample.numpy()


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def twins(request, tmp_path_factory):
    cfg = {"sd15": SD15_LIKE, "sdxl": SDXL_LIKE}[request.param]
    torch_unet = tiny_torch_unet(cfg)
    folder = tmp_path_factory.mktemp(request.param)
    torch_unet.save_pretrained(folder)
    return cfg, torch_unet, psa_jax.load_unet(folder), folder


def test_unet_matches_diffusers(twins):
    cfg, torch_unet, unet, _ = twins
    x, t, ehs, added = _inputs(cfg)
    assert (
        rel_err(
            unet(x, t, ehs, added_cond_kwargs=added), _torch_forward(torch_unet, x, t, ehs, added)
        )
        <= TOL
    )


def test_unet_odd_spatial_size_matches_diffusers(twins):
    # 12x20 latents are not a multiple of 2**num_upsamplers: upsampling must follow the skips.
    cfg, torch_unet, unet, _ = twins
    rng = np.random.default_rng(1)
    x, t, ehs, added = _inputs(cfg)
    x = rng.standard_normal((2, cfg["in_channels"], 10, 14), dtype=np.float32)
    assert (
        rel_err(
            unet(x, t, ehs, added_cond_kwargs=added), _torch_forward(torch_unet, x, t, ehs, added)
        )
        <= TOL
    )


def test_save_pretrained_round_trips_through_diffusers(twins, tmp_path):
    from diffusers import UNet2DConditionModel

    cfg, torch_unet, unet, _ = twins
    unet.save_pretrained(tmp_path)
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path).eval()
    x, t, ehs, added = _inputs(cfg, seed=3)
    np.testing.assert_array_equal(
        _torch_forward(reloaded, x, t, ehs, added), _torch_forward(torch_unet, x, t, ehs, added)
    )


def test_config_round_trip(twins):
    _, _, unet, folder = twins
    with open(folder / "config.json") as f:
        raw = json.load(f)
    cfg = UNetConfig.from_diffusers_config(raw)
    assert UNetConfig.from_diffusers_config(cfg.to_diffusers_config()) == cfg == unet.config


def test_fp16_checkpoint_loads(tmp_path):
    torch_unet = tiny_torch_unet(SD15_LIKE).half()
    torch_unet.save_pretrained(tmp_path, variant="fp16")
    unet = psa_jax.load_unet(tmp_path, variant="fp16")
    x, t, ehs, _ = _inputs(SD15_LIKE)
    ref = _torch_forward(torch_unet.float(), x, t, ehs)
    assert rel_err(unet(x, t, ehs), ref) <= TOL  # fp16 weights upcast exactly


def test_unsupported_config_is_named():
    with pytest.raises(ValueError, match="class_embed_type"):
        UNetConfig.from_diffusers_config({**SD15_LIKE, "class_embed_type": "timestep"})
    with pytest.raises(ValueError, match="AttnDownBlock2D"):
        UNetConfig.from_diffusers_config(
            {**SD15_LIKE, "down_block_types": ["AttnDownBlock2D", "DownBlock2D", "DownBlock2D"]}
        )


def test_bfloat16_unet_tracks_fp32(twins):
    # bf16 weights and compute: not a parity target, but must stay close and finite.
    cfg, torch_unet, _, folder = twins
    unet = psa_jax.load_unet(folder, dtype="bfloat16")
    assert {str(x.dtype) for x in jax.tree.leaves(unet.params)} == {"bfloat16"}
    x, t, ehs, added = _inputs(cfg)
    out = np.asarray(unet(x, t, ehs, added_cond_kwargs=added), np.float32)
    assert rel_err(out, _torch_forward(torch_unet, x, t, ehs, added)) < 5e-2


def test_pipeline_root_folder_loads_its_unet(twins, tmp_path):
    import shutil

    _, _, unet, folder = twins
    shutil.copytree(folder, tmp_path / "unet")
    from_root = psa_jax.load_unet(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, from_root.params, unet.params)
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        psa_jax.load_unet(tmp_path / "nothing_here")
