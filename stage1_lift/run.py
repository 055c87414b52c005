"""Stage 1 run: lift every scene of one split (`lift.split`) into `<run.out>/lift/<run.name>/`.

Scenes already finished (their `meta.json` exists) are skipped; an interrupted scene resumes from
its checkpoint. `SHARD=i/n` (or a SLURM array: SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT)
takes every n-th scene, so shards share one run folder without coordination: each scene folder has
one writer and `summary.json` is rebuilt from the per-scene files by every shard.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from fit3d.config import Config, validate
from fit3d.errors import UserError
from fit3d.io import write_json
from fit3d.runs import (
    META_FILE,
    STATUS_FILE,
    SUMMARY_FILE,
    build_backbone,
    check_settings,
    lift_scene_dir,
    resolve_device,
    resolve_precision,
    run_dir,
    shard_from_env,
    write_config,
)
from fit3d.scenes import resolve_scenes
from stage1_lift.loop import LiftDiverged, SceneInput, SceneUnreadable, lift_scene

_STATES = ("done", "skipped", "failed", "pending")
SETTINGS = ("scenes", "backbone", "lift")
"""Config sections a lift run folder is tied to: a rerun with others is refused."""


def summarize(out: Path, scene_ids: list[str]) -> dict[str, Any]:
    """Merge the per-scene files (meta.json / status.json) of a lift run into one summary."""
    scenes: dict[str, Any] = {}
    for sid in scene_ids:
        meta, status = (
            lift_scene_dir(out, sid) / META_FILE,
            lift_scene_dir(out, sid) / STATUS_FILE,
        )
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
        "run_dir": str(out),
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
    """Lift this shard's scenes of the `lift.split` split into `<run.out>/lift/<run.name>/`.

    Returns the merged summary (also written to `summary.json`). `on_step(step)` is passed to the
    per-scene loop (tests use it to interrupt).
    """
    validate(cfg)  # the config's ranges, for callers that built `cfg` themselves
    device = resolve_device(cfg.run.device)
    # `auto` -> what this device runs; config.yaml records (and check_settings compares) that
    precision = resolve_precision(cfg.lift.precision, device)
    cfg = replace(cfg, lift=replace(cfg.lift, precision=precision))
    root, scene_ids, resolution = resolve_scenes(cfg, cfg.lift.split)
    shard, n_shards = shard_from_env()
    mine = scene_ids[shard::n_shards]
    out = run_dir(cfg, "lift")
    # build the backbone first: a bad alias or weights file must fail before the run folder exists
    torch.manual_seed(cfg.run.seed)  # random-init backbones (tests) are reproducible
    backbone = build_backbone(cfg).to(device).eval()
    check_settings(cfg, out, SETTINGS)
    write_config(cfg, out)
    print(
        f"stage1_lift: {len(mine)} of {len(scene_ids)} {cfg.lift.split} scenes "
        f"(shard {shard}/{n_shards}) -> {out} on {device}"
    )
    for sid in mine:
        out_dir = lift_scene_dir(out, sid)
        if (out_dir / META_FILE).is_file():
            print(f"{sid}: done, skipped")
            continue
        try:
            inp = SceneInput.read(
                root, sid, resolution, cfg.lift.image_scale, cfg.lift.views == "all"
            )
        except (UserError, SceneUnreadable, OSError, ValueError) as e:
            write_json(out_dir / STATUS_FILE, {"status": "skipped", "reason": str(e)})
            print(f"{sid}: skipped: {e}", file=sys.stderr)
            continue
        try:
            lift_scene(inp, backbone, cfg, out_dir, device, on_step)
        except LiftDiverged as e:
            write_json(out_dir / STATUS_FILE, {"status": "failed", "reason": str(e)})
            print(f"{sid}: stopped: {e}", file=sys.stderr)
            continue
        (out_dir / STATUS_FILE).unlink(missing_ok=True)
    summary = summarize(out, scene_ids)
    write_json(out / SUMMARY_FILE, summary)
    print_table(summary)
    return summary
