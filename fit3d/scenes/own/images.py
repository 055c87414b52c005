"""`scenes.name=images`: plain photos, or a video, posed by structure from motion (pycolmap).

A scene folder holds photos (`.jpg .jpeg .png .bmp .tif .tiff`, any case), or one video
(`.mp4 .mov .avi .mkv .m4v .webm`). `scenes.root` is one such folder or a folder of them (named by
their folders). `scenes.frame_step` keeps every n-th photo in name order; from a video it keeps
every n-th frame (default: 2 frames per second), extracted as JPEGs.

Structure from motion, on the CPU unless pycolmap was built with CUDA, resumable at each step
(the database keeps finished images and pairs, the model is written when mapping ends):

1. SIFT features (at most `SIFT_SIZE` pixels on the long side) into `<work>/database.db`; one
   camera of `scenes.camera_model` for the whole scene (`scenes.single_camera`) or one per image.
2. Matching with geometric verification: every pair (`exhaustive`), or each image with its next
   `SEQUENTIAL_OVERLAP` images in name order and those 16, 32, 64, ... further on (`sequential`:
   videos, long walks). `scenes.matcher=auto` is exhaustive up to `EXHAUSTIVE_MAX` images.
3. Incremental mapping (COLMAP's defaults, seeded); the largest model is kept.

A scene stops with one line naming what to try when it has fewer than 2 images, when no pair of
images overlaps (no pair with `MIN_INLIERS` verified matches), or when fewer than
`scenes.min_registered` of its images register. The model is then undistorted and written like
any COLMAP workspace (`fit3d.scenes.own.colmap`); its sparse points seed the Gaussians.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import cv2
import pycolmap
from PIL import Image
from tqdm import tqdm

from fit3d.config import ScenesConfig
from fit3d.errors import UserError
from fit3d.io import atomic_path, write_json
from fit3d.scenes.own.colmap import capture_from_model
from fit3d.scenes.own.layout import Capture, Job, atomic_dir

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
VIDEO_EXTS = (".mp4", ".mov", ".avi", ".mkv", ".m4v", ".webm")
MIN_IMAGES = 2
"""Fewest images structure from motion can pose (20 or more are what a scene wants)."""
EXHAUSTIVE_MAX = 150
"""`scenes.matcher=auto` matches every pair up to this many images (11,175 pairs)."""
SEQUENTIAL_OVERLAP = 10
"""Sequential matching: each image with this many next ones (then 16, 32, 64, ... further)."""
SIFT_SIZE = 1600
"""Long side (pixels) at which SIFT features are extracted."""
MIN_INLIERS = 15
"""Verified matches that make two images overlap (COLMAP's `min_num_inliers`)."""
VIDEO_FPS = 2.0
"""Frames per second of video kept when `scenes.frame_step` is 0."""
CHUNK = 16
"""Images per feature-extraction call (the progress bar's step)."""
PAIR_CHUNK = 200
"""Image pairs per matching call (the progress bar's step)."""
ADVICE = (
    "photograph the same surfaces from many nearby viewpoints (each spot in 3 or more photos, "
    "consecutive photos sharing about two thirds of the view), avoid motion blur and bare walls"
)


def _photos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _videos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_EXTS)


def scene_dirs(root: Path) -> list[Path]:
    """The scenes under `scenes.root`: the root itself when it holds photos or a video, else its
    subfolders that do."""
    if _photos(root) or _videos(root):
        return [root]
    return sorted(d for d in root.iterdir() if d.is_dir() and (_photos(d) or _videos(d)))


@contextlib.contextmanager
def _quiet_colmap() -> Iterator[None]:
    """Only COLMAP's errors on stderr while it runs (the progress bars say the rest)."""
    old = pycolmap.logging.minloglevel
    pycolmap.logging.minloglevel = 2
    try:
        yield
    finally:
        pycolmap.logging.minloglevel = old


