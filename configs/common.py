"""Pieces shared by every config: mesh, logical-axis rules, adapter defaults.

Modules name their weight axes logically ("embed", "heads", "mlp", "conv_out", ...); these rules
say which mesh axis each one is sharded over (MaxText style). Change sharding here, not in code.
"""

import dataclasses

import ml_collections

from psa_jax.data.toy_scenes import ToyWorldConfig
from psa_jax.train import optim


def mesh_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            # -1: all remaining devices. data x fsdp x tensor must equal the device count.
            "shape": {"data": -1, "fsdp": 1, "tensor": 1},
            "logical_axis_rules": [
                ["act_batch", ["data", "fsdp"]],
                ["embed", "fsdp"],
                ["heads", "tensor"],
                ["mlp", "tensor"],
                ["conv_in", None],
                ["conv_out", "tensor"],
                ["norm", None],
                ["user_embed", None],
                ["vocab", None],
            ],
        }
    )


def adapter_config(
    user_embed_dim: int, num_user_tokens: int = 1, proj_init: str = "torch"
) -> ml_collections.ConfigDict:
    """PSA adapter: profile embedding size D, user tokens T, default scale, and how the user
    projection starts: ``"torch"`` (PSAlign: PyTorch's Linear init) or ``"standardized"`` (the
    training users' per-feature mean/std folded in; see adapter.standardize_projection)."""
    return ml_collections.ConfigDict(
        {
            "user_embed_dim": user_embed_dim,
            "num_user_tokens": num_user_tokens,
            "user_scale": 1.0,
            "proj_init": proj_init,
        }
    )


def noise_config(prediction_type: str = "epsilon") -> ml_collections.ConfigDict:
    """DDPM forward process of SD1.x/SDXL training (diffusers' scheduler_config.json keys)."""
    return ml_collections.ConfigDict(
        {
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "num_train_timesteps": 1000,
            "prediction_type": prediction_type,
        }
    )


def data_config(**overrides) -> ml_collections.ConfigDict:
    """Where pairs and profiles come from (see psa_jax/data/prepare.py)."""
    cfg = ml_collections.ConfigDict(
        {
            "source": "toy",  # "toy" (Sage-mini, generated) or a Sage-format / built folder
            "cache_dir": "",  # "": $PSA_JAX_CACHE or ~/.cache/psa_jax
            "users_csv": "",  # "": the toy world's users (toy) / required for "minilm"
            "embeddings": "minilm",  # "minilm" (offline, computed) or an embed-profiles folder
            "train_split": "train",
            "eval_split": "test_seen",  # held-out captions of seen users; "" = no eval
            "resolution": ml_collections.config_dict.placeholder(int),
            "skip_bad": False,
            "flip": True,
            # "joint": chosen and rejected mirrored alike, so a pair still differs only in its
            # content (Sage-mini: the marker); "independent": each image on its own, as
            # PSAlign's SageDataset transforms them.
            "flip_pair": "joint",
            # share of captions replaced by "" (PSAlign's --proportion_empty_prompts, 0.2), so
            # classifier-free guidance keeps an unconditional model
            "caption_dropout": 0.2,
            "num_threads": 2,
            "toy": dataclasses.asdict(ToyWorldConfig()),  # the generated world's size
        }
    )
    cfg.update(overrides)
    return cfg


def optim_config(**overrides) -> ml_collections.ConfigDict:
    """Optimizer (psa_jax/train/optim.py): AdamW or Adafactor, schedule, clipping; unknown keys
    are errors."""
    return optim.optim_config(**overrides)


def train_config(**overrides) -> ml_collections.ConfigDict:
    """Loop, batch, DPO and checkpoint settings shared by every task."""
    cfg = ml_collections.ConfigDict(
        {
            "steps": 1000,
            "batch_size": 8,  # global pairs (dpo) / images (denoise) per micro-batch
            "accum_steps": 1,  # micro-batches per optimizer step
            "beta": 5000.0,  # Diffusion-DPO beta (PSAlign)
            # task=dpo: weight of mean(mse_w - ref_w) added to the DPO loss (0: PSAlign's loss)
            "dpo_chosen_weight": 0.0,
            # task=dpo on Sage-mini: "category" weighs each category's safe-chosen and
            # unsafe-chosen pairs equally (train.step.balanced_pair_weights); "none": PSAlign's
            "dpo_balance": "none",
            # task=dpo: "standardized" runs the optimizer on the user projection as if it took
            # the training users' standardized embeddings (optim.in_standardized_coordinates);
            # the saved Linear is the same kind either way. "raw": PSAlign's.
            "user_proj_space": "raw",
            "checkpoint_every": 100,
            "keep_checkpoints": 3,
            "async_checkpoint": True,
            "eval_every": 100,
            "eval_batches": 4,
            "eval_batch_size": 8,
            "eval_draws": 8,  # (noise, timestep) draws averaged per held-out pair (pair_acc)
            "progress": True,
            "denoise_target": "unet",  # task=denoise: "unet" (full) or "lora"
            "image_key": "chosen",  # task=denoise: "chosen", "rejected" or "both"
            "snr_gamma": 0.0,  # task=denoise: Min-SNR-gamma loss weights (0: plain MSE)
            # task=denoise on Sage-mini: {category: loss weight of a pair's unsafe image} (its
            # safe one and unlisted categories: 1.0)
            "unsafe_weights": {},
            "vae_kl_weight": 1e-6,  # task=vae: KL weight next to the reconstruction MSE
            "lora": {
                "rank": 4,
                "alpha": 4.0,
                "targets": ["to_q", "to_k", "to_v", "to_out.0"],
            },
        }
    )
    cfg.update(overrides)
    return cfg


def add_training(
    config: ml_collections.ConfigDict,
    *,
    optim: ml_collections.ConfigDict,
    train: ml_collections.ConfigDict,
    data: ml_collections.ConfigDict,
    text_layer: str = "last",
    dtype: str = "float32",
) -> ml_collections.ConfigDict:
    """The sections every trainable config has besides ``model.unet``/``model.adapter``."""
    model = config.model
    # init_adapter (task=dpo): "" = a fresh adapter (model.adapter.proj_init); else an adapter
    # file (PSAlign, diffusers IP-Adapter) or a dpo run folder to start from.
    # attention: "xla" | "cudnn" | "auto" (models.layers.ATTENTION_IMPLS). "auto" picks cuDNN's
    # flash attention on a CUDA GPU for bf16/fp16 heads up to 128 wide; XLA until measured on
    # a GPU (issue 18: `psa-jax bench --attention auto`).
    for key, value in (("dtype", dtype), ("init_seed", 0), ("pretrained", ""),
                       ("base_workdir", ""), ("vae_path", ""), ("remat_policy", "none"),
                       ("text_layer", text_layer), ("init_adapter", ""),
                       ("attention", "xla")):  # fmt: skip
        if key not in model:
            model[key] = value
    config.task = "dpo"
    config.noise = noise_config()
    config.data = data
    config.optim = optim
    config.train = train
    config.mesh = mesh_config()
    config.seed = 0
    return config
