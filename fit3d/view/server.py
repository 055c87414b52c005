"""The viewer itself: a viser server showing one lifted scene (splats, cameras, feature maps).

viser serves its web client from the installed package (one self-contained HTML file) and talks
to it over a websocket on the same port, so the viewer needs no internet. Rendering happens in
the browser (WebGL), so the server needs no GPU: it only computes colours and feature maps.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fit3d.errors import UserError
from fit3d.gaussians import DECODER_FILE, GAUSSIANS_FILE, META_FILE, LiftedScene
from fit3d.runs import BACKBONE_FILE
from fit3d.view import data

COLOURINGS = ("RGB", "PCA of decoded features", "Feature query (cosine similarity)")
"""The colour switch's options, in GUI order."""
MAX_THUMBNAIL_VIEWS = 200
"""Frustums carry image thumbnails only up to this many training views (startup time)."""
PANEL_WIDTH = 320
"""Width in pixels of the selected view's image and feature maps in the GUI."""


def check_scene_folder(path: Path) -> None:
    """A `UserError` (one line) unless `path` looks like a finished lifted scene folder."""
    if not path.is_dir():
        raise UserError(f"{path} is not a folder (expected outputs/lift/<run>/<scene>)")
    if not (path / META_FILE).is_file():
        inner = sorted(p.name for p in path.iterdir() if (p / META_FILE).is_file())
        hint = f"; scenes inside: {', '.join(inner[:5])}" if inner else ""
        raise UserError(f"{path} is not a lifted scene (no {META_FILE}){hint}")
    for name in (GAUSSIANS_FILE, DECODER_FILE):
        if not (path / name).is_file():
            raise UserError(f"lifted scene {path} has no {name}")


def finetuned_weights(run_dir: Path) -> Path:
    """The fine-tuned backbone file of a stage-2 run folder (`outputs/finetune/<run>`)."""
    path = run_dir / BACKBONE_FILE if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise UserError(f"no fine-tuned backbone at {path} (expected outputs/finetune/<run>/)")
    return path


@dataclass
class Cameras:
    """The scene dataset's training views, for frustums and the selected-view panel."""

    scene: object  # fit3d.scenes.Scene
    views: list[int]  # indices of the training views
    viewmats: torch.Tensor  # [V, 4, 4] world-to-camera of `views`
    Ks: torch.Tensor  # [V, 3, 3]


def open_cameras(meta: dict, scene_dir: Path) -> tuple[Cameras | None, str]:
    """The training cameras of the scene dataset named by a lift's meta.json, or (None, why).

    A relative `scenes_root` is relative to where stage 1 ran: the working directory, else the
    folder holding `<run.out>` (three levels above `<run.out>/lift/<run>/<scene>`).
    """
    from fit3d.scenes import open_scene

    root, sid = meta.get("scenes_root"), meta.get("scene_id")
    if not root or not sid:
        return None, "meta.json names no scenes_root/scene_id: no cameras shown"
    parents = scene_dir.resolve().parents
    if not Path(root).is_absolute() and not Path(root).is_dir() and len(parents) > 3:
        if (parents[3] / root).is_dir():
            root = parents[3] / root
    try:
        scene = open_scene(root, sid, float(meta.get("resolution", 1.0)))
    except UserError as e:
        return None, f"cameras unavailable ({e})"
    views = list(scene.train_views) or list(range(len(scene)))
    viewmats, Ks = scene.cameras()
    return Cameras(scene, views, viewmats[views], Ks[views]), ""


