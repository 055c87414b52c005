"""Zero-shot multiview correspondence, computed as Probe3D computes it.

docs/method.md, "Evaluation: 3D-awareness probes (Probe3D)". For a view pair (0, 1):
- both depth maps go to 1/4 resolution by nearest-neighbour resizing (`F.interpolate`, scale
  0.25: pixel (i, j) of the small map is pixel (4i, 4j) of the full one) and both intrinsics are
  scaled by 1/4 (K[:2] *= 0.25), so pixel centres stay at +0.5 (docs/method.md "Conventions");
- every 1/4-resolution pixel with depth > 0, in either view, is a 3D point; its feature is the
  token map bilinearly resampled (align_corners=False) at its pixel centre, L2-normalised;
- each view-0 point is matched to the view-1 point of highest cosine similarity, weighted by
  1 - d1/d2 with d = 1 - cosine to the nearest and second nearest view-1 point, and the
  `top_k` (1000) best-weighted matches are kept;
- a match's error is the distance, in pixels of the 1/4-resolution image, between the view-0
  point projected into view 1 (relative pose, scaled K1) and the matched view-1 pixel centre.
Recall is then taken at 5, 10 and 20 of those pixels (`fit3d.eval.metrics.correspondence_recall`),
so Probe3D's "10 px" is 40 full-resolution pixels. No visibility test is made: an occluded view-0
point counts as Probe3D counts it. `run_corr` does this for every pair of a test split (the
dataset's fixed pairs or covisible pairs picked per scene) and every feature set.

Probe3D's NAVI protocol (`navi_pair_errors`, `eval.corr_protocol`) differs in three places: the
3D points are the full-resolution back-projected grid (pixel centres at +0.5 with the full K)
sampled by nearest-neighbour resizing to 1/4 (pixel (i, j) keeps the point of full pixel
(4i, 4j)); the token map is upsampled to the 1/4 grid bicubically (align_corners=False) instead
of sampled bilinearly; and each match has two errors, the 3D distance in metres between the
view-0 point moved into view 1 and the matched view-1 point, and the 2D distance in
full-resolution pixels of view 1 between their projections with K1 (scored by
`fit3d.eval.metrics.navi_recall`).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from fit3d.eval import data as D
from fit3d.eval import paper as P
from fit3d.eval.features import FEATURE_SETS
from fit3d.eval.fitting import Context, by_group, group_keys, short
from fit3d.eval.metrics import correspondence_recall, navi_recall
from fit3d.eval.probes import upsample_matrix
from fit3d.eval.report import summarize
from fit3d.geometry import relative_rotation, reproject, select_pairs

SCALE = 0.25
"""Probe3D's correspondence resolution (a quarter of the image)."""


def quarter(depth: Tensor, K: Tensor) -> tuple[Tensor, Tensor]:
    """depth [H, W] -> ([H//4, W//4] nearest-resized depth, K [3, 3] with rows 0, 1 x 0.25)."""
    small = F.interpolate(depth[None, None].float(), scale_factor=SCALE, mode="nearest")[0, 0]
    Kq = K.double().clone()
    Kq[:2] *= SCALE
    return small, Kq


def upsampled(feat: Tensor, size: tuple[int, int]) -> Tensor:
    """Token map [C, h, w] -> features [H4*W4, C] at the pixel centres of an H4 x W4 image
    (bilinear, align_corners=False), row-major; not normalised. fp16/bf16 maps become fp32,
    fp64 ones stay fp64."""
    feat = feat[None].to(torch.promote_types(feat.dtype, torch.float32))
    up = F.interpolate(feat, size=size, mode="bilinear", align_corners=False)[0]
    return up.flatten(1).T


