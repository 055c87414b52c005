// Torch bindings of the CPU kernels (`_kernels.h`): tensor checks, allocation, thread count.
//
// Layouts: "dense" geometry is [C, N, ...] (row c * N + n, zero where culled, gsplat's non-packed
// layout); "packed" geometry is [M, ...] over the visible rows `rows` (ascending c * N + n).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <limits>
#include <vector>

#include "_kernels.h"

namespace {

using torch::Tensor;

void check(const Tensor& t, torch::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.is_contiguous(), name,
              " must be a contiguous CPU tensor of the kernel's dtype");
}

const float* fptr(const Tensor& t, const char* name) {
  check(t, torch::kFloat32, name);
  return t.data_ptr<float>();
}

const int64_t* lptr(const Tensor& t, const char* name) {
  check(t, torch::kInt64, name);
  return t.data_ptr<int64_t>();
}

fit3d::ProjectArgs project_args(const Tensor& means, const Tensor& quats, const Tensor& scales,
                                const Tensor& opacities, const Tensor& viewmats,
                                const Tensor& Ks, int64_t width, int64_t height, double near,
                                double far, double eps2d) {
  fit3d::ProjectArgs a;
  a.n_gauss = means.size(0), a.n_cams = viewmats.size(0), a.width = width, a.height = height;
  a.means = fptr(means, "means"), a.quats = fptr(quats, "quats");
  a.scales = fptr(scales, "scales");
  a.opacities = opacities.defined() ? fptr(opacities, "opacities") : nullptr;
  a.viewmats = fptr(viewmats, "viewmats"), a.Ks = fptr(Ks, "Ks");
  a.near = near, a.far = far, a.eps2d = eps2d;
  a.n_threads = at::get_num_threads();
  return a;
}

// Returns means2d [C, N, 2], conics [C, N, 3], depths [C, N], radii [C, N, 2] int32 (dense), the
// visible rows [M] int64 and the dense radii again; with `packed` the first four are the visible
// rows' [M, ...] instead.
std::vector<Tensor> project_forward(Tensor means, Tensor quats, Tensor scales, Tensor opacities,
                                    Tensor viewmats, Tensor Ks, int64_t width, int64_t height,
                                    double near, double far, double eps2d, bool packed) {
  const auto a = project_args(means, quats, scales, opacities, viewmats, Ks, width, height, near,
                              far, eps2d);
  const int64_t C = a.n_cams, N = a.n_gauss;
  auto f32 = means.options();
  auto m2 = torch::empty({C, N, 2}, f32), con = torch::empty({C, N, 3}, f32);
  auto z = torch::empty({C, N}, f32);
  auto rad = torch::empty({C, N, 2}, f32.dtype(torch::kInt32));
  fit3d::project_forward(a, m2.data_ptr<float>(), con.data_ptr<float>(), z.data_ptr<float>(),
                         rad.data_ptr<int32_t>());
  const int32_t* rp = rad.data_ptr<int32_t>();
  std::vector<int64_t> rows;
  for (int64_t r = 0; r < C * N; ++r)
    if (rp[2 * r] > 0) rows.push_back(r);
  auto rows_t = torch::empty({static_cast<int64_t>(rows.size())}, f32.dtype(torch::kInt64));
  std::copy(rows.begin(), rows.end(), rows_t.data_ptr<int64_t>());
  if (!packed) return {m2, con, z, rad, rows_t, rad};
  return {m2.view({-1, 2}).index_select(0, rows_t), con.view({-1, 3}).index_select(0, rows_t),
          z.view({-1}).index_select(0, rows_t), rad.view({-1, 2}).index_select(0, rows_t), rows_t,
          rad};
}

// Dense [C * N, k] copy of packed [M, k] values (zero elsewhere).
Tensor unpack(const Tensor& packed, const Tensor& rows, int64_t n_rows, int64_t k) {
  auto dense = torch::zeros({n_rows, k}, packed.options());
  return dense.index_copy_(0, rows, packed.reshape({rows.size(0), k}).contiguous());
}