def _fit_width(image: np.ndarray, width: int) -> np.ndarray:
    """Resize an [H, W, 3] uint8 image to `width` pixels wide (area or nearest filter)."""
    import cv2

    h, w = image.shape[:2]
    size = (width, max(1, round(h * width / w)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if w > width else cv2.INTER_NEAREST)


class Viewer:
    """One lifted scene on a viser server. `colouring` (a GUI dropdown) switches the splat colours;
    `select_view(k)` fills the selected-view panel; `query(i)` colours by similarity to
    Gaussian i. Stop with `stop()`.

    Args:
        scene_dir: `outputs/lift/<run>/<scene>`.
        finetune: optional stage-2 run folder (or its backbone.safetensors): adds the fine-tuned
            PCA feature map beside the original's.
        host, port: where to serve (viser moves to the next free port if `port` is taken).
        max_gaussians: display cap; larger scenes show their most visible Gaussians.
    """

    def __init__(
        self,
        scene_dir: str | Path,
        finetune: str | Path | None = None,
        host: str = "127.0.0.1",
        port: int = 8080,
        max_gaussians: int = 500_000,
    ):
        import viser

        from fit3d.gaussians import load_lifted_scene

        scene_dir = Path(scene_dir)
        check_scene_folder(scene_dir)
        self.finetune = finetuned_weights(Path(finetune)) if finetune else None
        lifted = load_lifted_scene(scene_dir)
        self.meta = lifted.meta
        self.notes: list[str] = []
        self._prepare_gaussians(lifted, max_gaussians)
        del lifted
        self.cameras, why = open_cameras(self.meta, scene_dir)
        if why:
            self.notes.append(why)
        self._backbones: dict[str, object] = {}
        self._lock = threading.RLock()
        self.selected_view: int | None = None
        self.query_index: int | None = None

        self.server = viser.ViserServer(host=host, port=port, verbose=False)
        self.server.gui.configure_theme(control_width="large", show_share_button=False)
        self._add_scene()
        self._add_gui()

    # --- data ------------------------------------------------------------------------------------
    def _prepare_gaussians(self, lifted: LiftedScene, max_gaussians: int) -> None:
        """Subsample for display, then precompute geometry, RGB and PCA colours and the feature
        index. Empties `lifted.gaussians` on the way, so a large scene is freed before the PCA."""
        g = lifted.gaussians
        self.total = len(g["means"])
        keep = data.display_subset(g["opacities"], g["scales"], max_gaussians)
        self.shown = len(keep)
        self.summary = data.scene_summary(lifted, self.shown)
        self.means = g["means"][keep].contiguous()  # [M, 3]
        self.scales = g["scales"][keep].contiguous()  # [M, 3]
        self.opacities = g["opacities"][keep].contiguous()  # [M]
        quats = g["quats"][keep]  # [M, 4]
        sh_dc = g["sh"][keep, :1]  # [M, 1, 3]
        features = g["features"][keep].contiguous()  # [M, D]
        g.clear()  # the whole scene's tensors are not needed any more: free them before PCA
        self.covariances = data.covariances(quats, self.scales).numpy()  # [M, 3, 3]
        weight = lifted.decoder.weight.detach()  # [C, D, 3, 3]
        self.colours = {
            COLOURINGS[0]: data.rgb_colours(sh_dc),
            COLOURINGS[1]: data.pca_colours(features, weight),
        }
        self.index = data.FeatureIndex.build(features, weight)

    # --- scene -----------------------------------------------------------------------------------
    def _add_scene(self) -> None:
        scene = self.server.scene
        self.splats = scene.add_gaussian_splats(
            "/lifted",
            centers=self.means.numpy(),
            covariances=self.covariances,
            rgbs=self.colours[COLOURINGS[0]],
            opacities=self.opacities.numpy()[:, None],
        )
        self.frustums = []
        cams = self.cameras
        if cams is None:
            centre = self.means.median(0).values.numpy()
            self.server.initial_camera.position = centre + np.array([0.0, -3.0, 1.0])
            self.server.initial_camera.look_at = centre
            return
        scene.set_up_direction(data.up_direction(cams.viewmats))
        centres = torch.linalg.inv(cams.viewmats.double())[:, :3, 3]  # [V, 3]
        spread = float((centres - centres.mean(0)).norm(dim=1).max()) if len(centres) > 1 else 1.0
        size = max(0.06 * spread, 0.02)
        thumbs = len(cams.views) <= MAX_THUMBNAIL_VIEWS
        for k, view in enumerate(tqdm(cams.views, desc="cameras", unit="view", file=sys.stdout)):
            sc = cams.scene
            h, w = sc.height(view), sc.width(view)
            wxyz, pos = data.camera_pose(cams.viewmats[k])
            image = None
            if thumbs:
                image = _fit_width(self._image(view), 96)
            frustum = scene.add_camera_frustum(
                f"/cameras/{k:04d}",
                fov=data.vertical_fov(cams.Ks[k], h),
                aspect=w / h,
                scale=size,
                thickness=1.5,
                thickness_units="screen",
                color=(40, 40, 200),
                image=image,
                wxyz=wxyz,
                position=pos,
            )
            frustum.on_click(lambda _event, k=k: self.select_view(k))
            self.frustums.append(frustum)
        # Start above the middle of the camera path, looking where the first camera looked, so
        # the scene and the frustums are in view.
        _, pos = data.camera_pose(cams.viewmats[0])
        forward = torch.linalg.inv(cams.viewmats[0].double())[:3, 2].numpy()
        depth = float(np.median((self.means.numpy() - pos) @ forward)) if self.shown else 1.0
        up = data.up_direction(cams.viewmats)
        init = self.server.initial_camera
        init.position = centres.mean(0).numpy() + up * 0.3 * spread - forward * 0.3 * spread
        init.look_at = pos + forward * max(depth, 0.1)
        init.up = up
        init.fov = data.vertical_fov(cams.Ks[0], cams.scene.height(cams.views[0]))

    def _image(self, view: int) -> np.ndarray:
        """Training image `view` as uint8 [H, W, 3]."""
        from fit3d.viz import to_uint8

        return to_uint8(self.cameras.scene.load_image(view))

    # --- GUI -------------------------------------------------------------------------------------
    def _add_gui(self) -> None:
        gui = self.server.gui
        self.summary_text = gui.add_markdown(f"**fit3d lifted scene** {self.summary}")
        for note in self.notes:
            gui.add_markdown(f"_{note}_")
        self.colouring = gui.add_dropdown("Colour", COLOURINGS, initial_value=COLOURINGS[0])
        self.colouring.on_update(lambda _e: self._recolour())
        self.centre_button = gui.add_button(
            "Query the Gaussian at the view centre",
            hint="Colour every Gaussian by cosine similarity of its decoded feature to this one",
        )
        self.centre_button.on_click(self._query_centre)
        gui.add_markdown("Or shift+click a point in the scene to query it.")
        self.server.scene.on_click(modifier="shift")(
            lambda e: self.query(self._pick(e.ray_origin, e.ray_direction))
        )
        self.query_text = gui.add_markdown("")
        self._query_marker = None
        if self.cameras is None:
            return
        with gui.add_folder("Selected view"):
            names = [self.cameras.scene.image_name(v) for v in self.cameras.views]
            self.view_choice = gui.add_dropdown("View", ["(click a camera)", *names])
            self.view_choice.on_update(self._view_chosen)
            blank = np.full((2, 3, 3), 255, np.uint8)
            self.view_image = gui.add_image(blank, label="image", visible=False)
            self.original_map = gui.add_image(
                blank, label="original PCA", format="png", visible=False
            )
            label = "fine-tuned PCA (same basis)"
            self.finetuned_map = gui.add_image(blank, label=label, format="png", visible=False)

    def _view_chosen(self, _event) -> None:
        value = self.view_choice.value
        names = [self.cameras.scene.image_name(v) for v in self.cameras.views]
        if value in names and names.index(value) != self.selected_view:
            self.select_view(names.index(value))

    # --- colouring and queries ---------------------------------------------------------------
    def _recolour(self) -> None:
        mode = self.colouring.value
        if mode == COLOURINGS[2]:
            if self.query_index is None:
                self._query_centre(None)
                return
            rgb = data.similarity_colours(self.index.similarity(self.query_index))
        else:
            rgb = self.colours[mode]
        self.splats.rgbs = rgb

    def _pick(self, origin, direction) -> int | None:
        return data.pick_along_ray(
            self.means, self.scales, self.opacities, np.asarray(origin), np.asarray(direction)
        )

    def _query_centre(self, _event) -> None:
        """Query along the view axis of the first connected client (the initial camera if none)."""
        clients = list(self.server.get_clients().values())
        if clients:
            cam = clients[0].camera
            origin, target = np.asarray(cam.position), np.asarray(cam.look_at)
        else:
            init = self.server.initial_camera
            origin, target = np.asarray(init.position), np.asarray(init.look_at)
        self.query(self._pick(origin, target - origin))

    def query(self, index: int | None) -> None:
        """Colour every Gaussian by cosine similarity to displayed Gaussian `index`."""
        if index is None:
            return
        self.query_index = int(index)
        pos = self.means[self.query_index].numpy()
        radius = max(float(self.scales[self.query_index].max()), 1e-3)
        self._query_marker = self.server.scene.add_icosphere(
            "/query", radius=radius, color=(255, 0, 255), position=pos
        )
        self.query_text.content = f"Query: Gaussian {self.query_index} at {np.round(pos, 3)}"
        if self.colouring.value != COLOURINGS[2]:
            self.colouring.value = COLOURINGS[2]  # its callback recolours
        else:
            self._recolour()

    # --- selected view -------------------------------------------------------------------------
    def _backbone(self, which: str):
        """The original or fine-tuned backbone, built on first use (CPU)."""
        from fit3d.backbones import Backbone

        if which not in self._backbones:
            name = self.meta.get("backbone", "dinov2")
            if which == "finetuned":
                weights = str(self.finetune)
            else:
                w = self.meta.get("weights") or {}
                if w.get("source") == "random":
                    weights = "random"
                else:
                    weights = w.get("path") if w.get("path") and Path(w["path"]).is_file() else None
            self._backbones[which] = Backbone(name, weights=weights)
        return self._backbones[which]

    def feature_maps(self, image: torch.Tensor) -> list[np.ndarray]:
        """PCA pictures (one basis) of the original and, if given, fine-tuned backbone's features
        of an image [H, W, 3] in [0, 1]: uint8 [h, w, 3] each."""
        from fit3d.viz import pca_rgb, to_uint8

        which = ["original"] + (["finetuned"] if self.finetune else [])
        maps = []
        with torch.no_grad():
            for w in which:
                bb = self._backbone(w)
                maps.append(bb(bb.preprocess(image[None].permute(0, 3, 1, 2)))[0])  # [C, h, w]
        return [to_uint8(p) for p in pca_rgb(maps)]

    def select_view(self, k: int) -> None:
        """Show training view k (index into `cameras.views`) and its PCA feature maps."""
        with self._lock:
            cams = self.cameras
            self.selected_view = k
            for j, f in enumerate(self.frustums):
                f.color = (255, 120, 0) if j == k else (40, 40, 200)
            image = cams.scene.load_image(cams.views[k])  # [H, W, 3]
            self.view_image.image = _fit_width(
                (image.numpy() * 255).round().astype(np.uint8), PANEL_WIDTH
            )
            self.view_image.visible = True
            pictures = self.feature_maps(image)
            self.original_map.image = _fit_width(pictures[0], PANEL_WIDTH)
            self.original_map.visible = True
            if len(pictures) > 1:
                self.finetuned_map.image = _fit_width(pictures[1], PANEL_WIDTH)
                self.finetuned_map.visible = True
            name = cams.scene.image_name(cams.views[k])
            if self.view_choice.value != name:
                self.view_choice.value = name

    @property
    def url(self) -> str:
        return f"http://{self.server.get_host()}:{self.server.get_port()}"

    def stop(self) -> None:
        self.server.stop()
