// Torch-free CPU kernels of the renderer: shared constants, the thread pool, a vectorisable exp,
// and the kernel entry points that `_bindings.cpp` wraps for torch.
//
// Threads: every parallel loop runs on `parallel_tasks`, std::threads started per call that take
// tasks from one atomic counter (the caller's thread is worker 0). It needs no OpenMP runtime, so
// the kernels run on all cores whatever runtime (libgomp, libiomp, libomp or none) torch uses, and
// nothing is left behind to break a fork. `-fopenmp-simd` only enables the `omp simd` pragmas.

#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <system_error>
#include <thread>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace fit3d {

constexpr int kTile = 16;
constexpr int kPix = kTile * kTile;
// Pixels per SIMD block: one vector register of floats (a tile row is kTile / kLanes blocks).
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
constexpr float kAlphaMin = 1.0f / 255.0f;
constexpr float kAlphaMax = 0.999f;
constexpr float kTMin = 1e-4f;

// Runs fn(task, worker) for every task in [0, n_tasks) on up to n_threads threads; tasks are taken
// in order from one atomic counter, so callers put the expensive ones first. Worker ids are dense
// in [0, n_threads) (0 is the calling thread). If a thread cannot be started, fewer run.
template <typename Fn>
void parallel_tasks(int n_threads, int64_t n_tasks, Fn&& fn) {
  const int64_t want = std::min<int64_t>(std::max(n_threads, 1), n_tasks);
  std::atomic<int64_t> next{0};
  auto work = [&](int worker) {
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n_tasks;
         i = next.fetch_add(1, std::memory_order_relaxed))
      fn(i, worker);
  };
  std::vector<std::thread> pool;
  if (want > 1) pool.reserve(static_cast<size_t>(want - 1));
  for (int w = 1; w < want; ++w) {
    try {
      pool.emplace_back(work, w);
    } catch (const std::system_error&) {
      break;
    }
  }
  work(0);
  for (auto& t : pool) t.join();
}

// Runs the phases one after another, each like parallel_tasks (fn(phase, task, worker) for task in
// [0, sizes[phase])), on one set of threads that wait for each other between phases.
template <typename Fn>
void parallel_phases(int n_threads, const std::vector<int64_t>& sizes, Fn&& fn) {
  const int64_t n_phases = static_cast<int64_t>(sizes.size());
  const int64_t most = sizes.empty() ? 0 : *std::max_element(sizes.begin(), sizes.end());
  const int want = static_cast<int>(std::min<int64_t>(std::max(n_threads, 1), most));
  std::vector<std::atomic<int64_t>> next(n_phases), arrived(n_phases);
  for (int64_t ph = 0; ph < n_phases; ++ph) next[ph] = 0, arrived[ph] = 0;
  std::atomic<int> started{1};
  auto work = [&](int worker) {
    for (int64_t ph = 0; ph < n_phases; ++ph) {
      for (int64_t i = next[ph].fetch_add(1, std::memory_order_relaxed); i < sizes[ph];
           i = next[ph].fetch_add(1, std::memory_order_relaxed))
        fn(ph, i, worker);
      arrived[ph].fetch_add(1, std::memory_order_acq_rel);
      while (arrived[ph].load(std::memory_order_acquire) < started.load())
        std::this_thread::yield();
    }
  };
  std::vector<std::thread> pool;
  if (want > 1) pool.reserve(static_cast<size_t>(want - 1));
  for (int w = 1; w < want; ++w) {
    // counted before the thread exists, so no phase can finish without it; undone if it fails
    started.fetch_add(1);
    try {
      pool.emplace_back(work, w);
    } catch (const std::system_error&) {
      started.fetch_sub(1);
      break;
    }
  }
  work(0);
  for (auto& t : pool) t.join();
}

// Number of workers parallel_tasks will use (scratch buffers are sized by it).
inline int n_workers(int n_threads, int64_t n_tasks) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(std::max(n_threads, 1), n_tasks)));
}

