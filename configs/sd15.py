"""Stable Diffusion 1.5 with a PSA adapter on PSAlign's 3584-d Qwen2.5-7B profile embeddings.

    psa-jax train --config configs/sd15.py --workdir DIR --config.model.pretrained=/path/to/sd15

`model.pretrained` is a local diffusers pipeline folder (unet/, vae/, text_encoder/); nothing is
downloaded. The architecture below is diffusers' SD1.5 UNet config (859,520,964 parameters).

The recipe is PSAlign's as its launcher ran it (``launchers/train_sd15.sh``: ``accelerate launch``
on ``CUDA_VISIBLE_DEVICES=4,5,6,7``): per-device batch 6 x accumulation 8 x 4 GPUs = 192 pairs
per update, here ``train.batch_size`` 24 (global pairs per micro-batch) x ``accum_steps`` 8.
AdamW (``train.py``'s defaults: betas 0.9/0.999, eps 1e-8, weight decay 1e-2, max grad norm 1),
lr 5e-6, ``constant_with_warmup`` over 500 optimizer steps (``train.py`` passes
``500 x num_processes`` scheduler steps and accelerate steps the scheduler ``num_processes``
times per update), 5000 updates, a checkpoint every 500, ``beta_dpo`` 5000, bf16, 512 px,
20% empty captions (``--proportion_empty_prompts``' default 0.2), each image of a pair flipped
on its own (``SageDataset``'s per-image ``RandomHorizontalFlip``).
On fewer devices keep the product: e.g. ``--config.train.batch_size=6
--config.train.accum_steps=32`` on one GPU.
"""

import ml_collections

from configs import common


def get_config(arg=None) -> ml_collections.ConfigDict:
    del arg
    config = ml_collections.ConfigDict()
    config.name = "sd15"
    config.model = ml_collections.ConfigDict()
    config.model.init = "pretrained"  # model.init="random": random weights (tests, smoke)
    config.model.pretrained = ""  # local diffusers folder; required for training
    config.model.unet = {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "block_out_channels": [320, 640, 1280, 1280],
        "layers_per_block": 2,
        "attention_head_dim": 8,
        "cross_attention_dim": 768,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
    }
    config.model.adapter = common.adapter_config(user_embed_dim=3584)
    # PSAlign's SD1.5 recipe (module docstring): AdamW lr 5e-6, 500 warmup steps, 5000 steps,
    # 6 x 8 x 4 GPUs = 192 pairs per update.
    return common.add_training(
        config,
        optim=common.optim_config(learning_rate=5e-6, warmup_steps=500),
        train=common.train_config(steps=5000, batch_size=24, accum_steps=8, checkpoint_every=500),
        data=common.data_config(
            source="",
            embeddings="",
            resolution=512,
            eval_split="",
            flip_pair="independent",
            caption_dropout=0.2,
        ),
        dtype="bfloat16",
    )
