"""The public UNet object: a diffusers-style callable over frozen base params + a PSA adapter.

``load_unet`` reads a local diffusers UNet folder; the returned :class:`PSAUNet` keeps the base
weights (``params``) and the adapter weights (``adapter``) as two separate pytrees. Its
``__call__`` takes diffusers' layout (NCHW latents, ``[B, L, D]`` text states) and returns the
noise prediction like ``UNet2DConditionModel(...).sample``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from psa_jax.core import paths
from psa_jax.models import convert
from psa_jax.models.adapter_io import adapter_shape, export_adapter, import_adapter
from psa_jax.models.compiled import jitted_apply
from psa_jax.models.unet import UNet2DConditionModel, UNetConfig

WEIGHTS_STEM = "diffusion_pytorch_model"


def _dummy_inputs(cfg: UNetConfig, user_embed_dim: int | None) -> dict[str, Any]:
    size = 2 ** (cfg.num_blocks - 1)
    kw: dict[str, Any] = dict(
        sample=jnp.zeros((1, size, size, cfg.in_channels)),
        timesteps=jnp.zeros((1,)),
        encoder_hidden_states=jnp.zeros((1, 1, cfg.cross_attention_dim)),
    )
    if cfg.addition_embed_type == "text_time":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kw["added_cond_kwargs"] = {
            "text_embeds": jnp.zeros((1, text_dim)),
            "time_ids": jnp.zeros((1, 6)),
        }
    if user_embed_dim is not None:
        kw["user_embeds"] = jnp.zeros((1, user_embed_dim))
    return kw


def abstract_variables(module: UNet2DConditionModel) -> dict[str, Any]:
    """Shapes and dtypes of every collection (``params``, ``adapter``) without allocating."""
    inputs = _dummy_inputs(module.config, module.user_embed_dim)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), **inputs))


def init_variables(module: UNet2DConditionModel, rng: jax.Array | int = 0) -> dict[str, Any]:
    """Fresh random variables (tests and from-scratch tiny models)."""
    rng = jax.random.key(rng) if isinstance(rng, int) else rng
    inputs = _dummy_inputs(module.config, module.user_embed_dim)
    return jax.jit(lambda r: module.init(r, **inputs))(rng)


@functools.cache
def _adapter_init(module: UNet2DConditionModel):
    """Jitted ``(base params, rng) -> fresh adapter``, one compile per architecture.

    Only the adapter collection is created (mutable); the base params are used as given, so
    no random base weights are made and thrown away.
    """
    inputs = _dummy_inputs(module.config, module.user_embed_dim)

    def init(params, rng):
        _, new = module.apply(
            {"params": params}, **inputs, mutable=["adapter"], rngs={"params": rng}
        )
        return new["adapter"]

    return jax.jit(init)


class PSAUNet:
    """A UNet with optional PSA adapter; call it like diffusers' ``UNet2DConditionModel``."""

    def __init__(
        self,
        config: UNetConfig,
        params: dict[str, Any],
        *,
        adapter: dict[str, Any] | None = None,
        user_embed_dim: int | None = None,
        num_user_tokens: int = 1,
        dtype: Any = jnp.float32,
    ):
        self.config = config
        self.params = params
        self.adapter = adapter
        self.dtype = jnp.dtype(dtype)
        if adapter is not None:  # the adapter's own shapes decide D and T, so they cannot drift
            d, width = np.shape(meta.unbox(adapter)["user_proj"]["kernel"])
            given = (user_embed_dim or d, num_user_tokens)
            if given != (d, width // config.cross_attention_dim):
                raise ValueError(
                    f"adapter has D={d}, T={width // config.cross_attention_dim}; "
                    f"got user_embed_dim={user_embed_dim}, "
                    f"num_user_tokens={num_user_tokens}"
                )
            user_embed_dim = d
        self.num_user_tokens = num_user_tokens
        self._set_module(user_embed_dim)
        if user_embed_dim is not None and adapter is None:
            self.init_adapter(user_embed_dim, num_user_tokens)

    def _set_module(self, user_embed_dim: int | None) -> None:
        self.user_embed_dim = user_embed_dim
        self.module = UNet2DConditionModel(
            self.config,
            user_embed_dim=user_embed_dim,
            num_user_tokens=self.num_user_tokens,
            dtype=self.dtype,
        )
        self._apply = jitted_apply(self.module)

    @property
    def variables(self) -> dict[str, Any]:
        out = {"params": self.params}
        if self.adapter is not None:
            out["adapter"] = self.adapter
        return out

    def __call__(
        self,
        sample: jax.Array,
        timestep: jax.Array | float,
        encoder_hidden_states: jax.Array,
        added_cond_kwargs: dict[str, jax.Array] | None = None,
        user_embeds: jax.Array | None = None,
        user_scale: float | jax.Array = 1.0,
    ) -> jax.Array:
        """NCHW ``sample`` -> NCHW noise prediction. ``user_embeds=None``: the base model."""
        if user_embeds is not None and self.adapter is None:
            raise ValueError(
                "user_embeds given but this UNet has no adapter: call "
                "load_adapter(...) or init_adapter(user_embed_dim) first"
            )
        added = None
        if added_cond_kwargs is not None:
            added = {k: jnp.asarray(added_cond_kwargs[k]) for k in ("text_embeds", "time_ids")}
        out = self._apply(
            self.variables,
            jnp.transpose(jnp.asarray(sample), (0, 2, 3, 1)),
            jnp.asarray(timestep),
            jnp.asarray(encoder_hidden_states),
            added_cond_kwargs=added,
            user_embeds=None if user_embeds is None else jnp.asarray(user_embeds),
            user_scale=jnp.asarray(user_scale, jnp.float32),
        )
        return jnp.transpose(out, (0, 3, 1, 2))

    # ---- adapter ----------------------------------------------------------------------------
    def init_adapter(
        self, user_embed_dim: int, num_user_tokens: int | None = None, rng: int | jax.Array = 0
    ) -> None:
        """Create a fresh adapter (k/v zero, projection as PyTorch inits it): output unchanged."""
        self.num_user_tokens = num_user_tokens or self.num_user_tokens
        self._set_module(user_embed_dim)
        rng = jax.random.key(rng) if isinstance(rng, int) else rng
        adapter = _adapter_init(self.module)(self.params, rng)
        self.adapter = jax.tree.map(np.asarray, meta.unbox(adapter))

    def load_adapter(self, path: str | os.PathLike) -> None:
        """Load a PSAlign adapter (``.safetensors``, or ``.bin`` read with weights_only=True), a
        diffusers IP-Adapter file, a folder holding one such ``*.safetensors`` file, or a
        ``psa-jax train`` run folder (its newest complete checkpoint).

        Creates the adapter slots from the file's shapes when this UNet has none yet.

        Raises:
          WeightFileError: the file is missing, empty, garbage or truncated (names the file).
          WeightMismatchError: its keys or shapes do not fit this UNet (names the file).
        """
        source = _AdapterSource.read(os.fspath(path))
        if self.user_embed_dim is None:
            d, t = source.shape(self.config.cross_attention_dim)
            self.num_user_tokens = t
            self._set_module(d)
        self.adapter = source.tree(self.module)

    def save_adapter(self, path: str | os.PathLike, format: str = "psalign") -> str:
        """Write the adapter as ``psalign`` safetensors, or a ``diffusers-ip-adapter`` folder
        (``ip_adapter.safetensors``, loadable with ``pipe.load_ip_adapter``). Returns the file."""
        if self.adapter is None:
            raise ValueError("this UNet has no adapter to save")
        state = export_adapter(self.adapter, format)
        path = os.fspath(path)
        if format == "diffusers-ip-adapter":
            os.makedirs(path, exist_ok=True)
            path = os.path.join(path, "ip_adapter.safetensors")
        else:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        metadata = {
            "format": format,
            "num_user_tokens": str(self.num_user_tokens),
            "user_embed_dim": str(self.user_embed_dim),
        }
        convert.write_safetensors(state, path, metadata=metadata)
        return path

    # ---- base weights -----------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike, dtype: Any = np.float32) -> None:
        """A diffusers UNet folder of the base weights (``config.json`` + safetensors)."""
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(self.config.to_diffusers_config(), f, indent=2)
        convert.write_safetensors(
            convert.flax_to_torch(self.params, dtype),
            os.path.join(folder, f"{WEIGHTS_STEM}.safetensors"),
        )


@dataclasses.dataclass(frozen=True)
class _AdapterSource:
    """What :meth:`PSAUNet.load_adapter` reads: a run's adapter tree or a file's state dict."""

    what: str  # the file or run, for errors
    run_params: Any = None  # a dpo run's adapter tree
    state: Any = None  # an adapter file's state dict (PSAlign or diffusers IP-Adapter)

    @classmethod
    def read(cls, path: str) -> _AdapterSource:
        if paths.isdir(os.path.join(path, "checkpoints")):  # a psa_jax run (or gs:// one)
            from psa_jax.core.checkpoint import restore_host_params

            params, config = restore_host_params(path)
            if config.get("task") != "dpo" or "user_proj" not in params:
                raise convert.WeightFileError(
                    path, f"a {config.get('task')!r} run, not a PSA adapter (dpo) run"
                )
            return cls(f"run {path}", run_params=params)
        path = _adapter_file(path)
        # WeightFileError naming a garbage/missing file
        return cls(f"adapter file {path}", state=convert.read_state_dict(path))

    def shape(self, cross_dim: int) -> tuple[int, int]:
        """(profile embedding dim D, user tokens T)."""
        if self.state is not None:
            return adapter_shape(self.state, cross_dim, what=self.what)
        d, width = np.shape(self.run_params["user_proj"]["kernel"])
        return d, width // cross_dim

    def tree(self, module: UNet2DConditionModel) -> dict[str, Any]:
        """The adapter as host float32 arrays shaped like ``module``'s adapter slots."""
        ref = meta.unbox(abstract_variables(module)["adapter"])
        if self.state is not None:
            self.shape(module.config.cross_attention_dim)  # a named error for a foreign file
            return import_adapter(self.state, ref, what=self.what)
        want = jax.tree.map(lambda x: tuple(x.shape), ref)
        got = jax.tree.map(lambda x: tuple(np.shape(x)), self.run_params)
        if want != got:
            raise convert.WeightMismatchError(
                f"adapter of {self.what} does not fit this UNet: {got} vs {want}"
            )
        return jax.tree.map(lambda x: np.asarray(x, np.float32), self.run_params)


def read_adapter(path: str | os.PathLike, module: UNet2DConditionModel) -> dict[str, Any]:
    """The adapter that :meth:`PSAUNet.load_adapter` reads from ``path`` (a PSAlign or diffusers
    IP-Adapter file, a folder with one, or a ``dpo`` run folder), as host float32 arrays shaped
    like ``module``'s adapter slots (``user_embed_dim``, ``num_user_tokens``, cross-attention
    widths).

    Raises:
      WeightFileError: the file is missing or unreadable, or the run is not a dpo run.
      WeightMismatchError: its keys or shapes do not fit ``module``'s adapter.
    """
    return _AdapterSource.read(os.fspath(path)).tree(module)


def _adapter_file(path: str) -> str:
    if os.path.isdir(path):
        found = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".bin")))
        if len(found) != 1:
            raise convert.MissingWeightFileError(
                path,
                "expected exactly one adapter .safetensors/.bin file in this folder, "
                f"found {found or 'none'}",
            )
        return os.path.join(path, found[0])
    return path


