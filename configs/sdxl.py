"""Stable Diffusion XL (base 1.0) with a PSA adapter on 3584-d profile embeddings.

    psa-jax train --config configs/sdxl.py --workdir DIR --config.model.pretrained=/path/to/sdxl

The architecture is diffusers' SDXL UNet config (2,567,463,684 parameters): text_time added
conditions, per-block transformer depth [1, 2, 10], linear projections, 2048-d cross-attention.

The recipe is PSAlign's as its launcher ran it (``launchers/train_sdxl.sh``: ``accelerate launch
--sdxl`` on ``CUDA_VISIBLE_DEVICES=0,1,2,3``): per-device batch 2 x accumulation 16 x 4 GPUs =
128 pairs per update, here ``train.batch_size`` 8 (global pairs per micro-batch) x
``accum_steps`` 16. Adafactor (``train.py`` picks it for ``--sdxl``: ``scale_parameter=False,
relative_step=False``, ``clip_threshold`` 1, weight decay 1e-2, max grad norm 1), lr 5e-6,
``constant_with_warmup`` over 500 optimizer steps, 5000 updates, a checkpoint every 500,
``beta_dpo`` 5000, bf16, 1024 px, gradient checkpointing (``train.py`` turns it on for
``--sdxl``: ``model.remat_policy="full"``, diffusers' per-block recompute), each image of a pair
flipped on its own. Empty captions: 36%, not 20%: with ``--sdxl`` the 0.2 of
``--proportion_empty_prompts`` is drawn twice, once in ``SageDataset._tokenize`` and again in
``encode_prompt_sdxl`` (1 - 0.8^2).
On fewer devices keep the product: e.g. ``--config.train.batch_size=2
--config.train.accum_steps=64`` on one GPU.
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
    config.model.remat_policy = "full"  # PSAlign checkpoints SDXL's blocks (train.py, --sdxl)
    # PSAlign's SDXL recipe (module docstring): Adafactor lr 5e-6, 500 warmup steps, 5000
    # steps, 2 x 16 x 4 GPUs = 128 pairs per update; penultimate text states, as SDXL was
    # trained.
    return common.add_training(
        config,
        optim=common.optim_config(name="adafactor", learning_rate=5e-6, warmup_steps=500),
        train=common.train_config(steps=5000, batch_size=8, accum_steps=16, checkpoint_every=500),
        data=common.data_config(
            source="",
            embeddings="",
            resolution=1024,
            eval_split="",
            flip_pair="independent",
            caption_dropout=0.36,
        ),
        text_layer="penultimate",
        dtype="bfloat16",
    )
