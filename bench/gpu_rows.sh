#!/usr/bin/env bash
# Issue 18's GPU rows as one run on a lent device machine (H100/H200), in the order they matter:
# sd15 512 px DPO train (xla, then attention auto = cuDNN), sd15 sampling, sdxl 1024 px train.
#
#   bench/gpu_wheels.sh                   # here, first: the packages the device image lacks -> .whl/
#   bench/gpu_rows.sh OUT_DIR             # on the GPU machine (repository root; carry .whl)
#   bench/gpu_rows.sh OUT_DIR --tiny      # the same rows at the tiny shape, this environment as is
#   bench/gpu_rows.sh OUT_DIR --rehearse  # tiny rows after the same install from .whl/ (run with
#                                         # PYTHON= an environment holding only the image's packages)
#
# Each row writes OUT_DIR/<row>.json (psa-jax bench --json) and <row>.log, eight files in all
# (what the device tool brings back). A row that fails or outlasts ROW_TIMEOUT seconds is
# recorded as failed in its log and the next row starts. Before any row a preflight prints (to
# stdout: the tool brings back 8 files) the versions and devices, and stops the run if psa_jax's
# bench cannot be imported or, on the GPU machine, JAX sees no GPU: no device time is spent on
# rows that cannot run.
set -uo pipefail
out=${1:?usage: bench/gpu_rows.sh OUT_DIR [--tiny|--rehearse]}
mode=${2:-gpu}
case "$mode" in gpu | --tiny | --rehearse) ;; *) echo "unknown mode $mode (--tiny, --rehearse or nothing)" >&2; exit 2 ;; esac
# ROWS picks rows by name, run in the order given; DEADLINE (seconds from the start) cuts each
# row's timeout so the whole run ends inside one device call (600 s at most), leaving the tail
# for what the tool brings back. The default order is what matters most first.
rows=${ROWS:-train_xla sample sdxl_train train_auto}
deadline=${DEADLINE:-560}
for r in $rows; do
  case "$r" in train_xla | train_auto | sample | sdxl_train) ;;
    *) echo "unknown row $r (train_xla train_auto sample sdxl_train)" >&2; exit 2 ;; esac
done
mkdir -p "$out"
py=${PYTHON:-python3}
if [ "$mode" != --tiny ]; then
  site=${SITE:-/tmp/site}
  if [ -d .whl ]; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" .whl/*.whl || exit 1
  else
    echo "no .whl/ here: run bench/gpu_wheels.sh first and carry .whl" >&2
  fi
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false

"$py" - "$mode" <<'PY' || exit 1
import importlib.metadata as md, platform, sys
print("python", platform.python_version(), sys.executable)
import jax, psa_jax.bench.run, psa_jax.cli.bench, diffusers, torch  # noqa: E401,F401
for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "torch", "diffusers",
             "transformers", "huggingface-hub", "tensorflow-datasets", "grain", "numpy"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} (no distribution metadata)")
print("jax devices:", jax.devices(), "| torch cuda:", torch.cuda.is_available())
if sys.argv[1] == "gpu" and jax.default_backend() != "gpu":
    sys.exit(f"JAX's backend is {jax.default_backend()!r}, not gpu: no rows run")
PY

row() {
  local name=$1 left
  shift
  left=$((deadline - SECONDS))
  if [ "$left" -lt 60 ]; then
    echo "== $name SKIPPED: ${left}s left of DEADLINE=${deadline}s" | tee "$out/$name.log"
    return
  fi
  [ "$left" -gt "${ROW_TIMEOUT:-600}" ] && left=${ROW_TIMEOUT:-600}
  echo "== $name (timeout ${left}s): psa-jax bench $*"
  if timeout "$left" "$py" -m psa_jax.cli bench "$@" --json "$out/$name.json" \
    >"$out/$name.log" 2>&1; then
    tail -n 8 "$out/$name.log"
  else
    echo "== $name FAILED (exit $?); the end of its log:" | tee -a "$out/$name.log"
    tail -n 20 "$out/$name.log"
  fi
}

run_row() {
  if [ "$mode" != gpu ]; then
    case "$1" in
      train_xla) row train_xla --shape tiny --what train --steps 2 --warmup 0 --attention xla \
        --contestants psa_jax torch-psalign --torch-threads 1 ;;
      train_auto) row train_auto --shape tiny --what train --steps 2 --warmup 0 \
        --attention auto --contestants psa_jax ;;
      sample) row sample --shape tiny --what sample --steps 1 --warmup 0 --sample-steps 2 \
        --attention auto --contestants psa_jax torch-psalign --torch-threads 1 ;;
      sdxl_train) row sdxl_train --shape tiny-xl --what train --steps 1 --warmup 0 \
        --attention auto --contestants psa_jax ;;
    esac
  else
    case "$1" in
      train_xla) row train_xla --shape sd15 --what train --steps 5 --attention xla ;;
      train_auto) row train_auto --shape sd15 --what train --steps 5 --attention auto \
        --contestants psa_jax ;;
      sample) row sample --shape sd15 --what sample --steps 5 --attention auto ;;
      sdxl_train) row sdxl_train --shape sdxl --what train --steps 5 --attention auto ;;
    esac
  fi
}

for r in $rows; do
  run_row "$r"
done
ls -l "$out"