def load_unet(
    path: str | os.PathLike,
    *,
    num_user_tokens: int = 1,
    user_embed_dim: int | None = None,
    dtype: str | Any = "float32",
    variant: str | None = None,
) -> PSAUNet:
    """Load a local diffusers UNet folder (``config.json`` + safetensors fp32/fp16/bf16).

    Args:
      path: a diffusers UNet folder, or a pipeline folder holding ``unet/``.
      num_user_tokens: T, user tokens made by the adapter's projection.
      user_embed_dim: profile embedding size D; ``None`` leaves the adapter slots to
        ``load_adapter`` (which reads D and T from the file).
      dtype: compute dtype, and the dtype the base weights are stored in.
      variant: e.g. ``"fp16"`` for ``diffusion_pytorch_model.fp16.safetensors``.

    Raises:
      WeightMismatchError: the checkpoint's keys or shapes do not fit the config.
    """
    path = convert.component_folder(path, "unet")
    config = UNetConfig.from_diffusers_config(convert.read_config(path))
    weights = convert.find_weights_file(path, WEIGHTS_STEM, variant)
    module = UNet2DConditionModel(config, dtype=jnp.dtype(dtype))
    reference = abstract_variables(module)["params"]
    params = convert.torch_to_flax(
        convert.read_state_dict(weights),
        reference,
        what=f"UNet checkpoint {weights}",
        dtype=jnp.dtype(dtype),
    )
    return PSAUNet(
        config, params, user_embed_dim=user_embed_dim, num_user_tokens=num_user_tokens, dtype=dtype
    )


def unet_module_from_config(
    model_config: Any, dtype: Any = jnp.float32, unet_config: UNetConfig | None = None
) -> UNet2DConditionModel:
    """The UNet module a ``configs/*.py`` ``model`` section describes (adapter slots included).

    ``unet_config`` (a pretrained folder's) replaces ``model.unet``. ``model.remat_policy``
    (optional, default "none") picks the gradient-checkpointing policy, one of
    :data:`psa_jax.models.unet.REMAT_POLICIES`; ``model.attention`` how attention is computed
    (:data:`psa_jax.models.layers.ATTENTION_IMPLS`).
    """
    adapter = model_config.adapter
    return UNet2DConditionModel(
        unet_config or UNetConfig.from_diffusers_config(dict(model_config.unet)),
        user_embed_dim=adapter.user_embed_dim,
        num_user_tokens=adapter.num_user_tokens,
        dtype=jnp.dtype(dtype),
        remat_policy=model_config.remat_policy,
        attention=model_config.attention,
    )
