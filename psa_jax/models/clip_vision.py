"""Flax CLIP vision tower (transformers ``CLIPVisionModelWithProjection``) and a CLIPModel loader.

The evaluation scorers (Q16, CLIPScore) need CLIP image *and* text features; transformers 5 has
no Flax CLIP, so the vision tower lives here and reuses the text encoder's layer stack
(:class:`psa_jax.models.clip.CLIPEncoder` with ``causal=False``). Module names copy transformers'
(``vision_model.embeddings.patch_embedding``, ``pre_layrnorm`` with its typo, ``visual_projection``)
so :func:`psa_jax.models.convert.torch_to_flax` converts every leaf but one: the bare
``class_embedding`` parameter has no ``.weight`` suffix, so the loader moves it by hand.

:func:`load_clip_model` reads a local transformers **CLIPModel** folder (never the hub) and returns
:class:`FlaxCLIPModel`, which turns uint8 images and prompts into (unnormalised) projections.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from psa_jax.models.clip import CLIPEncoder, CLIPTextConfig, CLIPTextModule, FlaxCLIPTextModel
from psa_jax.models.clip import abstract_params as text_abstract_params
from psa_jax.models.clip_preprocess import CLIPImagePreprocess
from psa_jax.models.compiled import jitted_apply
from psa_jax.models.convert import (
    Params,
    WeightMismatchError,
    find_weights_file,
    read_config,
    read_state_dict,
    torch_to_flax,
)
from psa_jax.models.layers import Dtype, dense, layer_norm

_CLASS_KEY = "vision_model.embeddings.class_embedding"
# Non-persistent buffers older checkpoints still contain.
_IGNORE = (r"(text|vision)_model\.embeddings\.position_ids",)
_TOWER = {"text_model": 0, "text_projection": 0, "vision_model": 1, "visual_projection": 1}
_EXPECTED = (
    "a transformers CLIPModel folder (config.json with text_config and vision_config, "
    "model.safetensors or pytorch_model.bin, optionally tokenizer and preprocessor_config.json)"
)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The transformers ``CLIPVisionConfig`` fields the vision tower depends on."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}"
            )
        self.encoder_config()  # validates hidden_act and the head split

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> CLIPVisionConfig:
        """Build from a ``vision_config`` dict (unrelated keys are ignored)."""
        model_type = config.get("model_type", "clip_vision_model")
        if model_type != "clip_vision_model":
            raise ValueError(f"not a CLIP vision config: model_type={model_type!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    def encoder_config(self) -> CLIPTextConfig:
        """The fields :class:`CLIPEncoder` reads, in the text config it is typed for."""
        return CLIPTextConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            hidden_act=self.hidden_act,
            layer_norm_eps=self.layer_norm_eps,
            projection_dim=None,
        )


class CLIPVisionOutput(NamedTuple):
    last_hidden_state: jax.Array  # [B, 1 + patches, D], no post_layernorm (as transformers)
    pooled: jax.Array  # [B, D] post_layernorm(class token) (transformers' pooler_output)
    image_embeds: jax.Array  # [B, projection_dim], unnormalised


class CLIPVisionEmbeddings(nn.Module):
    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        """``pixels`` NHWC -> ``[B, 1 + (S/p)^2, D]``: class token, patches in row-major order."""
        cfg = self.config
        p, d = cfg.patch_size, cfg.hidden_size
        init = nn.initializers.normal(0.02)
        patches = nn.Conv(
            d,
            (p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(init, (None, None, "conv_in", "embed")),
            name="patch_embedding",
        )(pixels.astype(self.dtype))
        patches = patches.reshape(patches.shape[0], -1, d)
        cls = self.param(
            "class_embedding", nn.with_logical_partitioning(init, ("embed",)), (d,), jnp.float32
        )
        cls = jnp.broadcast_to(cls.astype(patches.dtype), (patches.shape[0], 1, d))
        x = jnp.concatenate([cls, patches], axis=1)
        pos = nn.Embed(
            x.shape[1],
            d,
            dtype=self.dtype,
            embedding_init=nn.with_logical_partitioning(init, (None, "embed")),
            name="position_embedding",
        )
        return x + pos(jnp.arange(x.shape[1]))[None]


class CLIPVisionTransformer(nn.Module):
    """transformers' ``CLIPVisionTransformer`` (``vision_model``): bidirectional, pre-norm ViT."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        size = cfg.image_size
        if pixels.shape[1:] != (size, size, cfg.num_channels):
            raise ValueError(
                f"CLIP vision input must be [B, {size}, {size}, {cfg.num_channels}] (NHWC inside; "
                f"the wrapper takes NCHW), got {pixels.shape}"
            )
        x = CLIPVisionEmbeddings(cfg, self.dtype, name="embeddings")(pixels)
        x = layer_norm(cfg.layer_norm_eps, dtype=self.dtype, name="pre_layrnorm")(x)
        enc = CLIPEncoder(cfg.encoder_config(), self.dtype, causal=False, name="encoder")
        last = enc(x, None)[-1]
        pooled = layer_norm(cfg.layer_norm_eps, dtype=self.dtype, name="post_layernorm")(last[:, 0])
        return last, pooled