def _pairs(names: list[str], matcher: str) -> list[tuple[str, str]]:
    """Image pairs to match: all of them, or the sequential neighbourhoods (module docstring)."""
    n = len(names)
    if matcher == "exhaustive":
        return [(names[i], names[j]) for i in range(n) for j in range(i + 1, n)]
    out = set()
    for i in range(n):
        steps = list(range(1, SEQUENTIAL_OVERLAP + 1))
        k = 16
        while k < n:
            steps.append(k)
            k *= 2
        out |= {(names[i], names[i + s]) for s in steps if i + s < n}
    return sorted(out)


def _matcher(sc: ScenesConfig, n: int, video: bool) -> str:
    if sc.matcher != "auto":
        return sc.matcher
    return "sequential" if video or n > EXHAUSTIVE_MAX else "exhaustive"


def _frame_step(sc: ScenesConfig, fps: float | None) -> int:
    if sc.frame_step:
        return sc.frame_step
    return max(1, round(fps / VIDEO_FPS)) if fps else 1


def _check_photos(scene: Path, photos: list[Path], sc: ScenesConfig, verbose: bool) -> None:
    """Every photo decodes; with one shared camera they have one size."""
    sizes: dict[tuple[int, int], Path] = {}
    for p in tqdm(photos, desc=f"{scene.name}: check photos", unit="img", disable=not verbose):
        try:  # PIL decodes silently (libjpeg through OpenCV prints its own warnings)
            with Image.open(p) as im:
                im.load()
                sizes.setdefault(im.size, p)
        except (OSError, ValueError, Image.DecompressionBombError):
            msg = f"unreadable image {p}: not an image file, or cut short; remove it"
            raise UserError(msg) from None
    if sc.single_camera and len(sizes) > 1:
        (a, pa), (b, pb) = list(sizes.items())[:2]
        raise UserError(
            f"{scene}: photos of different sizes ({pa.name} {a[0]}x{a[1]}, {pb.name} {b[0]}x{b[1]})"
            " cannot share one camera: set scenes.single_camera=false, or keep one camera's photos"
        )


def _extract_frames(video: Path, out: Path, step: int, verbose: bool) -> list[str]:
    """Every `step`-th frame of `video` as `out/frame_<index>.jpg` (resumable: frames already
    written are kept; each is written atomically)."""
    cap = cv2.VideoCapture(str(video))
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    out.mkdir(parents=True, exist_ok=True)
    names = []
    bar = tqdm(total=total or None, desc=f"{video.name}: frames", unit="frame", disable=not verbose)
    index = 0
    while cap.grab():
        if index % step == 0:
            name = f"frame_{index:06d}.jpg"
            if not (out / name).is_file():
                ok, frame = cap.retrieve()
                if not ok:
                    break
                ok, jpeg = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 95])
                with atomic_path(out / name) as tmp:
                    tmp.write_bytes(jpeg.tobytes())
            names.append(name)
        index += 1
        bar.update(1)
    bar.close()
    cap.release()
    return names


def _too_few_registered(scene: str, k: int, n: int, unregistered: list[str]) -> UserError:
    some = ", ".join(unregistered[:3]) + (", ..." if len(unregistered) > 3 else "")
    return UserError(
        f"{scene}: only {k} of {n} images registered (unposed: {some}): {ADVICE}; or try "
        f"scenes.matcher=exhaustive, scenes.camera_model=OPENCV, or a lower scenes.min_registered"
    )


