"""The benchmark shapes: UNet, VAE and text-encoder architectures with random weights.

The UNet, optimizer, noise schedule and DPO settings come from ``configs/<file>.py`` (the same
config ``psa-jax train`` reads), so the bench times what training runs. The SD1.5/SDXL configs
name no VAE or text encoder (those come from a pretrained folder), so their architectures are
written here as the diffusers/transformers configs of the released models. Nothing is
downloaded: every weight is random (:func:`random_params`), which costs the same FLOPs.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import numpy as np

from psa_jax.config import load_config
from psa_jax.models.unet import UNetConfig

# transformers CLIPTextConfig of SD1.x's text encoder (OpenAI CLIP ViT-L/14). Token ids 0/1 are
# BOS/EOS because the bench tokenizes with the word-level tokenizer (no BPE files offline).
CLIP_L = {
    "architectures": ["CLIPTextModel"],
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 1,
}
# SDXL's second text encoder (OpenCLIP ViT-bigG/14), with its text projection.
CLIP_BIGG = {
    **CLIP_L,
    "architectures": ["CLIPTextModelWithProjection"],
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
# diffusers AutoencoderKL config of SD1.5's VAE (SDXL's differs only in scaling_factor).
SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SDXL_VAE = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025}

# A few-MB SDXL-shaped model (text_time conditions, two text encoders, per-block transformer
# depth, linear projections): runs the SDXL code paths of every contestant on a CPU.
_TINY_XL_UNET = {
    "sample_size": 16,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [16, 32, 48],
    "layers_per_block": 1,
    "attention_head_dim": [2, 4, 6],
    "transformer_layers_per_block": [1, 2, 2],
    "use_linear_projection": True,
    "cross_attention_dim": 64,
    "norm_num_groups": 8,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 32 + 6 * 8,
}
_TINY_TEXT = {
    **CLIP_L,
    "vocab_size": 512,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 32,
    "projection_dim": 32,
}
_TINY_VAE = {
    **SD_VAE,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 32,
}


@dataclasses.dataclass(frozen=True)
class ShapeSpec:
    """One ``--shape``: its config file, pixel resolution, default batch and the architectures
    the config does not name (None: the config's ``model.vae`` / ``model.text_encoder``)."""

    config_file: str
    resolution: int
    batch: int | None = None  # None: the config's train.batch_size
    vae: dict | None = None
    text_encoders: tuple[dict, ...] | None = None
    unet_overrides: dict | None = None
    remat: str | None = None  # None: the config's model.remat_policy


SAMPLE_BATCH = 8  # images per sampling batch unless --batch says otherwise

SHAPES: dict[str, ShapeSpec] = {
    "tiny": ShapeSpec("tiny.py", 32),
    "sd15-256": ShapeSpec("sd15.py", 256, batch=1, vae=SD_VAE, text_encoders=(CLIP_L,)),
    # batch: PSAlign's per-GPU micro-batch (its launchers: 6 for SD1.5, 2 for SDXL); the
    # configs' train.batch_size is the global micro-batch of its 4 GPUs.
    "sd15": ShapeSpec("sd15.py", 512, batch=6, vae=SD_VAE, text_encoders=(CLIP_L,)),
    # SDXL at 1024 px does not fit without rematerialisation (PSAlign checkpoints SDXL too).
    "sdxl": ShapeSpec(
        "sdxl.py", 1024, batch=2, vae=SDXL_VAE, text_encoders=(CLIP_L, CLIP_BIGG), remat="full"
    ),
    "tiny-xl": ShapeSpec(
        "sdxl.py",
        32,
        batch=2,
        vae=_TINY_VAE,
        unet_overrides=_TINY_XL_UNET,
        text_encoders=(
            _TINY_TEXT,
            {**_TINY_TEXT, "architectures": ["CLIPTextModelWithProjection"], "hidden_size": 32},
        ),
    ),
}


@dataclasses.dataclass
class BenchShape:
    """A resolved shape: the training config and every architecture, all at one resolution."""

    name: str
    config: Any  # ml_collections.ConfigDict: model.init="random", the bench's dtype and batch
    unet: UNetConfig
    vae: dict  # diffusers AutoencoderKL config
    text_encoders: tuple[dict, ...]  # transformers CLIPTextConfig dicts (SDXL: two)
    resolution: int

    @property
    def sdxl(self) -> bool:
        return self.unet.addition_embed_type == "text_time"

    @property
    def latent_side(self) -> int:
        return self.resolution // 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def latent_channels(self) -> int:
        return self.unet.in_channels

    @property
    def text_len(self) -> int:
        return int(self.text_encoders[0]["max_position_embeddings"])

    @property
    def text_dim(self) -> int:
        return self.unet.cross_attention_dim

    @property
    def pooled_dim(self) -> int:
        """SDXL's pooled text embedding width (encoder 2's projection)."""
        return int(self.text_encoders[-1]["projection_dim"])

    @property
    def user_embed_dim(self) -> int:
        return int(self.config.model.adapter.user_embed_dim)

    @property
    def num_user_tokens(self) -> int:
        return int(self.config.model.adapter.num_user_tokens)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae["scaling_factor"])


