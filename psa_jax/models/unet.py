"""Flax ``UNet2DConditionModel`` for the SD1.x / SD2.x / SDXL family, with the PSA adapter.

The module tree mirrors diffusers' attribute names (``down_blocks.0.attentions.1...``), so a
diffusers checkpoint converts with :mod:`psa_jax.models.convert`'s leaf table alone. Inside,
feature maps are NHWC; the public wrapper (:mod:`psa_jax.models.psa_unet`) takes NCHW.

Config semantics follow diffusers exactly, including its historical naming bug: when
``num_attention_heads`` is unset, ``attention_head_dim`` is the *number of heads* (SD1.5: 8).

Gradient checkpointing: ``remat_policy`` (one of :data:`REMAT_POLICIES`) wraps every
``ResnetBlock2D`` and ``Transformer2DModel`` in ``nn.remat``. Parameter paths are unchanged
(each wrapped block keeps its explicit ``name``), so checkpoints and the conversion table do not
care which policy trained them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from psa_jax.models.adapter import UserProjection
from psa_jax.models.attention import Transformer2DModel
from psa_jax.models.layers import (
    Downsample2D,
    Dtype,
    ResnetBlock2D,
    TimestepEmbedding,
    Upsample2D,
    constrain_batch,
    conv,
    group_norm,
    timestep_embedding,
)

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", None)

# Gradient-checkpointing policies by config name: what each remat'd block keeps for the backward
# pass (``None``: no remat, everything is kept). "full" keeps only block inputs and recomputes the
# rest; "dots" keeps matmul/conv outputs; "dots_no_batch" keeps those without batch dimensions
# (weight matmuls/convs, not attention's batched q.k / p.v einsums).
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def remat_policy_fn(name: str) -> Any:
    """The ``jax.checkpoint`` policy for a :data:`REMAT_POLICIES` name (``None`` for "none")."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat_policy {name!r}; choose one of {sorted(REMAT_POLICIES)}")
    return REMAT_POLICIES[name]


# diffusers config keys that must hold these values (anything else is a model we do not build).
_REQUIRED = {
    "act_fn": "silu",
    "class_embed_type": None,
    "num_class_embeds": None,
    "time_embedding_type": "positional",
    "resnet_time_scale_shift": "default",
    "dual_cross_attention": False,
    "only_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_cond_proj_dim": None,
    "time_embedding_dim": None,
    "timestep_post_act": None,
    "cross_attention_norm": None,
    "center_input_sample": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "reverse_transformer_layers_per_block": None,
    "attention_type": "default",
    "attention_bias": False,
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "time_embedding_act_fn": None,
    "dropout": 0.0,
}
_IGNORED = {
    "_class_name",
    "_diffusers_version",
    "_name_or_path",
    "sample_size",
    "addition_embed_type_num_heads",
    "upcast_attention",
    "num_train_timesteps",
}


def _per_block(value: Any, n: int) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The diffusers ``UNet2DConditionModel`` config fields this UNet supports."""

    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    up_block_types: tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    transformer_layers_per_block: int | tuple = 1
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    sample_size: int = 64

    def __post_init__(self):
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                "down_block_types, up_block_types and block_out_channels must have "
                f"the same length, got {self.down_block_types}, "
                f"{self.up_block_types}, {self.block_out_channels}"
            )
        for kind, allowed in (
            (self.down_block_types, DOWN_BLOCKS),
            (self.up_block_types, UP_BLOCKS),
            ((self.mid_block_type,), MID_BLOCKS),
        ):
            bad = [b for b in kind if b not in allowed]
            if bad:
                raise ValueError(f"unsupported UNet block type(s) {bad}; supported: {allowed}")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"unsupported addition_embed_type {self.addition_embed_type!r}")
        if self.addition_embed_type == "text_time" and not (
            self.addition_time_embed_dim and self.projection_class_embeddings_input_dim
        ):
            raise ValueError(
                "addition_embed_type='text_time' needs addition_time_embed_dim and "
                "projection_class_embeddings_input_dim"
            )
        if isinstance(self.cross_attention_dim, (list, tuple)):
            raise ValueError("per-block cross_attention_dim is not supported")

    @classmethod
    def from_diffusers_config(cls, config: dict[str, Any]) -> UNetConfig:
        """Build from a diffusers ``config.json``; unsupported features raise ``ValueError``."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in config.items():
            if key in fields:
                kwargs[key] = tuple(value) if isinstance(value, list) else value
            elif key in _REQUIRED:
                want = _REQUIRED[key]
                if value != want and not (want is False and not value):
                    raise ValueError(f"unsupported UNet config {key}={value!r} (need {want!r})")
            elif key not in _IGNORED:
                raise ValueError(f"unknown UNet config key {key!r}={value!r}")
        if isinstance(kwargs.get("transformer_layers_per_block"), tuple):
            kwargs["transformer_layers_per_block"] = tuple(
                tuple(v) if isinstance(v, list) else v
                for v in kwargs["transformer_layers_per_block"]
            )
        return cls(**kwargs)

    def to_diffusers_config(self) -> dict[str, Any]:
        """The diffusers ``config.json`` dict (round-trips through ``from_diffusers_config``)."""
        out = {"_class_name": "UNet2DConditionModel"}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = _listify(value)
        return out

    # ---- per-block settings, resolved the way diffusers resolves them ----------------------
    @property
    def num_blocks(self) -> int:
        return len(self.block_out_channels)

    @property
    def heads(self) -> tuple[int, ...]:
        return _per_block(self.num_attention_heads or self.attention_head_dim, self.num_blocks)

    @property
    def layers(self) -> tuple[int, ...]:
        return _per_block(self.layers_per_block, self.num_blocks)

    @property
    def transformer_layers(self) -> tuple:
        return _per_block(self.transformer_layers_per_block, self.num_blocks)

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4


