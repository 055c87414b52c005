// CPU tile compositor for 3D Gaussian splatting: forward and hand-written backward.
//
// Each 16x16 tile walks its depth-sorted Gaussians front to back and splats each one only over
// the rows of its footprint inside the tile, kLanes pixels of a row at a time (one SIMD vector:
// sigma, exp, alpha and transmittance for all of them at once). A pixel stops before the Gaussian
// that would bring its transmittance to <= 1e-4, and a tile stops when all its pixels have.
// Colours are blended per SIMD block in a channel-major tile buffer when there are few channels,
// per pixel (vectorised over channels) when there are many. Tiles are tasks of `parallel_tasks`,
// most loaded first.
//
// The backward walks the same lists back to front, recovering each transmittance by division
// (alpha <= 0.999), and sums each Gaussian's gradient over the tile, in passes over the pixels a
// Gaussian reaches: alphas, then the geometry channels' dot products, then the alpha gradients,
// then the colour gradients (per pixel in registers when there are many channels). What the
// forward knows and the backward reuses: the tile lists' Gaussians as `Splat` records in list
// order (no gathering) and which entries were blended into no pixel (21% of them at the benchmark
// sizes, skipped). It does recompute alpha per pixel: exp, sigma and footprint rows are ~11% of
// the backward's instructions at 3 channels and ~4% at 64 (callgrind, 10k Gaussians), while
// keeping them would write and re-read >= 4 bytes per Gaussian-pixel pair (~54 MB at 100k
// Gaussians on 512x384). Accumulation is lock-free and
// deterministic: tiles run in classes (camera, tile x mod 3, tile y mod 3) one after another, so
// a Gaussian spanning at most 3 tiles each way meets one tile per class and its sums are added
// with plain stores; wider ones leave per-intersection partial sums that are added afterwards in
// list order.
//
// Memory beyond inputs and outputs: 64 bytes per Gaussian-tile intersection (the records), (8 +
// channels) floats per intersection of a Gaussian wider than 3 tiles, and per worker a [channels,
// 256] tile buffer; never N x H x W.

#include "_kernels.h"

