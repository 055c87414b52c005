"""The per-scene stage-1 loop: fit Gaussians (RGB) and their features (teacher) for one scene.

A plain torch loop (docs/method.md, "Stage 1: lifting"): one training view per step, RGB loss
driving geometry and densification (gsplat's DefaultStrategy), feature L1 driving only features and
decoder. Checkpoints hold everything that determines the future (parameters, optimiser and strategy
states, RNG state, step), so a killed run resumes to the same result.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from gsplat.strategy import DefaultStrategy
from gsplat.strategy.ops import reset_opa
from tqdm import tqdm

from fit3d.backbones import Backbone
from fit3d.config import Config, LiftConfig
from fit3d.gaussians import make_decoder, save_lifted_scene
from fit3d.io import atomic_path
from fit3d.lift.model import (
    activated,
    decode_at,
    feature_pixels,
    init_params,
    initial_points,
    render,
    scene_extent,
    upsample_at,
)
from fit3d.lift.teacher import teacher_tokens
from fit3d.losses import feature_cosine, masked_l1, psnr, rgb_loss, upsample
from fit3d.runs import CHECKPOINT_FILE, autocast, provenance
from fit3d.scenes import Scene, open_scene
from fit3d.viz import pca_rgb, to_uint8


class SceneUnreadable(Exception):
    """The scene cannot be lifted (empty, unreadable): skip it and record the reason."""


class LiftDiverged(Exception):
    """A non-finite loss stopped the scene; the last good checkpoint is kept."""


@dataclass
class Views:
    """Everything the loop reads from a scene, loaded once (images as 8-bit, like the files)."""

    train: list[int]
    test: list[int]
    viewmats: torch.Tensor  # [V, 4, 4] world-to-camera
    Ks: torch.Tensor  # [V, 3, 3]
    sizes: list[tuple[int, int]]  # (width, height) per view
    images: dict[int, torch.Tensor]  # view -> [H, W, 3] uint8
    masks: dict[int, torch.Tensor | None]  # view -> [H, W] bool or None

    def image(self, i: int) -> torch.Tensor:
        """[H,W,3] float in [0,1]."""
        return self.images[i].float() / 255.0


def read_views(scene: Scene, all_views: bool = False) -> Views:
    """Load cameras, images and masks of the train and test views; SceneUnreadable if unusable.
    `all_views`: fit every view, test views included (FiT3D, `lift.views=all`); the test-view
    metrics are then not held out."""
    train, test = list(scene.train_views), list(scene.test_views)
    if all_views:
        train = sorted(set(train) | set(test))
    if len(scene) == 0 or not train:
        raise SceneUnreadable("no train views")
    views = sorted(set(train) | set(test))
    images, masks = {}, {}
    for i in views:
        image = scene.load_image(i)
        if image.ndim != 3 or image.shape[-1] != 3 or image.numel() == 0:
            raise SceneUnreadable(f"view {scene.image_name(i)} has shape {tuple(image.shape)}")
        images[i] = (image.clamp(0, 1) * 255).round().to(torch.uint8)
        masks[i] = scene.load_mask(i)
    n = len(scene)
    return Views(
        train=train,
        test=test,
        viewmats=torch.stack([scene.viewmat(i) for i in range(n)]).float(),
        Ks=torch.stack([scene.K(i) for i in range(n)]).float(),
        sizes=[(scene.width(i), scene.height(i)) for i in range(n)],
        images=images,
        masks=masks,
    )


@dataclass
class SceneInput:
    """One scene to lift: cameras and images at the lifting size, the teacher's view of it, and
    where it came from (recorded in meta.json; stage 2 reads images at `resolution`)."""

    scene: Scene
    """The scene opened at the lifting resolution (`resolution` x `lift.image_scale`)."""
    views: Views
    """Its train/test views, loaded once."""
    teacher_image: Callable[[int], torch.Tensor]
    """View i as the teacher sees it: [H, W, 3] in [0, 1] at `resolution`."""
    scenes_root: Path
    resolution: float

    @classmethod
    def read(
        cls, root: Path, scene_id: str, resolution: float, image_scale: float, all_views=False
    ) -> SceneInput:
        """Open a scene for lifting; `SceneUnreadable`/`UserError` when it cannot be lifted."""
        lift_res = resolution * image_scale
        scene = open_scene(root, scene_id, lift_res)
        views = read_views(scene, all_views)
        teacher = scene if lift_res == resolution else open_scene(root, scene_id, resolution)
        return cls(scene, views, teacher.load_image, Path(root).resolve(), resolution)


def scene_seed(seed: int, scene_id: str) -> int:
    """A per-scene seed independent of scene order and sharding."""
    return (seed * 1_000_003 + zlib.crc32(scene_id.encode())) % (2**31)


def view_for_step(step: int, train: list[int], seed: int) -> int:
    """Training view of `step`: a fresh random permutation of the train views every epoch.

    Stateless (a function of seed, epoch and position), so resuming needs no sampler state.
    """
    epoch, pos = divmod(step, len(train))
    gen = torch.Generator().manual_seed(seed + 7919 * epoch)
    return train[int(torch.randperm(len(train), generator=gen)[pos])]


def make_strategy(cfg: Config, image_size: int = 0) -> DefaultStrategy:
    """gsplat's DefaultStrategy with the configured (3DGS) schedule. `lift.prune_radius_px` > 0
    (3DGS / FiT3D: 20) also prunes Gaussians whose screen radius exceeded that many pixels of
    an `image_size` (the longer side of the lifting views) since the last refinement, after the
    first opacity reset and until densification stops (gsplat's `prune_scale2d` with
    `refine_scale2d_stop_iter`; its 2D-scale split rule stays off)."""
    c = cfg.lift
    screen = c.prune_radius_px > 0 and image_size > 0
    return DefaultStrategy(
        prune_opa=c.prune_opa,
        grow_grad2d=c.grow_grad2d,
        grow_scale3d=c.grow_scale3d,
        refine_start_iter=c.refine_start,
        refine_stop_iter=c.refine_stop,
        refine_every=c.refine_every,
        reset_every=c.reset_every if c.reset_every > 0 else c.steps + 1,
        prune_scale2d=c.prune_radius_px / image_size if screen else 0.15,
        refine_scale2d_stop_iter=c.refine_stop if screen else 0,
        grow_scale2d=float("inf"),
    )


def longest_side(views: Views) -> int:
    """The longer image side (pixels) of a scene's train views: the unit of gsplat's 2D scales."""
    return max(max(views.sizes[i]) for i in views.train)


def adam(params: Any, lr: float) -> torch.optim.Adam:
    """Adam with eps 1e-15 (3DGS), fused: one kernel per step instead of ~10 tensor ops per
    parameter (the same update to float rounding; benchmarks/lift_step.py: the optimizer part of a
    demo step went 5x faster)."""
    return torch.optim.Adam(params, lr=lr, eps=1e-15, fused=True)


def make_optimizers(
    params: torch.nn.ParameterDict, cfg: Config, extent: float
) -> dict[str, torch.optim.Adam]:
    """One Adam (eps 1e-15) per parameter, as gsplat's strategies expect; means lr x extent."""
    c = cfg.lift
    lrs = {
        "means": c.lr_means * extent,
        "quats": c.lr_quats,
        "scales": c.lr_scales,
        "opacities": c.lr_opacities,
        "sh0": c.lr_sh0,
        "shN": c.lr_shN,
        "features": c.lr_features,
    }
    return {k: adam([{"params": params[k], "lr": lr, "name": k}], lr) for k, lr in lrs.items()}