def config_dir(given: str | None = None) -> str:
    """``configs/`` as ``psa-jax train`` finds it: ``given``, else ./configs, else the one next
    to the package (a source checkout)."""
    for path in (given, "configs", pathlib.Path(__file__).resolve().parents[2] / "configs"):
        if path is not None and os.path.isdir(path):
            return os.fspath(path)
    raise FileNotFoundError("no configs/ folder: run from the repository root or pass --config-dir")


def resolve(
    name: str,
    *,
    batch: int | None = None,
    dtype: str = "float32",
    configs: str | None = None,
    remat: str | None = None,
    attention: str | None = None,
) -> BenchShape:
    """The shape ``name`` at ``dtype`` with ``batch`` pairs per step (default: the spec's or the
    config's), its config switched to random frozen weights and PSAlign's DPO loss (no
    chosen-image term; the config's beta); ``attention``: ``model.attention`` instead of the
    config's; ``remat``: a remat policy instead of the spec's or
    the config's."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; shapes: {sorted(SHAPES)}")
    spec = SHAPES[name]
    config = load_config(os.path.join(config_dir(configs), spec.config_file))
    model = config.model
    model.init, model.dtype = "random", dtype
    model.remat_policy = remat or spec.remat or model.get("remat_policy", "none")
    if attention is not None:
        model.attention = attention
    unet_dict = {**dict(model.unet), **(spec.unet_overrides or {})}
    vae = dict(spec.vae or model.vae)
    texts = spec.text_encoders or (dict(model.text_encoder),)
    unet_dict["sample_size"] = spec.resolution // 2 ** (len(vae["block_out_channels"]) - 1)
    unet_dict["cross_attention_dim"] = sum(int(t["hidden_size"]) for t in texts)
    model.unet = unet_dict
    config.train.batch_size = int(batch or spec.batch or config.train.batch_size)
    config.train.accum_steps = 1  # one step = one micro-batch of pairs
    config.train.dpo_chosen_weight = 0.0  # PSAlign's loss, which every contestant computes
    config.data.resolution = spec.resolution
    unet = UNetConfig.from_diffusers_config(unet_dict)
    return BenchShape(name, config, unet, vae, tuple(dict(t) for t in texts), spec.resolution)


def random_params(abstract: Any, seed: int = 0) -> Any:
    """Host (numpy) weights for an abstract param tree: kernels ``U(+-1/sqrt(fan_in))`` (as
    PyTorch initialises them, so activations stay in range), biases 0, norm scales 1, embeddings
    ``N(0, 0.02)``. Fast for billions of weights, and the same on every machine."""
    import jax

    rng = np.random.default_rng(seed)

    def leaf(path, x):
        shape, name = tuple(x.shape), str(getattr(path[-1], "key", path[-1]))
        if name == "kernel":
            bound = 1.0 / np.sqrt(max(1, int(np.prod(shape[:-1]))))
            value = (rng.random(shape, np.float32) * 2 - 1) * np.float32(bound)
        elif name == "embedding":
            value = rng.standard_normal(shape, np.float32) * np.float32(0.02)
        elif name == "scale":
            value = np.ones(shape, np.float32)
        else:
            value = np.zeros(shape, np.float32)
        return value.astype(x.dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract)
