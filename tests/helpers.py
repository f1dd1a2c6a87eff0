"""Shared test utilities: relative error, tiny random PyTorch twins and reference processors."""

from __future__ import annotations

import numpy as np


def rel_err(a, b) -> float:
    """Relative L2 error ||a - b|| / ||b|| (b is the PyTorch reference)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def perturb_(module, seed: int = 0, scale: float = 0.05) -> None:
    """Add noise to every parameter so zero/one default inits cannot hide layout bugs."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


# Stable Diffusion 1.x's shipped scheduler_config.json (a PNDM config: the keys other
# schedulers must read or ignore).
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

SD15_LIKE = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(16, 32, 32),
    layers_per_block=2,
    attention_head_dim=2,  # diffusers' naming bug: this is the number of heads
    cross_attention_dim=24,
    norm_num_groups=8,
)

SDXL_LIKE = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(16, 32, 48),
    layers_per_block=2,
    attention_head_dim=(2, 4, 6),
    transformer_layers_per_block=(1, 2, 3),
    use_linear_projection=True,
    upcast_attention=True,
    cross_attention_dim=40,
    norm_num_groups=8,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=20 + 6 * 8,  # pooled text (20) + 6 time ids
)


def tiny_torch_unet(config: dict, seed: int = 0):
    """A random diffusers UNet2DConditionModel (fp32, eval mode) for a config dict."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config).eval()
    perturb_(unet, seed)
    return unet


def psa_reference_processor(hidden_size: int, cross_dim: int, num_tokens: int, scale: float):
    """PyTorch reference of PSAlign's ``PSAAttnProcessor2_0`` (written from its semantics).

    User tokens ride at the end of ``encoder_hidden_states`` (PSAlign's concatenated format);
    the user branch is SDPA of the text queries over all T user tokens (for T=1 exactly
    PSAlign), added with ``scale`` before ``to_out``. Keys: ``to_{k,v}_user.0.weight``.
    """
    import torch
    import torch.nn.functional as F

    class Processor(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.to_k_user = torch.nn.ModuleList(
                [torch.nn.Linear(cross_dim, hidden_size, bias=False)]
            )
            self.to_v_user = torch.nn.ModuleList(
                [torch.nn.Linear(cross_dim, hidden_size, bias=False)]
            )

        def __call__(
            self,
            attn,
            hidden_states,
            encoder_hidden_states=None,
            attention_mask=None,
            temb=None,
            **kwargs,
        ):
            b = hidden_states.shape[0]
            end = encoder_hidden_states.shape[1] - num_tokens
            text, user = encoder_hidden_states[:, :end], encoder_hidden_states[:, end:]

            def heads(x):
                return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

            def merge(x):
                return x.transpose(1, 2).reshape(b, -1, x.shape[1] * x.shape[3])

            q = heads(attn.to_q(hidden_states))
            out = merge(
                F.scaled_dot_product_attention(q, heads(attn.to_k(text)), heads(attn.to_v(text)))
            )
            user_out = merge(
                F.scaled_dot_product_attention(
                    q, heads(self.to_k_user[0](user)), heads(self.to_v_user[0](user))
                )
            )
            out = out + scale * user_out
            return attn.to_out[1](attn.to_out[0](out))

    return Processor()


def psa_reference_projection(embed_dim: int, cross_dim: int, num_tokens: int):
    """PSAlign's ``PSAProjection``: Linear(D -> T*cross) then LayerNorm(cross)."""
    import torch

    class Projection(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(embed_dim, num_tokens * cross_dim)
            self.norm = torch.nn.LayerNorm(cross_dim)

        def forward(self, x):
            return self.norm(self.proj(x).reshape(-1, num_tokens, cross_dim))

    return Projection()


def randomize_adapter(adapter, seed: int = 0, scale: float = 0.3):
    """Gaussian noise on every adapter leaf: zero-initialised to_k/to_v hide the user branch."""
    import jax

    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: np.asarray(x) + scale * rng.standard_normal(np.shape(x)).astype(np.float32),
        adapter,
    )


def tiny_clip_text(cls, vocab: int, hidden: int, seed: int, max_len: int, layers: int = 2, **extra):
    """A perturbed random transformers CLIP text model ``cls`` (ids 0/1 = BOS/EOS, as the word
    tokenizer)."""
    import torch
    from transformers import CLIPTextConfig

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=max_len,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        **extra,
    )
    model = cls(config).eval()
    perturb_(model, seed=seed, scale=0.1)
    return model


