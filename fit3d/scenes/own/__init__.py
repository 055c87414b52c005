"""Your own scenes (README "Your own scenes"): COLMAP workspaces, nerfstudio folders, plain photos
or videos, prepared once into the ScanNet++ layout that every stage reads.

`prepare(cfg)` (`python -m fit3d.scenes.own`; `make scenes|lift SCENES=<source>`) reads
`scenes.root`, one scene folder or a folder of scene folders, and:

1. checks every scene's inputs (files listed exist, images decode, enough of them) before any
   long work, so a bad input stops with one line and nothing written;
2. prepares each scene not prepared yet (`fit3d.scenes.own.{colmap,nerfstudio,images}` pose it,
   `fit3d.scenes.own.layout` undistorts and writes it) into
   `<run.out>/scenes/<name>/<input>-<hash>/data/<scene>/`, atomically: a scene folder exists only
   once complete, with its provenance in `prepared.json`. A scene is prepared again when its
   inputs (names, sizes, modification times) or the `scenes` settings it depends on change;
   `images` keeps its structure-from-motion work in `work/<scene>/`, so an interrupted run, or
   one with photos added, redoes only what is new;
3. writes `splits/train.txt` (every scene not in `scenes.val_scenes`) and `splits/val.txt`, then
   the marker `own.json` last.

`prepared_root(cfg)` is the pure side (`fit3d.scenes.scenes_root`): the prepared root of a config,
checked against its marker.

A mix (`scenes.name=mix scenes.sources=[images:my_photos,colmap:/data/garden,scannetpp:,demo:]`)
prepares (own sources), generates (`demo`) or finds (`scannetpp`) each set with this config's
other `scenes` settings, then links their scenes (symlinks) into one root whose splits are the
union of theirs: one lift run, hence one fine-tune, over all of them.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from fit3d.config import Config, ScenesConfig, to_dict
from fit3d.errors import UserError
from fit3d.io import write_json
from fit3d.runs import own_scenes_dir
from fit3d.scenes.own import colmap, images, nerfstudio
from fit3d.scenes.own.layout import PREPARED_FILE, write_capture
from fit3d.scenes.scannetpp import list_scenes, read_json

SOURCES = {"colmap": colmap, "nerfstudio": nerfstudio, "images": images}
"""Own scene sources: `scenes.name` -> the module that reads them."""
MIX = "mix"
NAMES = (*SOURCES, MIX)
"""Every `scenes.name` this package prepares."""
MIXABLE = (*SOURCES, "demo", "scannetpp")
MARKER = "own.json"
"""Written last into a prepared root: the settings it was prepared with and its scenes."""
SPLIT_NAMES = ("train", "val")
"""Split files of a prepared root (the own presets' `scenes.train_split` / `val_split`)."""
SCENE_SETTINGS = ("image_size", "test_every", "frame_step", "matcher", "camera_model")
SCENE_SETTINGS += ("single_camera", "min_registered")
"""`scenes` fields a prepared scene depends on."""
WHAT = {
    "colmap": "COLMAP workspaces (images/ + sparse/0)",
    "nerfstudio": "transforms.json folders",
    "images": "photos or a video",
}


def _command(sc: ScenesConfig) -> str:
    root = f"scenes.root={sc.root}" if sc.name != MIX else f"scenes.sources={list(sc.sources)}"
    return f'`make scenes SCENES={sc.name} ARGS="{root}"` (python -m fit3d.scenes.own)'


def _settings(cfg: Config) -> dict[str, Any]:
    """What a prepared root depends on (compared with its marker)."""
    sc = to_dict(cfg)["scenes"]
    keep = (*SCENE_SETTINGS, "name", "val_scenes")
    if cfg.scenes.name == MIX:  # members may be generated demo rooms or read with any split
        keep += ("sources", "train_split", "val_split") + tuple(k for k in sc if "demo" in k)
    else:
        sc["root"] = str(Path(cfg.scenes.root).expanduser().resolve())
        keep += ("root",)
    return {k: sc[k] for k in keep}


def prepared_root(cfg: Config) -> Path:
    """The prepared root of an own scene set or mix; UserError unless its marker matches."""
    sc = cfg.scenes
    if sc.name != MIX and not sc.root:
        raise UserError(f"scenes.root is empty: set scenes.root=<folder of {WHAT[sc.name]}>")
    root = own_scenes_dir(cfg)
    try:
        marker = read_json(root / MARKER)
    except UserError:
        raise UserError(f"{sc.name} scenes not prepared in {root}: run {_command(sc)}") from None
    if not isinstance(marker, dict) or marker.get("settings") != _settings(cfg):
        raise UserError(
            f"the {sc.name} scenes in {root} were prepared with other settings: run {_command(sc)}"
        )
    return root


def _write_splits(root: Path, ids: list[str], val: tuple[str, ...]) -> None:
    unknown = sorted(set(val) - set(ids))
    if unknown:
        raise UserError(f"scenes.val_scenes names {unknown[0]}, not a scene here ({ids})")
    (root / "splits").mkdir(parents=True, exist_ok=True)
    for name, part in zip(SPLIT_NAMES, ([s for s in ids if s not in val], list(val)), strict=True):
        (root / "splits" / f"{name}.txt").write_text("".join(s + "\n" for s in part))


def _is_prepared(scene_dir: Path, record: dict[str, Any]) -> bool:
    try:
        have = read_json(scene_dir / PREPARED_FILE)
    except UserError:
        return False
    return isinstance(have, dict) and all(have.get(k) == v for k, v in record.items())


def prepare(cfg: Config, verbose: bool = True) -> Path:
    """Prepare (or find prepared) the own scene set or mix of `cfg`; returns its root."""
    sc = cfg.scenes
    if sc.name not in NAMES:
        raise UserError(f"scenes.name must be one of {list(NAMES)} here, got '{sc.name}'")
    if sc.name == MIX:
        return _prepare_mix(cfg, verbose)
    if not sc.root:
        raise UserError(f"scenes.root is empty: set scenes.root=<folder of {WHAT[sc.name]}>")
    src = Path(sc.root).expanduser()
    if not src.is_dir():
        raise UserError(f"scenes.root {src} is not a folder (of {WHAT[sc.name]})")
    module = SOURCES[sc.name]
    jobs = [module.plan(d, sc, verbose) for d in module.scene_dirs(src) or [src]]
    ids = [j.scene_id for j in jobs]
    out = own_scenes_dir(cfg)
    settings = {k: getattr(sc, k) for k in SCENE_SETTINGS}
    todo = []
    for job in jobs:
        scene_dir = out / "data" / job.scene_id
        record = {"source": sc.name, "settings": settings, "fingerprint": job.fingerprint()}
        if _is_prepared(scene_dir, record):
            if verbose:
                print(f"{job.scene_id}: prepared already ({scene_dir})")
        else:
            todo.append((job, scene_dir, record))
    for job, _, _ in todo:  # every input checked before any long work
        if job.check is not None:
            job.check(verbose)
    if todo:
        (out / MARKER).unlink(missing_ok=True)  # the set is not ready until every scene is
    for job, scene_dir, record in todo:
        t0 = time.perf_counter()
        capture = job.run(out / "work" / job.scene_id, verbose)
        record["seconds_posing"] = round(time.perf_counter() - t0, 1)
        done = write_capture(capture, scene_dir, sc.image_size, sc.test_every, record, verbose)
        if verbose:
            print(
                f"{job.scene_id}: {done['views']} views ({done['test_views']} held out), "
                f"{done['points']} sparse points, {time.perf_counter() - t0:.1f} s -> {scene_dir}"
            )
    _write_splits(out, ids, sc.val_scenes)
    write_json(out / MARKER, {"settings": _settings(cfg), "scenes": ids})
    return out


def _member_root(cfg: Config, name: str, verbose: bool) -> Path:
    """Prepare, generate or find one member of a mix (`cfg.scenes.name` is the member's)."""
    from fit3d.scenes import generate_demo_set, scenes_root

    if name in SOURCES:
        return prepare(cfg, verbose)
    if name == "demo":
        return generate_demo_set(cfg, verbose)
    return scenes_root(cfg)


def _prepare_mix(cfg: Config, verbose: bool) -> Path:
    sc = cfg.scenes
    if not sc.sources:
        raise UserError(
            "scenes.sources is empty: list the sets to mix as name:root, e.g. "
            "scenes.sources=[images:my_photos,demo:]"
        )
    members: dict[str, Path] = {}  # scene id -> its folder
    splits: dict[str, list[str]] = {s: [] for s in SPLIT_NAMES}
    for entry in sc.sources:
        name, _, root = entry.partition(":")
        if name not in MIXABLE:
            raise UserError(f"scenes.sources entry '{entry}' must be name:root, name in {MIXABLE}")
        member = replace(cfg, scenes=replace(sc, name=name, root=root, sources=(), val_scenes=()))
        base = _member_root(member, name, verbose)
        for split in SPLIT_NAMES:
            for sid in list_scenes(base, split):
                if sid in members and members[sid] != base / "data" / sid:
                    raise UserError(
                        f"scene id '{sid}' is in two mixed sets ({members[sid].parent.parent} and "
                        f"{base}): rename one of the scene folders"
                    )
                members[sid] = base / "data" / sid
                splits[split].append(sid)
    unknown = sorted(set(sc.val_scenes) - set(members))
    if unknown:
        raise UserError(f"scenes.val_scenes names {unknown[0]}, not a scene of the mixed sets")
    splits = {
        "train": [s for s in splits["train"] if s not in sc.val_scenes],
        "val": splits["val"] + [s for s in splits["train"] if s in sc.val_scenes],
    }
    out = own_scenes_dir(cfg)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)
    for link in data.iterdir():
        if link.is_symlink() and link.name not in members:
            link.unlink()
    for sid, target in members.items():
        link = data / sid
        if link.is_symlink() or link.exists():
            if link.is_symlink() and Path(os.readlink(link)) == target.resolve():
                continue
            link.unlink()
        link.symlink_to(target.resolve(), target_is_directory=True)
    (out / "splits").mkdir(exist_ok=True)
    for split, ids in splits.items():
        (out / "splits" / f"{split}.txt").write_text("".join(s + "\n" for s in ids))
    marker = {"settings": _settings(cfg), "members": {s: str(p) for s, p in members.items()}}
    write_json(out / MARKER, marker)
    if verbose:
        print(f"mix: {len(splits['train'])} train and {len(splits['val'])} val scenes -> {out}")
    return out
