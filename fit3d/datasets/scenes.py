"""Posed scenes as an `EvalSet`: the generated demo rooms and ScanNet++ DSLR (undistorted).

Both are read with `fit3d.scenes.open_scene` (layout: `fit3d.scenes.scannetpp`). A split is a
scene list, `<root>/splits/<name>.txt` (`train` / `val` name `train_split` / `val_split`); every
view of every listed scene is a sample (`max_views` keeps that many evenly spaced views per
scene), keyed `<scene>/<image name>` and grouped by scene. Ground truth comes from the `gt_*`
folders beside the images: the demo generator writes them, for ScanNet++
`python -m fit3d.datasets.scannetpp_labels` renders them from the scan meshes.
The anonymisation mask is the `eval_mask`.

Classes: demo -> `<root>/classes.json`; ScanNet++ -> `SCANNETPP_CLASSES`, the 100 classes of the
official semantic benchmark (toolkit `metadata/semantic_benchmark/top100.txt`, in that order, as
FiT3D's ScanNet++ segmentation config lists them). Depth range: ScanNet++ 20 m (FiT3D's config),
demo 10 m.
"""

from __future__ import annotations

from pathlib import Path

from fit3d.datasets.base import (
    EvalSet,
    PaperNumbers,
    Sample,
    ViewInfo,
    check_split,
    evenly_spaced,
    missing,
    require_dir,
)
from fit3d.errors import UserError
from fit3d.scenes.scannetpp import GET_SCANNETPP, GT_DIRS, Scene, list_scenes, open_scene

SCANNETPP_CLASSES: tuple[str, ...] = (
    "wall", "ceiling", "floor", "table", "door", "ceiling lamp", "cabinet", "blinds", "curtain",
    "chair", "storage cabinet", "office chair", "bookshelf", "whiteboard", "window", "box",
    "window frame", "monitor", "shelf", "doorframe", "pipe", "heater", "kitchen cabinet", "sofa",
    "windowsill", "bed", "shower wall", "trash can", "book", "plant", "blanket", "tv",
    "computer tower", "kitchen counter", "refrigerator", "jacket", "electrical duct", "sink",
    "bag", "picture", "pillow", "towel", "suitcase", "backpack", "crate", "keyboard", "rack",
    "toilet", "paper", "printer", "poster", "painting", "microwave", "board", "shoes", "socket",
    "bottle", "bucket", "cushion", "basket", "shoe rack", "telephone", "file folder", "cloth",
    "blind rail", "laptop", "plant pot", "exhaust fan", "cup", "coat hanger", "light switch",
    "speaker", "table lamp", "air vent", "clothes hanger", "kettle", "smoke detector",
    "container", "power strip", "slippers", "paper bag", "mouse", "cutting board",
    "toilet paper", "paper towel", "pot", "clock", "pan", "tap", "jar", "soap dispenser",
    "binder", "bowl", "tissue box", "whiteboard eraser", "toilet brush", "spray bottle",
    "headphones", "stapler", "marker",
)  # fmt: skip
"""ScanNet++ semantic benchmark classes (top 100); the id of a class is its index."""

SCANNETPP_PAPER: PaperNumbers = {
    "dinov2": {
        "eval/seg/miou": (0.3019, 0.3276),
        "eval/depth/rmse": (0.3742, 0.3361),
        "eval/depth/absrel": (0.2836, 0.2401),
    },
    "dinov2_b": {"eval/seg/miou": (0.3272, 0.3619), "eval/depth/rmse": (0.3439, 0.3174)},
    "dinov2_reg": {"eval/seg/miou": (0.3092, 0.3339), "eval/depth/rmse": (0.4190, 0.3824)},
    "clip": {"eval/seg/miou": (0.2561, 0.2882), "eval/depth/rmse": (0.4324, 0.3960)},
    "mae": {"eval/seg/miou": (0.1719, 0.2027), "eval/depth/rmse": (0.4855, 0.4795)},
    "deit3": {"eval/seg/miou": (0.1862, 0.2298), "eval/depth/rmse": (0.4350, 0.3820)},
}
"""FiT3D's ScanNet++ linear-probe numbers (original -> FiT3D), ViT-S unless the alias says B."""

LABEL_COMMAND = "python -m fit3d.datasets.scannetpp_labels --preset scannetpp"
_GT_TASKS = {"seg": "semantics", "depth": "depth", "normals": "normals"}


