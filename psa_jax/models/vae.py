"""Flax ``AutoencoderKL`` (the Stable Diffusion VAE), loadable from a diffusers folder.

diffusers >= 0.40 ships no Flax VAE, so this re-implements ``AutoencoderKL`` with diffusers'
module names (``encoder.down_blocks.0.resnets.1``, ``decoder.mid_block.attentions.0.to_q``), so
:mod:`psa_jax.models.convert` needs no rename table. Inside, feature maps are NHWC; the public
wrapper :class:`FlaxAutoencoderKL` takes and returns NCHW like diffusers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from functools import partial
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from psa_jax.models.attention import Attention
from psa_jax.models.convert import (
    Params,
    component_folder,
    find_weights_file,
    flax_to_torch,
    read_config,
    read_state_dict,
    torch_to_flax,
    write_safetensors,
)
from psa_jax.models.layers import Downsample2D, Dtype, ResnetBlock2D, Upsample2D, conv, group_norm

WEIGHTS_NAME = "diffusion_pytorch_model"
_EPS = 1e-6  # every GroupNorm of diffusers' Encoder/Decoder uses eps=1e-6
_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}
# Old diffusers names of the mid-block attention (diffusers still renames them when loading).
_DEPRECATED_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_DEPRECATED_RE = re.compile(r"(.*\.mid_block\.attentions\.\d+)\.(query|key|value|proj_attn)\.(\w+)")


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The diffusers ``AutoencoderKL`` config fields; defaults are diffusers' defaults."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        if n == 0 or len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                "down_block_types, up_block_types and block_out_channels must have "
                f"the same non-zero length, got {self.down_block_types}, "
                f"{self.up_block_types}, {self.block_out_channels}"
            )
        for kinds, allowed in (
            (self.down_block_types, "DownEncoderBlock2D"),
            (self.up_block_types, "UpDecoderBlock2D"),
        ):
            bad = sorted({b for b in kinds if b != allowed})
            if bad:
                raise ValueError(f"unsupported VAE block type(s) {bad}; only {allowed!r} is built")
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"unsupported VAE act_fn {self.act_fn!r}; only 'silu' is built")
        if not isinstance(self.layers_per_block, int) or self.layers_per_block < 1:
            raise ValueError(
                f"layers_per_block must be a positive int, got {self.layers_per_block!r}"
            )
        bad_groups = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad_groups:
            raise ValueError(
                f"block_out_channels {bad_groups} are not divisible by "
                f"norm_num_groups={self.norm_num_groups}"
            )

    @classmethod
    def from_diffusers_config(cls, config: dict[str, Any]) -> VAEConfig:
        """Build from a diffusers ``config.json``; unknown or unsupported settings raise."""
        name = config.get("_class_name", "AutoencoderKL")
        if name != "AutoencoderKL":
            raise ValueError(f"expected an AutoencoderKL config, got _class_name={name!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in config.items():
            if key in fields:
                kwargs[key] = _tuple(value)
            elif key not in _IGNORED:
                raise ValueError(
                    f"unknown or unsupported AutoencoderKL config key {key!r}={value!r}"
                )
        return cls(**kwargs)

    def to_diffusers_config(self) -> dict[str, Any]:
        """The diffusers ``config.json`` dict (round-trips through ``from_diffusers_config``)."""
        out: dict[str, Any] = {"_class_name": "AutoencoderKL"}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side (8 for Stable Diffusion)."""
        return 2 ** (len(self.block_out_channels) - 1)


class MidBlock2D(nn.Module):
    """diffusers ``UNetMidBlock2D`` without time embedding: resnet, [attention], resnet."""

    channels: int
    groups: int
    add_attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        def resnet(name: str) -> ResnetBlock2D:
            return ResnetBlock2D(self.channels, self.groups, _EPS, dtype=self.dtype, name=name)

        x = resnet("resnets.0")(x)
        if self.add_attention:
            # One head of width C (attention_head_dim=C); residual added as diffusers'
            # residual_connection=True does, around the group norm.
            b, h, w, c = x.shape
            attn = Attention(
                heads=1,
                dim_head=c,
                out_dim=c,
                qkv_bias=True,
                norm_groups=self.groups,
                norm_eps=_EPS,
                dtype=self.dtype,
                name="attentions.0",
            )
            x = x + attn(x.reshape(b, h * w, c)).reshape(b, h, w, c)
        return resnet("resnets.1")(x)