class CLIPVisionModule(nn.Module):
    """``vision_model`` plus the bias-free ``visual_projection``."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> CLIPVisionOutput:
        last, pooled = CLIPVisionTransformer(self.config, self.dtype, name="vision_model")(pixels)
        proj = dense(
            self.config.projection_dim,
            ("embed", None),
            use_bias=False,
            dtype=self.dtype,
            name="visual_projection",
        )
        return CLIPVisionOutput(last, pooled, proj(pooled))


def vision_abstract_params(module: CLIPVisionModule) -> Params:
    """Unboxed param shapes/dtypes of ``module`` without allocating."""
    cfg = module.config
    x = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32)
    return nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), x)["params"])


@dataclasses.dataclass
class FlaxCLIPVisionModel:
    """A CLIP vision tower ready to run; takes transformers' NCHW ``pixel_values``."""

    config: CLIPVisionConfig
    module: CLIPVisionModule
    params: Params

    @classmethod
    def init_random(
        cls, config: CLIPVisionConfig, *, dtype: Any = "float32", seed: int = 0
    ) -> FlaxCLIPVisionModel:
        """Freshly initialised weights (tests, smoke runs)."""
        module = CLIPVisionModule(config, jnp.dtype(dtype))
        x = jnp.zeros((1, config.image_size, config.image_size, config.num_channels))
        params = nn.meta.unbox(jax.jit(module.init)(jax.random.key(seed), x)["params"])
        return cls(config, module, jax.tree.map(lambda p: p.astype(jnp.dtype(dtype)), params))

    def __call__(self, pixel_values: Any) -> CLIPVisionOutput:
        """``pixel_values`` ``[B, C, H, W]`` float, already preprocessed."""
        x = jnp.transpose(jnp.asarray(pixel_values, jnp.float32), (0, 2, 3, 1))
        return jitted_apply(self.module)({"params": self.params}, x)


# ----------------------------------------------------------------------------------------------
# The CLIPModel bundle and its loader.


def _batched(fn: Callable[[Any], Any], x: Any, batch_size: int | None, dim: int) -> np.ndarray:
    """``fn`` over chunks of ``x``; the last chunk is padded to full size (one compile)."""
    n = len(x)
    if n == 0:
        return np.zeros((0, dim), np.float32)
    b = min(batch_size or n, n)
    out = []
    for start in range(0, n, b):
        chunk = x[start : start + b]
        k = len(chunk)
        if k < b:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - k, axis=0)])
        out.append(np.asarray(fn(chunk), np.float32)[:k])
    return np.concatenate(out)


@dataclasses.dataclass
class FlaxCLIPModel:
    """Both CLIP towers with their projections, the preprocessing and (if any) the tokenizer."""

    vision: FlaxCLIPVisionModel
    text: FlaxCLIPTextModel
    preprocess: CLIPImagePreprocess
    tokenizer: Any | None = None
    logit_scale: float | None = None
    path: str | None = None

    @property
    def projection_dim(self) -> int:
        return self.vision.config.projection_dim

    def image_features(self, images: Any, batch_size: int | None = None) -> np.ndarray:
        """uint8 RGB ``[N, H, W, 3]`` -> float32 ``[N, P]`` (``image_embeds``, unnormalised)."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"expected uint8 images [N, H, W, 3], got {images.dtype} {images.shape}"
            )
        run = lambda chunk: self.vision(self.preprocess(chunk)).image_embeds  # noqa: E731
        return _batched(run, images, batch_size, self.projection_dim)

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        """``[N, L]`` ids, truncated and padded to the text tower's max positions (CLIPScore)."""
        if self.tokenizer is None:
            raise ValueError(
                f"CLIP folder {self.path} has no tokenizer (tokenizer.json, or vocab.json + "
                "merges.txt): pass tokenizer= to load_clip_model, or give input_ids"
            )
        from psa_jax.data.tokenizer import tokenize

        limit = self.text.config.max_position_embeddings
        return tokenize(self.tokenizer, prompts, min(self.tokenizer.model_max_length, limit))

    def text_features(self, prompts: Any, batch_size: int | None = None) -> np.ndarray:
        """Prompts (str or list of str) or ``[N, L]`` ids -> float32 ``[N, P]`` ``text_embeds``."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not len(prompts):
            return np.zeros((0, self.projection_dim), np.float32)
        if isinstance(prompts[0], str):
            ids = self.tokenize(prompts)
        else:
            ids = np.asarray(prompts, np.int32).reshape(len(prompts), -1)
        run = lambda chunk: self.text(chunk).text_embeds  # noqa: E731
        return _batched(run, ids, batch_size, self.projection_dim)


def clip_weights_file(folder: str | os.PathLike) -> str:
    """The CLIPModel weights file in ``folder``; FileNotFoundError says what belongs there."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no CLIP model folder at {folder}: expected {_EXPECTED}")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{folder} has no config.json: expected {_EXPECTED}")
    for stem in ("model", "pytorch_model"):
        try:
            return find_weights_file(folder, stem)
        except FileNotFoundError:
            pass
    raise FileNotFoundError(
        f"no CLIP weights in {folder}: expected model.safetensors (or its sharded index) or "
        f"pytorch_model.bin of {_EXPECTED}"
    )


