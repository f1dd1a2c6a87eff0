"""The Flax VAE against diffusers' AutoencoderKL on a tiny random model (no downloads)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL

from psa_jax.models.convert import WeightMismatchError, read_state_dict, write_safetensors
from psa_jax.models.vae import DiagonalGaussian, FlaxAutoencoderKL, VAEConfig, load_vae

TOL = 1e-5
TINY = dict(
    block_out_channels=(8, 16),
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=4,
    sample_size=16,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def tiny_torch_vae(seed: int = 0, **overrides) -> TorchAutoencoderKL:
    """Tiny AutoencoderKL with every parameter perturbed (default GroupNorm/bias inits are 1/0)."""
    torch.manual_seed(seed)
    model = TorchAutoencoderKL(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def torch_vae() -> TorchAutoencoderKL:
    return tiny_torch_vae()


@pytest.fixture(scope="module")
def vae_dir(torch_vae, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    torch_vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def flax_vae(vae_dir) -> FlaxAutoencoderKL:
    return load_vae(vae_dir)


def _randn(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("hw", [(16, 16), (16, 24), (13, 21)], ids=["16x16", "16x24", "13x21"])
def test_encode_matches_diffusers(torch_vae, flax_vae, hw):
    images = _randn(0, 2, 3, *hw)
    with torch.no_grad():
        dist = torch_vae.encode(torch.from_numpy(images)).latent_dist
    post = flax_vae.encode(images)
    assert post.mean.shape == tuple(dist.mean.shape)
    assert rel_err(post.mean, dist.mean) <= TOL
    assert rel_err(post.logvar, dist.logvar) <= TOL
    assert rel_err(post.std, dist.std) <= TOL


@pytest.mark.parametrize("hw", [(8, 8), (5, 7)], ids=["8x8", "5x7"])
def test_decode_matches_diffusers(torch_vae, flax_vae, hw):
    latents = _randn(1, 2, 4, *hw)
    with torch.no_grad():
        want = torch_vae.decode(torch.from_numpy(latents)).sample
    got = flax_vae.decode(latents)
    assert got.shape == tuple(want.shape) == (2, 3, 2 * hw[0], 2 * hw[1])
    assert rel_err(got, want) <= TOL


def test_other_architecture_matches_diffusers(tmp_path):
    """Three blocks, two layers each, no quant convs, no mid-block attention."""
    overrides = dict(
        block_out_channels=(8, 8, 16),
        layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
        latent_channels=3,
    )
    torch_vae = tiny_torch_vae(seed=7, **overrides)
    torch_vae.save_pretrained(tmp_path)
    vae = load_vae(tmp_path)
    assert (
        "quant_conv" not in vae.params and "attentions.0" not in vae.params["encoder"]["mid_block"]
    )
    images, latents = _randn(8, 2, 3, 16, 16), _randn(9, 2, 3, 4, 4)
    with torch.no_grad():
        dist = torch_vae.encode(torch.from_numpy(images)).latent_dist
        want = torch_vae.decode(torch.from_numpy(latents)).sample
    post = vae.encode(images)
    assert rel_err(post.mean, dist.mean) <= TOL
    assert rel_err(post.logvar, dist.logvar) <= TOL
    assert rel_err(vae.decode(latents), want) <= TOL


def test_logvar_clamped():
    moments = jnp.asarray([[[[1.0]], [[2.0]], [[-100.0]], [[100.0]]]])  # [1, 4, 1, 1]
    post = DiagonalGaussian.from_moments(moments)
    np.testing.assert_array_equal(post.mean.ravel(), [1.0, 2.0])
    np.testing.assert_array_equal(post.logvar.ravel(), [-30.0, 20.0])


def test_posterior_sample(flax_vae):
    post = flax_vae.encode(_randn(2, 1, 3, 16, 16))
    key = jax.random.key(3)
    z = post.sample(key)
    eps = jax.random.normal(key, post.mean.shape)
    np.testing.assert_allclose(z, post.mean + post.std * eps, rtol=1e-6, atol=1e-6)
    assert not np.allclose(z, post.sample(jax.random.key(4)))
    np.testing.assert_array_equal(post.mode(), post.mean)
    assert flax_vae.scaling_factor == pytest.approx(0.18215)
    assert flax_vae.shift_factor == 0.0


def test_config_round_trip(vae_dir):
    raw = json.loads((vae_dir / "config.json").read_text())
    config = VAEConfig.from_diffusers_config(raw)
    assert config.block_out_channels == (8, 16)
    assert config.shift_factor is None
    assert VAEConfig.from_diffusers_config(config.to_diffusers_config()) == config


@pytest.mark.parametrize(
    "change, message",
    [
        ({"act_fn": "gelu"}, "act_fn"),
        ({"down_block_types": ["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]}, "AttnDown"),
        ({"block_out_channels": [8]}, "same non-zero length"),
        ({"norm_num_groups": 3}, "divisible"),
        ({"some_new_option": 1}, "some_new_option"),
        ({"_class_name": "AutoencoderTiny"}, "AutoencoderTiny"),
    ],
)
def test_unsupported_config_raises(vae_dir, change, message):
    raw = json.loads((vae_dir / "config.json").read_text())
    with pytest.raises(ValueError, match=message):
        VAEConfig.from_diffusers_config({**raw, **change})


def _folder_with(src, dst, state_dict) -> None:
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    write_safetensors(state_dict, dst / "diffusion_pytorch_model.safetensors")


def test_weight_mismatch_names_keys(vae_dir, tmp_path):
    sd = read_state_dict(vae_dir / "diffusion_pytorch_model.safetensors")
    conv1 = "encoder.down_blocks.0.resnets.0.conv1.weight"
    to_q = "decoder.mid_block.attentions.0.to_q.bias"

    renamed = dict(sd)
    renamed["encoder.conv_in.weights"] = renamed.pop("encoder.conv_in.weight")
    _folder_with(vae_dir, tmp_path / "renamed", renamed)
    with pytest.raises(WeightMismatchError, match=r"encoder\.conv_in\.weights") as err:
        load_vae(tmp_path / "renamed")
    assert err.value.missing == ["encoder.conv_in.weight"]
    assert err.value.unexpected == ["encoder.conv_in.weights"]

    missing = {k: v for k, v in sd.items() if k != to_q}
    _folder_with(vae_dir, tmp_path / "missing", missing)
    with pytest.raises(WeightMismatchError, match=r"attentions\.0\.to_q\.bias") as err:
        load_vae(tmp_path / "missing")
    assert err.value.missing == [to_q] and not err.value.unexpected

    misshaped = {**sd, conv1: np.zeros((8, 8, 1, 1), np.float32)}
    _folder_with(vae_dir, tmp_path / "misshaped", misshaped)
    with pytest.raises(WeightMismatchError, match=r"resnets\.0\.conv1\.weight") as err:
        load_vae(tmp_path / "misshaped")
    assert err.value.mismatched == [(conv1, (8, 8, 1, 1), (8, 8, 3, 3))]


def _assert_same_params(a: FlaxAutoencoderKL, b: FlaxAutoencoderKL) -> None:
    flat_a, flat_b = jax.tree.leaves_with_path(a.params), jax.tree.leaves_with_path(b.params)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def test_deprecated_attention_names_load(flax_vae, vae_dir, tmp_path):
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for key, value in read_state_dict(vae_dir / "diffusion_pytorch_model.safetensors").items():
        for new, dep in old.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{dep}.")
        sd[key] = value
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in sd
    _folder_with(vae_dir, tmp_path / "old", sd)
    _assert_same_params(load_vae(tmp_path / "old"), flax_vae)


def test_bin_variant_and_pipeline_folder(torch_vae, flax_vae, tmp_path):
    torch_vae.save_pretrained(tmp_path / "bin", safe_serialization=False)
    _assert_same_params(load_vae(tmp_path / "bin"), flax_vae)
    torch_vae.save_pretrained(tmp_path / "pipe" / "vae", variant="fp16")
    _assert_same_params(load_vae(tmp_path / "pipe", variant="fp16"), flax_vae)
    with pytest.raises(FileNotFoundError):
        load_vae(tmp_path / "pipe")  # no plain (non-variant) weights there


def test_bfloat16_close(torch_vae, vae_dir):
    vae = load_vae(vae_dir, dtype="bfloat16")
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(vae.params))
    latents = _randn(1, 2, 4, 8, 8)
    with torch.no_grad():
        want = torch_vae.decode(torch.from_numpy(latents)).sample
    assert rel_err(np.asarray(vae.decode(latents), np.float32), want) < 5e-2


def test_flax_save_pretrained_loads_in_diffusers(flax_vae, tmp_path):
    # Perturb the loaded params so the saved weights come from Flax, not from the torch model.
    rng = np.random.default_rng(1)
    params = jax.tree.map(
        lambda p: jnp.asarray(p + 0.1 * rng.standard_normal(p.shape, np.float32)), flax_vae.params
    )
    config = dataclasses.replace(flax_vae.config, shift_factor=0.1, scaling_factor=0.5)
    vae = FlaxAutoencoderKL(config, params)
    assert (vae.scaling_factor, vae.shift_factor) == (0.5, 0.1)
    vae.save_pretrained(tmp_path / "flax_vae")

    torch_vae = TorchAutoencoderKL.from_pretrained(tmp_path / "flax_vae").eval()
    assert torch_vae.config.shift_factor == pytest.approx(0.1)
    assert torch_vae.config.scaling_factor == pytest.approx(0.5)
    latents = _randn(5, 2, 4, 8, 8)
    with torch.no_grad():
        want = torch_vae.decode(torch.from_numpy(latents)).sample
    assert rel_err(vae.decode(latents), want) <= TOL
    reloaded = load_vae(tmp_path / "flax_vae")
    assert reloaded.config == config
    _assert_same_params(reloaded, vae)
