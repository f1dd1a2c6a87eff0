#!/usr/bin/env bash
# Fetch, as wheels, the packages in bench/gpu_wheels.txt for the device machine's python3 (3.12 by
# default), at the versions this environment has installed (the tested ones), into DEST (.whl,
# which git ignores and the device tool carries: `carry: [".whl"]`). gpu_rows.sh installs them.
#
#   bench/gpu_wheels.sh [DEST] [PYTHON_VERSION]
#
# DEST's old wheels are removed first (two versions of one package stop gpu_rows.sh's install).
# A package published only as source (promise) is built here into a pure-Python wheel; one that
# needs compiling fails by name. Run from the repository root with the project's venv:
# PYTHON=.venv/bin/python bench/gpu_wheels.sh (or with it active).
set -euo pipefail
dest=${1:-.whl}
pyver=${2:-3.12}
py=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$dest"
rm -f "$dest"/*.whl
platforms=()
# pip matches each platform tag exactly and prefers them in the order given: oldest glibc
# first, so a release with several builds gives the most portable one (the image's glibc is
# not recorded; its Python is 3.12.3).
for p in manylinux1 manylinux2014 manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 \
  manylinux_2_31 manylinux_2_34 manylinux_2_35 manylinux_2_39; do
  platforms+=(--platform "${p}_x86_64")
done
failed=()
log=$(mktemp)
while read -r name; do
  case "$name" in '' | '#'*) continue ;; esac
  version=$("$py" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name") || {
    failed+=("$name (not installed here)")
    continue
  }
  if "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" \
    --implementation cp "${platforms[@]}" -d "$dest" "$name==$version" 2>"$log"; then
    continue
  fi
  # No wheel for that Python: a source release is built here, which serves any Python 3 only
  # as a pure-Python wheel (promise is one).
  echo "$name==$version: no wheel ($(grep -m1 ERROR "$log" || echo '?')); building it here" >&2
  built=$(mktemp -d)
  if "$py" -m pip wheel -q --no-deps -w "$built" "$name==$version"; then
    for w in "$built"/*.whl; do
      case "$w" in
        *-none-any.whl) mv "$w" "$dest"/ ;;
        *) failed+=("$name==$version (built for this Python only)") ;;
      esac
    done
  else
    failed+=("$name==$version")
  fi
  rm -rf "$built"
done <"$here/gpu_wheels.txt"
rm -f "$log"
if [ ${#failed[@]} -gt 0 ]; then
  printf 'could not fetch: %s\n' "${failed[@]}" >&2
  exit 1
fi
du -sh "$dest"
ls "$dest"