def means_lr(step: int, cfg: Config, extent: float) -> float:
    """Exponential decay from lr_means to lr_means_final (x extent) over the schedule."""
    c = cfg.lift
    t = min(step / max(c.steps, 1), 1.0)
    return extent * c.lr_means * (c.lr_means_final / c.lr_means) ** t


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to(obj: Any, device: torch.device) -> Any:
    """Move tensors nested in dicts/lists to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to(v, device) for v in obj]
    return obj


@dataclass
class SceneState:
    """The trainable state of one scene: all that a checkpoint must hold."""

    params: torch.nn.ParameterDict
    decoder: torch.nn.Conv2d
    optimizers: dict[str, torch.optim.Adam]
    decoder_opt: torch.optim.Adam
    strategy_state: dict[str, Any]
    step: int
    seconds: float

    def save(self, path: Path) -> None:
        """Atomic checkpoint (CPU tensors)."""
        blob = {
            "params": {k: v.detach() for k, v in self.params.items()},
            "decoder": self.decoder.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "decoder_opt": self.decoder_opt.state_dict(),
            "strategy_state": self.strategy_state,
            "rng": _rng_state(),
            "step": self.step,
            "seconds": self.seconds,
        }
        with atomic_path(path) as tmp:
            torch.save(_to(blob, torch.device("cpu")), tmp)


def new_state(views: Views, scene: Scene, cfg: Config, embed_dim: int, device, seed: int):
    """Fresh Gaussians from the sparse points (or the frustum fallback), decoder, optimisers."""
    c = cfg.lift
    gen = torch.Generator().manual_seed(seed)
    train_vm, train_K = views.viewmats[views.train], views.Ks[views.train]
    xyz, rgb, how = initial_points(
        scene.points(),
        train_vm,
        train_K,
        [views.sizes[i] for i in views.train],
        c.max_init_points,
        c.fallback_points,
        gen,
        scene.scene_id,
    )
    extent = scene_extent(train_vm)
    params = init_params(xyz, rgb, c.feature_dim, c.sh_degree, c.init_opacity).to(device)
    decoder = make_decoder(c.feature_dim, embed_dim).to(device)
    state = SceneState(
        params=params,
        decoder=decoder,
        optimizers=make_optimizers(params, cfg, extent),
        decoder_opt=adam(decoder.parameters(), c.lr_decoder),
        strategy_state=make_strategy(cfg, longest_side(views)).initialize_state(scene_scale=extent),
        step=0,
        seconds=0.0,
    )
    return state, {"init": how, "num_init_points": len(xyz), "extent": extent}


def load_state(path: Path, cfg: Config, embed_dim: int, device) -> SceneState:
    """Rebuild a SceneState from a checkpoint and restore the RNG state it was saved with."""
    blob = torch.load(path, map_location="cpu", weights_only=False)
    params = torch.nn.ParameterDict(
        {k: torch.nn.Parameter(v.to(device)) for k, v in blob["params"].items()}
    )
    decoder = make_decoder(cfg.lift.feature_dim, embed_dim).to(device)
    decoder.load_state_dict(blob["decoder"])
    extent = blob["strategy_state"]["scene_scale"]
    optimizers = make_optimizers(params, cfg, extent)
    for k, o in optimizers.items():
        o.load_state_dict(blob["optimizers"][k])
    decoder_opt = adam(decoder.parameters(), cfg.lift.lr_decoder)
    decoder_opt.load_state_dict(blob["decoder_opt"])
    _set_rng_state(blob["rng"])
    return SceneState(
        params=params,
        decoder=decoder,
        optimizers=optimizers,
        decoder_opt=decoder_opt,
        strategy_state=_to(blob["strategy_state"], device),
        step=blob["step"],
        seconds=blob["seconds"],
    )


def backend_for(device: torch.device) -> str:
    """Renderer backend: gsplat's CUDA kernels on GPU, the pure-torch rasteriser on CPU."""
    return "gsplat" if device.type == "cuda" else "torch"


