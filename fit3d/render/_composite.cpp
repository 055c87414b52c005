// CPU tile compositor for 3D Gaussian splatting: forward and hand-written backward.
//
// Each 16x16 tile walks its depth-sorted Gaussians front to back and splats each one only over
// the pixels of its radius box inside the tile; a pixel stops before the Gaussian that would bring
// its transmittance to <= 1e-4, and a tile stops when all its pixels have. The backward walks the
// same lists back to front per pixel, recovering each transmittance by division, sums each
// Gaussian's gradient over the tile and adds it to the output under a striped lock. Tiles run in
// parallel on torch.get_num_threads() threads (`parallel_tasks`), most loaded first. Memory: the
// image, the Gaussian-tile lists and [M, D] gradients, never N x H x W.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "_kernels.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <vector>

namespace {

constexpr int kTile = 16;
constexpr int kPix = kTile * kTile;
constexpr float kAlphaMin = 1.0f / 255.0f;
constexpr float kAlphaMax = 0.999f;
constexpr float kTMin = 1e-4f;
constexpr int64_t kLocks = 4096;

struct Grid {
  int64_t n_cams, width, height, tiles_x, tiles_y;
};

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

// A Gaussian's footprint: pixels where sigma <= ln(255 opacity) (alpha >= 1/255), found row by row
// from the conic's quadratic, widened by a margin so rounding can only add pixels, never drop one;
// every pixel is still tested exactly.
struct Footprint {
  float mx, my, a, b, c, thr;
  // Inclusive x range of row y (pixel centre y + 0.5) clipped to [lo, hi]; false if empty.
  inline bool row(int64_t y, int64_t lo, int64_t hi, int64_t& x0, int64_t& x1) const {
    const float dy = my - (static_cast<float>(y) + 0.5f);
    const float disc = b * b * dy * dy - a * (c * dy * dy - 2.0f * thr);
    if (disc < 0.0f) return false;
    const float root = std::sqrt(disc);
    const float dx_lo = (-b * dy - root) / a, dx_hi = (-b * dy + root) / a;
    x0 = std::max<int64_t>(lo, static_cast<int64_t>(std::ceil(mx - dx_hi - 0.5f - 0.01f)));
    x1 = std::min<int64_t>(hi, static_cast<int64_t>(std::floor(mx - dx_lo - 0.5f + 0.01f)));
    return x0 <= x1;
  }
};

inline Footprint footprint(float mx, float my, float a, float b, float c, float o) {
  return {mx, my, a, b, c, std::log(255.0f * o) * 1.001f + 1e-3f};
}

// Runs fn(tile) for every tile with Gaussians, dynamically scheduled, busiest tiles first.
template <typename Fn>
void for_each_tile(const int64_t* offsets, int64_t n_tiles, Fn fn) {
  std::vector<int64_t> order;
  order.reserve(n_tiles);
  for (int64_t t = 0; t < n_tiles; ++t) {
    if (offsets[t + 1] > offsets[t]) order.push_back(t);
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return offsets[a + 1] - offsets[a] > offsets[b + 1] - offsets[b];
  });
  fit3d::parallel_tasks(at::get_num_threads(), static_cast<int64_t>(order.size()),
                        [&](int64_t i, int) { fn(order[i]); });
}

}  // namespace