// SIMD over kLanes pixels with GCC/Clang vector extensions: the compiler lowers them to the
// target's vector unit (AVX-512, AVX2, SSE, NEON) or to scalar code, so the same source is
// portable. Comparisons give lane masks (all bits set or zero).
typedef float vf __attribute__((vector_size(4 * kLanes)));
typedef int32_t vi __attribute__((vector_size(4 * kLanes)));

inline vf splat(float x) {
#if defined(__AVX512F__)
  return (vf)_mm512_set1_ps(x);
#elif defined(__AVX__)
  return (vf)_mm256_set1_ps(x);
#else
  vf v;
  for (int l = 0; l < kLanes; ++l) v[l] = x;
  return v;
#endif
}
inline vi splat_i(int32_t x) {
#if defined(__AVX512F__)
  return (vi)_mm512_set1_epi32(x);
#elif defined(__AVX__)
  return (vi)_mm256_set1_epi32(x);
#else
  vi v;
  for (int l = 0; l < kLanes; ++l) v[l] = x;
  return v;
#endif
}
inline vi lane_ids() {
  vi v;
  for (int l = 0; l < kLanes; ++l) v[l] = l;
  return v;
}
inline vf lane_ids_f() { return __builtin_convertvector(lane_ids(), vf); }
inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vi load_i(const int32_t* p) {
  vi v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline void store_i(int32_t* p, vi v) { std::memcpy(p, &v, sizeof v); }
// Native instructions where the target has them, portable expressions elsewhere (same results,
// including vmin/vmax returning their second operand when either is NaN).
#if defined(__AVX512F__)
inline __mmask16 kmask(vi m) {
  return _mm512_cmplt_epi32_mask((__m512i)m, _mm512_setzero_si512());
}
inline vf select(vi m, vf a, vf b) {
  return (vf)_mm512_mask_blend_ps(kmask(m), (__m512)b, (__m512)a);
}
inline vf vmin(vf a, vf b) { return (vf)_mm512_min_ps((__m512)a, (__m512)b); }
inline vf vmax(vf a, vf b) { return (vf)_mm512_max_ps((__m512)a, (__m512)b); }
inline vf vsqrt(vf a) { return (vf)_mm512_sqrt_ps((__m512)a); }
inline vf vfloor(vf a) { return (vf)_mm512_roundscale_ps((__m512)a, _MM_FROUND_TO_NEG_INF); }
inline vf vceil(vf a) { return (vf)_mm512_roundscale_ps((__m512)a, _MM_FROUND_TO_POS_INF); }
#elif defined(__AVX__)
inline vf select(vi m, vf a, vf b) { return (vf)_mm256_blendv_ps((__m256)b, (__m256)a, (__m256)m); }
inline vf vmin(vf a, vf b) { return (vf)_mm256_min_ps((__m256)a, (__m256)b); }
inline vf vmax(vf a, vf b) { return (vf)_mm256_max_ps((__m256)a, (__m256)b); }
inline vf vsqrt(vf a) { return (vf)_mm256_sqrt_ps((__m256)a); }
inline vf vfloor(vf a) { return (vf)_mm256_floor_ps((__m256)a); }
inline vf vceil(vf a) { return (vf)_mm256_ceil_ps((__m256)a); }
#else
inline vf select(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }
inline vf vmin(vf a, vf b) { return select(a < b, a, b); }
inline vf vmax(vf a, vf b) { return select(a > b, a, b); }
inline vf vsqrt(vf a) {
  for (int l = 0; l < kLanes; ++l) a[l] = std::sqrt(a[l]);
  return a;
}
inline vf vfloor(vf a) {
  for (int l = 0; l < kLanes; ++l) a[l] = std::floor(a[l]);
  return a;
}
inline vf vceil(vf a) {
  for (int l = 0; l < kLanes; ++l) a[l] = std::ceil(a[l]);
  return a;
}
#endif
inline vi select_i(vi m, vi a, vi b) { return (a & m) | (b & ~m); }
inline vf vabs(vf a) { return (vf)((vi)a & splat_i(0x7fffffff)); }
inline float hsum(vf v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps((__m512)v);
#elif defined(__AVX__)
  const __m128 h =
      _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
#else
  float s = 0.0f;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
#endif
}
// y[0:n] += w * x[0:n]
inline void axpy(float* y, float w, const float* x, int64_t n) {
  const vf wv = splat(w);
  int64_t k = 0;
  for (; k + 2 * kLanes <= n; k += 2 * kLanes) {
    store(y + k, load(y + k) + wv * load(x + k));
    store(y + k + kLanes, load(y + k + kLanes) + wv * load(x + k + kLanes));
  }
  for (; k + kLanes <= n; k += kLanes) store(y + k, load(y + k) + wv * load(x + k));
  for (; k < n; ++k) y[k] += w * x[k];
}
// Bit l set where lane l of the mask is set.
inline uint32_t mask_bits(vi m) {
#if defined(__AVX512F__)
  return _mm512_cmplt_epi32_mask((__m512i)m, _mm512_setzero_si512());
#elif defined(__AVX__)
  return static_cast<uint32_t>(_mm256_movemask_ps((__m256)m));
#else
  uint32_t bits = 0;
  for (int l = 0; l < kLanes; ++l) bits |= static_cast<uint32_t>(m[l] != 0) << l;
  return bits;
#endif
}
// Number of set lanes of a mask.
inline int n_set(vi m) { return __builtin_popcount(mask_bits(m)); }

// e^x for x <= 0 on a vector: x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor series to r^7
// (truncation < 6e-9 relative), 2^n added to the exponent bits; n is rounded with the 1.5 * 2^23
// trick. Arguments below -87 are clamped (e^-87 ~ 1.6e-38, still a normal float), which no
// caller can tell from the true value: alphas that small are dropped.
inline vf exp_nonpos(vf x) {
  x = vmin(splat(0.0f), vmax(splat(-87.0f), x));
  const vf magic = splat(12582912.0f);
  const vf shifted = x * splat(1.44269504088896341f) + magic;
  const vf n = shifted - magic;
  const vf r = (x - n * splat(0.693145751953125f)) - n * splat(1.42860682030941723e-6f);
  vf p = splat(1.0f / 5040.0f);
  p = p * r + splat(1.0f / 720.0f);
  p = p * r + splat(1.0f / 120.0f);
  p = p * r + splat(1.0f / 24.0f);
  p = p * r + splat(1.0f / 6.0f);
  p = p * r + splat(0.5f);
  p = p * r + splat(1.0f);
  p = p * r + splat(1.0f);
  const vi ni = (vi)shifted - (vi)magic;  // n as an integer
  return (vf)((vi)p + (ni << 23));
}

// ---------------------------------------------------------------------------------------------
// Projection (_project.cpp). All [C * N] outputs are dense: row c * N + n is Gaussian n seen from
// camera c, zero (radii 0) where culled.

struct ProjectArgs {
  int64_t n_gauss, n_cams, width, height;
  const float* means;      // [N, 3]
  const float* quats;      // [N, 4] wxyz, any norm
  const float* scales;     // [N, 3]
  const float* opacities;  // [N]
  const float* viewmats;   // [C, 4, 4]
  const float* Ks;         // [C, 3, 3]
  double near, far, eps2d;
  int n_threads;
};

void project_forward(const ProjectArgs& a, float* means2d, float* conics, float* depths,
                     int32_t* radii);

// Gradients of the dense per-row (means2d, conics, depths) into means, quats, scales [N, .]
// (overwritten). Rows with radii 0 are skipped.
void project_backward(const ProjectArgs& a, const int32_t* radii, const float* conics,
                      const float* v_means2d, const float* v_conics, const float* v_depths,
                      float* v_means, float* v_quats, float* v_scales);

// Tile binning of M visible entries. Entry m is geometry row `rows ? rows[m] : m` of camera
// `cams[m]`. Pass 1 fills offsets [C * tiles_y * tiles_x + 1] and tiles_per_entry [M] and returns
// the number of intersections P; pass 2 fills flatten_ids [P] (geometry rows, per tile front to
// back: stable by depth).
struct IsectArgs {
  int64_t n_entries, n_cams, tiles_x, tiles_y;
  const int64_t* rows;  // [M] geometry row of each entry, or null for row = entry
  const int64_t* cams;  // [M]
  const float* means2d;  // [R, 2] geometry rows
  const int32_t* radii;  // [R, 2]
  const float* depths;   // [R]
};
int64_t intersect_count(const IsectArgs& a, int64_t* offsets, int64_t* tiles_per_entry);
void intersect_fill(const IsectArgs& a, const int64_t* offsets, int64_t* flatten_ids);

// ---------------------------------------------------------------------------------------------
// Compositing (_composite.cpp). Geometry is read per geometry row r (the ids in the tile lists);
// row r belongs to global row g(r) = grow ? grow[r] : r (= camera * N + Gaussian), its opacity is
// opacities[g % n_opac] and its colour colors[g % n_color_rows]. Outputs have D colour channels,
// then the depth channel when `depths` is given.

struct CompositeArgs {
  int64_t n_cams, width, height, tiles_x, tiles_y;
  const int64_t* flatten_ids;  // [P]
  const int64_t* offsets;      // [C * tiles_y * tiles_x + 1]
  const float* means2d;        // [R, 2]
  const float* conics;         // [R, 3]
  const int32_t* radii;        // [R, 2]
  const float* depths;         // [R] or null: no depth channel
  const int64_t* grow;         // [R] or null
  const float* opacities;      // [n_opac]
  int64_t n_opac;
  const float* colors;  // [n_color_rows, D]
  int64_t n_color_rows, D;
  int64_t geo_channels;  // leading colour channels whose gradient reaches geometry (depth always)
  int n_threads;
};

// One Gaussian-tile intersection as both passes read it: the tile lists' Gaussians copied into
// list order once, so the per-tile loops stream one cache line per entry instead of gathering
// from five arrays; the forward also notes which entries it blended, so the backward skips the
// others. Memory: 64 bytes per intersection.
struct alignas(64) Splat {
  float mx, my, a, b, c, o, z;
  float thr;  // footprint bound: sigma <= thr wherever alpha >= 1/255
  int32_t rx, ry;
  int32_t row, crow, orow;  // geometry, colour and opacity rows
  int32_t slot;  // backward: where this intersection's partial sums go (-1: straight to the rows)
  int32_t used;  // written by the forward: pixels of the tile it was blended into
  int32_t pad_;
};
static_assert(sizeof(Splat) == 64, "one cache line per intersection");

// out [C, H, W, D (+1)], trans [C, H, W] (final transmittance), last [C, H, W] (a pixel's
// contributors are among the first `last` entries of its tile's list), splats [P] (for the
// backward). Every element is written.
void composite_forward(const CompositeArgs& a, float* out, float* trans, int32_t* last,
                       Splat* splats);

struct CompositeGrads {
  float* v_means2d;  // [R, 2]
  float* v_conics;   // [R, 3]
  float* v_depths;   // [R] (only with depths)
  float* absgrad;    // [R, 2] or null: per-pixel |d loss / d means2d| summed (gsplat absgrad)
  float* v_opacities;  // [n_opac]
  float* v_colors;     // [n_color_rows, D]
};

// Adds the gradients of the loss to `g` (zero-initialised by the caller). v_out [C, H, W, D (+1)],
// v_alpha [C, H, W] (d loss / d (1 - trans)).
void composite_backward(const CompositeArgs& a, const Splat* splats, const float* trans,
                        const int32_t* last, const float* v_out, const float* v_alpha,
                        const CompositeGrads& g);

}  // namespace fit3d
