"""Run plumbing shared by every stage: devices, shards, output layout, provenance.

Every stage (`stage1_lift`, `stage2_finetune`, `fit3d.eval`, label preparation) is a `run(cfg)`
that asks this module where its outputs go, which device it runs on and which shard of the work
is its own; nothing else builds an output path.
"""

from __future__ import annotations

import os

import torch

from fit3d.errors import UserError


def shard_from_env(env: dict[str, str] | None = None) -> tuple[int, int]:
    """(index, count) from SHARD=i/n, else a SLURM array task, else (0, 1)."""
    env = dict(os.environ) if env is None else env
    if env.get("SHARD"):
        try:
            i, n = (int(x) for x in env["SHARD"].split("/"))
        except ValueError:
            raise UserError(f"SHARD={env['SHARD']!r} must look like i/n, e.g. 0/4") from None
    elif env.get("SLURM_ARRAY_TASK_ID") and env.get("SLURM_ARRAY_TASK_COUNT"):
        i = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        n = int(env["SLURM_ARRAY_TASK_COUNT"])
    else:
        return 0, 1
    if not 0 <= i < n:
        raise UserError(f"shard {i}/{n} out of range: need 0 <= i < n")
    return i, n


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when available, else CPU; `cuda` without CUDA is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("run.device=cuda but CUDA is not available")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UserError(f"run.device must be auto, cpu, cuda or cuda:N, got '{name}'")
    return torch.device(name)