// Returns (colours [C, H, W, D], transmittance [C, H, W], last [C, H, W] int32): a pixel's
// contributors are among the first `last` entries of its tile's list.
std::vector<torch::Tensor> composite_forward(torch::Tensor means2d, torch::Tensor conics,
                                   torch::Tensor opacities, torch::Tensor colors,
                                   torch::Tensor radii, torch::Tensor flatten_ids,
                                   torch::Tensor offsets, int64_t n_cams, int64_t width,
                                   int64_t height, int64_t tiles_x, int64_t tiles_y) {
  const int64_t D = colors.size(1);
  auto f32 = means2d.options();
  auto out = torch::zeros({n_cams, height, width, D}, f32);
  auto trans = torch::ones({n_cams, height, width}, f32);
  auto last = torch::zeros({n_cams, height, width}, f32.dtype(torch::kInt32));
  const float* m2 = means2d.data_ptr<float>();
  const float* co = conics.data_ptr<float>();
  const float* op = opacities.data_ptr<float>();
  const float* col = colors.data_ptr<float>();
  const int32_t* rad = radii.data_ptr<int32_t>();
  const int64_t* ids = flatten_ids.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  float* out_p = out.data_ptr<float>();
  float* trans_p = trans.data_ptr<float>();
  int32_t* last_p = last.data_ptr<int32_t>();
  const int64_t per_cam = tiles_x * tiles_y;

  for_each_tile(off, n_cams * per_cam, [&](int64_t tile) {
    const int64_t cam = tile / per_cam, tl = tile % per_cam;
    const int64_t ox = (tl % tiles_x) * kTile, oy = (tl / tiles_x) * kTile;
    const int64_t tw = std::min<int64_t>(kTile, width - ox), th = std::min<int64_t>(kTile, height - oy);
    const int64_t start = off[tile], count = off[tile + 1] - start;
    float T[kPix];
    int32_t stop_at[kPix];
    bool done[kPix];
    std::vector<float> acc(kPix * D, 0.0f);
    for (int p = 0; p < kPix; ++p) {
      T[p] = 1.0f;
      stop_at[p] = static_cast<int32_t>(count);
      done[p] = false;
    }
    int64_t n_done = 0;
    const int64_t n_pix = tw * th;
    for (int64_t j = 0; j < count && n_done < n_pix; ++j) {
      const int64_t g = ids[start + j];
      const float mx = m2[2 * g], my = m2[2 * g + 1];
      const float a = co[3 * g], b = co[3 * g + 1], c = co[3 * g + 2], o = op[g];
      const Box bx = pixel_box(mx, my, rad[2 * g], rad[2 * g + 1], ox, oy, tw, th);
      const float* cg = col + g * D;
      const Footprint fp = footprint(mx, my, a, b, c, o);
      for (int64_t y = bx.y0; y <= bx.y1; ++y) {
        const float dy = my - (static_cast<float>(y) + 0.5f);
        int64_t x0, x1;
        if (!fp.row(y, bx.x0, bx.x1, x0, x1)) continue;
        for (int64_t x = x0; x <= x1; ++x) {
          const int p = static_cast<int>((y - oy) * kTile + (x - ox));
          if (done[p]) continue;
          const float dx = mx - (static_cast<float>(x) + 0.5f);
          const float sigma = 0.5f * (a * dx * dx + c * dy * dy) + b * dx * dy;
          const float alpha = std::min(kAlphaMax, o * std::exp(-sigma));
          if (sigma < 0.0f || alpha < kAlphaMin) continue;
          const float t_next = T[p] * (1.0f - alpha);
          if (t_next <= kTMin) {
            done[p] = true;
            stop_at[p] = static_cast<int32_t>(j);
            ++n_done;
            continue;
          }
          const float w = alpha * T[p];
          float* ap = acc.data() + p * D;
          for (int64_t k = 0; k < D; ++k) ap[k] += w * cg[k];
          T[p] = t_next;
        }
      }
    }
    for (int64_t y = 0; y < th; ++y) {
      for (int64_t x = 0; x < tw; ++x) {
        const int p = static_cast<int>(y * kTile + x);
        const int64_t pix = (cam * height + oy + y) * width + ox + x;
        trans_p[pix] = T[p];
        last_p[pix] = stop_at[p];
        std::copy(acc.data() + p * D, acc.data() + (p + 1) * D, out_p + pix * D);
      }
    }
  });
  return {out, trans, last};
}