def tiny_torch_vae(sample_size: int, seed: int = 2):
    """A perturbed random diffusers AutoencoderKL that upsamples latents once (factor 2)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        sample_size=sample_size,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    ).eval()
    perturb_(vae, seed=seed, scale=0.1)
    return vae


def sd_ddim_scheduler():
    """diffusers' DDIM set up as Stable Diffusion ships it."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
    )


def load_ip_adapter_export(pipe, folder) -> None:
    """Load a ``diffusers-ip-adapter`` export into a diffusers pipeline, with no image encoder
    (PSA passes profile embeddings as ``ip_adapter_image_embeds``)."""
    pipe.load_ip_adapter(
        str(folder), subfolder="", weight_name="ip_adapter.safetensors", image_encoder_folder=None
    )


def tiny_sd_folder(root, unet_config: dict, prompts, max_len: int, scheduler=None):
    """Save a diffusers StableDiffusionPipeline of tiny random components (UNet, CLIP text
    encoder over a word tokenizer of ``prompts``, VAE with one upsampling, ``scheduler`` or
    SD's DDIM) into ``root``."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    from psa_jax.data.tokenizer import build_word_tokenizer

    tokenizer = build_word_tokenizer(prompts, max_length=max_len)
    vocab = len(tokenizer.get_vocab())
    cross = unet_config["cross_attention_dim"]
    pipe = StableDiffusionPipeline(
        vae=tiny_torch_vae(2 * unet_config["sample_size"]),
        text_encoder=tiny_clip_text(CLIPTextModel, vocab, cross, 1, max_len),
        tokenizer=tokenizer,
        unet=tiny_torch_unet(unet_config),
        scheduler=sd_ddim_scheduler() if scheduler is None else scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(root)
    return root


def tiny_sdxl_folder(
    root, unet_config: dict, prompts, max_len: int, widths=(16, 24), force_zeros: bool = True
):
    """Save a diffusers StableDiffusionXLPipeline of tiny random components into ``root``: the
    UNet, CLIPTextModel + CLIPTextModelWithProjection (OpenCLIP's gelu, as SDXL's encoder 2)
    over one word tokenizer of ``prompts``, a VAE with one upsampling and DDIM. The encoders'
    ``widths`` must add up to the UNet's ``cross_attention_dim`` and encoder 2's projection is
    the pooled size the UNet's ``projection_class_embeddings_input_dim`` leaves (6 time ids)."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from psa_jax.data.tokenizer import build_word_tokenizer

    assert sum(widths) == unet_config["cross_attention_dim"]
    pooled = unet_config["projection_class_embeddings_input_dim"]
    pooled -= 6 * unet_config["addition_time_embed_dim"]
    tokenizer = build_word_tokenizer(prompts, max_length=max_len)
    vocab = len(tokenizer.get_vocab())
    pipe = StableDiffusionXLPipeline(
        vae=tiny_torch_vae(2 * unet_config["sample_size"]),
        text_encoder=tiny_clip_text(CLIPTextModel, vocab, widths[0], 1, max_len, layers=3),
        text_encoder_2=tiny_clip_text(
            CLIPTextModelWithProjection,
            vocab,
            widths[1],
            3,
            max_len,
            layers=3,
            projection_dim=pooled,
            hidden_act="gelu",
        ),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=tiny_torch_unet(unet_config),
        scheduler=sd_ddim_scheduler(),
        add_watermarker=False,
        force_zeros_for_empty_prompt=force_zeros,
    )
    pipe.save_pretrained(root)
    return root


# A Sage-mini world small enough for a train run in a test (configs/tiny.py overrides).
SMALL_WORLD = [
    "data.toy.num_users=6",
    "data.toy.include_level_users=False",
    "data.toy.concepts_per_category=1",
    "data.toy.captions_per_concept=2",
    "data.toy.num_unseen_users=2",
    "data.toy.num_eval_seen_users=3",
    "data.toy.num_benign=4",
    "train.batch_size=4",
    "train.eval_batch_size=4",
    "train.eval_batches=1",
    "train.eval_every=0",
    "train.progress=False",
]
