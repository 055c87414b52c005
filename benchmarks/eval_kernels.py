"""The evaluator's two heaviest kernels on a CPU, today's against the plain form they replace.

- depth probe step: FiT3D's linear depth head (BatchNorm, 1x1 conv to 256 bins, x4 bilinear
  upsample, ReLU-normalised expected depth, loss on every 4th label pixel) on a batch of cached
  inputs (raw tokens ++ the CLS token on every cell), forward + backward + AdamW. `plain`: the
  conv over every input channel; `today`: `DepthHead(constant=C)`, the CLS channels' share of the
  conv once per image.
- cache read: one view's token map from an on-disk `ViewStore`; `plain`: a `numpy.memmap` of its
  bytes per read, copied out; `today`: `ViewStore.read` (`os.preadv` into a fresh array).
- correspondence pair: Probe3D's ratio-test matching of the four feature sets (original,
  fine-tuned, assembled, control) between two views. `plain`: the token maps resampled to the
  1/4 grid, then the products of the resampled points; `today`: `Grid`s (products on the tokens,
  resampled per set).

Both forms run in this process on the same inputs, alternately, after a warm-up; the table gives
the median per call and the ratio. Their outputs are compared too (max |difference|).

    python benchmarks/eval_kernels.py [--batch 8] [--tokens 16 24] [--width 384] [--reps 10]

Demo sizes by default: 224 x 336 images of ViT-S/14 (16 x 24 tokens, 384 channels).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fit3d.eval.cache import ViewStore  # noqa: E402
from fit3d.eval.correspondence import Grid, ratio_matches_sets, upsampled  # noqa: E402
from fit3d.eval.probes import DepthHead, loss_fn  # noqa: E402


def depth_step(head: DepthHead, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    loss = loss_fn("depth", "linear")

    def step() -> torch.Tensor:
        opt.zero_grad()
        out = head(x, tuple(y.shape[1:]), 4)
        loss(out, y[:, 2::4, 2::4], 0).backward()
        opt.step()
        return out.detach()

    return step


def timed(fns: dict[str, Callable], reps: int) -> dict[str, float]:
    """Median seconds per call of each function, called alternately."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, nargs=2, default=[16, 24])
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    torch.manual_seed(0)
    (h, w), c, b = args.tokens, args.width, args.batch
    H, W = 14 * h, 14 * w
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}; tokens {h} x {w}, width {c}")  # fmt: skip

    rows = []
    # depth probe step on one backbone's input (raw ++ CLS, 2C channels) and an assembled one's
    for name, raw_c in (("depth step, original", c), ("depth step, assembled", 2 * c)):
        raw = torch.randn(b, raw_c, h, w)
        cls = torch.randn(b, c)
        x = torch.cat([raw, cls[:, :, None, None].expand(-1, -1, h, w)], 1)
        y = torch.rand(b, H, W) * 5 + 0.5
        plain = DepthHead(raw_c + c, 10.0)
        today = DepthHead(raw_c + c, 10.0, constant=c)
        today.load_state_dict(plain.state_dict())
        first = (plain(x, (H, W), 4), today(x, (H, W), 4))
        diff = (first[0] - first[1]).abs().max().item()
        t = timed({"plain": depth_step(plain, x, y), "today": depth_step(today, x, y)}, args.reps)
        rows.append((name, t["plain"], t["today"], f"{diff:.1e} m"))

    # cache reads of one view's token map (fp16, as the evaluator stores them)
    with tempfile.TemporaryDirectory() as tmp:
        store = ViewStore(Path(tmp), {"m": ("float16", (c, "h", "w"))}, {"bench": 1}, 64)
        store.append([{"m": torch.randn(c, h, w).half()} for _ in range(64)])
        k = iter(range(10**9))

        def memmap_view(i: int) -> torch.Tensor:
            e = store._index[i]
            mm = np.memmap(store.data_path, dtype=np.uint8, mode="r", offset=int(e["offset"]),
                           shape=(2 * c * h * w,))  # fmt: skip
            return torch.from_numpy(np.array(mm).view(np.float16).reshape(c, h, w))

        def memmap_read() -> torch.Tensor:
            return memmap_view(next(k) % 64)

        def store_read() -> torch.Tensor:
            return store.read(next(k) % 64, ("m",))["m"]

        same = all(torch.equal(memmap_view(i), store.read(i, ("m",))["m"]) for i in range(64))
        t = timed({"plain": memmap_read, "today": store_read}, 200 * args.reps)
        rows.append(("cache read, one map", t["plain"], t["today"], f"equal: {same}"))

    # one correspondence pair, four sets over two backbones
    maps = [{p: torch.randn(c, h, w) for p in ("o", "f")} for _ in range(2)]
    sets = {"original": ("o",), "fine-tuned": ("f",), "assembled": ("o", "f"),
            "control": ("o", "o")}  # fmt: skip
    quarter = (H // 4, W // 4)
    valid = torch.ones(quarter, dtype=torch.bool)
    valid[: quarter[0] // 6] = False  # some pixels without depth

    def plain_pair():
        f0 = {p: upsampled(m, quarter)[valid.flatten()] for p, m in maps[0].items()}
        f1 = {p: upsampled(m, quarter)[valid.flatten()] for p, m in maps[1].items()}
        return ratio_matches_sets(f0, f1, sets)

    def today_pair():
        f0 = {p: Grid(m, valid) for p, m in maps[0].items()}
        f1 = {p: Grid(m, valid) for p, m in maps[1].items()}
        return ratio_matches_sets(f0, f1, sets)

    a, z = plain_pair(), today_pair()
    agree = min((a[s][0] == z[s][0]).double().mean().item() for s in sets)
    t = timed({"plain": plain_pair, "today": today_pair}, args.reps)
    rows.append(("corr pair, 4 sets", t["plain"], t["today"], f"{agree:.4f} same NN"))

    print("| kernel | plain | today | ratio | outputs |")
    print("|---|---|---|---|---|")
    for name, p, q, d in rows:
        print(f"| {name} | {1000 * p:.3g} ms | {1000 * q:.3g} ms | {q / p:.2f}x | {d} |")


if __name__ == "__main__":
    main()