// Returns gradients: geometry [M, 8] (means2d x, y, conic a, b, c, opacity, then the per-pixel
// absolute means2d gradients summed, gsplat's absgrad) and colours [M, D].
// Only the first `geo_channels` channels of v_out feed the geometry gradient.
std::vector<torch::Tensor> composite_backward(torch::Tensor means2d, torch::Tensor conics,
                                    torch::Tensor opacities, torch::Tensor colors,
                                    torch::Tensor radii, torch::Tensor flatten_ids,
                                    torch::Tensor offsets, torch::Tensor trans,
                                    torch::Tensor last, torch::Tensor v_out,
                                    torch::Tensor v_alpha, int64_t n_cams, int64_t width,
                                    int64_t height, int64_t tiles_x, int64_t tiles_y,
                                    int64_t geo_channels) {
  const int64_t D = colors.size(1), M = colors.size(0);
  const int64_t Dg = std::min(geo_channels, D);
  auto f32 = means2d.options();
  auto v_geo = torch::zeros({M, 8}, f32);
  auto v_col = torch::zeros({M, D}, f32);
  std::vector<std::mutex> locks(kLocks);  // striped by Gaussian: tiles sharing one add in turn
  const float* m2 = means2d.data_ptr<float>();
  const float* co = conics.data_ptr<float>();
  const float* op = opacities.data_ptr<float>();
  const float* col = colors.data_ptr<float>();
  const int32_t* rad = radii.data_ptr<int32_t>();
  const int64_t* ids = flatten_ids.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const float* trans_p = trans.data_ptr<float>();
  const int32_t* last_p = last.data_ptr<int32_t>();
  const float* vo = v_out.data_ptr<float>();
  const float* va = v_alpha.data_ptr<float>();
  float* vg_p = v_geo.data_ptr<float>();
  float* vc_p = v_col.data_ptr<float>();
  const int64_t per_cam = tiles_x * tiles_y;

  for_each_tile(off, n_cams * per_cam, [&](int64_t tile) {
    const int64_t cam = tile / per_cam, tl = tile % per_cam;
    const int64_t ox = (tl % tiles_x) * kTile, oy = (tl / tiles_x) * kTile;
    const int64_t tw = std::min<int64_t>(kTile, width - ox), th = std::min<int64_t>(kTile, height - oy);
    const int64_t start = off[tile];
    std::vector<float> vc_local(D);
    float T[kPix], behind[kPix];
    float t_final[kPix], v_a[kPix];
    int32_t stop_at[kPix];
    const float* v_pix[kPix];
    int32_t max_last = 0;
    for (int p = 0; p < kPix; ++p) stop_at[p] = 0;
    for (int64_t y = 0; y < th; ++y) {
      for (int64_t x = 0; x < tw; ++x) {
        const int p = static_cast<int>(y * kTile + x);
        const int64_t pix = (cam * height + oy + y) * width + ox + x;
        t_final[p] = trans_p[pix];
        T[p] = trans_p[pix];
        behind[p] = 0.0f;
        stop_at[p] = last_p[pix];
        v_a[p] = va[pix];
        v_pix[p] = vo + pix * D;
        max_last = std::max(max_last, stop_at[p]);
      }
    }
    for (int64_t j = max_last - 1; j >= 0; --j) {
      const int64_t g = ids[start + j];
      const float mx = m2[2 * g], my = m2[2 * g + 1];
      const float a = co[3 * g], b = co[3 * g + 1], c = co[3 * g + 2], o = op[g];
      const Box bx = pixel_box(mx, my, rad[2 * g], rad[2 * g + 1], ox, oy, tw, th);
      const float* cg = col + g * D;
      std::fill(vc_local.begin(), vc_local.end(), 0.0f);
      float* vc_g = vc_local.data();
      float v_mx = 0, v_my = 0, v_ca = 0, v_cb = 0, v_cc = 0, v_op = 0;
      float abs_mx = 0, abs_my = 0;
      bool any = false;
      const Footprint fp = footprint(mx, my, a, b, c, o);
      for (int64_t y = bx.y0; y <= bx.y1; ++y) {
        const float dy = my - (static_cast<float>(y) + 0.5f);
        int64_t x0, x1;
        if (!fp.row(y, bx.x0, bx.x1, x0, x1)) continue;
        for (int64_t x = x0; x <= x1; ++x) {
          const int p = static_cast<int>((y - oy) * kTile + (x - ox));
          if (j >= stop_at[p]) continue;
          const float dx = mx - (static_cast<float>(x) + 0.5f);
          const float sigma = 0.5f * (a * dx * dx + c * dy * dy) + b * dx * dy;
          const float vis = std::exp(-sigma);
          const float alpha = std::min(kAlphaMax, o * vis);
          if (sigma < 0.0f || alpha < kAlphaMin) continue;
          any = true;
          const float inv = 1.0f / (1.0f - alpha);
          const float t_i = T[p] * inv;  // transmittance in front of this Gaussian
          const float w = alpha * t_i;
          const float* vp = v_pix[p];
          float gdot = 0.0f;
#pragma omp simd reduction(+ : gdot)
          for (int64_t k = 0; k < Dg; ++k) gdot += cg[k] * vp[k];
          for (int64_t k = 0; k < D; ++k) vc_g[k] += w * vp[k];
          const float v_alpha_i = t_i * gdot + (v_a[p] * t_final[p] - behind[p]) * inv;
          behind[p] += w * gdot;
          T[p] = t_i;
          if (o * vis <= kAlphaMax) {
            const float v_sigma = -o * vis * v_alpha_i;
            v_op += vis * v_alpha_i;
            const float px_x = v_sigma * (a * dx + b * dy), px_y = v_sigma * (b * dx + c * dy);
            v_mx += px_x;
            v_my += px_y;
            abs_mx += std::abs(px_x);
            abs_my += std::abs(px_y);
            v_ca += 0.5f * v_sigma * dx * dx;
            v_cb += v_sigma * dx * dy;
            v_cc += 0.5f * v_sigma * dy * dy;
          }
        }
      }
      if (!any) continue;
      std::lock_guard<std::mutex> hold(locks[g % kLocks]);
      float* vg = vg_p + g * 8;
      vg[0] += v_mx;
      vg[1] += v_my;
      vg[2] += v_ca;
      vg[3] += v_cb;
      vg[4] += v_cc;
      vg[5] += v_op;
      vg[6] += abs_mx;
      vg[7] += abs_my;
      float* vc = vc_p + g * D;
      for (int64_t k = 0; k < D; ++k) vc[k] += vc_g[k];
    }
  });
  return {v_geo, v_col};
}