// Gradients into means, quats, scales [N, .] from the geometry gradients (dense, or packed over
// `rows` when `packed`). radii: dense [C, N, 2].
std::vector<Tensor> project_backward(Tensor means, Tensor quats, Tensor scales, Tensor viewmats,
                                     Tensor Ks, int64_t width, int64_t height, double eps2d,
                                     Tensor radii, Tensor conics, Tensor rows, bool packed,
                                     Tensor v_means2d, Tensor v_conics, Tensor v_depths) {
  const auto a = project_args(means, quats, scales, Tensor(), viewmats, Ks, width, height, 0.0,
                              0.0, eps2d);
  const int64_t n_rows = a.n_cams * a.n_gauss;
  if (packed) {
    conics = unpack(conics, rows, n_rows, 3);
    v_means2d = unpack(v_means2d, rows, n_rows, 2);
    v_conics = unpack(v_conics, rows, n_rows, 3);
    v_depths = unpack(v_depths, rows, n_rows, 1);
  }
  check(radii, torch::kInt32, "radii");
  auto v_means = torch::empty_like(means), v_quats = torch::empty_like(quats);
  auto v_scales = torch::empty_like(scales);
  fit3d::project_backward(a, radii.data_ptr<int32_t>(), fptr(conics, "conics"),
                          fptr(v_means2d, "v_means2d"), fptr(v_conics, "v_conics"),
                          fptr(v_depths, "v_depths"), v_means.data_ptr<float>(),
                          v_quats.data_ptr<float>(), v_scales.data_ptr<float>());
  return {v_means, v_quats, v_scales};
}

// Bins the visible rows into tiles: flatten_ids [P] (geometry rows: global rows when dense, entry
// indices when packed), offsets [C * tiles_y * tiles_x + 1], tiles_per_entry [M].
std::vector<Tensor> intersect_tiles(Tensor means2d, Tensor radii, Tensor depths, Tensor rows,
                                    bool packed, int64_t n_gauss, int64_t n_cams,
                                    int64_t tiles_x, int64_t tiles_y) {
  check(radii, torch::kInt32, "radii");
  auto cams = torch::div(rows, std::max<int64_t>(n_gauss, 1), "floor");
  fit3d::IsectArgs a;
  a.n_entries = rows.size(0), a.n_cams = n_cams, a.tiles_x = tiles_x, a.tiles_y = tiles_y;
  a.rows = packed ? nullptr : lptr(rows, "rows");
  a.cams = lptr(cams, "cams");
  a.means2d = fptr(means2d, "means2d"), a.radii = radii.data_ptr<int32_t>();
  a.depths = fptr(depths, "depths");
  auto opts = rows.options();
  auto offsets = torch::empty({n_cams * tiles_x * tiles_y + 1}, opts);
  auto per_entry = torch::empty({a.n_entries}, opts);
  const int64_t n_isect =
      fit3d::intersect_count(a, offsets.data_ptr<int64_t>(), per_entry.data_ptr<int64_t>());
  auto flat = torch::empty({n_isect}, opts);
  fit3d::intersect_fill(a, offsets.data_ptr<int64_t>(), flat.data_ptr<int64_t>());
  return {flat, offsets, per_entry};
}

fit3d::CompositeArgs composite_args(const Tensor& means2d, const Tensor& conics,
                                    const Tensor& radii, const Tensor& depths,
                                    const Tensor& grow, const Tensor& opacities,
                                    const Tensor& colors, const Tensor& flatten_ids,
                                    const Tensor& offsets, int64_t n_cams, int64_t width,
                                    int64_t height, int64_t tiles_x, int64_t tiles_y,
                                    int64_t geo_channels) {
  check(radii, torch::kInt32, "radii");
  TORCH_CHECK(colors.dim() == 2, "colors must be [rows, D]");
  TORCH_CHECK(offsets.numel() == n_cams * tiles_x * tiles_y + 1, "offsets do not match the grid");
  constexpr int64_t kMaxRows = std::numeric_limits<int32_t>::max();  // Splat rows are int32
  TORCH_CHECK(means2d.numel() / 2 <= kMaxRows && colors.size(0) <= kMaxRows &&
                  opacities.numel() <= kMaxRows,
              "more than 2^31 Gaussian rows");
  fit3d::CompositeArgs a;
  a.n_cams = n_cams, a.width = width, a.height = height, a.tiles_x = tiles_x, a.tiles_y = tiles_y;
  a.flatten_ids = lptr(flatten_ids, "flatten_ids"), a.offsets = lptr(offsets, "offsets");
  a.means2d = fptr(means2d, "means2d"), a.conics = fptr(conics, "conics");
  a.radii = radii.data_ptr<int32_t>();
  a.depths = depths.defined() ? fptr(depths, "depths") : nullptr;
  a.grow = grow.defined() ? lptr(grow, "grow") : nullptr;
  a.opacities = fptr(opacities, "opacities"), a.n_opac = opacities.numel();
  a.colors = fptr(colors, "colors"), a.n_color_rows = colors.size(0), a.D = colors.size(1);
  a.geo_channels = geo_channels;
  a.n_threads = at::get_num_threads();
  return a;
}

