#!/usr/bin/env bash
# CPU rehearsal of the GPU check (make gpu-rehearsal; docs/gpu.md): a fresh venv holding only
# packages of the GPU machine's set (tools/gpu_machine.txt), pinned to its versions where pip
# offers them for this Python and the nearest version where not, then `tools/gpu_check.sh
# --rehearsal`, which installs the bundle with --no-index --no-deps exactly as on the GPU machine,
# runs the CPU parts of the check and fails when any module came from outside that set and the
# bundle.
#
# Not the GPU machine: that has Python 3.12 and torch 2.11 (CUDA 13); this uses this machine's
# python3 (3.11 here) and torch 2.14.1 (what pip here offers and what works here). Pure-Python
# wheels of the bundle (gsplat) install here unchanged; a compiled one (pycolmap) is replaced by
# the same version built for this Python, downloaded beside the bundle, and the script says so.
# Where a CUDA 13 toolkit is installed (CUDA_HOME, nvcc on the PATH or /usr/local/cuda), the
# gsplat kernels are also compiled for FIT3D_GSPLAT_ARCH (default 9.0, the H100) and imported
# through gsplat's loader, not run (~6 min more on 2 cores).
#
# Environment: PYTHON (default python3), GPU_REHEARSAL_DIR (default .gpu_rehearsal: venv, site,
# outputs), GPU_BUNDLE (default .gpu_bundle).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DIR=${GPU_REHEARSAL_DIR:-.gpu_rehearsal}
BUNDLE=${GPU_BUNDLE:-.gpu_bundle}
T0=$SECONDS
step() { echo "[gpu-rehearsal +$((SECONDS - T0)) s] $*"; }
# pip here notes every local index folder that lacks a package: hide those lines, keep the status
quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location .* is ignored" || true; }; }

step "bundle (tools/gpu_bundle.sh)"
GPU_BUNDLE=$BUNDLE PYTHON=$PY bash tools/gpu_bundle.sh
# The bundle is for the GPU machine's Python 3.12. Pure-Python wheels install here as they are;
# for a compiled one (pycolmap) the rehearsal installs the same version built for this Python.
TWINS=$DIR/bundle-here
rm -rf "$TWINS" && mkdir -p "$TWINS"
for w in "$BUNDLE"/*.whl; do
  base=$(basename "$w")
  case "$base" in
    *-py3-none-any.whl) cp "$w" "$TWINS/" ;;
    *)
      IFS=- read -r name version _ <<< "$base"
      echo "gpu-rehearsal: $base is built for cp312; using $name==$version built for this" \
        "Python instead (downloaded into $TWINS, not part of the bundle)"
      quiet "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$TWINS" "$name==$version"
      ;;
  esac
done

step "fresh venv $DIR/venv ($("$PY" --version))"
rm -rf "$DIR/venv"
"$PY" -m venv "$DIR/venv"
VPY=$DIR/venv/bin/python
quiet "$VPY" -m pip install -q --upgrade pip
step "resolving versions against the GPU machine's (tools/gpu_machine.txt)"
"$VPY" tools/gpu_bundle.py pins --python "$VPY" > "$DIR/requirements.txt"
step "installing $(wc -l < "$DIR/requirements.txt") packages and their dependencies"
quiet "$VPY" -m pip install -q -r "$DIR/requirements.txt"
"$VPY" - <<'EOF'
import sys
from importlib import metadata
sys.path.insert(0, "tools")
from gpu_bundle import canonical, read_machine
machine = read_machine()
names = sorted({canonical(d.metadata["Name"]) for d in metadata.distributions()})
extra = [n for n in names if n not in machine]
print(f"  venv: {len(names)} distributions, {len(names) - len(extra)} of them on the machine's list")
if extra:
    print("  not on the machine's list (may not be imported; the audit checks):", ", ".join(extra))
EOF

export PATH=$PWD/$DIR/venv/bin:$PATH  # ninja for the kernel builds, as in an activated venv
GPU_CHECK_PYTHON=$VPY GPU_CHECK_OUT=$DIR/out GPU_CHECK_SITE=$PWD/$DIR/site GPU_BUNDLE=$TWINS \
  bash tools/gpu_check.sh --rehearsal
step "rehearsal passed"