@functools.cache
def _remat_class(cls: type[nn.Module], policy_name: str) -> type[nn.Module]:
    """``nn.remat(cls)`` with a named policy, made once per (class, policy).

    Every argument is traced (no ``static_argnums``): the blocks take arrays, ``None`` or a
    scale array only. Variable collections (``params``, ``adapter``) and rngs are all lifted,
    so lazy adapter init works inside the checkpointed block.
    """
    policy = remat_policy_fn(policy_name)
    return cls if policy is None else nn.remat(cls, policy=policy)


def _listify(value):
    return [_listify(v) for v in value] if isinstance(value, tuple) else value


def _layer_count(spec: int | Sequence[int], i: int) -> int:
    """transformer_layers_per_block entries are an int per block or a list per resnet layer."""
    return spec[i] if isinstance(spec, (list, tuple)) else spec


class UNet2DConditionModel(nn.Module):
    """The UNet, NHWC in and out. Adapter slots exist when ``user_embed_dim`` is set.

    Call with ``user_embeds=None`` for the base model; with ``[B, user_embed_dim]`` profile
    embeddings the PSA branch is added in every cross-attention layer, scaled by ``user_scale``
    (a float or one value per sample).
    """

    config: UNetConfig
    user_embed_dim: int | None = None
    num_user_tokens: int = 1
    user_fast_path: bool = True
    dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    attention: str = "xla"  # how attention is computed: layers.ATTENTION_IMPLS

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        encoder_hidden_states: jax.Array,
        added_cond_kwargs: dict[str, jax.Array] | None = None,
        user_embeds: jax.Array | None = None,
        user_scale: float | jax.Array = 1.0,
    ) -> jax.Array:
        remat_policy_fn(self.remat_policy)  # an unknown name fails before anything is built
        cfg = self.config
        b = sample.shape[0]
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
        # Activations split over the batch under a mesh (layers.constrain_batch; else no-ops).
        ctx = constrain_batch(encoder_hidden_states.astype(self.dtype))

        t_emb = timestep_embedding(
            timesteps,
            cfg.block_out_channels[0],
            flip_sin_to_cos=cfg.flip_sin_to_cos,
            freq_shift=cfg.freq_shift,
        )
        emb = TimestepEmbedding(cfg.time_embed_dim, dtype=self.dtype, name="time_embedding")(
            t_emb.astype(self.dtype)
        )
        if cfg.addition_embed_type == "text_time":
            emb = emb + self._text_time_embedding(added_cond_kwargs, b)
        emb = constrain_batch(emb)

        user_tokens = None
        if self.user_embed_dim is not None and user_embeds is not None:
            if user_embeds.shape != (b, self.user_embed_dim):
                raise ValueError(
                    f"user_embeds must be [batch={b}, {self.user_embed_dim}], got "
                    f"{tuple(user_embeds.shape)}"
                )
            user_tokens = UserProjection(
                self.num_user_tokens, cfg.cross_attention_dim, dtype=self.dtype, name="user_proj"
            )(user_embeds)
            user_tokens = constrain_batch(user_tokens)
        # Positional, all pytrees (user_tokens may be None): a traced argument of nn.remat.
        attn_args = (ctx, user_tokens, jnp.asarray(user_scale))

        x = conv(cfg.block_out_channels[0], 3, dtype=self.dtype, name="conv_in")(
            constrain_batch(sample.astype(self.dtype))
        )
        skips = [x]
        for i, block_type in enumerate(cfg.down_block_types):
            for j in range(cfg.layers[i]):
                name = f"down_blocks.{i}"
                x = self._resnet(cfg.block_out_channels[i], f"{name}.resnets.{j}")(x, emb)
                if block_type == "CrossAttnDownBlock2D":
                    x = self._transformer(
                        i, _layer_count(cfg.transformer_layers[i], j), f"{name}.attentions.{j}"
                    )(x, *attn_args)
                skips.append(x)
            if i < cfg.num_blocks - 1:
                x = Downsample2D(
                    cfg.block_out_channels[i],
                    cfg.downsample_padding,
                    dtype=self.dtype,
                    name=f"down_blocks.{i}.downsamplers.0",
                )(x)
                skips.append(x)

        if cfg.mid_block_type is not None:
            x = self._mid_block(x, emb, attn_args)

        rev_channels = list(reversed(cfg.block_out_channels))
        rev_heads_idx = list(reversed(range(cfg.num_blocks)))
        for i, block_type in enumerate(cfg.up_block_types):
            src = rev_heads_idx[i]  # the down block whose settings this up block mirrors
            n_layers = cfg.layers[src] + 1
            for j in range(n_layers):
                name = f"up_blocks.{i}"
                x = jnp.concatenate([x, skips.pop()], axis=-1)
                x = self._resnet(rev_channels[i], f"{name}.resnets.{j}")(x, emb)
                if block_type == "CrossAttnUpBlock2D":
                    x = self._transformer(
                        src, _layer_count(cfg.transformer_layers[src], j), f"{name}.attentions.{j}"
                    )(x, *attn_args)
            if i < cfg.num_blocks - 1:
                size = skips[-1].shape[1:3]  # diffusers' forward_upsample_size for odd sizes
                x = Upsample2D(
                    rev_channels[i], dtype=self.dtype, name=f"up_blocks.{i}.upsamplers.0"
                )(x, size)

        x = group_norm(cfg.norm_num_groups, cfg.norm_eps, dtype=self.dtype, name="conv_norm_out")(x)
        x = conv(cfg.out_channels, 3, dtype=self.dtype, name="conv_out")(nn.silu(x))
        return constrain_batch(x)

    def _remat(self, cls: type[nn.Module]) -> type[nn.Module]:
        """``cls`` under this model's remat policy (``cls`` itself for "none")."""
        return _remat_class(cls, self.remat_policy)

    def _resnet(self, out_channels: int, name: str, scale: float = 1.0) -> ResnetBlock2D:
        return self._remat(ResnetBlock2D)(
            out_channels,
            self.config.norm_num_groups,
            self.config.norm_eps,
            output_scale_factor=scale,
            dtype=self.dtype,
            name=name,
        )

    def _transformer(self, block: int, num_layers: int, name: str) -> Transformer2DModel:
        cfg = self.config
        heads = cfg.heads[block]
        return self._remat(Transformer2DModel)(
            heads=heads,
            dim_head=cfg.block_out_channels[block] // heads,
            num_layers=num_layers,
            groups=cfg.norm_num_groups,
            use_linear_projection=cfg.use_linear_projection,
            user_adapter=self.user_embed_dim is not None,
            user_fast_path=self.user_fast_path,
            attention=self.attention,
            dtype=self.dtype,
            name=name,
        )

    def _mid_block(self, x: jax.Array, emb: jax.Array, attn_args: tuple) -> jax.Array:
        cfg, last = self.config, self.config.num_blocks - 1
        scale = cfg.mid_block_scale_factor
        x = self._resnet(cfg.block_out_channels[-1], "mid_block.resnets.0", scale)(x, emb)
        layers = cfg.transformer_layers[-1]
        layers = layers[0] if isinstance(layers, (list, tuple)) else layers
        x = self._transformer(last, layers, "mid_block.attentions.0")(x, *attn_args)
        return self._resnet(cfg.block_out_channels[-1], "mid_block.resnets.1", scale)(x, emb)

    def _text_time_embedding(self, added: dict[str, jax.Array] | None, b: int) -> jax.Array:
        """SDXL's added conditions: pooled text embeds + sinusoidal embedding of 6 time ids."""
        cfg = self.config
        if not added or "text_embeds" not in added or "time_ids" not in added:
            raise ValueError(
                "this UNet (addition_embed_type='text_time') needs "
                "added_cond_kwargs={'text_embeds': [B, D], 'time_ids': [B, 6]}"
            )
        time_ids = jnp.broadcast_to(added["time_ids"], (b, added["time_ids"].shape[-1]))
        t = timestep_embedding(
            time_ids.reshape(-1),
            cfg.addition_time_embed_dim,
            flip_sin_to_cos=cfg.flip_sin_to_cos,
            freq_shift=cfg.freq_shift,
        )
        t = t.reshape(b, -1)
        add = jnp.concatenate([added["text_embeds"].astype(jnp.float32), t], axis=-1)
        return TimestepEmbedding(cfg.time_embed_dim, dtype=self.dtype, name="add_embedding")(
            add.astype(self.dtype)
        )