def structure_from_motion(
    scene: str,
    image_dir: Path,
    names: list[str],
    work: Path,
    sc: ScenesConfig,
    matcher: str,
    verbose: bool,
) -> pycolmap.Reconstruction:
    """Pose `names` (files under `image_dir`) with pycolmap in `work` (module docstring) and
    return the largest model; UserError when the scene cannot be posed.

    Resumable: the database keeps every image's features and every matched pair, so a rerun
    (interrupted, or with photos added) extracts and matches only what is new; a finished model
    of the same images is reused. Other feature settings start the folder again.
    """
    settings = {
        "camera_model": sc.camera_model,
        "single_camera": sc.single_camera,
        "sift_size": SIFT_SIZE,
        "pycolmap": pycolmap.__version__,
    }
    marker, model, db = work / "sfm.json", work / "model", work / "database.db"
    try:
        state = json.loads(marker.read_text())
    except (OSError, ValueError):
        state = {}
    if not isinstance(state, dict) or state.get("settings") != settings:
        shutil.rmtree(work, ignore_errors=True)
    elif state.get("model_images") == names and model.is_dir():
        return pycolmap.Reconstruction(str(model))
    work.mkdir(parents=True, exist_ok=True)
    write_json(marker, {"settings": settings})  # the model, if any, is not of these images
    mode = pycolmap.CameraMode.SINGLE if sc.single_camera else pycolmap.CameraMode.PER_IMAGE
    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = sc.camera_model
    extraction = pycolmap.FeatureExtractionOptions()
    extraction.max_image_size = SIFT_SIZE
    with _quiet_colmap():
        try:
            database = pycolmap.Database.open(db)  # creates it
            cameras = database.read_all_cameras()
            database.close()
            if sc.single_camera and cameras:  # photos added later share the scene's camera
                reader.existing_camera_id = cameras[0].camera_id
            # every image first (existing ones are kept), so chunked extraction shares one camera
            pycolmap.import_images(db, image_dir, mode, names, reader)
        except (ValueError, RuntimeError) as e:
            raise UserError(f"{scene}: cannot read the images ({str(e).splitlines()[0]})") from None
        bar = tqdm(total=len(names), desc=f"{scene}: features", unit="img", disable=not verbose)
        for k in range(0, len(names), CHUNK):
            chunk = names[k : k + CHUNK]
            pycolmap.extract_features(db, image_dir, chunk, mode, reader, extraction)  # new only
            bar.update(len(chunk))
        bar.close()
        pairs = _pairs(names, matcher)
        pair_file = work / "pairs.txt"
        options = pycolmap.ImportedPairingOptions()
        options.match_list_path = pair_file
        bar = tqdm(total=len(pairs), desc=f"{scene}: matching", unit="pair", disable=not verbose)
        for k in range(0, len(pairs), PAIR_CHUNK):
            chunk = pairs[k : k + PAIR_CHUNK]
            pair_file.write_text("".join(f"{a} {b}\n" for a, b in chunk))
            pycolmap.match_image_pairs(db, pairing_options=options)  # new pairs only
            bar.update(len(chunk))
        bar.close()
        if not _overlapping(db, names):
            hint = "" if matcher == "exhaustive" else "; or try scenes.matcher=exhaustive"
            raise UserError(
                f"{scene}: no overlap: no two of its {len(names)} images share "
                f"{MIN_INLIERS} verified feature matches: {ADVICE}{hint}"
            )
        mapping = pycolmap.IncrementalPipelineOptions()
        mapping.image_names = names
        mapping.min_model_size = MIN_IMAGES
        mapping.random_seed = 0
        pycolmap.set_random_seed(0)
        shutil.rmtree(work / "mapping", ignore_errors=True)
        bar = tqdm(total=len(names), desc=f"{scene}: mapping", unit="img", disable=not verbose)
        models = pycolmap.incremental_mapping(
            db,
            image_dir,
            work / "mapping",
            mapping,
            initial_image_pair_callback=lambda: bar.update(2),
            next_image_callback=lambda: bar.update(1),
        )
        bar.close()
        shutil.rmtree(work / "mapping", ignore_errors=True)
    best = max(models.values(), key=lambda r: r.num_reg_images(), default=None)
    k = best.num_reg_images() if best is not None else 0
    if k < MIN_IMAGES or k < sc.min_registered * len(names):
        posed = {best.images[i].name for i in best.reg_image_ids()} if best is not None else set()
        raise _too_few_registered(scene, k, len(names), [n for n in names if n not in posed])
    with atomic_dir(model) as tmp:
        best.write_binary(str(tmp))
    write_json(marker, {"settings": settings, "model_images": names})
    return best