namespace fit3d {
namespace {

// Up to this many output channels the colour work runs per SIMD block of pixels, above it per
// pixel over channels (both give the same sums).
constexpr int64_t kBlockChannels = 16;

struct Box {
  int64_t x0, x1, y0, y1;  // inclusive pixel range, empty if x0 > x1 or y0 > y1
};

// Pixels of tile (ox, oy, tw, th) whose centres lie within the Gaussian's radius box.
inline Box pixel_box(float mx, float my, int32_t rx, int32_t ry, int64_t ox, int64_t oy,
                     int64_t tw, int64_t th) {
  Box b;
  b.x0 = std::max<int64_t>(ox, static_cast<int64_t>(std::ceil(mx - rx - 0.5f)));
  b.x1 = std::min<int64_t>(ox + tw - 1, static_cast<int64_t>(std::floor(mx + rx - 0.5f)));
  b.y0 = std::max<int64_t>(oy, static_cast<int64_t>(std::ceil(my - ry - 0.5f)));
  b.y1 = std::min<int64_t>(oy + th - 1, static_cast<int64_t>(std::floor(my + ry - 0.5f)));
  return b;
}

struct TileXY {
  int64_t cam, ox, oy, tw, th;
};

inline TileXY tile_xy(const CompositeArgs& a, int64_t per_cam, int64_t tile) {
  const int64_t tl = tile % per_cam;
  TileXY t;
  t.cam = tile / per_cam;
  t.ox = (tl % a.tiles_x) * kTile, t.oy = (tl / a.tiles_x) * kTile;
  t.tw = std::min<int64_t>(kTile, a.width - t.ox), t.th = std::min<int64_t>(kTile, a.height - t.oy);
  return t;
}

// A Gaussian's footprint in a tile: per tile row, the tile-local columns [lo, hi] where sigma <=
// thr (alpha >= 1/255 needs sigma <= ln(255 opacity)), from the conic's quadratic in x, inside the
// radius box and widened by a margin so rounding can only add pixels, never drop one; every pixel
// is still tested exactly. Empty rows get lo > hi. All tile rows at once, kLanes per vector.
struct Spans {
  alignas(64) int32_t lo[kTile];
  alignas(64) int32_t hi[kTile];
  int y0, y1;  // tile-local rows of the radius box
};

inline bool footprint_spans(const Splat& s, const TileXY& t, Spans& sp) {
  const Box bx = pixel_box(s.mx, s.my, s.rx, s.ry, t.ox, t.oy, t.tw, t.th);
  if (bx.x0 > bx.x1 || bx.y0 > bx.y1) return false;
  sp.y0 = static_cast<int>(bx.y0 - t.oy), sp.y1 = static_cast<int>(bx.y1 - t.oy);
  const vf x_lo = splat(static_cast<float>(bx.x0)), x_hi = splat(static_cast<float>(bx.x1));
  const vf a = splat(s.a), b = splat(s.b), c = splat(s.c), inv_a = splat(1.0f / s.a);
  const vf zero = splat(0.0f);
  for (int v = sp.y0 / kLanes * kLanes; v <= sp.y1; v += kLanes) {
    const vf dy = splat(s.my - (static_cast<float>(t.oy + v) + 0.5f)) - lane_ids_f();
    const vf disc = b * b * dy * dy - a * (c * dy * dy - splat(2.0f * s.thr));
    const vf root = vsqrt(vmax(disc, zero));
    const vf dx_lo = (-b * dy - root) * inv_a, dx_hi = (-b * dy + root) * inv_a;
    // clamped into [x_lo - 1, x_hi + 1] (a NaN from a degenerate conic becomes a bound: vmax and
    // vmin return their second operand then), so the int conversion stays in range
    vf x0 = vmin(vmax(vceil(splat(s.mx - 0.5f - 0.01f) - dx_hi), x_lo), x_hi + splat(1.0f));
    vf x1 = vmax(vmin(vfloor(splat(s.mx - 0.5f + 0.01f) - dx_lo), x_hi), x_lo - splat(1.0f));
    x0 = select(disc >= zero, x0, x_hi + splat(1.0f));
    const vi ox = splat_i(static_cast<int32_t>(t.ox));
    store_i(sp.lo + v, __builtin_convertvector(x0, vi) - ox);
    store_i(sp.hi + v, __builtin_convertvector(x1, vi) - ox);
  }
  return true;
}

inline int64_t wrap(int64_t g, int64_t n) { return g < n ? g : g % n; }

// Tile geometry and the walk order of all non-empty tiles (most Gaussians first).
struct Tiles {
  int64_t per_cam;
  std::vector<int64_t> order;
  Tiles(const CompositeArgs& a) : per_cam(a.tiles_x * a.tiles_y) {
    const int64_t n = a.n_cams * per_cam;
    const int64_t* off = a.offsets;
    for (int64_t t = 0; t < n; ++t)
      if (off[t + 1] > off[t]) order.push_back(t);
    std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
      return off[x + 1] - off[x] > off[y + 1] - off[y];
    });
  }
};

// Tiles of one class (same camera, same tile x and y modulo kStride) are kStride tiles apart, so a
// Gaussian whose tile box spans at most kStride tiles each way meets at most one of them: the
// backward runs the classes one after another and such Gaussians' sums go straight to their rows.
constexpr int64_t kStride = 3;

// True when the Gaussian's tile box spans more than kStride tiles in x or y (same box as the
// binning's).
inline bool wide(const Splat& s) {
  const float rx = float(s.rx) / kTile, ry = float(s.ry) / kTile;
  const float cx = s.mx / kTile, cy = s.my / kTile;
  return std::ceil(cx + rx) - std::floor(cx - rx) > kStride ||
         std::ceil(cy + ry) - std::floor(cy - ry) > kStride;
}

inline Splat make_splat(const CompositeArgs& a, int64_t row) {
  Splat s;
  s.row = static_cast<int32_t>(row);
  const int64_t g = a.grow ? a.grow[row] : row;
  s.orow = static_cast<int32_t>(wrap(g, a.n_opac));
  s.crow = static_cast<int32_t>(wrap(g, a.n_color_rows));
  s.slot = -1;
  s.used = 0, s.pad_ = 0;
  s.mx = a.means2d[2 * row], s.my = a.means2d[2 * row + 1];
  s.a = a.conics[3 * row], s.b = a.conics[3 * row + 1], s.c = a.conics[3 * row + 2];
  s.o = a.opacities[s.orow];
  s.z = a.depths ? a.depths[row] : 0.0f;
  s.thr = std::log(255.0f * s.o) * 1.001f + 1e-3f;
  s.rx = a.radii[2 * row], s.ry = a.radii[2 * row + 1];
  return s;
}

