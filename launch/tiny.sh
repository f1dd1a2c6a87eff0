#!/usr/bin/env bash
# The embedded tiny world end to end on one machine: VAE -> base UNet -> PSA adapter (DPO).
#   bash launch/tiny.sh [RUN_DIR] [--config.KEY=VALUE ...]   (overrides go to the DPO stage)
# Each stage resumes from its folder, so a rerun after a kill continues where it stopped.
set -euo pipefail
run=${1:-runs/tiny}
shift || true
psa-jax train --config configs/tiny.py:vae --workdir "$run/vae"
psa-jax train --config configs/tiny.py:base --workdir "$run/base" \
  --config.model.vae_path="$run/vae"
psa-jax train --config configs/tiny.py --workdir "$run/dpo" \
  --config.model.vae_path="$run/vae" --config.model.base_workdir="$run/base" "$@"
