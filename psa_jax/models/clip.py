"""Flax CLIP text encoder (transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection``).

transformers >= 5 ships no Flax models, so this is our own. Module names copy transformers'
attribute names (``text_model.encoder.layers.0.self_attn.q_proj``), so checkpoints convert with
:mod:`psa_jax.models.convert`'s leaf table alone.

What Stable Diffusion reads from the outputs:

* SD1.x / SD2.x: ``last_hidden_state`` (after ``final_layer_norm``).
* SDXL: ``hidden_states[-2]`` of both encoders (penultimate layer, *no* final layer norm),
  plus ``text_embeds`` of encoder 2 (``CLIPTextModelWithProjection``) as the pooled prompt.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from psa_jax.models.compiled import jitted_apply
from psa_jax.models.convert import (
    Params,
    WeightMismatchError,
    component_folder,
    find_weights_file,
    flax_to_torch,
    read_config,
    read_state_dict,
    torch_to_flax,
    write_safetensors,
)
from psa_jax.models.layers import Dtype, dense, gelu, layer_norm, sdpa

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP (SD1.x CLIP-L)
    "gelu": gelu,  # OpenCLIP (SD2.x, SDXL encoder 2)
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}

_PREFIX = "text_model."
# Non-persistent buffer some (older) checkpoints still contain.
_IGNORE = (r"text_model\.embeddings\.position_ids",)


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The transformers ``CLIPTextConfig`` fields the text encoder depends on."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = 512
    # 2 selects transformers' legacy pooling (argmax of the ids); see ``CLIPTextTransformer``.
    eos_token_id: int = 49407
    bos_token_id: int | None = 49406
    pad_token_id: int | None = 1

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"unsupported CLIP hidden_act {self.hidden_act!r}; supported: {sorted(ACTIVATIONS)}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if not isinstance(self.eos_token_id, int) or isinstance(self.eos_token_id, bool):
            raise ValueError(
                f"eos_token_id must be one int (pooling needs it), got {self.eos_token_id!r}"
            )

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> CLIPTextConfig:
        """Build from a transformers ``config.json`` dict; unrelated keys are ignored."""
        if "text_config" in config:
            raise ValueError(
                "this is a full CLIPModel config; pass the text encoder's own folder "
                "(CLIPTextModel / CLIPTextModelWithProjection)"
            )
        model_type = config.get("model_type", "clip_text_model")
        if model_type != "clip_text_model":
            raise ValueError(f"not a CLIP text model config: model_type={model_type!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    def to_hf_config(self, with_projection: bool, dtype: Any = "float32") -> dict[str, Any]:
        """A ``config.json`` dict that transformers' ``from_pretrained`` accepts."""
        arch = "CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"
        return {
            "architectures": [arch],
            "model_type": "clip_text_model",
            **dataclasses.asdict(self),
            "attention_dropout": 0.0,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "dtype": jnp.dtype(dtype).name,
        }


# ----------------------------------------------------------------------------------------------
# linen modules (names = transformers attribute names).


class CLIPTextOutput(NamedTuple):
    last_hidden_state: jax.Array  # [B, L, D], after final_layer_norm
    hidden_states: tuple[jax.Array, ...]  # embeddings + every layer, no final norm
    pooled: jax.Array  # [B, D] final-norm state at the EOS token (transformers' pooler_output)
    text_embeds: jax.Array | None  # [B, projection_dim]; None without text_projection


