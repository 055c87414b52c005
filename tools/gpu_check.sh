#!/usr/bin/env bash
# The GPU check in one command, for a machine with a GPU and no network (docs/gpu.md):
#
#   bash tools/gpu_check.sh              # with .gpu_bundle/ (tools/gpu_bundle.sh) beside the code
#   bash tools/gpu_check.sh --rehearsal  # the same steps on CPU (make gpu-rehearsal runs this)
#
# 1. installs the bundle's wheels with `pip --no-index --no-deps --target` into a fresh folder
#    (nothing else is installed; that machine's python3 and its packages are used as they are);
# 2. builds, side by side, the gsplat kernels fit3d calls for this GPU's architecture only
#    (tools/gsplat_kernels.py; gsplat's own full JIT build when that fails) and fit3d's CPU
#    renderer kernels;
# 3. runs benchmarks/gpu_check.py: gpu tests, a small CUDA pipeline (random backbone weights),
#    gsplat vs CPU renderer, import audit; one table.
# Everything printed also goes to $GPU_CHECK_OUT/gpu_check.log; the table to gpu_check.txt and
# gpu_check.json there. Exit 0: all passed (or no GPU: one line); 1: a part failed; 2: bad setup.
#
# Environment: GPU_CHECK_OUT (default outputs/gpu_check), GPU_CHECK_PYTHON (default python3),
# GPU_BUNDLE (default .gpu_bundle), GPU_CHECK_SITE (where the wheels go; default a fresh
# /tmp/fit3d-gpu-site), TORCH_CUDA_ARCH_LIST (default: the GPU's own), MAX_JOBS (default: nproc).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MODE=gpu
case "${1:-}" in
  --rehearsal) MODE=rehearsal ;;
  "") ;;
  *) echo "usage: bash tools/gpu_check.sh [--rehearsal]"; exit 2 ;;
esac
OUT=${GPU_CHECK_OUT:-outputs/gpu_check}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PY=${GPU_CHECK_PYTHON:-python3}
BUNDLE=${GPU_BUNDLE:-.gpu_bundle}
export GPU_CHECK_SITE=${GPU_CHECK_SITE:-/tmp/fit3d-gpu-site}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled GPU_BUNDLE=$BUNDLE
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}
# large per-step temporaries stay in the heap (the CPU renderer is 4-5x slower otherwise)
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296}
: > "$OUT/gpu_check.log"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
T0=$SECONDS
step() { echo "[gpu-check $MODE +$((SECONDS - T0)) s] $*"; }

step "python: $(command -v "$PY" || echo "$PY not found")"
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "gpu-check: $PY cannot import torch (set GPU_CHECK_PYTHON to an interpreter with torch)"
  exit 2
fi
"$PY" -c "import sys, torch; print(f'  Python {sys.version.split()[0]}, torch {torch.__version__},', \
  f'CUDA {torch.version.cuda}, GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}')"
if [ "$MODE" = gpu ] && ! "$PY" benchmarks/gpu_check.py --has-gpu; then
  exit 0  # the one line is printed; nothing installed or run
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader | sed 's/^/  /'

shopt -s nullglob
wheels=("$BUNDLE"/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
  echo "gpu-check: no wheels in $BUNDLE: run tools/gpu_bundle.sh where pip can reach a registry" \
    "and bring $BUNDLE along"
  exit 2
fi
step "installing ${#wheels[@]} bundled wheel(s) into $GPU_CHECK_SITE (--no-index --no-deps)"
rm -rf "$GPU_CHECK_SITE"
if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target \
  "$GPU_CHECK_SITE" "${wheels[@]}"; then
  echo "gpu-check: installing the bundle failed"
  exit 2
fi
export PYTHONPATH=$GPU_CHECK_SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}
export FIT3D_IMPORT_LOG=$(mktemp -d /tmp/fit3d-gpu-imports.XXXXXX)
"$PY" -c "import gsplat; print('  gsplat', gsplat.__version__, 'from', gsplat.__file__)" || exit 2

# gsplat's kernels for this GPU (or, in the rehearsal, for FIT3D_GSPLAT_ARCH, default 9.0 = H100,
# when nvcc exists here), built while fit3d's CPU kernels build alongside
ARCH=${TORCH_CUDA_ARCH_LIST:-}
if [ "$MODE" = gpu ] && [ -z "$ARCH" ]; then
  ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
fi
[ "$MODE" = rehearsal ] && ARCH=${FIT3D_GSPLAT_ARCH:-9.0}
export TORCH_CUDA_ARCH_LIST=$ARCH
# torch takes CUDA_HOME from `which nvcc` before /usr/local/cuda; a wrapper script on the PATH
# (/usr/local/bin/nvcc) would give it a folder without the CUDA headers
if [ -z "${CUDA_HOME:-}" ]; then
  on_path=$(command -v nvcc || true)
  for c in ${on_path:+"$(dirname "$(dirname "$(readlink -f "$on_path")")")"} /usr/local/cuda; do
    if [ -x "$c/bin/nvcc" ] && [ -e "$c/include/cuda_runtime.h" ]; then export CUDA_HOME=$c; break; fi
  done
fi
NVCC=${CUDA_HOME:+$CUDA_HOME/bin/nvcc}
[ -x "${NVCC:-}" ] || NVCC=""
[ -n "$NVCC" ] && step "nvcc: $NVCC ($("$NVCC" --version | grep -o 'release [0-9.]*'))"
step "building kernels: gsplat's for sm_${ARCH/./} and fit3d's CPU renderer ($MAX_JOBS jobs)"
"$PY" -c "import torch; from fit3d.render._cpp import usable; \
  print('  fit3d CPU kernels:', 'built' if usable(torch.zeros(1)) else 'unavailable (pure torch)')" &
cpu_pid=$!
export GPU_CHECK_KERNELS
if [ -z "$NVCC" ]; then
  GPU_CHECK_KERNELS="none: no nvcc here"
  step "gsplat kernels: no nvcc (CUDA_HOME or PATH): not built$([ "$MODE" = gpu ] && echo \
    ', gsplat will try its own JIT build')"
elif "$PY" tools/gsplat_kernels.py --arch "$ARCH" --jobs "$MAX_JOBS"; then
  GPU_CHECK_KERNELS="fit3d's ops only, sm_${ARCH/./} (tools/gsplat_kernels.py)"
else
  GPU_CHECK_KERNELS="gsplat's own JIT build, all sources, sm_${ARCH/./} (the trimmed build failed)"
  step "the trimmed gsplat build failed: gsplat's own JIT build compiles at the first render"
fi
wait $cpu_pid
step "kernels done"

rc=0
if [ "$MODE" = rehearsal ]; then
  "$PY" benchmarks/gpu_check.py --out "$OUT" --rehearsal || rc=$?
else
  "$PY" benchmarks/gpu_check.py --out "$OUT" || rc=$?
fi
rm -rf "$FIT3D_IMPORT_LOG"
step "done (exit $rc); table and logs in $OUT"
exit $rc