def _overlapping(db: Path, names: list[str]) -> bool:
    """Whether some pair of `names` has `MIN_INLIERS` verified matches in the database."""
    database = pycolmap.Database.open(db)
    try:
        ids = {im.image_id for im in database.read_all_images() if im.name in set(names)}
        pair_ids, inliers = database.read_two_view_geometry_num_inliers()
    finally:
        database.close()
    for pair_id, n in zip(pair_ids, inliers, strict=True):
        a, b = pycolmap.pair_id_to_image_pair(pair_id)
        if n >= MIN_INLIERS and a in ids and b in ids:
            return True
    return False


def plan(scene: Path, sc: ScenesConfig, verbose: bool = True) -> Job:
    """Check one scene folder (enough photos, each readable; or an openable video) before any
    long work."""
    photos, videos = _photos(scene), _videos(scene)
    if not photos and not videos:
        raise UserError(
            f"{scene}: too few images: none ({', '.join(IMAGE_EXTS)}) and no video; "
            f"put 20 or more overlapping photos of the scene there"
        )
    if photos and videos:
        raise UserError(f"{scene}: holds both photos and a video; keep one of them per folder")
    if len(videos) > 1:
        raise UserError(f"{scene}: holds {len(videos)} videos; put each in a folder of its own")
    if videos:
        cap = cv2.VideoCapture(str(videos[0]))
        fps, count = cap.get(cv2.CAP_PROP_FPS), int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        ok = cap.isOpened() and cap.grab()
        cap.release()
        if not ok:
            raise UserError(f"unreadable video {videos[0]}: OpenCV cannot decode it")
        step = _frame_step(sc, fps)
        if count and (count + step - 1) // step < MIN_IMAGES:
            raise UserError(
                f"{videos[0]}: too few images: {count} frames every {step}th is fewer than "
                f"{MIN_IMAGES}; lower scenes.frame_step"
            )
        matcher = _matcher(sc, 0, video=True)

        def run_video(work: Path, verbose: bool) -> Capture:
            frames = work / "frames"
            names = _extract_frames(videos[0], frames, step, verbose)
            if len(names) < MIN_IMAGES:
                raise UserError(f"{videos[0]}: too few images: {len(names)} frames decoded")
            rec = structure_from_motion(
                scene.name, frames, names, work / "sfm", sc, matcher, verbose
            )
            return _capture(rec, frames, names, "video", step)

        return Job(scene.name, [videos[0]], run_video)
    chosen = photos[:: _frame_step(sc, None)]
    if len(chosen) < MIN_IMAGES:
        raise UserError(
            f"{scene}: too few images: {len(chosen)}; structure from motion needs {MIN_IMAGES} "
            f"or more (20 or more overlapping photos make a scene)"
        )
    names = [p.name for p in chosen]
    matcher = _matcher(sc, len(names), video=False)

    def run_photos(work: Path, verbose: bool) -> Capture:
        rec = structure_from_motion(scene.name, scene, names, work / "sfm", sc, matcher, verbose)
        return _capture(rec, scene, names, "photos", _frame_step(sc, None))

    return Job(scene.name, chosen, run_photos, lambda v: _check_photos(scene, chosen, sc, v))


def _capture(
    rec: pycolmap.Reconstruction, image_dir: Path, names: list[str], kind: str, step: int
) -> Capture:
    posed = {rec.images[i].name for i in rec.reg_image_ids()}
    info = {
        "source": "images",
        "input": kind,
        "frame_step": step,
        "images": len(names),
        "registered": len(posed),
        "unregistered": [n for n in names if n not in posed],
        "reprojection_error_px": round(rec.compute_mean_reprojection_error(), 4),
        "pycolmap": pycolmap.__version__,
    }
    return capture_from_model(rec, image_dir, None, info)