// Entries this far ahead in a tile list get their colour rows prefetched.
constexpr int64_t kAhead = 6;

inline void prefetch_row(const float* p, int64_t n) {
  for (int64_t k = 0; k < n; k += 16) __builtin_prefetch(p + k);
}

// Calls fn(ly, b0, b1, lx0, lx1) for every tile row ly of the Gaussian's footprint: SIMD blocks
// [b0, b1] cover tile-local columns [lx0, lx1].
template <typename Fn>
inline void for_each_row(const Splat& s, const TileXY& t, Fn&& fn) {
  Spans sp;
  if (!footprint_spans(s, t, sp)) return;
  for (int ly = sp.y0; ly <= sp.y1; ++ly) {
    const int lx0 = sp.lo[ly], lx1 = sp.hi[ly];
    if (lx0 > lx1) continue;
    fn(ly, lx0 / kLanes, lx1 / kLanes, lx0, lx1);
  }
}

// y[0:n] = sum_i w[i] * v[i][0:n] over the m pairs, summed in registers 4 vectors at a time.
inline void weighted_rows(float* y, const float* const* v, const float* w, int m, int64_t n) {
  int64_t k = 0;
  for (; k + 4 * kLanes <= n; k += 4 * kLanes) {
    vf a0 = splat(0.0f), a1 = a0, a2 = a0, a3 = a0;
    for (int i = 0; i < m; ++i) {
      const vf wi = splat(w[i]);
      const float* r = v[i] + k;
      a0 += wi * load(r), a1 += wi * load(r + kLanes);
      a2 += wi * load(r + 2 * kLanes), a3 += wi * load(r + 3 * kLanes);
    }
    store(y + k, a0), store(y + k + kLanes, a1);
    store(y + k + 2 * kLanes, a2), store(y + k + 3 * kLanes, a3);
  }
  for (; k + kLanes <= n; k += kLanes) {
    vf a0 = splat(0.0f);
    for (int i = 0; i < m; ++i) a0 += splat(w[i]) * load(v[i] + k);
    store(y + k, a0);
  }
  for (; k < n; ++k) {
    float a0 = 0.0f;
    for (int i = 0; i < m; ++i) a0 += w[i] * v[i][k];
    y[k] = a0;
  }
}

// x[0:n] . y[0:n]
inline float dot(const float* x, const float* y, int64_t n) {
  vf a0 = splat(0.0f), a1 = a0;
  int64_t k = 0;
  for (; k + 2 * kLanes <= n; k += 2 * kLanes) {
    a0 += load(x + k) * load(y + k);
    a1 += load(x + k + kLanes) * load(y + k + kLanes);
  }
  for (; k + kLanes <= n; k += kLanes) a0 += load(x + k) * load(y + k);
  float s = hsum(a0 + a1);
  for (; k < n; ++k) s += x[k] * y[k];
  return s;
}

// Per-worker buffers of the forward.
struct FwdScratch {
  std::vector<float> acc;  // channel-major blending: the tile's colours [Dout, kPix]
};