def _read_json(path: str) -> dict[str, Any] | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_clip_model(
    folder: str | os.PathLike, dtype: Any = "float32", *, tokenizer: Any | None = None
) -> FlaxCLIPModel:
    """Load a local transformers ``CLIPModel`` folder (keys ``text_model.*``, ``vision_model.*``,
    ``text_projection.weight``, ``visual_projection.weight``, ``logit_scale``).

    ``tokenizer`` (a transformers tokenizer) wins over the folder's own; without either,
    :meth:`FlaxCLIPModel.text_features` takes ids only.

    Raises:
      FileNotFoundError: the folder, its config.json or its weights are missing.
      WeightMismatchError: every missing, unexpected or mis-shaped key, both towers at once.
    """
    folder = os.fspath(folder)
    file = clip_weights_file(folder)
    raw = read_config(folder)
    text_raw = raw.get("text_config") or raw.get("text_config_dict")
    vision_raw = raw.get("vision_config") or raw.get("vision_config_dict")
    if text_raw is None or vision_raw is None:
        raise ValueError(f"{folder}/config.json is not a CLIPModel config (no text/vision_config)")
    proj = raw.get("projection_dim", 512)  # the towers' own projection_dim is unused by CLIPModel
    text_cfg = CLIPTextConfig.from_hf_config({**text_raw, "projection_dim": proj})
    vision_cfg = CLIPVisionConfig.from_hf_config({**vision_raw, "projection_dim": proj})
    dt = jnp.dtype(dtype)

    state = read_state_dict(file)
    logit = state.pop("logit_scale", None)
    parts: tuple[dict[str, Any], ...] = ({}, {}, {})  # text, vision, neither
    for k, v in state.items():
        parts[_TOWER.get(k.split(".", 1)[0], 2)][k] = v

    text_module = CLIPTextModule(text_cfg, True, dt)
    vision_module = CLIPVisionModule(vision_cfg, dt)
    missing, unexpected, mismatched = [], list(parts[2]), []

    def convert(sd: dict[str, Any], ref: Params) -> Params:
        try:
            return torch_to_flax(sd, ref, what=file, ignore=_IGNORE, dtype=dt)
        except WeightMismatchError as e:
            missing.extend(e.missing), unexpected.extend(e.unexpected)
            mismatched.extend(e.mismatched)
            return {}

    text_params = convert(parts[0], text_abstract_params(text_module))
    ref = flax.core.unfreeze(vision_abstract_params(vision_module))
    ref["vision_model"]["embeddings"].pop("class_embedding")
    cls = parts[1].pop(_CLASS_KEY, None)
    vision_params = convert(parts[1], ref)
    if cls is None:
        missing.append(_CLASS_KEY)
    elif tuple(cls.shape) != (vision_cfg.hidden_size,):
        mismatched.append((_CLASS_KEY, tuple(cls.shape), (vision_cfg.hidden_size,)))
    if missing or unexpected or mismatched:
        raise WeightMismatchError(file, missing, unexpected, mismatched)
    vision_params["vision_model"]["embeddings"]["class_embedding"] = np.asarray(cls).astype(dt)

    if tokenizer is None:
        from psa_jax.data.tokenizer import load_tokenizer

        try:
            tokenizer = load_tokenizer(folder)
        except FileNotFoundError:
            tokenizer = None
    preprocess = CLIPImagePreprocess.from_config(
        _read_json(os.path.join(folder, "preprocessor_config.json")), vision_cfg.image_size
    )
    return FlaxCLIPModel(
        vision=FlaxCLIPVisionModel(
            vision_cfg, vision_module, jax.tree.map(jnp.asarray, vision_params)
        ),
        text=FlaxCLIPTextModel(text_cfg, text_module, jax.tree.map(jnp.asarray, text_params), True),
        preprocess=preprocess,
        tokenizer=tokenizer,
        logit_scale=None if logit is None else float(np.asarray(logit, np.float32).reshape(())),
        path=folder,
    )
