"""Attention modules of the Stable Diffusion UNet, with the PSA user branch in cross-attention.

``Attention`` is diffusers' ``Attention`` (to_q/to_k/to_v/to_out.0). When ``user_adapter`` is
set (every ``attn2``), it also owns ``to_k_user``/``to_v_user`` in the adapter collection and
computes, before ``to_out``::

    out = SDPA(q, K_text, V_text) + user_scale * SDPA(q, to_k_user(u), to_v_user(u))

which is PSAlign's ``PSAAttnProcessor2_0`` and diffusers' ``IPAdapterAttnProcessor2_0``.
``user_tokens=None`` skips the branch: exactly the base model.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from psa_jax.models.adapter import AdapterDense, user_attention
from psa_jax.models.layers import (
    Dtype,
    constrain_batch,
    conv,
    dense,
    gelu,
    group_norm,
    layer_norm,
    sdpa,
)


class Attention(nn.Module):
    """diffusers ``Attention``; ``norm_groups`` adds its ``group_norm`` (VAE mid-block)."""

    heads: int
    dim_head: int
    out_dim: int
    qkv_bias: bool = False
    norm_groups: int | None = None
    norm_eps: float = 1e-6
    user_adapter: bool = False
    user_fast_path: bool = True
    attention: str = "xla"  # layers.ATTENTION_IMPLS
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        user_tokens: jax.Array | None = None,
        user_scale: float | jax.Array = 1.0,
    ) -> jax.Array:
        inner = self.heads * self.dim_head
        if self.norm_groups is not None:
            x = group_norm(self.norm_groups, self.norm_eps, dtype=self.dtype, name="group_norm")(x)
        ctx = x if context is None else context.astype(self.dtype)

        def proj(name, y):
            return dense(
                inner, ("embed", "heads"), use_bias=self.qkv_bias, dtype=self.dtype, name=name
            )(y)

        q = proj("to_q", x)
        k, v = proj("to_k", ctx), proj("to_v", ctx)
        out = sdpa(q, k, v, self.heads, implementation=self.attention)
        if self.user_adapter and user_tokens is not None:
            uk = AdapterDense(inner, dtype=self.dtype, name="to_k_user")(user_tokens)
            uv = AdapterDense(inner, dtype=self.dtype, name="to_v_user")(user_tokens)
            u = user_attention(q, uk, uv, self.heads, fast_path=self.user_fast_path)
            out = out + _per_sample(user_scale, out) * u
        return dense(self.out_dim, ("heads", "embed"), dtype=self.dtype, name="to_out.0")(out)


def _per_sample(scale: float | jax.Array, like: jax.Array) -> jax.Array:
    """A scalar scale, or one per sample (``[B]``) broadcast over tokens and channels."""
    scale = jnp.asarray(scale, like.dtype)
    return scale.reshape(-1, 1, 1) if scale.ndim == 1 else scale


class FeedForward(nn.Module):
    """diffusers ``FeedForward`` with GEGLU: ``net.0.proj`` -> hidden * gelu(gate) -> ``net.2``."""

    dim: int
    mult: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        inner = self.dim * self.mult
        h = dense(2 * inner, ("embed", "mlp"), dtype=self.dtype, name="net.0.proj")(x)
        hidden, gate = jnp.split(h, 2, axis=-1)
        h = hidden * gelu(gate)
        return dense(self.dim, ("mlp", "embed"), dtype=self.dtype, name="net.2")(h)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention (with the PSA branch), GEGLU feed-forward; pre-LayerNorm."""

    dim: int
    heads: int
    dim_head: int
    user_adapter: bool = False
    user_fast_path: bool = True
    attention: str = "xla"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, user_tokens=None, user_scale=1.0):
        kw = dict(heads=self.heads, dim_head=self.dim_head, out_dim=self.dim,
                  attention=self.attention, dtype=self.dtype)  # fmt: skip
        # The residual stream stays split over the batch (see layers.constrain_batch).
        x = constrain_batch(x)
        h = layer_norm(dtype=self.dtype, name="norm1")(x)
        x = constrain_batch(x + Attention(**kw, name="attn1")(h))
        h = layer_norm(dtype=self.dtype, name="norm2")(x)
        attn2 = Attention(
            **kw, user_adapter=self.user_adapter, user_fast_path=self.user_fast_path, name="attn2"
        )
        x = constrain_batch(x + attn2(h, context, user_tokens, user_scale))
        h = layer_norm(dtype=self.dtype, name="norm3")(x)
        return constrain_batch(x + FeedForward(self.dim, dtype=self.dtype, name="ff")(h))


class Transformer2DModel(nn.Module):
    """diffusers ``Transformer2DModel`` (continuous input) on NHWC feature maps."""

    heads: int
    dim_head: int
    num_layers: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    user_adapter: bool = False
    user_fast_path: bool = True
    attention: str = "xla"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, user_tokens=None, user_scale=1.0):
        b, h, w, c = x.shape
        inner = self.heads * self.dim_head
        x = residual = constrain_batch(x)
        x = group_norm(self.groups, 1e-6, dtype=self.dtype, name="norm")(x)
        if self.use_linear_projection:
            x = dense(inner, ("embed", "heads"), dtype=self.dtype, name="proj_in")(
                x.reshape(b, h * w, c)
            )
        else:
            x = conv(inner, 1, dtype=self.dtype, name="proj_in")(x).reshape(b, h * w, inner)
        for i in range(self.num_layers):
            block = BasicTransformerBlock(
                inner,
                self.heads,
                self.dim_head,
                user_adapter=self.user_adapter,
                user_fast_path=self.user_fast_path,
                attention=self.attention,
                dtype=self.dtype,
                name=f"transformer_blocks.{i}",
            )
            x = block(x, context, user_tokens, user_scale)
        if self.use_linear_projection:
            x = dense(c, ("heads", "embed"), dtype=self.dtype, name="proj_out")(x)
            x = x.reshape(b, h, w, c)
        else:
            x = conv(c, 1, dtype=self.dtype, name="proj_out")(x.reshape(b, h, w, inner))
        return constrain_batch(x + residual)