class CLIPAttention(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    causal: bool = True  # the text encoder; CLIP's vision tower attends both ways

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        d = self.config.hidden_size

        def proj(name: str) -> jax.Array:
            return dense(d, ("embed", "heads"), dtype=self.dtype, name=name)(x)

        q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")
        out = sdpa(q, k, v, self.config.num_attention_heads, mask=mask, is_causal=self.causal)
        return dense(d, ("heads", "embed"), dtype=self.dtype, name="out_proj")(out)


class CLIPMLP(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        x = dense(cfg.intermediate_size, ("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
        x = ACTIVATIONS[cfg.hidden_act](x)
        return dense(cfg.hidden_size, ("mlp", "embed"), dtype=self.dtype, name="fc2")(x)


class CLIPEncoderLayer(nn.Module):
    """Pre-norm block: x + attn(LN1(x)), then x + mlp(LN2(x))."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        eps = self.config.layer_norm_eps
        h = layer_norm(eps, dtype=self.dtype, name="layer_norm1")(x)
        x = x + CLIPAttention(self.config, self.dtype, self.causal, name="self_attn")(h, mask)
        h = layer_norm(eps, dtype=self.dtype, name="layer_norm2")(x)
        return x + CLIPMLP(self.config, self.dtype, name="mlp")(h)


class CLIPEncoder(nn.Module):
    """The layer stack shared by the text (causal) and vision (``causal=False``) towers."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, ...]:
        """Returns the input and every layer's output (``num_hidden_layers + 1`` arrays)."""
        states = [x]
        for i in range(self.config.num_hidden_layers):
            layer = CLIPEncoderLayer(self.config, self.dtype, self.causal, name=f"layers.{i}")
            x = layer(x, mask)
            states.append(x)
        return tuple(states)


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.config
        init = nn.initializers.normal(0.02)
        tok = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=self.dtype,
            embedding_init=nn.with_logical_partitioning(init, ("vocab", "embed")),
            name="token_embedding",
        )
        pos = nn.Embed(
            cfg.max_position_embeddings,
            cfg.hidden_size,
            dtype=self.dtype,
            embedding_init=nn.with_logical_partitioning(init, (None, "embed")),
            name="position_embedding",
        )
        return tok(input_ids) + pos(jnp.arange(input_ids.shape[-1]))[None]


class CLIPTextTransformer(nn.Module):
    """transformers' ``CLIPTextModel`` body (``text_model``): causal, pre-norm transformer.

    Pooling follows transformers: with the legacy ``eos_token_id == 2`` the EOS position is
    ``argmax(input_ids)`` (the EOT token has the largest id); otherwise it is the *first*
    position holding ``eos_token_id`` (padding may repeat it). Every row must contain an EOS.
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None
    ) -> tuple[jax.Array, tuple[jax.Array, ...], jax.Array]:
        cfg = self.config
        if input_ids.shape[-1] > cfg.max_position_embeddings:
            raise ValueError(
                f"sequence length {input_ids.shape[-1]} exceeds max_position_embeddings "
                f"{cfg.max_position_embeddings}"
            )
        input_ids = input_ids.astype(jnp.int32)
        x = CLIPTextEmbeddings(cfg, self.dtype, name="embeddings")(input_ids)
        # Padding hides keys only (queries still run); combined with the causal mask in sdpa.
        # A row with every key hidden (left padding, first tokens) attends uniformly to all
        # keys, as transformers' eager attention does (its additive finfo.min swamps scores);
        # its sdpa path differs there, at padded positions only. Real tokens match both.
        mask = None if attention_mask is None else attention_mask[:, None, None, :].astype(bool)
        states = CLIPEncoder(cfg, self.dtype, name="encoder")(x, mask)
        last = layer_norm(cfg.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")(states[-1])
        if cfg.eos_token_id == 2:
            eos = jnp.argmax(input_ids, axis=-1)
        else:
            eos = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(last, eos[:, None, None], axis=1)[:, 0]
        return last, states, pooled


class CLIPTextModule(nn.Module):
    """``text_model`` plus, with ``with_projection``, the bias-free ``text_projection``."""

    config: CLIPTextConfig
    with_projection: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None
    ) -> CLIPTextOutput:
        last, states, pooled = CLIPTextTransformer(self.config, self.dtype, name="text_model")(
            input_ids, attention_mask
        )
        embeds = None
        if self.with_projection:
            if not self.config.projection_dim:
                raise ValueError("with_projection needs config.projection_dim")
            proj = dense(
                self.config.projection_dim,
                ("embed", None),
                use_bias=False,
                dtype=self.dtype,
                name="text_projection",
            )
            embeds = proj(pooled)
        return CLIPTextOutput(last, states, pooled, embeds)


# ----------------------------------------------------------------------------------------------
# User-facing wrapper and loading.


def abstract_params(module: CLIPTextModule) -> Params:
    """Param shapes/dtypes of ``module`` without allocating (the conversion reference)."""
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(module.init, jax.random.key(0), ids)["params"]


@dataclasses.dataclass
class FlaxCLIPTextModel:
    """A CLIP text encoder ready to run: config, linen module and (unboxed) params.

    ``__call__`` compiles once per architecture (shared by instances); params are an argument,
    not a constant, so replacing ``params`` with same-shaped arrays does not recompile.
    """

    config: CLIPTextConfig
    module: CLIPTextModule
    params: Params
    with_projection: bool

    @classmethod
    def init_random(
        cls,
        config: CLIPTextConfig,
        *,
        with_projection: bool = False,
        dtype: Any = "float32",
        seed: int = 0,
    ) -> FlaxCLIPTextModel:
        """Freshly initialised weights (tests, smoke runs)."""
        module = CLIPTextModule(config, with_projection, jnp.dtype(dtype))

        @jax.jit  # one compiled init instead of hundreds of eager dispatches
        def init(key: jax.Array) -> Params:
            params = nn.meta.unbox(module.init(key, jnp.zeros((1, 1), jnp.int32))["params"])
            return jax.tree.map(lambda p: p.astype(jnp.dtype(dtype)), params)

        return cls(config, module, init(jax.random.key(seed)), with_projection)

    def __call__(self, input_ids: Any, attention_mask: Any | None = None) -> CLIPTextOutput:
        """``input_ids`` [B, L] ints; ``attention_mask`` [B, L] 1 = token, 0 = padding."""
        ids = jnp.asarray(input_ids, jnp.int32)
        mask = None if attention_mask is None else jnp.asarray(attention_mask)
        return jitted_apply(self.module)({"params": self.params}, ids, mask)

    @property
    def dtype(self) -> np.dtype:
        return jnp.dtype(jax.tree.leaves(self.params)[0].dtype)

    def state_dict(self) -> dict[str, np.ndarray]:
        """transformers-layout state dict (``text_model.``-prefixed keys)."""
        return flax_to_torch(self.params)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write ``config.json`` + ``model.safetensors`` that transformers (4 and 5) can load.

        Keys keep the ``text_model.`` prefix: the layout of every SD checkpoint; transformers
        5's ``CLIPTextModel`` strips it on load.
        """
        os.makedirs(folder, exist_ok=True)
        cfg = self.config.to_hf_config(self.with_projection, self.dtype)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
        write_safetensors(
            self.state_dict(), os.path.join(folder, "model.safetensors"), {"format": "pt"}
        )


def _weights_path(folder: str | os.PathLike, variant: str | None) -> str:
    """transformers names its weights ``model.safetensors`` (new) or ``pytorch_model.bin``."""
    try:
        return find_weights_file(folder, "model", variant)
    except FileNotFoundError as err:
        try:
            return find_weights_file(folder, "pytorch_model", variant)
        except FileNotFoundError:
            raise FileNotFoundError(f"no text encoder weights in {folder}: {err}") from None


def _has_projection(config: dict[str, Any], state: dict[str, Any]) -> bool:
    archs = config.get("architectures") or []
    if any(a.endswith("WithProjection") for a in archs):
        return True
    if "CLIPTextModel" in archs:
        return False
    return "text_projection.weight" in state


def load_text_encoder(
    path: str | os.PathLike,
    dtype: Any = "float32",
    *,
    variant: str | None = None,
    with_projection: bool | None = None,
) -> FlaxCLIPTextModel:
    """Load a local transformers CLIP text encoder folder (never touches the network).

    Reads ``config.json`` and ``model.safetensors`` (or its sharded index, or
    ``pytorch_model.bin``). ``with_projection`` defaults to the config's ``architectures``
    (then to whether ``text_projection.weight`` exists). Keys may carry the ``text_model.``
    prefix (transformers 4, SD checkpoints) or not (transformers 5 ``CLIPTextModel``).

    Raises:
      WeightMismatchError: naming every missing, unexpected or mis-shaped key (file layout).
    """
    path = component_folder(path, "text_encoder")
    raw = read_config(path)
    config = CLIPTextConfig.from_hf_config(raw)
    file = _weights_path(path, variant)
    state = read_state_dict(file)
    if with_projection is None:
        with_projection = _has_projection(raw, state)
    bare = not any(k.startswith(_PREFIX) for k in state)
    if bare:  # transformers 5 CLIPTextModel layout
        state = {
            k if k.startswith("text_projection.") else _PREFIX + k: v for k, v in state.items()
        }
    module = CLIPTextModule(config, with_projection, jnp.dtype(dtype))
    try:
        params = torch_to_flax(
            state, abstract_params(module), what=file, ignore=_IGNORE, dtype=jnp.dtype(dtype)
        )
    except WeightMismatchError as e:
        if not bare:
            raise
        strip = lambda k: k.removeprefix(_PREFIX)  # noqa: E731  report the file's own names
        raise WeightMismatchError(
            file,
            map(strip, e.missing),
            map(strip, e.unexpected),
            [(strip(k), got, want) for k, got, want in e.mismatched],
        ) from None
    params = jax.tree.map(jnp.asarray, params)
    return FlaxCLIPTextModel(config, module, params, with_projection)
