"""`python -m stage1_lift [--preset demo] [key=value ...]`: lift every train scene of a run.

Scenes already finished (their `meta.json` exists) are skipped; an interrupted scene resumes from
its checkpoint. `SHARD=i/n` (or a SLURM array: SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT)
takes every n-th scene, so shards share one run folder without coordination: each scene folder has
one writer and `summary.json` is rebuilt from the per-scene files by every shard.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from fit3d.backbones import Backbone
from fit3d.config import Config, parse_cli, save_config, to_dict
from fit3d.errors import UserError, cli_entry
from fit3d.io import write_json
from fit3d.runs import resolve_device, shard_from_env
from fit3d.scenes import open_scene, resolve_scenes
from stage1_lift.loop import LiftDiverged, SceneUnreadable, lift_scene, read_views

STATUS = "status.json"
"""Per-scene file recording why a scene was skipped or stopped (absent once it is done)."""
_STATES = ("done", "skipped", "failed", "pending")


def _check_run_config(cfg: Config, run_dir: Path) -> None:
    """Write config.yaml; refuse to mix results of different settings in one run folder."""
    path = run_dir / "config.yaml"
    sections = ("scenes", "backbone", "lift")
    if path.is_file():
        old = yaml.safe_load(path.read_text()) or {}
        new = to_dict(cfg)
        changed = [s for s in sections if old.get(s) != new.get(s)]
        if changed:
            raise UserError(
                f"{path} was written with different {'/'.join(changed)} settings; "
                "use another run.name or remove the folder"
            )
    save_config(cfg, path)


def summarize(run_dir: Path, scene_ids: list[str]) -> dict[str, Any]:
    """Merge the per-scene files (meta.json / status.json) of all scenes into one summary."""
    scenes: dict[str, Any] = {}
    for sid in scene_ids:
        meta, status = run_dir / sid / "meta.json", run_dir / sid / STATUS
        if meta.is_file():
            m = json.loads(meta.read_text())
            scenes[sid] = {
                "status": "done",
                **m["metrics"],
                "num_gaussians": m["num_gaussians"],
                "steps": m["steps"],
                "seconds": m["seconds"],
                "init": m.get("init"),
            }
        elif status.is_file():
            scenes[sid] = json.loads(status.read_text())
        else:
            scenes[sid] = {"status": "pending"}
    done = [s for s in scenes.values() if s["status"] == "done"]

    def mean(key: str) -> float | None:
        vals = [s[key] for s in done if s.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    counts = {k: sum(s["status"] == k for s in scenes.values()) for k in _STATES}
    return {
        "run_dir": str(run_dir),
        "num_scenes": len(scene_ids),
        **counts,
        "mean": {k: mean(k) for k in ("psnr", "feat_l1", "feat_cos")},
        "seconds_total": round(sum(s["seconds"] for s in done), 1),
        "scenes": scenes,
    }


def print_table(summary: dict[str, Any]) -> None:
    """One line per scene: status, #Gaussians, seconds, PSNR, feature L1 / cosine, or reason."""

    def f(x: Any, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    print(f"{'scene':<24}{'status':<9}{'#G':>9}{'sec':>8}{'PSNR':>8}{'featL1':>8}{'cos':>7}")
    for sid, s in summary["scenes"].items():
        if s["status"] == "done":
            print(
                f"{sid:<24}{'done':<9}{s['num_gaussians']:>9}{f(s['seconds'], '.0f'):>8}"
                f"{f(s['psnr'], '.2f'):>8}{f(s['feat_l1'], '.3f'):>8}{f(s['feat_cos'], '.3f'):>7}"
            )
        else:
            print(f"{sid:<24}{s['status']:<9}  {s.get('reason', '')}")
    m = summary["mean"]
    print(
        f"{'mean':<24}{summary['done']}/{summary['num_scenes']} done, "
        f"{summary['seconds_total']:.0f} s{'':<3}"
        f"{f(m['psnr'], '.2f'):>8}{f(m['feat_l1'], '.3f'):>8}{f(m['feat_cos'], '.3f'):>7}"
    )


def run(cfg: Config, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Lift this shard's scenes of the train split into `<run.out>/lift/<run.name>/`.

    Returns the merged summary (also written to `summary.json`). `on_step(step)` is passed to the
    per-scene loop (tests use it to interrupt).
    """
    device = resolve_device(cfg.run.device)
    root, scene_ids, resolution = resolve_scenes(cfg.scenes, cfg.run.out, "train")
    shard, n_shards = shard_from_env()
    mine = scene_ids[shard::n_shards]
    run_dir = Path(cfg.run.out) / "lift" / cfg.run.name
    # build the backbone first: a bad alias or weights file must fail before the run folder exists
    torch.manual_seed(cfg.run.seed)  # random-init backbones (tests) are reproducible
    backbone = Backbone(cfg.backbone.name, cfg.backbone.weights or None).to(device).eval()
    _check_run_config(cfg, run_dir)
    print(
        f"stage1_lift: {len(mine)} of {len(scene_ids)} scenes (shard {shard}/{n_shards}) "
        f"-> {run_dir} on {device}"
    )
    for sid in mine:
        out_dir = run_dir / sid
        if (out_dir / "meta.json").is_file():
            print(f"{sid}: done, skipped")
            continue
        lift_res = resolution * cfg.lift.image_scale
        try:
            views = read_views(scene := open_scene(root, sid, lift_res))
            teacher_scene = scene if lift_res == resolution else open_scene(root, sid, resolution)
        except (UserError, SceneUnreadable, OSError, ValueError) as e:
            write_json(out_dir / STATUS, {"status": "skipped", "reason": str(e)})
            print(f"{sid}: skipped: {e}", file=sys.stderr)
            continue
        try:
            lift_scene(
                scene,
                views,
                teacher_scene.load_image,
                backbone,
                cfg,
                out_dir,
                device,
                root,
                resolution,
                on_step,
            )
        except LiftDiverged as e:
            write_json(out_dir / STATUS, {"status": "failed", "reason": str(e)})
            print(f"{sid}: stopped: {e}", file=sys.stderr)
            continue
        (out_dir / STATUS).unlink(missing_ok=True)
    summary = summarize(run_dir, scene_ids)
    write_json(run_dir / "summary.json", summary)
    print_table(summary)
    return summary


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Entry point; exit code 1 when no scene of this shard could be lifted."""
    cfg = parse_cli(argv, "python -m stage1_lift", "Stage 1: lift features into 3D Gaussians")
    summary = run(cfg)
    return 0 if summary["done"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
