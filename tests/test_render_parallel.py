"""The C++ renderer keeps every thread busy: a 100k-Gaussian forward+backward on 2 threads must use
at least ~1.6 CPU-seconds per wall-second (one core's worth would be ~1.0).

Written for an otherwise idle machine with >= 2 cores (CI); the best of a few repetitions is kept,
so one step slowed by a stray process does not fail it. On a machine that other processes keep
busy (seen in /proc/stat) no wall-clock ratio is meaningful; there the test checks instead that
the threads other than the caller did the work (process CPU >= 1.6 x the calling thread's CPU),
which single-core kernels (ratio ~1.0) fail just the same.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from fit3d.render import rasterization

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler"),
    pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores"),
]


def _scene(n: int, width: int, height: int) -> dict:
    """n Gaussians spread over a width x height view, 3-9 px 3-sigma radius, 2-6 m deep."""
    g = torch.Generator().manual_seed(0)
    f = 0.8 * width
    z = 2.0 + 4.0 * torch.rand(n, generator=g)
    px, py = torch.rand(n, generator=g) * width, torch.rand(n, generator=g) * height
    means = torch.stack([(px - width / 2) * z / f, (py - height / 2) * z / f, z], -1)
    sigma = ((3.0 + 6.0 * torch.rand(n, generator=g)) / 3.0 * z / f)[:, None].repeat(1, 3)
    return dict(
        means=means,
        quats=torch.randn(n, 4, generator=g),
        scales=sigma,
        opacities=0.1 + 0.8 * torch.rand(n, generator=g),
        colors=torch.rand(n, 3, generator=g),
        viewmats=torch.eye(4)[None],
        Ks=torch.tensor([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]])[None],
    )


def _machine_cpu_seconds() -> float | None:
    """CPU-seconds all processes have used since boot (Linux /proc/stat), else None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def test_render_uses_two_cores() -> None:
    from fit3d.render import _cpp

    assert _cpp.usable(torch.zeros(1))
    width, height = 512, 384
    s = _scene(100_000, width, height)
    names = ("means", "quats", "scales", "opacities", "colors")
    params = [s[k].requires_grad_(True) for k in names]
    grad_img = torch.randn(1, height, width, 3, generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ratios, splits, others = [], [], []
        for rep in range(6):  # the first one warms up (allocations, page faults)
            for p in params:
                p.grad = None
            machine0 = _machine_cpu_seconds()
            wall0, cpu0, own0 = time.perf_counter(), time.process_time(), time.thread_time()
            img, alpha, _ = rasterization(
                *params, s["viewmats"], s["Ks"], width, height, backend="torch"
            )
            torch.autograd.backward([img, alpha], [grad_img, torch.ones_like(alpha)])
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            own = time.thread_time() - own0
            machine1 = _machine_cpu_seconds()
            if rep == 0:
                continue
            ratios.append(cpu / wall)
            splits.append(cpu / max(own, 1e-9))
            if machine0 is not None and machine1 is not None:
                # share of all cores that other processes used meanwhile
                others.append((machine1 - machine0 - cpu) / (wall * (os.cpu_count() or 1)))
            if ratios[-1] >= 1.6:
                break
    finally:
        torch.set_num_threads(threads)
    if max(ratios) >= 1.6:
        return
    busy = bool(others) and min(others) > 0.2
    assert busy, f"CPU-seconds per wall-second {ratios} on an idle machine: one core's worth"
    assert max(splits) >= 1.6, f"busy machine; process CPU / calling thread CPU {splits}"
