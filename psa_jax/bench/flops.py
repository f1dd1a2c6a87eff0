"""Analytic FLOP counts from the architectures: convolutions and matmuls, 2 FLOPs per MAC.

Norms, activations, softmax and elementwise work are left out (a few percent), so these are the
"model FLOPs" of MFU. Counts are split into ``weight`` MACs (an activation times a weight: conv,
linear) and ``attn`` MACs (activation times activation: ``q k^T`` and ``p v``), because a
backward pass through a frozen network needs one input-gradient product for each weight MAC but
two for each attention MAC. Sanity anchors: SD1.5's UNet forward at 512 px (64x64 latents, 77
text tokens) is about 803 GFLOP per image, its VAE encoder about 1,117 GFLOP per 512 px image.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from psa_jax.models.unet import UNetConfig


@dataclasses.dataclass
class Macs:
    """Multiply-accumulates of one forward pass, split as the backward pass needs them."""

    weight: float = 0.0
    attn: float = 0.0

    def __iadd__(self, other: Macs) -> Macs:
        self.weight += other.weight
        self.attn += other.attn
        return self

    @property
    def flops(self) -> float:
        return 2.0 * (self.weight + self.attn)


def _conv(h: int, w: int, cin: int, cout: int, k: int = 3) -> Macs:
    return Macs(weight=float(h * w * k * k * cin * cout))


def _resnet(h: int, w: int, cin: int, cout: int, temb: int | None) -> Macs:
    m = _conv(h, w, cin, cout)
    m += _conv(h, w, cout, cout)
    if temb:
        m += Macs(weight=float(temb * cout))
    if cin != cout:
        m += _conv(h, w, cin, cout, 1)
    return m


def _attention(n: int, dim: int, ctx_len: int, ctx_dim: int) -> Macs:
    """q from ``n`` tokens, k/v from ``ctx_len`` tokens of width ``ctx_dim``, out projection."""
    weight = 2 * n * dim * dim + 2 * ctx_len * ctx_dim * dim
    return Macs(weight=float(weight), attn=float(2 * n * ctx_len * dim))


def _transformer(h: int, w: int, c: int, layers: int, ctx: tuple[int, int], user: int) -> Macs:
    """diffusers Transformer2DModel: proj_in/out and ``layers`` blocks (self-attention,
    cross-attention with ``user`` extra PSA tokens, GEGLU feed-forward of 4c)."""
    n = h * w
    m = Macs(weight=float(2 * n * c * c))
    for _ in range(layers):
        m += _attention(n, c, n, c)
        m += _attention(n, c, *ctx)
        if user:  # to_k_user/to_v_user on the user tokens; one key per token (T=1: just v)
            m += Macs(weight=float(2 * user * ctx[1] * c), attn=float(2 * n * user * c))
        m += Macs(weight=float(n * c * 8 * c + n * 4 * c * c))
    return m


def _per_block(value: Any, i: int, j: int = 0) -> int:
    value = value[i] if isinstance(value, (list, tuple)) else value
    return int(value[j] if isinstance(value, (list, tuple)) else value)


def unet_forward(cfg: UNetConfig, side: int, ctx_len: int, user_tokens: int = 0) -> Macs:
    """One image's UNet forward at ``side`` x ``side`` latents; ``user_tokens`` > 0 adds the PSA
    branch in every cross-attention layer."""
    ch, temb = cfg.block_out_channels, cfg.time_embed_dim
    ctx = (ctx_len, cfg.cross_attention_dim)
    m = Macs(weight=float(ch[0] * temb + temb * temb))  # time embedding MLP
    if cfg.addition_embed_type == "text_time":
        m += Macs(weight=float(cfg.projection_class_embeddings_input_dim * temb + temb * temb))
    m += _conv(side, side, cfg.in_channels, ch[0])
    s, c, skips = side, ch[0], [ch[0]]
    for i, kind in enumerate(cfg.down_block_types):
        for j in range(cfg.layers[i]):
            m += _resnet(s, s, c, ch[i], temb)
            c = ch[i]
            if kind.startswith("CrossAttn"):
                layers = _per_block(cfg.transformer_layers_per_block, i, j)
                m += _transformer(s, s, c, layers, ctx, user_tokens)
            skips.append(c)
        if i < len(ch) - 1:
            s = (s + 1) // 2
            m += _conv(s, s, c, c)
            skips.append(c)
    if cfg.mid_block_type is not None:
        m += _resnet(s, s, c, c, temb)
        m += _transformer(
            s, s, c, _per_block(cfg.transformer_layers_per_block, -1), ctx, user_tokens
        )
        m += _resnet(s, s, c, c, temb)
    rev = list(reversed(ch))
    for i, kind in enumerate(cfg.up_block_types):
        src = len(ch) - 1 - i
        for j in range(cfg.layers[src] + 1):
            m += _resnet(s, s, c + skips.pop(), rev[i], temb)
            c = rev[i]
            if kind.startswith("CrossAttn"):
                layers = _per_block(cfg.transformer_layers_per_block, src, j)
                m += _transformer(s, s, c, layers, ctx, user_tokens)
        if i < len(ch) - 1:
            s *= 2
            m += _conv(s, s, c, c)
    m += _conv(s, s, c, cfg.out_channels)
    return m


def vae_encode(vae: dict, resolution: int) -> Macs:
    """One image through diffusers' AutoencoderKL encoder (and ``quant_conv``)."""
    ch, layers = vae["block_out_channels"], int(vae.get("layers_per_block", 1))
    s, c = resolution, ch[0]
    m = _conv(s, s, vae.get("in_channels", 3), c)
    for i, out in enumerate(ch):
        for _ in range(layers):
            m += _resnet(s, s, c, out, None)
            c = out
        if i < len(ch) - 1:
            s //= 2
            m += _conv(s, s, c, c)
    m += _vae_mid(s, c)
    lat = 2 * int(vae["latent_channels"])
    m += _conv(s, s, c, lat)
    m += _conv(s, s, lat, lat, 1)
    return m


