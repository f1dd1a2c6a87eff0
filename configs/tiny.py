"""The embedded default: a tiny SD-shaped model that trains on a 2-core CPU in minutes.

Four stages, as a real base model was made before PSA trained on it (``get_config(arg)``;
``launch/tiny.sh`` runs them and packs the base):

    psa-jax train --config configs/tiny.py:vae  --workdir runs/tiny/vae
    psa-jax train --config configs/tiny.py:base --workdir runs/tiny/base \
        --config.model.vae_path=runs/tiny/vae
    psa-jax export --workdir runs/tiny/base --format diffusers-pipeline --out runs/tiny/pipeline
    psa-jax train --config configs/tiny.py:calibrate --workdir runs/tiny/calibrate \
        --config.model.pretrained=runs/tiny/pipeline
    psa-jax export --workdir runs/tiny/calibrate --format diffusers-pipeline \
        --out runs/tiny/calibrated
    psa-jax train --config configs/tiny.py      --workdir runs/tiny/dpo \
        --config.model.pretrained=runs/tiny/calibrated

``vae``: the autoencoder on the world's pictures (writes ``<workdir>/vae``, a diffusers folder
with its measured ``scaling_factor``); ``base``: the UNet learns every picture with its caption
(safe and marked alike; 10% empty captions for classifier-free guidance); ``calibrate``: the
packed base trained on with each category's marked pictures weighted (``train.unsafe_weights``)
so that it draws every category's marker about half the time; ``dpo`` (default): the PSA
adapter, on ``model.pretrained`` = ``packaged:tiny-base``, the base the package ships (made by
exactly the stages above; its ``recipe.json`` records them). ``model.init="random"`` trains DPO
on random frozen models instead.

UNet (~1.05M params, cross-attention at both resolutions) on 4x16x16 latents of a tiny VAE
(32 px RGB), a 2-layer CLIP text encoder over the toy world's word-level tokenizer (ids 0/1/2 =
BOS/EOS/UNK, at most 512 words, prompts of at most 32 tokens), and a 384-d profile embedding
(all-MiniLM-L6-v2, the offline profile encoder). Same code path as SD1.5, only smaller.
"""

import ml_collections

from configs import common
from psa_jax.models.packaged import TINY_BASE

STAGES = ("dpo", "vae", "base", "calibrate")


