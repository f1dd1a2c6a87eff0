"""Stable Diffusion XL (base 1.0) with a PSA adapter on 3584-d profile embeddings.

    psa-jax train --config configs/sdxl.py --workdir DIR --config.model.pretrained=/path/to/sdxl

The architecture is diffusers' SDXL UNet config (2,567,463,684 parameters): text_time added
conditions, per-block transformer depth [1, 2, 10], linear projections, 2048-d cross-attention.
"""

import ml_collections

from configs import common


def get_config(arg=None) -> ml_collections.ConfigDict:
    del arg
    config = ml_collections.ConfigDict()
    config.name = "sdxl"
    config.model = ml_collections.ConfigDict()
    config.model.init = "pretrained"  # model.init="random": random weights (tests, smoke)
    config.model.pretrained = ""
    config.model.unet = {
        "sample_size": 128,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [320, 640, 1280],
        "layers_per_block": 2,
        "attention_head_dim": [5, 10, 20],
        "transformer_layers_per_block": [1, 2, 10],
        "use_linear_projection": True,
        "cross_attention_dim": 2048,
        "norm_num_groups": 32,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }
    config.model.adapter = common.adapter_config(user_embed_dim=3584)
    # PSAlign's SDXL recipe uses Adafactor; penultimate text states, as SDXL was trained.
    return common.add_training(
        config,
        optim=common.optim_config(name="adafactor", learning_rate=1e-5, warmup_steps=500),
        train=common.train_config(steps=5000, batch_size=4, accum_steps=8, checkpoint_every=500),
        data=common.data_config(source="", embeddings="", resolution=1024, eval_split=""),
        text_layer="penultimate",
        dtype="bfloat16",
    )
