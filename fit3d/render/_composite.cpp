// CPU tile compositor for 3D Gaussian splatting: forward and hand-written backward.
//
// Each 16x16 tile walks its depth-sorted Gaussians front to back and splats each one only over
// the rows of its footprint inside the tile, kLanes pixels of a row at a time (one SIMD vector:
// sigma, exp, alpha and transmittance for all of them at once). A pixel stops before the Gaussian
// that would bring its transmittance to <= 1e-4, and a tile stops when all its pixels have. The
// backward walks the same lists back to front, recovering each transmittance by division, sums
// each Gaussian's gradient over the tile and adds it to the output under a striped lock. Tiles are
// tasks of `parallel_tasks`, most loaded first. Colour channels are blended per SIMD block in a
// channel-major tile buffer when there are few of them, per pixel (vectorised over channels) when
// there are many. Both passes read the tile lists' Gaussians from `Splat` records the forward
// writes in list order. Memory: the outputs, 64 bytes per Gaussian-tile intersection, per worker
// one [channels, 256] tile buffer; never N x H x W.

#include <mutex>

#include "_kernels.h"

namespace fit3d {
namespace {

constexpr int64_t kLocks = 4096;
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
    vf x0 = vmax(x_lo, vceil(splat(s.mx - 0.5f - 0.01f) - dx_hi));
    vf x1 = vmin(x_hi, vfloor(splat(s.mx - 0.5f + 0.01f) - dx_lo));
    x0 = select(disc >= zero, x0, x_hi + splat(1.0f));
    x1 = vmax(x1, x_lo - splat(1.0f));  // keeps the int conversion in range
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

inline Splat make_splat(const CompositeArgs& a, int64_t row) {
  Splat s;
  s.row = row;
  const int64_t g = a.grow ? a.grow[row] : row;
  s.orow = wrap(g, a.n_opac);
  s.crow = wrap(g, a.n_color_rows);
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

template <bool kChanMajor>
void forward_tile(const CompositeArgs& a, const TileXY& t, const Splat* list, int64_t count,
                  float* acc, float* out, float* trans, int32_t* last) {
  const int64_t D = a.D, Dout = D + (a.depths ? 1 : 0);
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
  for (int64_t ly = 0; ly < kTile; ++ly) out_row[ly] = out + pix_index(ly < t.th ? ly : 0, 0) * Dout;
  if (kChanMajor) {
    std::fill(acc, acc + Dout * kPix, 0.0f);
  } else {
    for (int64_t ly = 0; ly < t.th; ++ly) std::fill(out_row[ly], out_row[ly] + t.tw * Dout, 0.0f);
  }
  const vi lanes = lane_ids();
  const vf lane_x = lane_ids_f();
  int64_t n_live = t.tw * t.th;
  for (int64_t j = 0; j < count && n_live > 0; ++j) {
    const Splat& s = list[j];
    const float* col = a.colors + s.crow * D;
    if (j + kAhead < count) prefetch_row(a.colors + list[j + kAhead].crow * D, D);
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
        if (n_set(use) == 0) continue;
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

// Per-worker buffers of the backward.
struct BwdScratch {
  // v_out of the tile, channel-major [channels, kPix]: all channels when blending per block, the
  // geometry channels (then depth) when blending per pixel
  std::vector<float> v_tile;
  std::vector<float> vc;  // colour-gradient sums: [Dout, kLanes] or [Dout]
};

template <bool kChanMajor>
void backward_tile(const CompositeArgs& a, const TileXY& t, const Splat* list, const float* trans,
                   const int32_t* last, const float* v_out, const float* v_alpha,
                   const CompositeGrads& g, BwdScratch& sc, std::vector<std::mutex>& locks) {
  const int64_t D = a.D, Dout = D + (a.depths ? 1 : 0);
  const int64_t Dg = std::min(a.geo_channels, D);
  alignas(64) float T[kPix], behind[kPix], vat[kPix];
  alignas(64) int32_t stop_at[kPix];
  alignas(64) float w[kLanes];
  const float* v_pix[kPix];
  auto pix_index = [&](int64_t ly, int64_t lx) {
    return (t.cam * a.height + t.oy + ly) * a.width + t.ox + lx;
  };
  // transposed channels: colour channel k at row k, depth at row `z_row`
  const int64_t n_vt = kChanMajor ? Dout : Dg + (a.depths ? 1 : 0);
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
    for (int64_t k = 0; k < (kChanMajor ? Dout : Dg); ++k) vt[k * kPix + p] = v_pix[p][k];
    if (!kChanMajor && a.depths) vt[z_row * kPix + p] = v_pix[p][D];
  }
  float* vc = sc.vc.data();
  const vi lanes = lane_ids();
  const vf lane_x = lane_ids_f();
  const vf zero = splat(0.0f);
  for (int64_t j = max_last - 1; j >= 0; --j) {
    const Splat& s = list[j];
    const float* col = a.colors + s.crow * D;
    if (j >= kAhead) {
      prefetch_row(a.colors + list[j - kAhead].crow * D, D);
      prefetch_row(g.v_colors + list[j - kAhead].crow * D, D);
    }
    const vi jj = splat_i(static_cast<int32_t>(j));
    const vf ca = splat(s.a), cb = splat(s.b), cc = splat(s.c), o = splat(s.o);
    vf s_mx = zero, s_my = zero, s_a = zero, s_b = zero, s_c = zero, s_op = zero, s_ax = zero,
       s_ay = zero;
    std::fill(vc, vc + Dout * (kChanMajor ? kLanes : 1), 0.0f);
    bool any = false;
    for_each_row(s, t, [&](int ly, int b0, int b1, int lx0, int lx1) {
      const float dy_s = s.my - (static_cast<float>(t.oy + ly) + 0.5f);
      const vf dy = splat(dy_s), bdy = splat(s.b * dy_s), hcdy2 = splat(0.5f * s.c * dy_s * dy_s);
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
        if (mask_bits(ok) == 0) continue;
        any = true;
        const vf inv = splat(1.0f) / (splat(1.0f) - alpha);
        const vf tv = load(T + p0);
        const vf ti = tv * inv;  // transmittance in front of this Gaussian
        const vf wv = select(ok, alpha * ti, zero);
        // geometry channels' dot product with the pixel's output gradient
        vf gd = zero;
        for (int64_t k = 0; k < Dg; ++k) gd += splat(col[k]) * load(vt + k * kPix + p0);
        if (a.depths) gd += splat(s.z) * load(vt + z_row * kPix + p0);
        const vf bh = load(behind + p0);
        const vf v_a = ti * gd + (load(vat + p0) - bh) * inv;
        store(behind + p0, bh + wv * gd);
        store(T + p0, select(ok, ti, tv));
        const vi grad = ok & (ov <= splat(kAlphaMax));  // clamped alphas pass no gradient
        const vf v_sigma = select(grad, -ov * v_a, zero);
        s_op += select(grad, vis * v_a, zero);
        const vf px = v_sigma * (ca * dx + cb * dy), py = v_sigma * (cb * dx + cc * dy);
        s_mx += px;
        s_my += py;
        s_ax += vabs(px);
        s_ay += vabs(py);
        s_a += splat(0.5f) * v_sigma * dx * dx;
        s_b += v_sigma * dx * dy;
        s_c += splat(0.5f) * v_sigma * dy * dy;
        if (kChanMajor) {
          for (int64_t k = 0; k < Dout; ++k) {
            float* ck = vc + k * kLanes;
            store(ck, load(ck) + wv * load(vt + k * kPix + p0));
          }
        } else {
          store(w, wv);
          for (uint32_t bits = mask_bits(ok); bits; bits &= bits - 1) {
            const int l = __builtin_ctz(bits);
            axpy(vc, w[l], v_pix[p0 + l], Dout);
          }
        }
      }
    });
    if (!any) continue;
    if (kChanMajor) {
      for (int64_t k = 0; k < Dout; ++k) vc[k] = hsum(load(vc + k * kLanes));  // k <= k * kLanes
    }
    std::lock_guard<std::mutex> hold(locks[s.orow % kLocks]);
    const int64_t r = s.row;
    g.v_means2d[2 * r] += hsum(s_mx);
    g.v_means2d[2 * r + 1] += hsum(s_my);
    g.v_conics[3 * r] += hsum(s_a);
    g.v_conics[3 * r + 1] += hsum(s_b);
    g.v_conics[3 * r + 2] += hsum(s_c);
    g.v_opacities[s.orow] += hsum(s_op);
    if (g.absgrad) {
      g.absgrad[2 * r] += hsum(s_ax);
      g.absgrad[2 * r + 1] += hsum(s_ay);
    }
    float* vcol = g.v_colors + s.crow * D;
    for (int64_t k = 0; k < D; ++k) vcol[k] += vc[k];
    if (a.depths) g.v_depths[r] += vc[D];
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
    for (int64_t i = task * kChunk; i < end; ++i) splats[i] = make_splat(a, a.flatten_ids[i]);
  });
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
  std::vector<std::vector<float>> acc(n_workers(a.n_threads, n));
  parallel_tasks(a.n_threads, n, [&](int64_t i, int worker) {
    const int64_t tile = tiles.order[i];
    const TileXY t = tile_xy(a, tiles.per_cam, tile);
    const int64_t start = a.offsets[tile], count = a.offsets[tile + 1] - start;
    if (chan_major) {
      std::vector<float>& buf = acc[worker];
      if (buf.empty()) buf.resize(Dout * kPix);
      forward_tile<true>(a, t, splats + start, count, buf.data(), out, trans, last);
    } else {
      forward_tile<false>(a, t, splats + start, count, nullptr, out, trans, last);
    }
  });
}

void composite_backward(const CompositeArgs& a, const Splat* splats, const float* trans,
                        const int32_t* last, const float* v_out, const float* v_alpha,
                        const CompositeGrads& g) {
  const Tiles tiles(a);
  const int64_t Dout = a.D + (a.depths ? 1 : 0);
  const bool chan_major = Dout <= kBlockChannels;
  std::vector<std::mutex> locks(kLocks);  // striped by Gaussian: tiles sharing one add in turn
  const int64_t n = static_cast<int64_t>(tiles.order.size());
  std::vector<BwdScratch> scratch(n_workers(a.n_threads, n));
  parallel_tasks(a.n_threads, n, [&](int64_t i, int worker) {
    const int64_t tile = tiles.order[i];
    const TileXY t = tile_xy(a, tiles.per_cam, tile);
    BwdScratch& sc = scratch[worker];
    if (sc.vc.empty()) {
      sc.vc.resize(Dout * kLanes);
      sc.v_tile.resize(Dout * kPix);
    }
    if (chan_major)
      backward_tile<true>(a, t, splats + a.offsets[tile], trans, last, v_out, v_alpha, g, sc, locks);
    else
      backward_tile<false>(a, t, splats + a.offsets[tile], trans, last, v_out, v_alpha, g, sc, locks);
  });
}

}  // namespace fit3d