def vae_decode(vae: dict, latent_side: int) -> Macs:
    """One latent through ``post_quant_conv`` and diffusers' AutoencoderKL decoder."""
    ch, layers = list(reversed(vae["block_out_channels"])), int(vae.get("layers_per_block", 1))
    s, lat = latent_side, int(vae["latent_channels"])
    m = _conv(s, s, lat, lat, 1)
    m += _conv(s, s, lat, ch[0])
    c = ch[0]
    m += _vae_mid(s, c)
    for i, out in enumerate(ch):
        for _ in range(layers + 1):
            m += _resnet(s, s, c, out, None)
            c = out
        if i < len(ch) - 1:
            s *= 2
            m += _conv(s, s, c, c)
    m += _conv(s, s, c, vae.get("out_channels", 3))
    return m


def _vae_mid(s: int, c: int) -> Macs:
    m = _resnet(s, s, c, c, None)
    m += _attention(s * s, c, s * s, c)
    m += _resnet(s, s, c, c, None)
    return m


def text_encode(text: dict, length: int) -> Macs:
    """One prompt of ``length`` tokens through a CLIP text transformer (and its projection)."""
    d, inner = int(text["hidden_size"]), int(text["intermediate_size"])
    per_layer = _attention(length, d, length, d)
    per_layer += Macs(weight=float(2 * length * d * inner))
    m = Macs()
    for _ in range(int(text["num_hidden_layers"])):
        m += per_layer
    if "WithProjection" in "".join(text.get("architectures", [])):
        m += Macs(weight=float(d * int(text["projection_dim"])))
    return m


def dpo_step(shape: Any, batch: int) -> dict[str, float]:
    """FLOPs of one Diffusion-DPO step on ``batch`` pairs: ``model`` = policy forward and its
    input-gradient backward plus the reference forward, on both images of every pair (what
    every contestant must compute; the MFU numerator); ``extra`` = what PSAlign's loop adds
    on top: VAE encoding of both images and text encoding, every step."""
    side, ctx = shape.latent_side, shape.text_len
    policy = unet_forward(shape.unet, side, ctx, shape.num_user_tokens)
    ref = unet_forward(shape.unet, side, ctx, 0)
    backward = 2.0 * (policy.weight + 2.0 * policy.attn)
    model = 2 * batch * (policy.flops + backward + ref.flops)
    extra = 2 * batch * vae_encode(shape.vae, shape.resolution).flops
    extra += batch * sum(text_encode(t, ctx).flops for t in shape.text_encoders)
    return {"model": model, "extra": extra}


def sample_batch(shape: Any, batch: int, steps: int, guided: bool = True) -> dict[str, float]:
    """FLOPs of drawing ``batch`` images: ``steps`` UNet forwards (two with guidance), the
    prompts and the negative prompt encoded once, the VAE decode."""
    side, ctx = shape.latent_side, shape.text_len
    unet = unet_forward(shape.unet, side, ctx, shape.num_user_tokens).flops
    text = sum(text_encode(t, ctx).flops for t in shape.text_encoders)
    decode = vae_decode(shape.vae, side).flops
    model = batch * (steps * (2 if guided else 1) * unet + decode) + (batch + 1) * text
    return {"model": model, "extra": 0.0}