template <bool kChanMajor>
void forward_tile(const CompositeArgs& a, const TileXY& t, Splat* list, int64_t count,
                  FwdScratch& sc, float* out, float* trans, int32_t* last) {
  const int64_t D = a.D, Dout = D + (a.depths ? 1 : 0);
  float* acc = sc.acc.data();
  alignas(64) float T[kPix];
  alignas(64) int32_t live[kPix];  // -1 while the pixel composites, 0 after it stopped
  alignas(64) int32_t stop_at[kPix];
  alignas(64) float w[kLanes];
  for (int p = 0; p < kPix; ++p) {
    T[p] = 1.0f;
    live[p] = (p % kTile < t.tw) && (p / kTile < t.th) ? -1 : 0;
    stop_at[p] = static_cast<int32_t>(count);
  }
  auto pix_index = [&](int64_t ly, int64_t lx) {
    return (t.cam * a.height + t.oy + ly) * a.width + t.ox + lx;
  };
  float* out_row[kTile];  // pixel-major: the tile's rows of the output
  for (int64_t ly = 0; ly < kTile; ++ly)
    out_row[ly] = out + pix_index(ly < t.th ? ly : 0, 0) * Dout;
  if (kChanMajor) {
    std::fill(acc, acc + Dout * kPix, 0.0f);
  } else {
    for (int64_t ly = 0; ly < t.th; ++ly) std::fill(out_row[ly], out_row[ly] + t.tw * Dout, 0.0f);
  }
  const vi lanes = lane_ids();
  const vf lane_x = lane_ids_f();
  int64_t n_live = t.tw * t.th;
  for (int64_t j = 0; j < count && n_live > 0; ++j) {
    Splat& s = list[j];
    const float* col = a.colors + int64_t(s.crow) * D;
    if (j + kAhead < count) prefetch_row(a.colors + int64_t(list[j + kAhead].crow) * D, D);
    const vi jj = splat_i(static_cast<int32_t>(j));
    const vf ha = splat(0.5f * s.a), o = splat(s.o);
    for_each_row(s, t, [&](int ly, int b0, int b1, int lx0, int lx1) {
      const float dy = s.my - (static_cast<float>(t.oy + ly) + 0.5f);
      const vf bdy = splat(s.b * dy), hcdy2 = splat(0.5f * s.c * dy * dy);
      for (int blk = b0; blk <= b1; ++blk) {
        const int p0 = ly * kTile + blk * kLanes;
        const vi lx = lanes + splat_i(blk * kLanes);
        const vi lv = load_i(live + p0) & (lx >= splat_i(lx0)) & (lx <= splat_i(lx1));
        if (mask_bits(lv) == 0) continue;  // every pixel here has stopped
        const vf dx = splat(s.mx - (static_cast<float>(t.ox + blk * kLanes) + 0.5f)) - lane_x;
        const vf sigma = dx * (ha * dx + bdy) + hcdy2;
        const vf alpha = vmin(splat(kAlphaMax), o * exp_nonpos(-sigma));
        const vi ok = lv & (sigma >= splat(0.0f)) & (alpha >= splat(kAlphaMin));
        const vf tv = load(T + p0);
        const vf t_next = tv * (splat(1.0f) - alpha);
        const vi stop = ok & (t_next <= splat(kTMin));
        const vi use = ok & ~stop;
        const vf wv = select(use, alpha * tv, splat(0.0f));
        store(T + p0, select(use, t_next, tv));
        store_i(live + p0, load_i(live + p0) & ~stop);
        store_i(stop_at + p0, select_i(stop, jj, load_i(stop_at + p0)));
        n_live -= n_set(stop);
        const int n_use = n_set(use);
        if (n_use == 0) continue;
        s.used += n_use;
        if (kChanMajor) {
          for (int64_t k = 0; k < D; ++k) {
            float* ak = acc + k * kPix + p0;
            store(ak, load(ak) + wv * splat(col[k]));
          }
          if (a.depths) {
            float* ak = acc + D * kPix + p0;
            store(ak, load(ak) + wv * splat(s.z));
          }
        } else {
          store(w, wv);
          for (uint32_t bits = mask_bits(use); bits; bits &= bits - 1) {
            const int l = __builtin_ctz(bits);
            float* ap = out_row[ly] + (blk * kLanes + l) * Dout;
            axpy(ap, w[l], col, D);
            if (a.depths) ap[D] += w[l] * s.z;
          }
        }
      }
    });
  }
  for (int64_t ly = 0; ly < t.th; ++ly) {
    for (int64_t lx = 0; lx < t.tw; ++lx) {
      const int p = static_cast<int>(ly * kTile + lx);
      const int64_t pix = pix_index(ly, lx);
      trans[pix] = T[p];
      last[pix] = stop_at[p];
      if (kChanMajor) {
        float* op = out + pix * Dout;
        for (int64_t k = 0; k < Dout; ++k) op[k] = acc[k * kPix + p];
      }
    }
  }
}

