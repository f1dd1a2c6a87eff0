"""PyTorch twins for the torch contestants: a diffusers UNet with PSA attention processors, the
PSA user projection, and random VAE / CLIP text encoders of a bench shape.

The processor follows PSAlign's ``PSAAttnProcessor2_0`` (written here from its semantics, not
copied): ``out = SDPA(q, K_text, V_text) + scale * SDPA(q, to_k_user(u), to_v_user(u))`` before
``to_out``, with bias-free zero-initialised ``to_k_user``/``to_v_user`` (a ``ModuleList`` of
one, PSAlign's key layout). PSAlign passes the user tokens at the end of
``encoder_hidden_states`` (``concat=True``); the careful variant passes them as a
``cross_attention_kwargs`` entry, so that ``None`` turns the branch off and one UNet serves as
both policy and reference. Both attend over all T user tokens, as psa_jax and IP-Adapter do
(PSAlign attends to the first only; identical for T = 1, its default).

Module names make :meth:`PSAAdapter.state_dict` PSAlign's flattened adapter file, so a psa_jax
adapter loads with ``load_state_dict(export_adapter(tree, "psalign"))``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class SelfAttnProcessor:
    """diffusers' SDPA self-attention; takes (and ignores) the user-token kwargs, which diffusers
    hands to every processor of a transformer block."""

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        user_tokens=None,
        user_scale=1.0,
    ):
        q = _heads(attn.to_q(hidden_states), attn.heads)
        k = _heads(attn.to_k(hidden_states), attn.heads)
        v = _heads(attn.to_v(hidden_states), attn.heads)
        return attn.to_out[0](_merge(F.scaled_dot_product_attention(q, k, v)))


class PSAProcessor(nn.Module):
    """Cross-attention with the PSA user branch (see the module docstring)."""

    def __init__(self, hidden: int, cross_dim: int, num_tokens: int, concat: bool):
        super().__init__()
        self.num_tokens, self.concat = num_tokens, concat
        self.to_k_user = nn.ModuleList([nn.Linear(cross_dim, hidden, bias=False)])
        self.to_v_user = nn.ModuleList([nn.Linear(cross_dim, hidden, bias=False)])
        for lin in (self.to_k_user[0], self.to_v_user[0]):
            nn.init.zeros_(lin.weight)

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        user_tokens=None,
        user_scale=1.0,
    ):
        text = encoder_hidden_states
        if self.concat:
            end = text.shape[1] - self.num_tokens
            text, user_tokens = text[:, :end], text[:, end:]
        q = _heads(attn.to_q(hidden_states), attn.heads)
        k = _heads(attn.to_k(text), attn.heads)
        v = _heads(attn.to_v(text), attn.heads)
        out = _merge(F.scaled_dot_product_attention(q, k, v))
        if user_tokens is not None:
            uk = _heads(self.to_k_user[0](user_tokens), attn.heads)
            uv = _heads(self.to_v_user[0](user_tokens), attn.heads)
            user = _merge(F.scaled_dot_product_attention(q, uk.to(q.dtype), uv.to(q.dtype)))
            out = out + user_scale * user
        return attn.to_out[0](out)


class UserProjection(nn.Module):
    """PSAlign's ``PSAProjection``: Linear(D -> T*C), reshaped to T tokens, LayerNorm(C)."""

    def __init__(self, embed_dim: int, cross_dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens, self.cross_dim = num_tokens, cross_dim
        self.proj = nn.Linear(embed_dim, num_tokens * cross_dim)
        self.norm = nn.LayerNorm(cross_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        x = self.proj(embeds.to(self.proj.weight.dtype))
        return self.norm(x.reshape(-1, self.num_tokens, self.cross_dim))


class PSAAdapter(nn.Module):
    """The trainable pieces: ``user_proj`` and one processor per cross-attention layer, in
    ``unet.attn_processors`` order (PSAlign's ``psa_adapter.<i>`` index)."""

    def __init__(self, unet: nn.Module, embed_dim: int, num_tokens: int, concat: bool):
        super().__init__()
        cfg = unet.config
        self.user_proj = UserProjection(embed_dim, cfg.cross_attention_dim, num_tokens)
        procs = []
        for name in unet.attn_processors:
            if name.endswith("attn2.processor"):
                hidden = _module(unet, name.rsplit(".", 1)[0]).to_q.out_features
                procs.append(PSAProcessor(hidden, cfg.cross_attention_dim, num_tokens, concat))
        self.psa_adapter = nn.ModuleList(procs)

    def attach(self, unet: nn.Module) -> None:
        """Install the processors: ``attn2`` gets the PSA branch, ``attn1`` plain SDPA."""
        procs, it = {}, iter(self.psa_adapter)
        for name in unet.attn_processors:
            procs[name] = next(it) if name.endswith("attn2.processor") else SelfAttnProcessor()
        unet.set_attn_processor(procs)


def _module(root: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def to_torch_state(flat: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """numpy state dict -> torch tensors of their own (copies: each contestant holds its own
    weights, and host-memory figures count them)."""
    out = {}
    for k, v in flat.items():
        v = np.asarray(v)
        if v.dtype.name == "bfloat16":
            out[k] = torch.from_numpy(v.astype(np.float32)).to(torch.bfloat16)
        else:
            out[k] = torch.from_numpy(np.array(v, copy=True))
    return out


def torch_unet(unet_config: Any, state: dict[str, np.ndarray]) -> nn.Module:
    """A diffusers ``UNet2DConditionModel`` holding ``state`` (built on the meta device, then
    the tensors assigned: no random init of a billion weights that would be overwritten)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config.to_diffusers_config())
    unet.load_state_dict(to_torch_state(state), strict=True, assign=True)
    return unet.eval().requires_grad_(False)


def torch_vae(vae_config: dict, seed: int = 0) -> nn.Module:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL.from_config(vae_config).eval().requires_grad_(False)


def torch_text_encoders(configs: tuple[dict, ...], seed: int = 0) -> list[nn.Module]:
    """Random transformers CLIP text encoders (``CLIPTextModelWithProjection`` where the
    config's architecture says so: SDXL's second encoder)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    out = []
    for i, cfg in enumerate(configs):
        torch.manual_seed(seed + i)
        with_proj = "WithProjection" in "".join(cfg.get("architectures", []))
        cls = CLIPTextModelWithProjection if with_proj else CLIPTextModel
        kw = {k: v for k, v in cfg.items() if k != "architectures"}
        out.append(cls(CLIPTextConfig(**kw)).eval().requires_grad_(False))
    return out


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
