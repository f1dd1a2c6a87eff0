#!/usr/bin/env bash
# Fetch, as wheels, the packages in bench/gpu_wheels.txt for the device machine's python3 (3.12 by
# default), at the versions this environment has installed (the tested ones), into DEST (.whl,
# which git ignores and the device tool carries: `carry: [".whl"]`). gpu_rows.sh installs them.
#
#   bench/gpu_wheels.sh [DEST] [PYTHON_VERSION]
#
# DEST's old wheels are removed first (two versions of one package stop gpu_rows.sh's install).
# A package published only as source (promise) is built here into a pure-Python wheel; one that
# needs compiling fails by name. Run from the repository root with the project's venv active.
set -euo pipefail
dest=${1:-.whl}
pyver=${2:-3.12}
py=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$dest"
rm -f "$dest"/*.whl
platforms=()
# pip matches each platform tag exactly: name every manylinux tag a wheel here might carry (the
# image's glibc is not recorded; its Python is 3.12.3).
for p in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 \
  manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${p}_x86_64")
done
failed=()
while read -r name; do
  case "$name" in '' | '#'*) continue ;; esac
  version=$("$py" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name") || {
    failed+=("$name (not installed here)")
    continue
  }
  if ! "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" \
    --implementation cp "${platforms[@]}" -d "$dest" "$name==$version" 2>/dev/null; then
    # Source only: build it here; a pure-Python wheel (py3-none-any) serves any Python 3.
    "$py" -m pip wheel -q --no-deps -w "$dest" "$name==$version" || failed+=("$name==$version")
    for w in "$dest"/*.whl; do
      case "$w" in *-none-any.whl | *-cp"${pyver/./}"-* | *-abi3-*) ;; *) failed+=("$w (built for this Python)") ;; esac
    done
  fi
done <"$here/gpu_wheels.txt"
if [ ${#failed[@]} -gt 0 ]; then
  printf 'could not fetch: %s\n' "${failed[@]}" >&2
  exit 1
fi
du -sh "$dest"
ls "$dest"