class ScenesSet(EvalSet):
    """Views of the scenes listed in one split file; see the module docstring.

    Args:
        root: dataset root (`<root>/data/<scene>/dslr/...`, `<root>/splits/*.txt`).
        split: `train` or `val` (the split files `train_split` / `val_split`), or the name of
            any other split file `<root>/splits/<split>.txt` (the demo's `probe_train`, `test`).
        kind: `demo` or `scannetpp` (class list, depth range, published numbers).
        resolution: image scale factor on read (ScanNet++: 0.5 = FiT3D's 876x584).
        max_views: keep at most this many evenly spaced views per scene (0 = all).
        max_scenes: keep the first this many scenes of the split (0 = all).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        kind: str = "scannetpp",
        resolution: float | None = None,
        max_views: int = 0,
        max_scenes: int = 0,
        train_split: str = "nvs_sem_train",
        val_split: str = "nvs_sem_val",
    ):
        if kind not in ("demo", "scannetpp"):
            raise UserError(f"scene set kind must be demo or scannetpp, got {kind!r}")
        where = GET_SCANNETPP if kind == "scannetpp" else "`python -m fit3d.scenes.demo`"
        self.root = Path(root)
        require_dir(self.root / "data", "a folder data/<scene_id>/dslr per scene", where)
        name = {"train": train_split, "val": val_split}.get(split, split)
        split_file = self.root / "splits" / f"{name}.txt"
        if not split_file.is_file():
            known = sorted({"train", "val"} | {f.stem for f in self.root.glob("splits/*.txt")})
            check_split(kind, split, known)
            raise missing(split_file, "one scene id per line", where)
        ids = list_scenes(self.root, split_file.stem)
        if max_scenes > 0:
            ids = ids[:max_scenes]
        if not ids:
            raise UserError(f"{split_file}: lists no scenes")
        self.name, self.split, self.kind = kind, split, kind
        if resolution is None:
            resolution = 0.5 if kind == "scannetpp" else 1.0
        self.scenes: list[Scene] = [open_scene(self.root, s, resolution) for s in ids]
        self.notes: list[str] = []
        """Why a task that some scenes label is left out of the split (one line each)."""
        self._index: list[tuple[int, int]] = [
            (si, vi)
            for si, scene in enumerate(self.scenes)
            for vi in evenly_spaced(len(scene), max_views)
        ]
        self.tasks = self._gt_tasks()
        if kind == "scannetpp":
            self.classes, self.max_depth, self.paper = SCANNETPP_CLASSES, 20.0, SCANNETPP_PAPER
        else:
            names = self.scenes[0].classes
            if names is None:
                raise missing(self.root / "classes.json", '{"classes": [names]}', where)
            self.classes, self.max_depth, self.paper = tuple(names), 10.0, {}

    def _gt_tasks(self) -> frozenset[str]:
        """Tasks whose label files exist for every scene (checked on each scene's first view)."""
        present: dict[str, list[bool]] = {t: [] for t in _GT_TASKS}
        for scene in self.scenes:
            stem = Path(scene.image_name(0)).stem
            for task, kind in _GT_TASKS.items():
                present[task].append((scene.dslr_dir / GT_DIRS[kind] / f"{stem}.png").is_file())
        tasks = set()
        for task, flags in present.items():
            if all(flags):
                tasks.add(task)
            elif any(flags):  # the other tasks stay usable: say which scene lacks this one
                lacking = self.scenes[flags.index(False)].dslr_dir / GT_DIRS[_GT_TASKS[task]]
                self.notes.append(
                    f"{lacking}: expected {task} labels like the other scenes of this split "
                    f"(render them with `{LABEL_COMMAND}`): {task} left out of this split"
                )
        if not tasks and self.kind == "scannetpp":
            gt = self.scenes[0].dslr_dir / GT_DIRS["depth"]
            raise UserError(
                f"{gt}: expected ground truth rendered from the scan mesh; run `{LABEL_COMMAND}` "
                f"(scenes.root={self.root}) first"
            )
        if "depth" in tasks:
            tasks.add("corr")  # poses + depth give the correspondence ground truth
        return frozenset(tasks)

    def __len__(self) -> int:
        return len(self._index)

    def info(self, i: int) -> ViewInfo:
        si, vi = self._index[i]
        scene = self.scenes[si]
        return ViewInfo(
            key=f"{scene.scene_id}/{scene.image_name(vi)}",
            group=scene.scene_id,
            height=scene.height(vi),
            width=scene.width(vi),
            K=scene.K(vi),
            viewmat=scene.viewmat(vi),
        )

    def _load(self, i: int) -> Sample:
        si, vi = self._index[i]
        scene = self.scenes[si]
        gt = {
            task: getattr(scene, f"load_{kind}")(vi)
            for task, kind in _GT_TASKS.items()
            if task in self.tasks
        }
        for task, value in gt.items():
            if value is None:  # e.g. an interrupted labelling run
                path = scene.dslr_dir / GT_DIRS[_GT_TASKS[task]]
                raise UserError(
                    f"{path / (Path(scene.image_name(vi)).stem + '.png')}: expected the {task} "
                    f"label of this view; finish `{LABEL_COMMAND}`"
                )
        return Sample(
            key=f"{scene.scene_id}/{scene.image_name(vi)}",
            image=scene.load_image(vi),
            seg=gt.get("seg"),
            depth=gt.get("depth"),
            normals=gt.get("normals"),
            eval_mask=scene.load_mask(vi),
            K=scene.K(vi),
            viewmat=scene.viewmat(vi),
            group=scene.scene_id,
        )