@dataclass
class Grid:
    """A part's token map `feat` [C, h, w] seen at the pixel centres of an H x W grid (bilinear,
    align_corners=False), of which the pixels where `valid` [H, W] are the view's points: the
    points' features are `upsampled(feat, (H, W))[valid.flatten()]`. `ratio_matches_sets` takes
    dot products of Grids on the tokens and resamples them (`_columns`, `_resampled_rows`): the
    same values by linearity, to float rounding, at a fraction of the multiply-adds of a product
    of the resampled features."""

    feat: Tensor  # [C, h, w], fp32 or fp64
    valid: Tensor  # [H, W] bool

    def __post_init__(self) -> None:
        self.feat = self.feat.to(torch.promote_types(self.feat.dtype, torch.float32))
        self.flat = self.valid.flatten().nonzero()[:, 0]  # [N] flat grid index of each point
        (H, W), (h, w) = self.valid.shape, self.feat.shape[1:]
        dev, dt = self.feat.device, self.feat.dtype
        self.up_h = upsample_matrix(h, H, dev, dt)  # [H, h]
        self.up_w = upsample_matrix(w, W, dev, dt)  # [W, w]

    def __len__(self) -> int:
        return len(self.flat)

    def sq_grid(self) -> Tensor:
        """Squared feature norms at every grid pixel, [H * W]."""
        return upsampled(self.feat, tuple(self.valid.shape)).square().sum(1)


def _columns(a: Grid, b: Grid) -> Tensor:
    """[h0 * w0, N1]: each view-0 token's dot product with every view-1 point."""
    h0w0, (h1, w1) = a.feat.shape[1] * a.feat.shape[2], b.feat.shape[1:]
    tokens = a.feat.flatten(1).T @ b.feat.flatten(1)  # [h0 w0, h1 w1]
    cols = b.up_h @ tokens.view(h0w0, h1, w1) @ b.up_w.T  # [h0 w0, H1, W1]
    return cols.reshape(h0w0, -1)[:, b.flat]


def _resampled_rows(a: Grid, cols: Tensor, y0: int, y1: int) -> Tensor:
    """cols [h0 * w0, N1] (per view-0 token) -> [n, N1] at the view-0 grid pixels of rows
    y0..y1-1 (those of them in the grid), row-major."""
    (h0, w0), n1 = a.feat.shape[1:], cols.shape[1]
    up_h = a.up_h[y0:y1]  # [cy, h0]
    part = (up_h @ cols.view(h0, w0 * n1)).view(len(up_h), w0, n1)
    return torch.matmul(a.up_w, part).view(-1, n1)  # [cy W0, N1]


Sets = dict[str, tuple[str, ...]]
"""Feature set -> the parts whose features it concatenates along channels (a part may repeat)."""