fit3d::Splat* splat_ptr(const Tensor& t) {
  check(t, torch::kFloat32, "splats");
  TORCH_CHECK(t.dim() == 2 && t.size(1) == 16, "splats must be [P, 16]");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % alignof(fit3d::Splat) == 0,
              "splats are not aligned");
  return reinterpret_cast<fit3d::Splat*>(t.data_ptr<float>());
}

// Returns (colours [C, H, W, D (+1 depth)], transmittance [C, H, W], last [C, H, W] int32, the
// backward's per-intersection records [P, 16]).
std::vector<Tensor> composite_forward(Tensor means2d, Tensor conics, Tensor radii,
                                      c10::optional<Tensor> depths, c10::optional<Tensor> grow,
                                      Tensor opacities, Tensor colors, Tensor flatten_ids,
                                      Tensor offsets, int64_t n_cams, int64_t width,
                                      int64_t height, int64_t tiles_x, int64_t tiles_y) {
  const auto a = composite_args(means2d, conics, radii, depths.value_or(Tensor()),
                                grow.value_or(Tensor()), opacities, colors, flatten_ids, offsets,
                                n_cams, width, height, tiles_x, tiles_y, 0);
  auto f32 = means2d.options();
  auto out = torch::empty({n_cams, height, width, a.D + (a.depths ? 1 : 0)}, f32);
  auto trans = torch::empty({n_cams, height, width}, f32);
  auto last = torch::empty({n_cams, height, width}, f32.dtype(torch::kInt32));
  auto splats = torch::empty({flatten_ids.numel(), 16}, f32);
  fit3d::composite_forward(a, out.data_ptr<float>(), trans.data_ptr<float>(),
                           last.data_ptr<int32_t>(), splat_ptr(splats));
  return {out, trans, last, splats};
}

// Returns gradients (means2d, conics, depths (empty without), opacities, colors, absgrad (empty
// unless asked)) shaped like the inputs.
std::vector<Tensor> composite_backward(Tensor means2d, Tensor conics, Tensor radii,
                                       c10::optional<Tensor> depths, c10::optional<Tensor> grow,
                                       Tensor opacities, Tensor colors, Tensor flatten_ids,
                                       Tensor offsets, int64_t n_cams, int64_t width,
                                       int64_t height, int64_t tiles_x, int64_t tiles_y,
                                       int64_t geo_channels, Tensor splats, Tensor trans,
                                       Tensor last, Tensor v_out, Tensor v_alpha, bool absgrad) {
  const auto a = composite_args(means2d, conics, radii, depths.value_or(Tensor()),
                                grow.value_or(Tensor()), opacities, colors, flatten_ids, offsets,
                                n_cams, width, height, tiles_x, tiles_y, geo_channels);
  check(last, torch::kInt32, "last");
  TORCH_CHECK(v_out.size(-1) == a.D + (a.depths ? 1 : 0), "v_out has the wrong channel count");
  auto v_m2 = torch::zeros_like(means2d), v_con = torch::zeros_like(conics);
  auto v_z = a.depths ? torch::zeros_like(*depths) : Tensor();
  auto v_op = torch::zeros_like(opacities), v_col = torch::zeros_like(colors);
  auto v_abs = absgrad ? torch::zeros_like(means2d) : Tensor();
  fit3d::CompositeGrads g;
  g.v_means2d = v_m2.data_ptr<float>(), g.v_conics = v_con.data_ptr<float>();
  g.v_depths = a.depths ? v_z.data_ptr<float>() : nullptr;
  g.absgrad = absgrad ? v_abs.data_ptr<float>() : nullptr;
  g.v_opacities = v_op.data_ptr<float>(), g.v_colors = v_col.data_ptr<float>();
  TORCH_CHECK(splats.size(0) == flatten_ids.numel(), "splats do not match the tile lists");
  fit3d::composite_backward(a, splat_ptr(splats), fptr(trans, "trans"), last.data_ptr<int32_t>(),
                            fptr(v_out, "v_out"), fptr(v_alpha, "v_alpha"), g);
  return {v_m2, v_con, v_z, v_op, v_col, v_abs};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("project_forward", &project_forward, "EWA projection, dense or packed");
  m.def("project_backward", &project_backward, "EWA projection backward");
  m.def("intersect_tiles", &intersect_tiles, "16x16 tile binning, depth-sorted per tile");
  m.def("composite_forward", &composite_forward, "tile compositor forward");
  m.def("composite_backward", &composite_backward, "tile compositor backward");
}