class Encoder(nn.Module):
    """diffusers VAE ``Encoder`` (double_z): NHWC image -> NHWC [mean, logvar] pre-quant."""

    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, kw = self.config, {"dtype": self.dtype}
        channels = cfg.block_out_channels
        x = conv(channels[0], 3, name="conv_in", **kw)(x.astype(self.dtype))
        for i, ch in enumerate(channels):
            for j in range(cfg.layers_per_block):
                x = ResnetBlock2D(
                    ch, cfg.norm_num_groups, _EPS, name=f"down_blocks.{i}.resnets.{j}", **kw
                )(x)
            if i < len(channels) - 1:
                x = Downsample2D(ch, padding=0, name=f"down_blocks.{i}.downsamplers.0", **kw)(x)
        x = MidBlock2D(
            channels[-1], cfg.norm_num_groups, cfg.mid_block_add_attention, name="mid_block", **kw
        )(x)
        x = group_norm(cfg.norm_num_groups, _EPS, name="conv_norm_out", **kw)(x)
        return conv(2 * cfg.latent_channels, 3, name="conv_out", **kw)(nn.silu(x))


class Decoder(nn.Module):
    """diffusers VAE ``Decoder`` (norm_type="group"): NHWC latents -> NHWC image."""

    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg, kw = self.config, {"dtype": self.dtype}
        channels = list(reversed(cfg.block_out_channels))
        x = conv(channels[0], 3, name="conv_in", **kw)(z.astype(self.dtype))
        x = MidBlock2D(
            channels[0], cfg.norm_num_groups, cfg.mid_block_add_attention, name="mid_block", **kw
        )(x)
        for i, ch in enumerate(channels):
            for j in range(cfg.layers_per_block + 1):
                x = ResnetBlock2D(
                    ch, cfg.norm_num_groups, _EPS, name=f"up_blocks.{i}.resnets.{j}", **kw
                )(x)
            if i < len(channels) - 1:
                x = Upsample2D(ch, name=f"up_blocks.{i}.upsamplers.0", **kw)(x)
        x = group_norm(cfg.norm_num_groups, _EPS, name="conv_norm_out", **kw)(x)
        return conv(cfg.out_channels, 3, name="conv_out", **kw)(nn.silu(x))


