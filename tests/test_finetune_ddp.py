"""Stage 2 under Lightning DDP on CPU (gloo): `finetune.batch_size` is the global batch, so 2
processes take the optimizer steps of 1 process, on the same samples, with disjoint ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from test_finetune import assert_adam_weights_agree

from stage2_finetune.synthetic import write_lift_run, write_scenes

SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import lightning as L
    import torch

    from fit3d.config import load_config
    from stage2_finetune.train import run

    out, devices = Path(sys.argv[1]), int(sys.argv[2])


    class Record(L.Callback):
        def __init__(self):
            self.keys = []  # per optimizer step: this rank's [scene, view, flip] keys

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.keys.append(batch["key"].tolist())

        def on_train_end(self, trainer, module):
            flat = torch.cat([p.detach().flatten() for p in module.parameters()])
            rank = trainer.global_rank
            torch.save({"keys": self.keys, "weights": flat, "world": trainer.world_size},
                       out / f"d{devices}_rank{rank}.pt")


    overrides = [
        f"run.out={out}", f"run.name=d{devices}", "run.device=cpu", "backbone.name=test_tiny",
        f"finetune.devices={devices}", "finetune.strategy=ddp" if devices > 1 else "",
        "finetune.batch_size=2", "finetune.lr=0.001", "finetune.corr_pairs=0",
        "finetune.pca_views=0", "finetune.val_views=1", "finetune.target_window=5",
    ]
    run(load_config([], [o for o in overrides if o]), callbacks=[Record()])
    """
)


def _run(tmp_path: Path, devices: int) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path.cwd()), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "ddp_run.py"), str(tmp_path), str(devices)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_processes_take_the_steps_of_one_with_the_same_global_batch(tmp_path):
    ids = ["s0", "s1", "s2"]
    write_scenes(tmp_path / "scenes", ids)  # 12 train views: 6 steps of global batch 2
    write_lift_run(tmp_path / "lift" / "default", tmp_path / "scenes", ids)
    (tmp_path / "ddp_run.py").write_text(SCRIPT)
    _run(tmp_path, 1)
    _run(tmp_path, 2)
    one = torch.load(tmp_path / "d1_rank0.pt")
    ranks = [torch.load(tmp_path / f"d2_rank{r}.pt") for r in (0, 1)]
    assert one["world"] == 1 and [r["world"] for r in ranks] == [2, 2]
    metas = [
        json.loads((tmp_path / "finetune" / f"d{d}" / "meta.json").read_text()) for d in (1, 2)
    ]
    assert metas[0]["steps"] == metas[1]["steps"] == 6  # a whole epoch each, no max_steps
    assert metas[0]["batch"] == {
        "global_batch": 2, "devices": 1, "device_batch": 2, "accumulation": 1, "per_device": 2
    }  # fmt: skip
    assert metas[1]["batch"] == {
        "global_batch": 2, "devices": 2, "device_batch": 1, "accumulation": 1, "per_device": 1
    }  # fmt: skip
    assert metas[1]["world_size"] == 2
    # step k: each rank one sample, disjoint, together the 1-process run's two samples of step k
    assert len(one["keys"]) == len(ranks[0]["keys"]) == len(ranks[1]["keys"]) == 6
    for k, both in enumerate(one["keys"]):
        a, b = ranks[0]["keys"][k], ranks[1]["keys"][k]
        assert len(a) == len(b) == 1 and a != b
        assert sorted(a + b) == sorted(both)
    seen = [{(s, v) for step in r["keys"] for s, v, _ in step} for r in ranks]
    assert len(seen[0]) == len(seen[1]) == 6 and not seen[0] & seen[1]
    # identical replicas, and the 1-process run's weights up to float rounding
    assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])
    assert_adam_weights_agree(ranks[0]["weights"], one["weights"], lr=1e-3, steps=6)