// Geometry sums of one Gaussian over a tile: d loss / d (mean x, y, conic a, b, c, opacity) and the
// absolute mean gradients (gsplat's absgrad).
constexpr int kGeo = 8;

inline void add_to_rows(const CompositeArgs& a, const CompositeGrads& g, const Splat& s,
                        const float* sums, const float* vc) {
  const int64_t r = s.row, D = a.D;
  g.v_means2d[2 * r] += sums[0];
  g.v_means2d[2 * r + 1] += sums[1];
  g.v_conics[3 * r] += sums[2];
  g.v_conics[3 * r + 1] += sums[3];
  g.v_conics[3 * r + 2] += sums[4];
  g.v_opacities[s.orow] += sums[5];
  if (g.absgrad) {
    g.absgrad[2 * r] += sums[6];
    g.absgrad[2 * r + 1] += sums[7];
  }
  float* vcol = g.v_colors + int64_t(s.crow) * D;
  for (int64_t k = 0; k < D; ++k) vcol[k] += vc[k];
  if (a.depths) g.v_depths[r] += vc[D];
}

// Per-worker buffers of the backward.
struct BwdScratch {
  // v_out of the tile, channel-major [channels, kPix]: all channels when blending per block, the
  // geometry channels (then depth) when their dot products run per block
  std::vector<float> v_tile;
  std::vector<float> vc;  // colour-gradient sums: [Dout, kLanes] or [Dout]
};

// One SIMD block of pixels that a Gaussian reaches, between the backward's passes over it.
struct BlockState {
  vf dx, vis, ov, inv, ti, w, gd;
  float dy;
  int p0;
  uint32_t bits;  // pixels it contributes to
};