class AutoencoderKL(nn.Module):
    """diffusers ``AutoencoderKL`` on NHWC: ``encode`` gives moments, ``decode`` an image."""

    config: VAEConfig
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        self.encoder = Encoder(cfg, dtype=self.dtype)
        self.decoder = Decoder(cfg, dtype=self.dtype)
        lat = cfg.latent_channels
        self.quant_conv = conv(2 * lat, 1, dtype=self.dtype) if cfg.use_quant_conv else None
        self.post_quant_conv = conv(lat, 1, dtype=self.dtype) if cfg.use_post_quant_conv else None

    def encode(self, images: jax.Array) -> jax.Array:
        """``[B, H, W, in]`` -> ``[B, H/f, W/f, 2 * latent]`` (mean, then unclamped logvar)."""
        moments = self.encoder(images)
        return self.quant_conv(moments) if self.quant_conv is not None else moments

    def decode(self, latents: jax.Array) -> jax.Array:
        """Unscaled latents ``[B, h, w, latent]`` -> image ``[B, f*h, f*w, out]``."""
        z = latents.astype(self.dtype)
        z = self.post_quant_conv(z) if self.post_quant_conv is not None else z
        return self.decoder(z)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Reconstruct from the posterior mode (touches every parameter, used by ``init``)."""
        return self.decode(DiagonalGaussian.from_moments(self.encode(images), axis=-1).mean)


@flax.struct.dataclass
class DiagonalGaussian:
    """The VAE posterior, as diffusers' ``latent_dist`` (logvar clamped to [-30, 20])."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array, axis: int = 1) -> DiagonalGaussian:
        mean, logvar = jnp.split(moments, 2, axis=axis)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """``mean + std * eps`` with ``eps ~ N(0, I)`` drawn from ``key``."""
        eps = jax.random.normal(key, self.mean.shape, self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> jax.Array:
        return self.mean


@partial(jax.jit, static_argnums=0)  # modules are hashable: one compile per architecture
def _encode(module: AutoencoderKL, params: Params, images: jax.Array) -> DiagonalGaussian:
    moments = module.apply(
        {"params": params}, jnp.transpose(images, (0, 2, 3, 1)), method=AutoencoderKL.encode
    )
    return DiagonalGaussian.from_moments(jnp.transpose(moments, (0, 3, 1, 2)), axis=1)


@partial(jax.jit, static_argnums=0)
def _decode(module: AutoencoderKL, params: Params, latents: jax.Array) -> jax.Array:
    out = module.apply(
        {"params": params}, jnp.transpose(latents, (0, 2, 3, 1)), method=AutoencoderKL.decode
    )
    return jnp.transpose(out, (0, 3, 1, 2))


class FlaxAutoencoderKL:
    """Config + module + params, with NCHW ``encode``/``decode`` like diffusers' AutoencoderKL.

    ``encode``/``decode`` compile once per architecture and input shape, shared by instances.
    Latents are unscaled: diffusion latents are ``(z - shift_factor) * scaling_factor``.
    """

    def __init__(self, config: VAEConfig, params: Params, dtype: Dtype = jnp.float32):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.module = AutoencoderKL(config, dtype=self.dtype)
        self.params = params

    @property
    def scaling_factor(self) -> float:
        return float(self.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        """The config's ``shift_factor``, 0.0 where it is None (SD1.x/SDXL)."""
        return float(self.config.shift_factor or 0.0)

    def encode(self, images: jax.Array) -> DiagonalGaussian:
        """Images ``[B, C, H, W]`` in [-1, 1] -> posterior with NCHW ``mean``/``logvar``."""
        return _encode(self.module, self.params, jnp.asarray(images))

    def decode(self, latents: jax.Array) -> jax.Array:
        """Unscaled latents ``[B, latent, h, w]`` -> images ``[B, C, f*h, f*w]``."""
        return _decode(self.module, self.params, jnp.asarray(latents))

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` (diffusers layout)."""
        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(self.config.to_diffusers_config(), f, indent=2)
        write_safetensors(
            flax_to_torch(self.params),
            os.path.join(folder, f"{WEIGHTS_NAME}.safetensors"),
            metadata={"format": "pt"},
        )


def _dummy_images(config: VAEConfig) -> jax.Array:
    side = config.downscale
    return jnp.zeros((1, side, side, config.in_channels), jnp.float32)


def rename_deprecated_keys(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Old diffusers VAEs name the mid-block attention ``query/key/value/proj_attn``; map them
    to ``to_q/to_k/to_v/to_out.0`` exactly as diffusers does on load."""
    out = {}
    for key, value in state_dict.items():
        m = _DEPRECATED_RE.fullmatch(key)
        if m:
            key = f"{m[1]}.{_DEPRECATED_ATTN[m[2]]}.{m[3]}"
            if value.ndim == 4 and value.shape[2:] == (1, 1):  # 1x1-conv form of a Linear
                value = value[:, :, 0, 0]
        out[key] = value
    return out


def load_vae(
    path: str | os.PathLike, dtype: Dtype = "float32", variant: str | None = None
) -> FlaxAutoencoderKL:
    """Load a local diffusers ``AutoencoderKL`` folder (or a pipeline folder with ``vae/``).

    Reads ``config.json`` and ``diffusion_pytorch_model[.variant].safetensors`` (or its sharded
    index, or ``.bin``); never touches the network. Params and compute use ``dtype``.

    Raises:
      WeightMismatchError: naming every missing, unexpected and mis-shaped key.
      ValueError: the config asks for something this implementation does not build.
    """
    folder = component_folder(path, "vae")
    config = VAEConfig.from_diffusers_config(read_config(folder))
    weights = find_weights_file(folder, WEIGHTS_NAME, variant)
    state_dict = rename_deprecated_keys(read_state_dict(weights))
    dtype = jnp.dtype(dtype)
    module = AutoencoderKL(config, dtype=dtype)
    reference = jax.eval_shape(module.init, jax.random.key(0), _dummy_images(config))["params"]
    params = torch_to_flax(state_dict, reference, what=f"VAE weights {weights}", dtype=dtype)
    params = jax.tree.map(lambda p: jnp.asarray(np.asarray(p)), params)
    return FlaxAutoencoderKL(config, params, dtype)
