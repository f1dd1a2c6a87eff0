#!/usr/bin/env bash
# psa-jax train on every worker of a TPU VM slice, multi-host (jax.distributed from the TPU
# environment: `psa-jax train --distributed`).
#
#   bash launch/tpu_pod.sh --tpu NAME --zone ZONE [--accelerator v4-32] [--create]
#        [--version tpu-ubuntu2204-base] [--project P] [--src DIR] [--logs DIR] [--dry-run] \
#        -- --config configs/sd15.py --workdir gs://BUCKET/runs/x [--config.KEY=VALUE ...]
#
# Steps: create the slice if --create and it does not exist (reused otherwise); copy the source
# tree (--src, default: this checkout, as a tarball without .venv/.git/runs) to every worker and
# `pip install -e` it with its gcs extra (gcsfs, google-cloud-storage) and jax[tpu];
# run `psa-jax train --distributed ARGS` on all workers at once (--worker=all); copy each
# worker's log back to --logs (default: ./tpu_logs/NAME). --dry-run prints every command and
# runs none. The workdir must be one every worker sees: a gs:// URI (checkpoints, metrics.jsonl,
# summary.json go there; see psa_jax/core/paths.py) or a shared mount. The data cache
# (data.cache_dir, default ~/.cache/psa_jax) stays on each worker's disk: each prepares its own.
set -euo pipefail

tpu="" zone="" accelerator="v4-32" version="tpu-ubuntu2204-base" project="" create=0 dry=0
src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" logs=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tpu) tpu=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --accelerator) accelerator=$2; shift 2 ;;
    --version) version=$2; shift 2 ;;
    --project) project=$2; shift 2 ;;
    --src) src=$2; shift 2 ;;
    --logs) logs=$2; shift 2 ;;
    --create) create=1; shift ;;
    --dry-run) dry=1; shift ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown option $1 (train arguments go after --)" >&2; exit 2 ;;
  esac
done
if [ -z "$tpu" ] || [ -z "$zone" ] || [ $# -eq 0 ]; then
  echo "usage: tpu_pod.sh --tpu NAME --zone ZONE [options] -- <psa-jax train arguments>" >&2
  exit 2
fi
logs=${logs:-tpu_logs/$tpu}
gc=(gcloud compute tpus tpu-vm)
where=(--zone "$zone")
[ -n "$project" ] && where+=(--project "$project")

run() {  # print (dry run) or run one command
  if [ "$dry" = 1 ]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

if [ "$create" = 1 ]; then
  if [ "$dry" = 1 ] || ! "${gc[@]}" describe "$tpu" "${where[@]}" >/dev/null 2>&1; then
    run "${gc[@]}" create "$tpu" "${where[@]}" --accelerator-type "$accelerator" \
      --version "$version"
  fi
fi
train_cmd=$(printf ' %q' psa-jax train --distributed "$@")
# Expanded on each worker, not here: its own home and host name.
# shellcheck disable=SC2016,SC2088
remote_log='~/psa_jax_train-$(hostname).log'
tarball="${TMPDIR:-/tmp}/psa_jax_src_$tpu.tar.gz"
run tar -C "$src" --exclude=.venv --exclude=.git --exclude=runs --exclude=__pycache__ \
  -czf "$tarball" .
run "${gc[@]}" scp "$tarball" "$tpu:~/psa_jax_src.tar.gz" "${where[@]}" --worker=all
run "${gc[@]}" ssh "$tpu" "${where[@]}" --worker=all --command \
  "mkdir -p ~/psa_jax && tar -C ~/psa_jax -xzf ~/psa_jax_src.tar.gz && pip install -q -e ~/psa_jax'[gcs]' 'jax[tpu]'"
run "${gc[@]}" ssh "$tpu" "${where[@]}" --worker=all --command \
  "cd ~/psa_jax &&${train_cmd} 2>&1 | tee $remote_log"
run mkdir -p "$logs"
run "${gc[@]}" scp "$tpu:~/psa_jax_train-*.log" "$logs/" "${where[@]}" --worker=all
