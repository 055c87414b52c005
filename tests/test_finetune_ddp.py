"""Stage 2 under Lightning DDP: 2 CPU processes (gloo), disjoint samples, identical weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from test_finetune import write_lift_run, write_scenes

SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import lightning as L
    import torch

    from fit3d.config import load_config
    from stage2_finetune.train import run

    out = Path(sys.argv[1])


    class Record(L.Callback):
        def __init__(self):
            self.keys = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.keys += batch["key"].tolist()

        def on_train_end(self, trainer, module):
            flat = torch.cat([p.detach().flatten() for p in module.parameters()])
            rank = trainer.global_rank
            torch.save({"keys": self.keys, "weights": flat, "world": trainer.world_size},
                       out / f"rank{rank}.pt")


    overrides = [
        f"run.out={out}", "run.device=cpu", "backbone.name=test_tiny",
        "finetune.devices=2", "finetune.strategy=ddp", "finetune.max_steps=3",
        "finetune.lr=0.001", "finetune.corr_pairs=0", "finetune.pca_views=0",
        "finetune.val_views=1",
    ]
    run(load_config([], overrides), callbacks=[Record()])
    """
)


def test_ddp_two_cpu_processes_disjoint_samples_identical_weights(tmp_path):
    ids = ["s0", "s1", "s2"]
    write_scenes(tmp_path / "scenes", ids)
    write_lift_run(tmp_path / "lift" / "default", tmp_path / "scenes", ids)
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path.cwd()), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    seen = [{(s, v) for s, v, _ in r["keys"]} for r in ranks]
    assert [len(r["keys"]) for r in ranks] == [6, 6]  # 3 steps x batch 2 on each rank
    assert len(seen[0]) == len(seen[1]) == 6 and not seen[0] & seen[1]
    assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])
    meta = json.loads((tmp_path / "finetune" / "default" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["steps"] == 3
