#!/usr/bin/env bash
# Issue 18's GPU rows as one run on a lent device machine (H100/H200), in the order they matter:
# sd15 512 px DPO train (three contestants), sd15 sampling, sdxl 1024 px train, then sd15 train
# with cuDNN attention (psa_jax alone).
#
#   bench/gpu_wheels.sh                   # here, first: the packages the device image lacks -> .whl/
#   bench/gpu_rows.sh OUT_DIR             # on the GPU machine (repository root; carry .whl)
#   bench/gpu_rows.sh OUT_DIR --tiny      # the same rows at the tiny shape, this environment as is
#   bench/gpu_rows.sh OUT_DIR --rehearse  # tiny rows after the same install from .whl/ (run with
#                                         # PYTHON= an environment holding only the image's packages)
#
# Each row writes OUT_DIR/<row>.json (psa-jax bench --json, rewritten after each contestant, so
# a row cut off keeps the contestants it finished) and <row>.log: eight files, what the device
# tool brings back. A row that fails or outlasts its time is recorded as failed in its log and
# the next row starts. Before any row a preflight prints (to stdout, and again at the end) the
# versions and devices, and stops the run if a module the rows import is missing or, on the GPU
# machine, JAX or torch sees no GPU: no device time is spent on rows that cannot run.
set -uo pipefail
SECONDS=0
out=${1:?usage: bench/gpu_rows.sh OUT_DIR [--tiny|--rehearse]}
mode=${2:-gpu}
case "$mode" in gpu | --tiny | --rehearse) ;;
  *) echo "unknown mode $mode (--tiny, --rehearse or nothing)" >&2; exit 2 ;; esac
# ROWS picks rows by name, run in the order given; DEADLINE (seconds from the start) cuts each
# row's timeout so the whole run ends inside one device call (600 s at most), leaving the tail
# for what the tool brings back. The default order is what matters most first.
all_rows="train_xla sample sdxl_train train_auto"
rows=${ROWS:-$all_rows}
deadline=${DEADLINE:-560}
for r in $rows; do
  case " $all_rows " in *" $r "*) ;; *) echo "unknown row $r ($all_rows)" >&2; exit 2 ;; esac
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

preflight() {
  "$py" - "$mode" <<'PY'
import importlib.metadata as md, platform, sys
print("python", platform.python_version(), sys.executable)
# What the rows import (the bench's contestants load their modules lazily).
import jax, torch, diffusers, tensorflow_datasets, grain, google.protobuf  # noqa: E401,F401
import tensorflow_metadata.proto.v0.statistics_pb2  # noqa: F401  (checks the protobuf runtime)
import psa_jax.cli.bench, psa_jax.bench.run, psa_jax.bench.jax_train  # noqa: E401,F401
import psa_jax.bench.sample, psa_jax.bench.torch_train  # noqa: E401,F401
for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "torch", "diffusers",
             "transformers", "huggingface-hub", "tensorflow-datasets", "grain", "protobuf",
             "numpy"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} (no distribution metadata)")
print("jax devices:", jax.devices(), "| torch cuda:", torch.cuda.is_available())
if sys.argv[1] == "gpu" and jax.default_backend() != "gpu":
    sys.exit(f"JAX's backend is {jax.default_backend()!r}, not gpu: no rows run")
if sys.argv[1] == "gpu" and not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device: no rows run")
PY
}
if ! pre=$(preflight 2>&1); then
  echo "$pre" | cut -c1-300
  echo "== preflight FAILED: no rows run"
  exit 1
fi
echo "$pre"

# row NAME CAP ARGS...: the bench, for at most CAP seconds (ROW_TIMEOUT overrides every CAP)
# and never past DEADLINE.
row() {
  local name=$1 left=$((deadline - SECONDS)) cap=${ROW_TIMEOUT:-$2}
  shift 2
  if [ "$left" -lt 60 ]; then
    echo "== $name SKIPPED: ${left}s left of DEADLINE=${deadline}s" | tee "$out/$name.log"
    return
  fi
  [ "$left" -gt "$cap" ] && left=$cap
  echo "== $name (timeout ${left}s): psa-jax bench $*"
  timeout -k 15 "$left" "$py" -m psa_jax.cli bench "$@" --json "$out/$name.json" \
    >"$out/$name.log" 2>&1
  local rc=$?
  if [ "$rc" -eq 0 ]; then
    tail -n 8 "$out/$name.log"
    return
  fi
  # 124: the cap or DEADLINE; the JSON, if written, holds the contestants that finished.
  [ "$rc" -eq 124 ] && rc="timed out after ${left}s"
  echo "== $name FAILED (exit $rc); the end of its log:" | tee -a "$out/$name.log"
  tail -n 20 "$out/$name.log" | cut -c1-300
}

run_row() {
  if [ "$mode" != gpu ]; then
    case "$1" in
      train_xla) row train_xla 300 --shape tiny --what train --steps 2 --warmup 0 \
        --attention xla --contestants psa_jax torch-psalign --torch-threads 1 ;;
      train_auto) row train_auto 300 --shape tiny --what train --steps 2 --warmup 0 \
        --attention auto --contestants psa_jax ;;
      sample) row sample 300 --shape tiny --what sample --steps 1 --warmup 0 --sample-steps 2 \
        --attention auto --contestants psa_jax torch-psalign --torch-threads 1 ;;
      sdxl_train) row sdxl_train 300 --shape tiny-xl --what train --steps 1 --warmup 0 \
        --attention auto --contestants psa_jax ;;
    esac
  else
    # Caps: no row may take the whole call (torch-fair's torch.compile is the likeliest to run
    # long); the JSON keeps whatever contestants finished.
    case "$1" in
      train_xla) row train_xla 270 --device gpu --shape sd15 --what train --steps 5 \
        --attention xla ;;
      train_auto) row train_auto 150 --device gpu --shape sd15 --what train --steps 5 \
        --attention auto --contestants psa_jax ;;
      sample) row sample 180 --device gpu --shape sd15 --what sample --steps 5 --attention auto ;;
      sdxl_train) row sdxl_train 240 --device gpu --shape sdxl --what train --steps 5 \
        --attention auto ;;
    esac
  fi
}

for r in $rows; do
  run_row "$r"
done
ls -l "$out"
echo "== preflight (again, for the end of the output):"
echo "$pre" | head -n 20