template <bool kChanMajor>
void backward_tile(const CompositeArgs& a, const TileXY& t, const Splat* list, const float* trans,
                   const int32_t* last, const float* v_out, const float* v_alpha,
                   const CompositeGrads& g, BwdScratch& sc, float* slots) {
  const int64_t D = a.D, Dout = D + (a.depths ? 1 : 0);
  const int64_t Dg = std::min(a.geo_channels, D);
  // geometry dot products per block from transposed channels when they are few, else per pixel
  const bool gd_blocks = kChanMajor || Dg + (a.depths ? 1 : 0) <= kBlockChannels;
  alignas(64) float T[kPix], behind[kPix], vat[kPix];
  alignas(64) int32_t stop_at[kPix];
  const float* v_pix[kPix];
  auto pix_index = [&](int64_t ly, int64_t lx) {
    return (t.cam * a.height + t.oy + ly) * a.width + t.ox + lx;
  };
  // transposed channels: colour channel k at row k, depth at row `z_row`
  const int64_t n_vt = kChanMajor ? Dout : gd_blocks ? Dg + (a.depths ? 1 : 0) : 0;
  const int64_t z_row = kChanMajor ? D : Dg;
  float* vt = sc.v_tile.data();
  std::fill(vt, vt + n_vt * kPix, 0.0f);
  int32_t max_last = 0;
  for (int p = 0; p < kPix; ++p) {
    const int64_t lx = p % kTile, ly = p / kTile;
    T[p] = 1.0f, behind[p] = 0.0f, vat[p] = 0.0f, stop_at[p] = 0;
    v_pix[p] = v_out;
    if (lx >= t.tw || ly >= t.th) continue;
    const int64_t pix = pix_index(ly, lx);
    T[p] = trans[pix];
    vat[p] = v_alpha[pix] * trans[pix];
    stop_at[p] = last[pix];
    v_pix[p] = v_out + pix * Dout;
    max_last = std::max(max_last, stop_at[p]);
    if (n_vt == 0) continue;
    for (int64_t k = 0; k < (kChanMajor ? Dout : Dg); ++k) vt[k * kPix + p] = v_pix[p][k];
    if (!kChanMajor && a.depths) vt[z_row * kPix + p] = v_pix[p][D];
  }
  float* vc = sc.vc.data();
  const vi lanes = lane_ids();
  const vf lane_x = lane_ids_f();
  const vf zero = splat(0.0f);
  BlockState blocks[kPix / kLanes];
  const float* pair_v[kPix];  // pixel-major: the contributing pixels' output gradients ...
  alignas(64) float pair_w[kPix];  // ... their blend weights
  int pair_slot[kPix];             // ... and block * kLanes + lane
  alignas(64) float lane_w[kPix], lane_gd[kPix];  // per block * kLanes + lane
  for (int64_t j = max_last - 1; j >= 0; --j) {
    const Splat& s = list[j];
    if (s.used == 0) continue;  // blended into no pixel of this tile
    const float* col = a.colors + int64_t(s.crow) * D;
    if (j >= kAhead) {  // the rows an entry further on reads and adds to
      const Splat& f = list[j - kAhead];
      prefetch_row(a.colors + int64_t(f.crow) * D, D);
      prefetch_row(g.v_colors + int64_t(f.crow) * D, D);
      __builtin_prefetch(g.v_means2d + 2 * int64_t(f.row));
      __builtin_prefetch(g.v_conics + 3 * int64_t(f.row));
      __builtin_prefetch(g.v_opacities + f.orow);
      if (g.absgrad) __builtin_prefetch(g.absgrad + 2 * int64_t(f.row));
      if (g.v_depths) __builtin_prefetch(g.v_depths + f.row);
    }
    const vi jj = splat_i(static_cast<int32_t>(j));
    const vf ca = splat(s.a), cb = splat(s.b), cc = splat(s.c), o = splat(s.o);
    // pass 1: alpha, weight and transmittance of every pixel the Gaussian reaches
    int n_blocks = 0, n_pairs = 0;
    for_each_row(s, t, [&](int ly, int b0, int b1, int lx0, int lx1) {
      const float dy = s.my - (static_cast<float>(t.oy + ly) + 0.5f);
      const vf bdy = splat(s.b * dy), hcdy2 = splat(0.5f * s.c * dy * dy);
      for (int blk = b0; blk <= b1; ++blk) {
        const int p0 = ly * kTile + blk * kLanes;
        const vi lx = lanes + splat_i(blk * kLanes);
        const vi in = (jj < load_i(stop_at + p0)) & (lx >= splat_i(lx0)) & (lx <= splat_i(lx1));
        if (mask_bits(in) == 0) continue;  // no pixel here reached this Gaussian
        const vf dx = splat(s.mx - (static_cast<float>(t.ox + blk * kLanes) + 0.5f)) - lane_x;
        const vf sigma = dx * (splat(0.5f) * ca * dx + bdy) + hcdy2;
        const vf vis = exp_nonpos(-sigma);
        const vf ov = o * vis;
        const vf alpha = vmin(splat(kAlphaMax), ov);
        const vi ok = in & (sigma >= zero) & (alpha >= splat(kAlphaMin));
        const uint32_t bits = mask_bits(ok);
        if (bits == 0) continue;
        BlockState& b = blocks[n_blocks];
        const vf tv = load(T + p0);
        b.dx = dx, b.vis = vis, b.ov = ov, b.dy = dy, b.p0 = p0, b.bits = bits;
        b.inv = splat(1.0f) / (splat(1.0f) - alpha);
        b.ti = tv * b.inv;  // transmittance in front of this Gaussian
        b.w = select(ok, alpha * b.ti, zero);
        store(T + p0, select(ok, b.ti, tv));
        if (!kChanMajor) {
          store(lane_w + n_blocks * kLanes, b.w);
          for (uint32_t m = bits; m; m &= m - 1) {
            const int l = __builtin_ctz(m);
            pair_v[n_pairs] = v_pix[p0 + l];
            pair_w[n_pairs] = lane_w[n_blocks * kLanes + l];
            pair_slot[n_pairs++] = n_blocks * kLanes + l;
          }
        }
        ++n_blocks;
      }
    });
    if (n_blocks == 0) continue;
    // pass 2: the geometry channels' dot products with the pixels' output gradients
    if (gd_blocks) {
      for (int bi = 0; bi < n_blocks; ++bi) {
        BlockState& b = blocks[bi];
        vf gd = zero;
        for (int64_t k = 0; k < Dg; ++k) gd += splat(col[k]) * load(vt + k * kPix + b.p0);
        if (a.depths) gd += splat(s.z) * load(vt + z_row * kPix + b.p0);
        b.gd = gd;
      }
    } else {
      std::fill(lane_gd, lane_gd + n_blocks * kLanes, 0.0f);
      for (int i = 0; i < n_pairs; ++i) {
        float d = dot(col, pair_v[i], Dg);
        if (a.depths) d += s.z * pair_v[i][D];
        lane_gd[pair_slot[i]] = d;
      }
      for (int bi = 0; bi < n_blocks; ++bi) blocks[bi].gd = load(lane_gd + bi * kLanes);
    }
    // pass 3: gradients of alpha, hence of the conic, mean and opacity
    vf s_mx = zero, s_my = zero, s_a = zero, s_b = zero, s_c = zero, s_op = zero, s_ax = zero,
       s_ay = zero;
    for (int bi = 0; bi < n_blocks; ++bi) {
      const BlockState& b = blocks[bi];
      const vf bh = load(behind + b.p0);
      const vf v_a = b.ti * b.gd + (load(vat + b.p0) - bh) * b.inv;
      store(behind + b.p0, bh + b.w * b.gd);
      const vi grad = (b.w > zero) & (b.ov <= splat(kAlphaMax));  // clamped alphas: no gradient
      const vf v_sigma = select(grad, -b.ov * v_a, zero);
      s_op += select(grad, b.vis * v_a, zero);
      const vf dx = b.dx, dy = splat(b.dy);
      const vf px = v_sigma * (ca * dx + cb * dy), py = v_sigma * (cb * dx + cc * dy);
      s_mx += px;
      s_my += py;
      s_ax += vabs(px);
      s_ay += vabs(py);
      s_a += splat(0.5f) * v_sigma * dx * dx;
      s_b += v_sigma * dx * dy;
      s_c += splat(0.5f) * v_sigma * dy * dy;
    }
    // pass 4: colour gradients, sum of weight x output gradient
    if (kChanMajor) {
      for (int64_t k = 0; k < Dout; ++k) {
        vf acc = zero;
        for (int bi = 0; bi < n_blocks; ++bi)
          acc += blocks[bi].w * load(vt + k * kPix + blocks[bi].p0);
        vc[k] = hsum(acc);
      }
    } else {
      weighted_rows(vc, pair_v, pair_w, n_pairs, Dout);
    }
    const float sums[kGeo] = {hsum(s_mx), hsum(s_my), hsum(s_a),  hsum(s_b),
                              hsum(s_c),  hsum(s_op), hsum(s_ax), hsum(s_ay)};
    if (s.slot >= 0) {  // a wide Gaussian: other tiles of this class may add to its rows now
      float* dst = slots + s.slot * (kGeo + Dout);
      std::copy(sums, sums + kGeo, dst);
      std::copy(vc, vc + Dout, dst + kGeo);
    } else {
      add_to_rows(a, g, s, sums, vc);
    }
  }
}

}  // namespace

