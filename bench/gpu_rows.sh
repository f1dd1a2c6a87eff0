#!/usr/bin/env bash
# Issue 18's GPU rows as one run on a lent device machine (H100/H200), in the order they matter:
# sd15 512 px DPO train (xla, then attention auto = cuDNN), sd15 sampling, sdxl 1024 px train.
#
#   bench/gpu_rows.sh OUT_DIR          # on the GPU machine (from the repository root)
#   bench/gpu_rows.sh OUT_DIR --tiny   # the same rows at the tiny shape: tests this script on a CPU
#
# Each row writes OUT_DIR/<row>.json (psa-jax bench --json) and <row>.log, eight files in all
# (what the device tool brings back). A row that fails or outlasts ROW_TIMEOUT seconds is
# recorded as failed in its log and the next row starts. Python packages the machine lacks
# (diffusers, ml_collections, grain, ...) travel as wheels in .whl/ (the device README), which
# this installs to /tmp/site when present.
set -uo pipefail
out=${1:?usage: bench/gpu_rows.sh OUT_DIR [--tiny]}
mode=${2:-gpu}
case "$mode" in gpu | --tiny) ;; *) echo "unknown mode $mode (--tiny or nothing)" >&2; exit 2 ;; esac
mkdir -p "$out"
py=${PYTHON:-python3}
if [ -d .whl ] && [ "$mode" = gpu ]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false

row() {
  local name=$1
  shift
  echo "== $name: psa-jax bench $*"
  if timeout "${ROW_TIMEOUT:-300}" "$py" -m psa_jax.cli bench "$@" --json "$out/$name.json" \
    >"$out/$name.log" 2>&1; then
    tail -n 8 "$out/$name.log"
  else
    echo "== $name FAILED (exit $?); the end of its log:" | tee -a "$out/$name.log"
    tail -n 20 "$out/$name.log"
  fi
}

if [ "$mode" = --tiny ]; then
  row train_xla --shape tiny --what train --steps 2 --warmup 0 --attention xla \
    --contestants psa_jax torch-psalign --torch-threads 1
  row train_auto --shape tiny --what train --steps 2 --warmup 0 --attention auto \
    --contestants psa_jax
  row sample --shape tiny --what sample --steps 1 --warmup 0 --sample-steps 2 --attention auto \
    --contestants psa_jax torch-psalign --torch-threads 1
  row sdxl_train --shape tiny-xl --what train --steps 1 --warmup 0 --attention auto \
    --contestants psa_jax
else
  row train_xla --shape sd15 --what train --steps 5 --attention xla
  row train_auto --shape sd15 --what train --steps 5 --attention auto --contestants psa_jax
  row sample --shape sd15 --what sample --steps 2 --attention auto
  row sdxl_train --shape sdxl --what train --steps 3 --attention auto
fi
ls -l "$out"
