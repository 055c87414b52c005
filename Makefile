# fit3d: thin, self-documenting layer over the Python entry points. `make help` lists targets.
# Every target that needs the virtualenv creates it first, so any target works on a fresh clone.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fit3d-installed

SCENES ?= demo
BACKBONE ?= dinov2
ARGS ?=
PYTEST_ARGS ?=
DATASET ?=
DATASET_ROOT ?=

# Large per-step temporaries otherwise go back to the OS and are page-faulted in again every step
# (measured 4-5x slower on CPU); keep them in the heap for the long-running targets.
RUN_ENV := GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296
# SCHEDULE=demo: the demo preset's CPU-sized lift / fine-tune schedule under another SCENES.
SCHEDULE ?=
STAGE_ARGS = $(if $(SCHEDULE),--preset $(SCHEDULE) )--preset $(SCENES) backbone.name=$(BACKBONE) $(ARGS)

.DEFAULT_GOAL := help
.PHONY: help setup test test-other-isa lint format scenes lift finetune eval demo compare view bench gpu-check gpu-rehearsal clean

help: ## Show this help
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'
	@echo "  variables: SCENES=$(SCENES) (demo|scannetpp|colmap|nerfstudio|images|mix)  BACKBONE=$(BACKBONE)  ARGS='key.sub=value ...'"
	@echo "             SCHEDULE=demo (the demo's short lift / fine-tune schedule, e.g. with SCENES=images on a CPU)"
	@echo "             DATASET=(nyu|nyuv2|ade20k|voc2012|kitti|scannet|navi|scannet1500|nyu_normals) DATASET_ROOT=..." 

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

setup: $(STAMP) ## Create .venv, install fit3d[dev], prepare offline DINOv2 weights, build CPU kernels
	@$(PY) -m fit3d.weights --prepare
	@$(PY) -c "import torch; from fit3d.render._cpp import usable; usable(torch.zeros(1))"

test: setup ## Run the test suite (CPU, offline)
	@HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; rc=0; fi; exit $$rc

# The suite on another CPU kind's code paths: torch's own kernels, MKL, oneDNN and the C++ renderer
# (built for that target, cached apart) take AVX2 on an AVX-512 machine, as an AVX2-only CPU does,
# and SSE4.2 on an AVX2 one. Float sums then run in another order, so a test that passes only on
# one CPU's rounding fails here too. .ci/run runs it after `make test`.
HAS_AVX512 := $(shell grep -qsw avx512f /proc/cpuinfo && echo 1)
OTHER_ISA := $(if $(HAS_AVX512),ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
  ONEDNN_MAX_CPU_ISA=AVX2 FIT3D_RENDER_MARCH=x86-64-v3,ATEN_CPU_CAPABILITY=default \
  MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41 FIT3D_RENDER_MARCH=x86-64-v2)
test-other-isa: setup ## The test suite on another CPU kind's code paths (AVX2 on AVX-512; SSE on AVX2)
	@echo "code paths: $(OTHER_ISA)"
	@$(OTHER_ISA) HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; rc=0; fi; exit $$rc

lint: $(STAMP) ## ruff check + ruff format --check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP) ## Apply ruff format and safe fixes
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The demo rooms are generated only when asked for (cached by their parameters).
DEMO_SCENES = $(if $(filter demo,$(SCENES)),@$(PY) -m fit3d.scenes.demo --preset demo $(ARGS),)
# Own scenes (README "Your own scenes") are posed / undistorted once (cached, resumable).
OWN_SCENES = $(if $(filter colmap nerfstudio images mix,$(SCENES)),@$(PY) -m fit3d.scenes.own $(STAGE_ARGS),)

scenes: setup ## Generate the demo rooms, or prepare SCENES=colmap|nerfstudio|images|mix (cached)
	$(if $(OWN_SCENES),$(OWN_SCENES),@$(PY) -m fit3d.scenes.demo --preset demo $(ARGS))

lift: setup ## Stage 1: lift backbone features into per-scene 3D Gaussians
	$(DEMO_SCENES)
	$(OWN_SCENES)
	$(RUN_ENV) $(PY) -m stage1_lift $(STAGE_ARGS)

finetune: setup ## Stage 2: fine-tune the backbone on features rendered from the lifted scenes
	$(DEMO_SCENES)
	$(RUN_ENV) $(PY) -m stage2_finetune $(STAGE_ARGS)

