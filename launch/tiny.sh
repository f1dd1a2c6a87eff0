#!/usr/bin/env bash
# The embedded tiny world end to end on one machine:
#   VAE -> base UNet -> packed base -> calibrated base (packed) -> PSA (DPO).
#   bash launch/tiny.sh [RUN_DIR] [--config.KEY=VALUE ...]   (overrides go to the DPO stage)
# Each stage resumes from its folder, so a rerun after a kill continues where it stopped.
# The calibrated base ($run/calibrated, a diffusers StableDiffusionPipeline folder with
# recipe.json) is what the package ships as packaged:tiny-base (psa_jax/models/tiny_base): to
# refresh it, copy $run/calibrated there and run tests/test_demo.py.
set -euo pipefail
run=${1:-runs/tiny}
shift || true
psa-jax train --config configs/tiny.py:vae --workdir "$run/vae"
psa-jax train --config configs/tiny.py:base --workdir "$run/base" \
  --config.model.vae_path="$run/vae"
[ -f "$run/pipeline/model_index.json" ] ||
  psa-jax export --workdir "$run/base" --format diffusers-pipeline --out "$run/pipeline"
# The base draws some categories' markers far more often than others: the calibrate stage
# sets the marked/unmarked balance per category (configs/tiny.py:calibrate).
psa-jax train --config configs/tiny.py:calibrate --workdir "$run/calibrate" \
  --config.model.pretrained="$run/pipeline"
[ -f "$run/calibrated/model_index.json" ] ||
  psa-jax export --workdir "$run/calibrate" --format diffusers-pipeline --out "$run/calibrated"
psa-jax train --config configs/tiny.py --workdir "$run/dpo" \
  --config.model.pretrained="$run/calibrated" "$@"
