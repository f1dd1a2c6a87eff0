#!/usr/bin/env bash
# Submit launch/slurm_gpu.sbatch with the task layout spelled out:
#   bash launch/slurm_gpu.sh [--nodes N] [--gpus-per-node G] [--per gpu|node] [--partition P]
#        [--time HH:MM:SS] [--dry-run] -- --config configs/sd15.py --workdir /shared/runs/x ...
# --per gpu (default): N*G processes, one GPU each; --per node: N processes, G GPUs each.
# --dry-run prints the sbatch command and the srun line the job would run; submits nothing.
set -euo pipefail

nodes=1 gpus=8 per=gpu partition="" time="" dry=0
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) nodes=$2; shift 2 ;;
    --gpus-per-node) gpus=$2; shift 2 ;;
    --per) per=$2; shift 2 ;;
    --partition) partition=$2; shift 2 ;;
    --time) time=$2; shift 2 ;;
    --dry-run) dry=1; shift ;;
    --) shift; break ;;
    *) echo "slurm_gpu.sh: unknown option $1 (train arguments go after --)" >&2; exit 2 ;;
  esac
done
if [ $# -eq 0 ]; then
  echo "usage: slurm_gpu.sh [options] -- <psa-jax train arguments>" >&2
  exit 2
fi
case "$per" in
  gpu) layout=(--ntasks-per-node="$gpus" --gpus-per-task=1) ;;
  node) layout=(--ntasks-per-node=1 --gpus-per-node="$gpus") ;;
  *) echo "slurm_gpu.sh: --per must be gpu or node, got $per" >&2; exit 2 ;;
esac
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cmd=(sbatch --nodes="$nodes" "${layout[@]}")
[ -n "$partition" ] && cmd+=(--partition="$partition")
[ -n "$time" ] && cmd+=(--time="$time")
cmd+=("$here/slurm_gpu.sbatch" "$@")
if [ "$dry" = 1 ]; then
  printf '+'; printf ' %q' "${cmd[@]}"; printf '\n'
  PSA_JAX_DRY_RUN=1 bash "$here/slurm_gpu.sbatch" "$@"
  exit 0
fi
exec "${cmd[@]}"