void composite_forward(const CompositeArgs& a, float* out, float* trans, int32_t* last,
                       Splat* splats) {
  const Tiles tiles(a);
  const int64_t n_isect = a.offsets[a.n_cams * tiles.per_cam];
  constexpr int64_t kChunk = 1 << 14;
  parallel_tasks(a.n_threads, (n_isect + kChunk - 1) / kChunk, [&](int64_t task, int) {
    const int64_t end = std::min(n_isect, (task + 1) * kChunk);
    for (int64_t i = task * kChunk; i < end; ++i) {
      if (i + 16 < end) {  // the rows an entry further on reads
        const int64_t r = a.flatten_ids[i + 16];
        __builtin_prefetch(a.means2d + 2 * r), __builtin_prefetch(a.conics + 3 * r);
        __builtin_prefetch(a.radii + 2 * r);
        __builtin_prefetch(a.opacities + wrap(a.grow ? a.grow[r] : r, a.n_opac));
        if (a.depths) __builtin_prefetch(a.depths + r);
      }
      splats[i] = make_splat(a, a.flatten_ids[i]);
    }
  });
  int32_t n_slots = 0;  // wide Gaussians' intersections, numbered in list order
  for (int64_t i = 0; i < n_isect; ++i)
    if (wide(splats[i])) splats[i].slot = n_slots++;
  const int64_t Dout = a.D + (a.depths ? 1 : 0);
  const bool chan_major = Dout <= kBlockChannels;
  // pixels of empty tiles: nothing drawn
  const int64_t n_tiles = a.n_cams * tiles.per_cam;
  for (int64_t tile = 0; tile < n_tiles; ++tile) {
    if (a.offsets[tile + 1] > a.offsets[tile]) continue;
    const TileXY t = tile_xy(a, tiles.per_cam, tile);
    for (int64_t ly = 0; ly < t.th; ++ly) {
      const int64_t pix = (t.cam * a.height + t.oy + ly) * a.width + t.ox;
      std::fill(out + pix * Dout, out + (pix + t.tw) * Dout, 0.0f);
      std::fill(trans + pix, trans + pix + t.tw, 1.0f);
      std::fill(last + pix, last + pix + t.tw, 0);
    }
  }
  const int64_t n = static_cast<int64_t>(tiles.order.size());
  // allocated here, so running out of memory raises in the caller instead of ending a worker
  std::vector<FwdScratch> scratch(n_workers(a.n_threads, n));
  if (chan_major)
    for (FwdScratch& sc : scratch) sc.acc.resize(Dout * kPix);
  parallel_tasks(a.n_threads, n, [&](int64_t i, int worker) {
    const int64_t tile = tiles.order[i];
    const TileXY t = tile_xy(a, tiles.per_cam, tile);
    const int64_t start = a.offsets[tile], count = a.offsets[tile + 1] - start;
    FwdScratch& sc = scratch[worker];
    if (chan_major) {
      forward_tile<true>(a, t, splats + start, count, sc, out, trans, last);
    } else {
      forward_tile<false>(a, t, splats + start, count, sc, out, trans, last);
    }
  });
}

