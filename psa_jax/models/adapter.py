"""The PSA adapter's trainable pieces.

Every adapter weight lives in the ``"adapter"`` variable collection, never in ``"params"``: the
frozen base and the trainable adapter are two separate pytrees that meet only in ``apply``
(``{"params": base, "adapter": adapter}``), so training differentiates the adapter tree alone and
the base needs no gradient masking and no copy for the DPO reference (adapter off).

Pieces:
  * ``UserProjection`` -- ``u = LayerNorm(Linear(profile_embedding))`` reshaped to T tokens of the
    cross-attention width (PSAlign ``PSAProjection``; diffusers ``ImageProjection``).
  * ``AdapterDense`` -- the bias-free, zero-initialised ``to_k_user`` / ``to_v_user`` of every
    cross-attention layer.
  * ``user_attention`` -- ``SDPA(q, to_k_user(u), to_v_user(u))`` with the exact T=1 fast path.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from psa_jax.models.layers import Dtype, sdpa

ADAPTER = "adapter"


def _adapter_variable(module: nn.Module, name: str, init, shape, axes) -> jax.Array:
    # The initialiser is called lazily: an rng is only drawn while the variable is created.
    def make():
        return nn.with_logical_partitioning(init, axes)(module.make_rng("params"), shape)

    return module.variable(ADAPTER, name, make).value


def _uniform(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class AdapterDense(nn.Module):
    """Bias-free linear map held in the adapter collection, zero-initialised (PSAlign)."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = _adapter_variable(
            self,
            "kernel",
            nn.initializers.zeros_init(),
            (x.shape[-1], self.features),
            ("embed", "heads"),
        )
        return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))


class UserProjection(nn.Module):
    """Profile embedding ``[B, D]`` -> ``[B, T, cross_dim]`` user tokens (Linear, LayerNorm).

    Initialised as PyTorch initialises ``nn.Linear``/``nn.LayerNorm``, like PSAlign's projection.
    """

    num_tokens: int
    cross_dim: int
    dtype: Dtype = jnp.float32
    eps: float = 1e-5

    @nn.compact
    def __call__(self, embeds: jax.Array) -> jax.Array:
        d = embeds.shape[-1]
        width = self.num_tokens * self.cross_dim
        kernel = _adapter_variable(
            self, "kernel", _uniform(1 / math.sqrt(d)), (d, width), ("user_embed", "embed")
        )
        bias = _adapter_variable(self, "bias", _uniform(1 / math.sqrt(d)), (width,), ("embed",))
        # Projected in float32 whatever the compute dtype: raw LLM embeddings have norms ~100.
        x = jnp.dot(embeds.astype(jnp.float32), kernel.astype(jnp.float32)) + bias
        x = x.reshape(embeds.shape[0], self.num_tokens, self.cross_dim)
        return _AdapterLayerNorm(self.eps, name="norm")(x).astype(self.dtype)


class _AdapterLayerNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = _adapter_variable(
            self, "scale", nn.initializers.ones_init(), (x.shape[-1],), ("norm",)
        )
        bias = _adapter_variable(
            self, "bias", nn.initializers.zeros_init(), (x.shape[-1],), ("norm",)
        )
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias


def user_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, heads: int, *, fast_path: bool = True
) -> jax.Array:
    """``SDPA(q, k, v)`` over the T user tokens; ``q [B, L, inner]``, ``k, v [B, T, inner]``.

    With one token the softmax over a single key is exactly 1, so the result is ``v`` at every
    query position: the fast path skips the logits (and ``to_k_user`` gets no gradient, as in
    PSAlign).
    """
    if fast_path and k.shape[1] == 1:
        return jnp.broadcast_to(v, (v.shape[0], q.shape[1], v.shape[2])).astype(q.dtype)
    return sdpa(q, k, v, heads)


def adapter_layer_paths(adapter: dict[str, Any]) -> list[tuple[str, ...]]:
    """Module paths of the cross-attention layers that hold ``to_k_user``/``to_v_user``, in
    diffusers' ``unet.attn_processors`` order (down blocks, up blocks, then the mid block): the
    index PSAlign and IP-Adapter files use."""
    from flax.traverse_util import flatten_dict

    paths = {p[:-2] for p in flatten_dict(nn.meta.unbox(adapter)) if p[-2] == "to_k_user"}
    order = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}

    def key(path):
        return [order.get(path[0].split(".")[0], 3)] + [_natural(p) for p in path]

    return sorted(paths, key=key)


def _natural(part: str) -> tuple:
    name, _, idx = part.rpartition(".")
    return (name, int(idx)) if idx.isdigit() else (part, -1)


PROJ_INITS = ("torch", "standardized")


def population_stats(
    embeds: Any, dim: int, min_std_ratio: float = 0.1
) -> tuple[jax.Array, jax.Array]:
    """Per-feature ``(mean, std)`` of the training users' ``[N, dim]`` embeddings (``N >= 2``),
    ``std`` floored at ``min_std_ratio`` x its RMS so that a feature constant over the
    population is not blown up: the standardisation of :func:`standardize_projection` and of
    ``train.user_proj_space="standardized"`` (``optim.in_standardized_coordinates``)."""
    embeds = jnp.asarray(embeds, jnp.float32)
    if embeds.ndim != 2 or embeds.shape[0] < 2 or embeds.shape[1] != dim:
        raise ValueError(f"need [N >= 2, {dim}] training-user embeddings, got {embeds.shape}")
    mean, std = embeds.mean(0), embeds.std(0)
    std = jnp.maximum(std, min_std_ratio * jnp.sqrt(jnp.mean(jnp.square(std))))
    if not bool(jnp.all(std > 0)):
        raise ValueError("training-user embeddings are all identical: nothing to standardise")
    return mean, std


def standardize_projection(
    user_proj: dict[str, Any], embeds: Any, min_std_ratio: float = 0.1
) -> dict[str, Any]:
    """Fold a population's per-feature standardisation into ``user_proj``'s Linear.

    Profile embeddings of one encoder are nearly parallel (all-MiniLM-L6-v2 over the toy world's
    profiles: mean pairwise cosine 0.977), so ``Linear(e)`` at PyTorch's init is almost the same
    for every user and the zero-initialised ``to_v_user`` first learns what all users share. With
    ``W' = W / s`` and ``b' = b - (m / s) W`` the projection at step 0 sees ``(e - m) / s``, the
    user differences, while staying an ordinary Linear (PSAlign and IP-Adapter files unchanged).

    ``embeds`` ``[N, D]``: the training users' embeddings (``N >= 2``); ``m``, ``s`` their
    per-feature mean and std, ``s`` floored at ``min_std_ratio`` x its RMS so that a feature
    constant over the population is not blown up. Returns a new ``user_proj`` tree.
    """
    kernel = jnp.asarray(user_proj["kernel"], jnp.float32)
    mean, std = population_stats(embeds, kernel.shape[0], min_std_ratio)
    scaled, bias = fold_standardization(
        kernel, jnp.asarray(user_proj["bias"], jnp.float32), mean, std
    )
    return {**user_proj, "kernel": scaled, "bias": bias}


def fold_standardization(kernel: Any, bias: Any, mean: Any, std: Any) -> tuple[Any, Any]:
    """``(kernel / std, bias - (mean / std) @ kernel)``: the Linear on raw ``e`` that computes
    what ``(kernel, bias)`` computes on ``(e - mean) / std``. Linear in ``(kernel, bias)``, so
    it maps updates too (``optim.in_standardized_coordinates``)."""
    return kernel / std[:, None], bias - (mean / std) @ kernel