def canonical(parts: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    """A set's parts as (part, multiplicity) with the multiplicities divided by their gcd, sorted:
    scaling every multiplicity by one factor leaves every cosine unchanged (original ++ original
    has original's cosines), so sets with one canonical form are computed once, bit-identically."""
    counts = Counter(parts)
    g = math.gcd(*counts.values())
    return tuple(sorted((p, m // g) for p, m in counts.items()))


def top_indices(weight: Tensor, k: int) -> Tensor:
    """Indices of the k largest values of weight [N], equal values in ascending index order (a
    stable descending sort; `topk` leaves the order of ties unspecified)."""
    return torch.argsort(weight, descending=True, stable=True)[:k]


def _best_two(sim: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per row of sim [n, N1]: (index of the largest value, the lowest index among equal ones;
    largest value; second largest value, equal to the largest where the row has a tie). Two
    `max` passes (the second with the first's column masked; sim is overwritten there): ~3x
    faster on a CPU than `topk(2)`."""
    if sim.shape[1] == 1:
        v = sim[:, 0]
        return torch.zeros_like(v, dtype=torch.long), v, torch.full_like(v, -math.inf)
    first, index = sim.max(dim=1)  # max(dim) returns the first of equal maxima
    sim.scatter_(1, index[:, None], -math.inf)
    return index, first, sim.max(dim=1).values


Part = Tensor | Grid
"""A part's points in one view: raw features [N, C], or a `Grid`."""


def ratio_matches_sets(
    f0: dict[str, Part], f1: dict[str, Part], sets: Sets, max_elems: int = 1 << 24
) -> dict[str, tuple[Tensor, Tensor]]:
    """Nearest neighbour in view 1 by cosine and Probe3D's ratio-test weight for every point of
    view 0, for every set at once, from each part's raw features f0[p] [N0, C_p] and f1[p]
    [N1, C_p] (not normalised), or from their `Grid`s (all parts of both views).

    A set's cosine is that of its parts' concatenation: the sum of the parts' dot products over
    the product of the concatenations' norms. Raw features: each part's dot products are
    computed once per chunk of rows and shared by every set using it (original ++ fine-tuned
    costs no matrix product of its own). Grids: each part's token-to-point products (`_columns`)
    are summed per set, scaled by the view-1 norms, and resampled once per set over view 0's
    grid; rows off view 0's points are dropped at the end. Sets with one `canonical` form
    (original ++ original and original) are one computation. Within a row, dividing by the
    view-0 norm does not change the order, so it is applied to the two values kept. Ties are
    broken by index: the nearest neighbour is the lowest view-1 index among equal cosines (and
    `pair_errors` keeps equal weights in index order), so results depend on nothing but the dot
    products' values.
    Returns {set: (index [N0] into f1, weight [N0] float64 = 1 - d1/d2, d = 1 - cosine clamped
    at 1e-9)}.
    """
    forms = {s: canonical(parts) for s, parts in sets.items()}
    unique = list(dict.fromkeys(forms.values()))
    used = list(dict.fromkeys(p for u in unique for p, _ in u))
    g0 = f0[used[0]]  # a Grid gives the view's geometry, shared by its parts
    grid = isinstance(g0, Grid)
    n1 = len(f1[used[0]])
    sq0 = {p: f.sq_grid() if grid else f.square().sum(1) for p, f in f0.items()}  # [rows]
    sq1 = {p: f.sq_grid()[f.flat] if grid else f.square().sum(1) for p, f in f1.items()}  # [N1]
    norm0 = {u: sum(m * sq0[p] for p, m in u).sqrt().clamp_min(1e-12) for u in unique}
    inv1 = {u: 1 / sum(m * sq1[p] for p, m in u).sqrt().clamp_min(1e-12) for u in unique}
    n_rows = len(sq0[used[0]])
    chunk = max(max_elems // max(n1, 1), 1)
    if grid:  # whole grid rows per chunk; per set, its parts' columns over the view-1 norms
        width = g0.valid.shape[1]
        # ~2M values a chunk: the rows stay in cache for `_best_two` (1.3x faster than 16M)
        chunk = max(min(max_elems, 1 << 21) // (width * max(n1, 1)), 1) * width
        cols = {p: _columns(f0[p], f1[p]) for p in used}
        set_cols = {u: sum(cols[p] * (m * inv1[u])[None] for p, m in u) for u in unique}
        del cols  # [h0 w0, N1] per part; only the sets' sums are read from here on
    out: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {u: ([], []) for u in unique}
    for start in range(0, n_rows, chunk):
        rows = slice(start, start + chunk)
        if not grid:
            dots = {p: f0[p][rows] @ f1[p].T for p in used}  # [n, N1]
        for u in unique:
            if grid:  # cosine times the row's view-0 norm, [n, N1]
                y0 = start // width
                sim = _resampled_rows(g0, set_cols[u], y0, y0 + chunk // width)
            else:
                (p, m), rest = u[0], u[1:]
                sim = dots[p] * (m * inv1[u])[None]
                for p, m in rest:
                    sim.addcmul_(dots[p], (m * inv1[u])[None])
            index, first, second = _best_two(sim)
            cos1, cos2 = (v.double() / norm0[u][rows].double() for v in (first, second))
            d1, d2 = ((1 - c).clamp_min(1e-9) for c in (cos1, cos2))  # [n]
            out[u][0].append(index)
            out[u][1].append(1 - d1 / d2)
    found = {u: (torch.cat(i), torch.cat(w)) for u, (i, w) in out.items()}
    if grid:  # view 0's points only
        found = {u: (i[g0.flat], w[g0.flat]) for u, (i, w) in found.items()}
    return {s: found[forms[s]] for s in sets}


def pair_errors(
    maps0: dict[str, Tensor],
    maps1: dict[str, Tensor],
    sets: Sets,
    depth0: Tensor,
    depth1: Tensor,
    K0: Tensor,
    K1: Tensor,
    viewmat0: Tensor,
    viewmat1: Tensor,
    top_k: int = 1000,
) -> dict[str, Tensor]:
    """Per feature set, the errors [M <= top_k] of its best-weighted matches, in 1/4-resolution
    pixels of view 1.

    maps0, maps1: each part's token maps [C_p, h, w] (a set's map is the channel concat of its
    parts', `sets`; see `ratio_matches_sets`); depth0, depth1: [H, W] metres (0 = invalid) at
    full resolution; K0, K1: [3, 3] full-resolution intrinsics; viewmat0, viewmat1: [4, 4]
    world-to-camera.
    """
    d0, K0q = quarter(depth0, K0)
    d1, K1q = quarter(depth1, K1)
    v0, v1 = d0.flatten() > 0, d1.flatten() > 0
    if not v0.any() or not v1.any():
        return {s: torch.zeros(0, dtype=torch.float64) for s in sets}
    f0 = {p: Grid(m, d0 > 0) for p, m in maps0.items()}
    f1 = {p: Grid(m, d1 > 0) for p, m in maps1.items()}
    w0, w1 = d0.shape[1], d1.shape[1]
    out = {}
    for s, (idx, weight) in ratio_matches_sets(f0, f1, sets).items():
        keep = top_indices(weight, top_k)
        pix0 = v0.nonzero()[:, 0][keep]  # flat indices into the 1/4 map of view 0
        pix1 = v1.nonzero()[:, 0][idx[keep]]
        xy0 = torch.stack([pix0 % w0, pix0 // w0], 1)  # [M, 2] pixel indices (x, y)
        xy1 = torch.stack([pix1 % w1, pix1 // w1], 1).double()
        gt_xy1, _ = reproject(xy0, d0.flatten()[pix0], K0q, K1q, viewmat0, viewmat1)
        out[s] = (gt_xy1 - xy1).norm(dim=1)
    return out


def _backprojected(depth: Tensor, K: Tensor) -> Tensor:
    """Camera-frame points [H//4 * W//4, 3] float64 of the 1/4 grid NAVI's protocol keeps: full
    pixel (4i, 4j) back-projected at its centre (+0.5) with K [3, 3] and its depth [H, W]."""
    d = quarter(depth, K)[0].double()  # nearest: pixel (i, j) is full pixel (4i, 4j)
    h, w = d.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float64) * 4 + 0.5,
        torch.arange(w, dtype=torch.float64) * 4 + 0.5,
        indexing="ij",
    )
    pix = torch.stack([xs, ys, torch.ones_like(xs)], -1).reshape(-1, 3)  # [N, 3]
    rays = torch.linalg.solve(K.double(), pix.T).T  # [N, 3]
    return rays * d.reshape(-1, 1)


def _bicubic(feat: Tensor, size: tuple[int, int]) -> Tensor:
    """Token map [C, h, w] -> features [H4*W4, C], upsampled bicubically (align_corners=False) to
    the H4 x W4 grid, row-major; not normalised."""
    feat = feat[None].to(torch.promote_types(feat.dtype, torch.float32))
    up = F.interpolate(feat, size=size, mode="bicubic", align_corners=False)[0]
    return up.flatten(1).T


def navi_pair_errors(
    maps0: dict[str, Tensor],
    maps1: dict[str, Tensor],
    sets: Sets,
    depth0: Tensor,
    depth1: Tensor,
    K0: Tensor,
    K1: Tensor,
    viewmat0: Tensor,
    viewmat1: Tensor,
    top_k: int = 1000,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per feature set, (3D errors [M] metres, 2D errors [M] full-resolution pixels of view 1) of
    its `top_k` best-weighted matches under Probe3D's NAVI protocol (module docstring). Arguments
    as `pair_errors`."""
    p0, p1 = _backprojected(depth0, K0), _backprojected(depth1, K1)  # [N0, 3], [N1, 3]
    v0, v1 = p0[:, 2] > 0, p1[:, 2] > 0
    empty = torch.zeros(0, dtype=torch.float64)
    if not v0.any() or not v1.any():
        return {s: (empty, empty) for s in sets}
    size0, size1 = (tuple(quarter(d, K)[0].shape) for d, K in ((depth0, K0), (depth1, K1)))
    f0 = {p: _bicubic(m, size0)[v0] for p, m in maps0.items()}
    f1 = {p: _bicubic(m, size1)[v1] for p, m in maps1.items()}
    rel = viewmat1.double() @ torch.linalg.inv(viewmat0.double())  # cam0 -> cam1
    K1d = K1.double()

    def project(x: Tensor) -> Tensor:  # [M, 3] -> [M, 2], Probe3D's z clamp
        uvw = x @ K1d.T
        return uvw[:, :2] / uvw[:, 2:].clamp_min(1e-9)

    out = {}
    for s, (idx, weight) in ratio_matches_sets(f0, f1, sets).items():
        keep = top_indices(weight, top_k)
        x0 = p0[v0][keep]  # [M, 3] view-0 camera frame
        x1 = p1[v1][idx[keep]]  # [M, 3] view-1 camera frame
        x0in1 = x0 @ rel[:3, :3].T + rel[:3, 3]
        out[s] = ((x0in1 - x1).norm(dim=1), (project(x0in1) - project(x1)).norm(dim=1))
    return out


# --- the probe over a test split --------------------------------------------------------------
PER_GROUP_KEYS = (
    "recall_10px",
    "recall_10px_rot0-15",
    "recall_10px_rot15-30",
    "recall_10px_rot30-60",
    "recall_10px_rot60-180",
)
"""Recalls also kept per test group (`<key>@<group>`, over that group's pairs): the verdict's.
Under the NAVI protocol, `recall_2cm`."""


def test_pairs(ctx: Context) -> list[tuple[int, int, float]]:
    """(position i, position j, rotation deg) of the test split's correspondence pairs: the
    dataset's fixed pairs, else covisible pairs picked per group (`fit3d.geometry`)."""
    ec, split = ctx.cfg.eval, ctx.test
    pos = {v: n for n, v in enumerate(split.views)}
    infos = [split.ds.info(v) for v in split.views]
    fixed = split.ds.pairs()
    if fixed:
        out = [(pos[i], pos[j]) for i, j in fixed if i in pos and j in pos]
        return [(i, j, relative_rotation(infos[i].viewmat, infos[j].viewmat)) for i, j in out]
    pairs = []
    for members in by_group([info.group for info in infos]).values():
        depths, Ks = [], []
        for n in members:  # 1/4-resolution depth: pair selection needs no more
            d = D.label_batch(split, [n], "depth")[0]
            small, Kq = quarter(d, infos[n].K)
            depths.append(small)
            Ks.append(Kq)
        found = select_pairs(
            depths, Ks, [infos[n].viewmat for n in members], ec.pairs_per_scene, ec.min_overlap,
            ctx.cfg.run.seed,
        )  # fmt: skip
        pairs += [(members[i], members[j], rot) for i, j, rot in found]
    return pairs


def recall_by_group(errors: list[Tensor], rots: Tensor, groups: list[str]) -> dict[str, float]:
    """`correspondence_recall` of the pairs, plus `PER_GROUP_KEYS` over each group's pairs as
    `<key>@<group>` (with 2..PER_GROUP_MAX groups). errors: [M_i] per pair; rots: [P] degrees;
    groups: [P]."""
    out = correspondence_recall(errors, rots)
    if group_keys(groups):
        for g, ns in by_group(groups).items():
            got = correspondence_recall([errors[n] for n in ns], rots[ns])
            out |= {f"{k}@{g}": got[k] for k in PER_GROUP_KEYS}
    return out


def navi_recall_by_group(
    err3d: list[Tensor], err2d: list[Tensor], rots: Tensor, groups: list[str]
) -> dict[str, float]:
    """`navi_recall` of the pairs, plus `recall_2cm@<group>` (with 2..PER_GROUP_MAX groups)."""
    out = navi_recall(err3d, err2d, rots)
    if group_keys(groups):
        for g, ns in by_group(groups).items():
            got = navi_recall([err3d[n] for n in ns], [err2d[n] for n in ns], rots[ns])
            out[f"recall_2cm@{g}"] = got["recall_2cm"]
    return out


def _K(split: D.Split, n: int, infos: list) -> Tensor:
    """Intrinsics of view n: its ViewInfo's, else (sets that compute K per crop, e.g. NAVI) the
    sample's."""
    K = infos[n].K
    return K if K is not None else split.ds[split.views[n]].K


def run_corr(sets: list[str], ctx: Context) -> dict:
    """Zero-shot correspondence recall of every feature set on the test split's pairs."""
    ec, split = ctx.cfg.eval, ctx.test
    if "corr" not in split.tasks:
        ctx.notes.append("test split has no usable depth and poses: corr probe skipped")
        return {}
    pairs = test_pairs(ctx)
    if not pairs:
        ctx.notes.append(f"no test view pair overlaps >= {ec.min_overlap}: corr skipped")
        return {}
    infos = [split.ds.info(v) for v in split.views]
    rots = torch.tensor([r for _, _, r in pairs])
    block = f"block{ec.corr_block % ctx.backbones['original'].num_blocks}"
    feats = ctx.feats["test"]
    by_set = {s: tuple(FEATURE_SETS[s]) for s in sets}
    parts = list(dict.fromkeys(p for ps in by_set.values() for p in ps))
    errors: dict[str, list] = {s: [] for s in sets}
    navi = P.corr_protocol(ec, split.ds.name) == "navi"
    for i, j, _ in tqdm(pairs, desc="corr", leave=False, disable=None):
        d0, d1 = D.label_batch(split, [i], "depth")[0], D.label_batch(split, [j], "depth")[0]
        found = (navi_pair_errors if navi else pair_errors)(
            {p: feats.maps(i, (p,), block) for p in parts},
            {p: feats.maps(j, (p,), block) for p in parts},
            by_set, d0, d1, _K(split, i, infos), _K(split, j, infos), infos[i].viewmat,
            infos[j].viewmat, ec.top_k,
        )  # fmt: skip
        for s in sets:
            errors[s].append(found[s])
    pair_groups = [infos[i].group for i, _, _ in pairs]
    out = {}
    for s in sets:
        if navi:
            err3d, err2d = [e[0] for e in errors[s]], [e[1] for e in errors[s]]
            rec = navi_recall_by_group(err3d, err2d, rots, pair_groups)
        else:
            rec = recall_by_group(errors[s], rots, pair_groups)
        out[s] = {f"eval/corr/{k}": summarize([v]) for k, v in rec.items()}
        print(f"  corr        {s:11s} ({len(pairs)} pairs): " + short(out[s]), flush=True)
    return out