void composite_backward(const CompositeArgs& a, const Splat* splats, const float* trans,
                        const int32_t* last, const float* v_out, const float* v_alpha,
                        const CompositeGrads& g) {
  const Tiles tiles(a);
  const int64_t Dout = a.D + (a.depths ? 1 : 0);
  const bool chan_major = Dout <= kBlockChannels;
  const int64_t n_isect = a.offsets[a.n_cams * tiles.per_cam];
  // tile classes, each busiest first (tiles.order is)
  std::vector<std::vector<int64_t>> classes(a.n_cams * kStride * kStride);
  for (const int64_t tile : tiles.order) {
    const int64_t tl = tile % tiles.per_cam, tx = tl % a.tiles_x, ty = tl / a.tiles_x;
    classes[(tile / tiles.per_cam * kStride + ty % kStride) * kStride + tx % kStride].push_back(
        tile);
  }
  std::vector<int64_t> sizes;
  for (const auto& c : classes) sizes.push_back(static_cast<int64_t>(c.size()));
  int64_t n_slots = 0;
  for (int64_t i = 0; i < n_isect; ++i) n_slots += splats[i].slot >= 0;
  // zero-filled: an intersection the backward does not reach (behind every pixel's last
  // contributor) leaves its slot untouched
  std::vector<float> slots(n_slots * (kGeo + Dout), 0.0f);
  // allocated here, so running out of memory raises in the caller instead of ending a worker
  std::vector<BwdScratch> scratch(n_workers(a.n_threads, static_cast<int64_t>(tiles.order.size())));
  for (BwdScratch& sc : scratch) sc.vc.resize(Dout), sc.v_tile.resize(Dout * kPix);
  parallel_phases(a.n_threads, sizes, [&](int64_t ph, int64_t i, int worker) {
    const int64_t tile = classes[ph][i];
    const TileXY t = tile_xy(a, tiles.per_cam, tile);
    BwdScratch& sc = scratch[worker];
    const Splat* list = splats + a.offsets[tile];
    if (chan_major)
      backward_tile<true>(a, t, list, trans, last, v_out, v_alpha, g, sc, slots.data());
    else
      backward_tile<false>(a, t, list, trans, last, v_out, v_alpha, g, sc, slots.data());
  });
  // wide Gaussians' partial sums, in list order (deterministic)
  for (int64_t i = 0; i < n_isect; ++i) {
    const Splat& s = splats[i];
    if (s.slot < 0) continue;
    const float* src = slots.data() + s.slot * (kGeo + Dout);
    add_to_rows(a, g, s, src, src + kGeo);
  }
}

}  // namespace fit3d