def _view(views: Views, i: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(image [H,W,3], mask [H,W] or None) of view i on device."""
    mask = views.masks[i]
    return views.image(i).to(device), None if mask is None else mask.to(device)


def _target(views: Views, teacher: dict[int, torch.Tensor], i: int, device):
    """(image [H,W,3], mask [H,W] or None, upsampled teacher [C,H,W]) of view i on device."""
    w, h = views.sizes[i]
    return *_view(views, i, device), upsample(teacher[i].to(device), h, w)


def _feature_loss(
    state: SceneState,
    feat: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor | None,
    step: int,
    seed: int,
    c: LiftConfig,
) -> torch.Tensor:
    """Masked L1 between the decoded rendered features [D, H, W] and the teacher's tokens
    [C, h, w] upsampled to H x W, at every pixel or at `lift.feature_pixels` of them (drawn per
    step from (seed, step), so a resumed run draws the same)."""
    _, h, w = feat.shape
    tokens = tokens.to(feat.device)
    pixels = feature_pixels(h, w, c.feature_pixels, seed * 7919 + step)
    if pixels is None:
        with autocast(feat.device, c.precision):  # the decoder's conv dominates a CPU step
            decoded = state.decoder(feat[None])[0]  # [C, H, W]
        target = upsample(tokens, h, w)  # [C, H, W]
    else:
        pixels = pixels.to(feat.device)
        with autocast(feat.device, c.precision):
            decoded = decode_at(feat, state.decoder.weight, pixels)[:, None]  # [C, 1, P]
        target = upsample_at(tokens, h, w, pixels)[:, None]  # [C, 1, P]
        mask = None if mask is None else mask.flatten()[pixels][None]  # [1, P]
    return masked_l1(decoded, target, mask)  # fp32 (type promotion)


@torch.no_grad()
def evaluate(state: SceneState, views: Views, teacher, cfg: Config, device) -> dict[str, Any]:
    """Held-out metrics on the test views: RGB PSNR, decoded-feature L1 and cosine (means)."""
    if not views.test:
        return {"psnr": None, "feat_l1": None, "feat_cos": None, "views": 0}
    rows = []
    for i in views.test:
        image, mask, target = _target(views, teacher, i, device)
        rgb, decoded = _render_decoded(state, views, i, cfg, device)  # [3,H,W], [C,H,W]
        rows.append(
            (
                psnr(rgb, image, mask),
                float(masked_l1(decoded, target, mask)),
                feature_cosine(decoded, target, mask),
            )
        )
    mean = np.mean(np.array(rows), axis=0)
    return {
        "psnr": float(mean[0]),
        "feat_l1": float(mean[1]),
        "feat_cos": float(mean[2]),
        "views": len(rows),
    }


@torch.no_grad()
def _render_decoded(
    state: SceneState, views: Views, i: int, cfg: Config, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render view i and decode its features: RGB [3, H, W] and decoded features [C, H, W]."""
    w, h = views.sizes[i]
    rgb, feat, _, _ = render(
        state.params,
        views.viewmats[i].to(device),
        views.Ks[i].to(device),
        w,
        h,
        cfg.lift.sh_degree,
        backend_for(device),
    )
    return rgb, state.decoder(feat[None])[0]


@torch.no_grad()
def write_pca(path: Path, state: SceneState, views: Views, teacher, cfg: Config, device) -> None:
    """pca.png: image | rendered RGB | teacher PCA | decoded rendered-feature PCA (one basis)."""
    pool = views.test or views.train
    i = pool[min(cfg.lift.pca_view, len(pool) - 1)]
    image, _, target = _target(views, teacher, i, device)
    rgb, decoded = _render_decoded(state, views, i, cfg, device)
    pcs = [to_uint8(p) for p in pca_rgb([target, decoded])]
    panel = np.concatenate([to_uint8(image), to_uint8(rgb), *pcs], axis=1)
    ok, png = cv2.imencode(".png", cv2.cvtColor(panel, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"cannot encode {path}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(png.tobytes())


def lift_scene(
    inp: SceneInput,
    backbone: Backbone,
    cfg: Config,
    out_dir: Path,
    device: torch.device,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Lift one scene into `out_dir` (resuming from its checkpoint) and return its meta.

    `on_step(step)` is called after each finished step (after any checkpoint); tests use it to
    interrupt a run. Raises LiftDiverged on a non-finite loss.
    """
    scene, views = inp.scene, inp.views
    seed = scene_seed(cfg.run.seed, scene.scene_id)
    t0 = time.perf_counter()
    with autocast(device, cfg.lift.precision):
        teacher = teacher_tokens(backbone, inp.teacher_image, sorted(views.images), device)
    teacher_seconds = time.perf_counter() - t0

    ckpt = out_dir / CHECKPOINT_FILE
    torch.manual_seed(seed)
    state, init_info = new_state(views, scene, cfg, backbone.embed_dim, device, seed)
    if ckpt.is_file():
        state = load_state(ckpt, cfg, backbone.embed_dim, device)
    _train(state, inp, teacher, cfg, device, ckpt, on_step)

    metrics = evaluate(state, views, teacher, cfg, device)
    write_pca(out_dir / "pca.png", state, views, teacher, cfg, device)
    meta = {
        "scene_id": scene.scene_id,
        "scenes_root": str(inp.scenes_root),
        "resolution": inp.resolution,
        "lift_resolution": scene.resolution,
        **provenance(backbone),
        "feature_dim": cfg.lift.feature_dim,
        "precision": cfg.lift.precision,
        "sh_degree": cfg.lift.sh_degree,
        "steps": state.step,
        "num_gaussians": len(state.params["means"]),
        "seconds": round(state.seconds + teacher_seconds, 2),
        "teacher_seconds": round(teacher_seconds, 2),
        "metrics": metrics,
        "seed": seed,
        **init_info,
        "extent": state.strategy_state["scene_scale"],
        "train_views": len(views.train),
        "test_views": len(views.test),
    }
    save_lifted_scene(out_dir, activated(state.params), state.decoder.weight, meta)
    ckpt.unlink(missing_ok=True)
    return meta


def _train(
    state: SceneState,
    inp: SceneInput,
    teacher: dict[int, torch.Tensor],
    cfg: Config,
    device: torch.device,
    ckpt: Path,
    on_step: Callable[[int], None] | None,
) -> None:
    """Run the remaining steps of `state`'s schedule (one train view per step), in place."""
    c, views, scene_id = cfg.lift, inp.views, inp.scene.scene_id
    seed = scene_seed(cfg.run.seed, scene_id)
    extent = state.strategy_state["scene_scale"]
    strategy = make_strategy(cfg, longest_side(views))
    strategy.check_sanity(state.params, state.optimizers)
    backend = backend_for(device)
    bar = tqdm(total=c.steps, initial=state.step, desc=scene_id, dynamic_ncols=True, leave=True)
    t_start = time.perf_counter() - state.seconds
    for step in range(state.step, c.steps):
        i = view_for_step(step, views.train, seed)
        w, h = views.sizes[i]
        image, mask = _view(views, i, device)
        degree = min(step // max(c.sh_degree_interval, 1), c.sh_degree)
        rgb, feat, _, info = render(
            state.params,
            views.viewmats[i].to(device),
            views.Ks[i].to(device),
            w,
            h,
            degree,
            backend,
        )
        strategy.step_pre_backward(state.params, state.optimizers, state.strategy_state, step, info)
        loss_rgb = rgb_loss(rgb, image, mask, c.ssim_weight)
        loss_feat = _feature_loss(state, feat, teacher[i], mask, step, seed, c)
        loss = loss_rgb + c.feature_weight * loss_feat
        if not torch.isfinite(loss):
            bar.close()
            kept = f"checkpoint {ckpt} kept" if ckpt.is_file() else "no checkpoint yet"
            raise LiftDiverged(f"non-finite loss ({loss.item()}) at step {step}; {kept}")
        loss.backward()
        state.optimizers["means"].param_groups[0]["lr"] = means_lr(step, cfg, extent)
        for opt in [*state.optimizers.values(), state.decoder_opt]:
            opt.step()
            opt.zero_grad(set_to_none=True)
        strategy.step_post_backward(
            state.params, state.optimizers, state.strategy_state, step, info, packed=False
        )
        # gsplat 1.5's DefaultStrategy never resets opacities (`... == 0 & step > 0` parses as a
        # chained comparison that is always False); reset here as 3DGS does (idempotent).
        if c.reset_every > 0 and 0 < step < c.refine_stop and step % c.reset_every == 0:
            reset_opa(state.params, state.optimizers, state.strategy_state, 2.0 * c.prune_opa)
        state.step = step + 1
        state.seconds = time.perf_counter() - t_start
        if step % 10 == 0 or state.step == c.steps:
            bar.set_postfix(
                loss=f"{loss.item():.4f}",
                psnr=f"{psnr(rgb.detach(), image, mask):.2f}",
                G=len(state.params["means"]),
            )
        bar.update(1)
        if c.checkpoint_every > 0 and state.step % c.checkpoint_every == 0 and state.step < c.steps:
            state.save(ckpt)
        if on_step is not None:
            on_step(state.step)
    bar.close()