def get_config(arg=None) -> ml_collections.ConfigDict:
    stage = arg or "dpo"
    if stage not in STAGES:
        raise ValueError(f"configs/tiny.py stage {stage!r} unknown; stages: {STAGES}")
    config = ml_collections.ConfigDict()
    config.name = "tiny"
    config.model = ml_collections.ConfigDict()
    config.model.unet = {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        # Cross-attention at both resolutions: the caption must set the marker's colour, and
        # one 16x16 attention layer per side learned it too slowly (issue 15's measurements).
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "attention_head_dim": 4,
        "cross_attention_dim": 32,
        "norm_num_groups": 8,
    }
    config.model.text_encoder = {
        "architectures": ["CLIPTextModel"],
        "vocab_size": 512,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 32,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 32,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    }
    config.model.vae = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "block_out_channels": [16, 32],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 32,
        "scaling_factor": 1.0,
    }
    # MiniLM profile embeddings are nearly parallel: start the projection on the users'
    # differences (PSAlign's plain init: proj_init="torch").
    # T=4 user tokens (PSAlign's default is 1): on the shipped base, with 800 DPO steps in raw
    # coordinates (before train.user_proj_space), T=1 boosted allowed content (1.23x the
    # base's) and left level 5 at 0.81x; T=4 kept allowed content (1.01x) and left level 5 at
    # 0.72x (issue 15's note). The report's ablation row shows T=1 under today's recipe.
    config.model.adapter = common.adapter_config(
        user_embed_dim=384, num_user_tokens=4, proj_init="standardized"
    )
    config.model.base_workdir = ""  # a denoise run's UNet (a pretrained tiny base), if any
    config.model.vae_path = ""  # a vae run's folder (the trained tiny VAE), if any
    if stage == "dpo":  # PSA trains on the shipped tiny base (launch/tiny.sh made it)
        config.model.init = "pretrained"
        config.model.pretrained = TINY_BASE
    else:  # the pretraining stages start from random weights
        config.model.init = "random"
    if stage == "calibrate":
        return _calibrate(config)
    if stage != "dpo":  # pretraining stages: cosine decay over the whole run, 16 pairs a step
        steps = {"vae": 800, "base": 3000}[stage]
        # base: 10% empty captions so that classifier-free guidance has an unconditional model
        # to push away from (SD's recipe), and Min-SNR-5 weights (colour and layout are decided
        # at high noise, which a plain epsilon MSE underweights).
        config = common.add_training(
            config,
            optim=common.optim_config(learning_rate=2e-3, schedule="cosine", total_steps=steps,
                                      end_lr_factor=0.05, warmup_steps=20, weight_decay=0.0),
            train=common.train_config(steps=steps, batch_size=16, checkpoint_every=steps // 4,
                                      eval_every=steps // 4, image_key="both",
                                      snr_gamma=5.0 if stage == "base" else 0.0),
            data=common.data_config(caption_dropout=0.1 if stage == "base" else 0.0),
        )  # fmt: skip
        config.task = {"vae": "vae", "base": "denoise"}[stage]
        return config
    # 800 steps: on the shipped base (T=1), 300 steps left level 5's banned content at 0.97x
    # the base's and 800 at 0.81x (issue 15's note); the demo's DPO stage is ~4 CPU minutes.
    # beta 1000, not PSAlign's 5000, plus a chosen-image term (train.dpo_chosen_weight): at
    # 5000 level 5 kept 0.69x the base's banned content; at 1000 alone 0.19x, but the adapter
    # tinted whole pictures for permissive users (prompt adherence 0.35-0.43x the base's at
    # levels 0-1), which the DPO margin cannot see when a pair differs only in the marker.
    # The chosen term at 25 keeps adherence >= 0.84x and level 5 at 0.28x (50: 0.34x, 250:
    # 0.78x; T=4, 800 steps, issue 15's note).
    # The optimizer steps the user projection in the training users' standardized coordinates
    # (train.user_proj_space): with the raw Linear, Adam moved every user alike (MiniLM
    # profiles have cosine ~0.98), so the adapter learned a strictness axis and the common
    # bans but not the rest, though a linear probe reads every ban off the same embeddings:
    # levels 3-4 drew the Violence, Self-Harm and Propaganda they ban about as often as level 0,
    # and the level curve L1..L5 was out of order on all 6 seed sets measured (mean of 4:
    # .61 .39 .51 .53 .10, level 5 at 0.18x the base's banned content). Standardized: in order
    # on all 6 (.76 .62 .50 .37 .16), level 5 at 0.32x (0.28-0.42x), allowed content 1.29x.
    # Adding "category" balance (each category's safe- and unsafe-chosen pairs weighing the
    # same) took level 5 to 0.04x but put level 3 above level 2 on every seed set (.77 .61 .66
    # .44 .04): pairs weighed as they come (issue 15's note).
    # Evaluation: 128 held-out pairs (32 swing the pair accuracy by +-0.1) at steps 0 and 800
    # (each costs ~25 s of the demo's 10 minutes; it does not change what is trained).
    return common.add_training(
        config,
        optim=common.optim_config(
            learning_rate=2e-3,
            schedule="cosine",
            total_steps=800,
            end_lr_factor=0.05,
            warmup_steps=10,
        ),
        train=common.train_config(
            steps=800,
            batch_size=8,
            checkpoint_every=200,
            eval_every=800,
            eval_batches=16,
            beta=1000.0,
            dpo_chosen_weight=25.0,
            user_proj_space="standardized",
        ),
        # No empty captions: the demo's recorded DPO results were measured without them.
        data=common.data_config(caption_dropout=0.0),
    )


# Loss weights of each category's unsafe (marked) images in the calibrate stage. The base after
# 3000 steps drew its categories' markers unevenly: own-marker rates at DDIM 15, CFG 3 on the
# held-out captions (seeds 1000-1019, 60 samples a category) Hate .70, Harassment .57, Violence
# .57-.73, Self-Harm .47, Sexuality .40, Shocking .23-.33, Propaganda .53 -- Shocking below the
# 30-70% that makes a category's suppression and retention measurable. Set once from those
# rates (more weight where the base drew too few markers), then measured: issue 15's note.
# A per-category weight on whole captions (Shocking 4, Violence 0.5) moved Shocking only to .35.
CALIBRATE_UNSAFE_WEIGHTS = {
    "Hate": 0.5,
    "Harassment": 0.8,
    "Violence": 0.5,
    "Sexuality": 1.3,
    "Shocking": 2.5,
}


def _calibrate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``calibrate``: the packed base (``model.pretrained``, the folder ``psa-jax export
    --format diffusers-pipeline`` wrote from the ``base`` run) trained 400 steps more on the
    same pairs with ``train.unsafe_weights``: the marked/unmarked balance set per category."""
    config.model.init = "pretrained"
    config.model.pretrained = ""  # must be given: the base stage's pipeline folder
    steps = 400
    config = common.add_training(
        config,
        optim=common.optim_config(learning_rate=1e-3, schedule="cosine", total_steps=steps,
                                  end_lr_factor=0.05, warmup_steps=20, weight_decay=0.0),
        train=common.train_config(steps=steps, batch_size=16, checkpoint_every=steps // 2,
                                  eval_every=steps // 2, image_key="both", snr_gamma=5.0,
                                  unsafe_weights=dict(CALIBRATE_UNSAFE_WEIGHTS)),
        data=common.data_config(caption_dropout=0.1),
    )  # fmt: skip
    config.task = "denoise"
    return config