# DATASET=nyuv2 DATASET_ROOT=/data/nyuv2: score a benchmark (README "Datasets") instead of the scenes.
EVAL_DATA = $(if $(DATASET),eval.dataset=$(DATASET) $(if $(DATASET_ROOT),eval.dataset_root=$(DATASET_ROOT)),)

eval: setup ## Evaluate original / fine-tuned / assembled / control features (DATASET=nyuv2 ...)
	$(DEMO_SCENES)
	$(RUN_ENV) $(PY) -m fit3d.eval $(STAGE_ARGS) $(EVAL_DATA)

# Each stage's wall time is printed at the end (README "What `make demo` gives" quotes them).
# HELDOUT=1 also lifts the 3 held-out rooms so stage 2 reports its masked L1 on them (~+3 min).
HELDOUT ?= 0
heldout := $(filter 1,$(HELDOUT))
comma := ,
demo: setup ## Whole pipeline on the embedded demo scenes: scenes -> lift -> finetune -> eval
	@set -e; t0=$$(date +%s); \
	echo "[1/4] demo scenes"; $(PY) -m fit3d.scenes.demo --preset demo $(ARGS); t1=$$(date +%s); \
	echo "[2/4] lift (6 train rooms$(if $(heldout),$(comma) then the 3 held-out rooms))"; \
	$(RUN_ENV) $(PY) -m stage1_lift --preset demo backbone.name=$(BACKBONE) $(ARGS); t2=$$(date +%s); \
	$(if $(heldout),$(RUN_ENV) $(PY) -m stage1_lift --preset demo backbone.name=$(BACKBONE) \
	  $(ARGS) run.name=heldout lift.split=val;) t3=$$(date +%s); \
	echo "[3/4] finetune"; $(RUN_ENV) $(PY) -m stage2_finetune --preset demo \
	  backbone.name=$(BACKBONE) $(ARGS) $(if $(heldout),finetune.val_lift_run=heldout); \
	t4=$$(date +%s); \
	echo "[4/4] eval"; $(RUN_ENV) $(PY) -m fit3d.eval --preset demo backbone.name=$(BACKBONE) $(ARGS); \
	t5=$$(date +%s); \
	echo "demo wall time: scenes $$((t1-t0)) s, lift $$((t2-t1)) s$(if $(heldout),$(comma) held-out lift $$((t3-t2)) s), finetune $$((t4-t3)) s, eval $$((t5-t4)) s, total $$((t5-t0)) s"; \
	echo "report: outputs/eval/default/results.html (make view SCENE=demo_000 to look at a lifted room)"

# VARIANTS=fit3d/full,equivariance/lora: which objective/adapter pairs (default: the five of
# fit3d.config.COMPARE_VARIANTS); the table and plot land in outputs/compare/default/.
VARIANTS ?=
compare: setup ## Stage-2 objectives x adapters from one lift, one evaluator: table + plot (README)
	$(RUN_ENV) $(PY) -m fit3d.compare $(if $(VARIANTS),--variants $(VARIANTS) )$(STAGE_ARGS)

SCENE ?= demo_000
RUN ?= default
PORT ?= 8080
view: setup ## 3D viewer of a lifted scene (+ fine-tuned feature maps once stage 2 ran): make view SCENE=demo_000
	$(PY) -m fit3d.view outputs/lift/$(RUN)/$(SCENE) --port $(PORT) \
	  $(if $(wildcard outputs/finetune/$(RUN)/backbone.safetensors),--finetune outputs/finetune/$(RUN))

bench: setup ## Speed/memory benchmarks (renderer vs baseline, fine-tuning step, full vs LoRA, evaluator memory)
	$(PY) benchmarks/raster.py
	$(PY) benchmarks/finetune.py
	$(PY) benchmarks/adapter_step.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/eval_memory.py

# No .venv needed (docs/gpu.md): the machine's python3 (or .venv's, where it exists) plus the
# bundle's wheels. Without CUDA: one line, nothing run (exit 0).
gpu-check: ## On a GPU: bundle, gsplat kernels, gpu tests, small CUDA pipeline, table (~5 min)
	@bash tools/gpu_bundle.sh && \
	  GPU_CHECK_PYTHON=$(if $(wildcard $(PY)),$(PY),$(PYTHON)) bash tools/gpu_check.sh

gpu-rehearsal: ## CPU rehearsal of gpu-check in a fresh venv of the GPU machine's packages (~20 min)
	@PYTHON=$(PYTHON) bash tools/gpu_rehearsal.sh

clean: ## Remove outputs (keeps .venv and the weights cache)
	rm -rf outputs
