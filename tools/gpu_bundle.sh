#!/usr/bin/env bash
# Download the wheels the GPU check needs and the borrowed GPU machine lacks (Python 3.12,
# manylinux x86-64) into .gpu_bundle/, then check them: every dependency on the machine or in the
# bundle, and bundle + the files that travel with the checkout under 60 MiB. docs/gpu.md.
#
#   bash tools/gpu_bundle.sh            # downloads what is missing, then checks (exit 1: failed)
#   GPU_BUNDLE=DIR PYTHON=python3 bash tools/gpu_bundle.sh
#
# Needs a python3 with pip and a package registry; the GPU machine itself needs neither.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUNDLE=${GPU_BUNDLE:-.gpu_bundle}
mkdir -p "$BUNDLE"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
  manylinux1_x86_64; do platforms+=(--platform "$p"); done
while read -r req; do
  [ -n "$req" ] || continue
  name=${req%%==*}; version=${req#*==}
  if compgen -G "$BUNDLE/${name//-/_}-${version}-*.whl" >/dev/null; then
    echo "gpu bundle: $req already in $BUNDLE"
    continue
  fi
  echo "gpu bundle: downloading $req for cp312 manylinux x86-64 ..."
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d "$BUNDLE" "$req"
done < <("$PY" tools/gpu_bundle.py requirements)
exec "$PY" tools/gpu_bundle.py check --bundle "$BUNDLE"
