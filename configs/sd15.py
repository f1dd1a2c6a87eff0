"""Stable Diffusion 1.5 with a PSA adapter on PSAlign's 3584-d Qwen2.5-7B profile embeddings.

    psa-jax train --config configs/sd15.py --workdir DIR --config.model.pretrained=/path/to/sd15

`model.pretrained` is a local diffusers pipeline folder (unet/, vae/, text_encoder/); nothing is
downloaded. The architecture below is diffusers' SD1.5 UNet config (859,520,964 parameters).
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
    # PSAlign's SD1.5 recipe: AdamW lr 5e-6, 500 warmup steps, 5000 steps, batch 6 x 8.
    return common.add_training(
        config,
        optim=common.optim_config(learning_rate=5e-6, warmup_steps=500),
        train=common.train_config(steps=5000, batch_size=6, accum_steps=8, checkpoint_every=500),
        data=common.data_config(source="", embeddings="", resolution=512, eval_split=""),
        dtype="bfloat16",
    )
