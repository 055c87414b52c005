// CPU EWA projection (forward and hand-written backward) and tile binning for 3D Gaussians.
//
// Same rules as the pure-torch `_project.py` (gsplat's classic pinhole path): cull outside
// [near, far], non-positive blurred 2D covariance, opacity < 1/255, or a pixel box missing the
// image. Per-entry maths runs in double and is stored in float. The forward runs in parallel
// (`parallel_tasks`); the backward is serial (entries of one Gaussian in several cameras collide).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

namespace {

constexpr double kAlphaMin = 1.0 / 255.0;
constexpr int64_t kTile = 16;

struct Cam {
  double R[3][3], t[3], fx, fy, cx, cy, lxp, lxn, lyp, lyn;
};

Cam camera(const float* vm, const float* K, int64_t width, int64_t height) {
  Cam c;
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 3; ++j) c.R[i][j] = vm[i * 4 + j];
    c.t[i] = vm[i * 4 + 3];
  }
  c.fx = K[0], c.fy = K[4], c.cx = K[2], c.cy = K[5];
  const double tfx = 0.5 * width / c.fx, tfy = 0.5 * height / c.fy;
  c.lxp = (width - c.cx) / c.fx + 0.3 * tfx, c.lxn = c.cx / c.fx + 0.3 * tfx;
  c.lyp = (height - c.cy) / c.fy + 0.3 * tfy, c.lyn = c.cy / c.fy + 0.3 * tfy;
  return c;
}

// Rotation of the normalised quaternion (w, x, y, z); qn receives the normalised quaternion.
void rotation(const float* q, double qn[4], double Rq[3][3]) {
  const double n = std::sqrt(double(q[0]) * q[0] + double(q[1]) * q[1] + double(q[2]) * q[2] +
                             double(q[3]) * q[3]);
  for (int i = 0; i < 4; ++i) qn[i] = q[i] / n;
  const double w = qn[0], x = qn[1], y = qn[2], z = qn[3];
  Rq[0][0] = 1 - 2 * (y * y + z * z), Rq[0][1] = 2 * (x * y - w * z), Rq[0][2] = 2 * (x * z + w * y);
  Rq[1][0] = 2 * (x * y + w * z), Rq[1][1] = 1 - 2 * (x * x + z * z), Rq[1][2] = 2 * (y * z - w * x);
  Rq[2][0] = 2 * (x * z - w * y), Rq[2][1] = 2 * (y * z + w * x), Rq[2][2] = 1 - 2 * (x * x + y * y);
}

// Everything the forward and backward share for one (camera, Gaussian) entry.
struct Entry {
  double pc[3], qn[4], Rq[3][3], RM[3][3], J0[3], J1[3], j0[3], j1[3], u, v;
  bool clamp_x, clamp_y;
  double ca, cb, cc;  // blurred 2D covariance [[ca, cb], [cb, cc]]
};

// Returns false when the entry is outside [near, far].
bool evaluate(const Cam& c, const float* p, const float* q, const float* s, double near,
              double far, double eps2d, Entry& e) {
  for (int i = 0; i < 3; ++i)
    e.pc[i] = c.R[i][0] * p[0] + c.R[i][1] * p[1] + c.R[i][2] * p[2] + c.t[i];
  const double z = e.pc[2];
  if (!(z >= near && z <= far)) return false;
  rotation(q, e.qn, e.Rq);
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) {
      double acc = 0;
      for (int k = 0; k < 3; ++k) acc += c.R[i][k] * e.Rq[k][j] * s[j];
      e.RM[i][j] = acc;  // R_view @ R_q @ diag(s)
    }
  const double xz = e.pc[0] / z, yz = e.pc[1] / z;
  e.u = std::min(c.lxp, std::max(-c.lxn, xz));
  e.v = std::min(c.lyp, std::max(-c.lyn, yz));
  e.clamp_x = !(xz <= c.lxp && xz >= -c.lxn);
  e.clamp_y = !(yz <= c.lyp && yz >= -c.lyn);
  e.J0[0] = c.fx / z, e.J0[1] = 0, e.J0[2] = -c.fx * e.u / z;
  e.J1[0] = 0, e.J1[1] = c.fy / z, e.J1[2] = -c.fy * e.v / z;
  for (int k = 0; k < 3; ++k) {
    e.j0[k] = e.J0[0] * e.RM[0][k] + e.J0[2] * e.RM[2][k];
    e.j1[k] = e.J1[1] * e.RM[1][k] + e.J1[2] * e.RM[2][k];
  }
  e.ca = e.j0[0] * e.j0[0] + e.j0[1] * e.j0[1] + e.j0[2] * e.j0[2] + eps2d;
  e.cb = e.j0[0] * e.j1[0] + e.j0[1] * e.j1[1] + e.j0[2] * e.j1[2];
  e.cc = e.j1[0] * e.j1[0] + e.j1[1] * e.j1[1] + e.j1[2] * e.j1[2] + eps2d;
  return true;
}

}  // namespace

// Projects N Gaussians into C cameras. Returns packed visible entries: camera_ids [M],
// gaussian_ids [M] (int64), means2d [M, 2], conics [M, 3], depths [M], radii [M, 2] int32.
std::vector<torch::Tensor> project_forward(torch::Tensor means, torch::Tensor quats,
                                           torch::Tensor scales, torch::Tensor opacities,
                                           torch::Tensor viewmats, torch::Tensor Ks,
                                           int64_t width, int64_t height, double near,
                                           double far, double eps2d) {
  const int64_t N = means.size(0), C = viewmats.size(0);
  const float* mp = means.data_ptr<float>();
  const float* qp = quats.data_ptr<float>();
  const float* sp = scales.data_ptr<float>();
  const float* op = opacities.data_ptr<float>();
  std::vector<Cam> cams;
  for (int64_t c = 0; c < C; ++c)
    cams.push_back(camera(viewmats.data_ptr<float>() + c * 16, Ks.data_ptr<float>() + c * 9,
                          width, height));
  // dense pass over C * N, then compaction
  auto f32 = means.options();
  auto d_m2 = torch::empty({C * N, 2}, f32), d_con = torch::empty({C * N, 3}, f32);
  auto d_z = torch::empty({C * N}, f32);
  auto d_rad = torch::zeros({C * N, 2}, f32.dtype(torch::kInt32));
  float* m2 = d_m2.data_ptr<float>();
  float* con = d_con.data_ptr<float>();
  float* zz = d_z.data_ptr<float>();
  int32_t* rad = d_rad.data_ptr<int32_t>();
  constexpr int64_t kChunk = 8192;
  fit3d::parallel_tasks(at::get_num_threads(), (C * N + kChunk - 1) / kChunk, [&](int64_t task, int) {
    Entry e;
    for (int64_t idx = task * kChunk; idx < std::min(C * N, (task + 1) * kChunk); ++idx) {
      const int64_t c = idx / N, n = idx % N;
      const Cam& cam = cams[c];
      const double o = op[n];
      if (!evaluate(cam, mp + 3 * n, qp + 4 * n, sp + 3 * n, near, far, eps2d, e)) continue;
      const double det = e.ca * e.cc - e.cb * e.cb;
      if (!(det > 0) || o < kAlphaMin) continue;
      const double extend = std::min(3.33, std::sqrt(2.0 * std::log(o / kAlphaMin)));
      const double rx = std::ceil(extend * std::sqrt(e.ca)), ry = std::ceil(extend * std::sqrt(e.cc));
      const double z = e.pc[2];
      const double mx = cam.fx * e.pc[0] / z + cam.cx, my = cam.fy * e.pc[1] / z + cam.cy;
      if (mx + rx <= 0 || mx - rx >= width || my + ry <= 0 || my - ry >= height) continue;
      rad[2 * idx] = static_cast<int32_t>(rx), rad[2 * idx + 1] = static_cast<int32_t>(ry);
      m2[2 * idx] = float(mx), m2[2 * idx + 1] = float(my);
      con[3 * idx] = float(e.cc / det), con[3 * idx + 1] = float(-e.cb / det);
      con[3 * idx + 2] = float(e.ca / det);
      zz[idx] = float(z);
    }
  });
  auto keep = torch::nonzero(d_rad.select(1, 0) > 0).select(1, 0);  // [M]
  return {torch::div(keep, N, "floor"), torch::remainder(keep, N), d_m2.index_select(0, keep),
          d_con.index_select(0, keep), d_z.index_select(0, keep), d_rad.index_select(0, keep)};
}

// Gradients of (means2d, conics, depths) of the packed entries -> (means, quats, scales) [N, .].
std::vector<torch::Tensor> project_backward(torch::Tensor means, torch::Tensor quats,
                                            torch::Tensor scales, torch::Tensor viewmats,
                                            torch::Tensor Ks, int64_t width, int64_t height,
                                            double eps2d, torch::Tensor camera_ids,
                                            torch::Tensor gaussian_ids, torch::Tensor conics,
                                            torch::Tensor v_means2d, torch::Tensor v_conics,
                                            torch::Tensor v_depths) {
  const int64_t N = means.size(0), C = viewmats.size(0), M = camera_ids.size(0);
  auto v_means = torch::zeros({N, 3}, means.options());
  auto v_quats = torch::zeros({N, 4}, means.options());
  auto v_scales = torch::zeros({N, 3}, means.options());
  std::vector<Cam> cams;
  for (int64_t c = 0; c < C; ++c)
    cams.push_back(camera(viewmats.data_ptr<float>() + c * 16, Ks.data_ptr<float>() + c * 9,
                          width, height));
  const float* mp = means.data_ptr<float>();
  const float* qp = quats.data_ptr<float>();
  const float* sp = scales.data_ptr<float>();
  const int64_t* cid = camera_ids.data_ptr<int64_t>();
  const int64_t* gid = gaussian_ids.data_ptr<int64_t>();
  const float* con = conics.data_ptr<float>();
  const float* vm2 = v_means2d.data_ptr<float>();
  const float* vco = v_conics.data_ptr<float>();
  const float* vz = v_depths.data_ptr<float>();
  float* vmp = v_means.data_ptr<float>();
  float* vqp = v_quats.data_ptr<float>();
  float* vsp = v_scales.data_ptr<float>();
  Entry e;
  for (int64_t i = 0; i < M; ++i) {  // serial: entries of one Gaussian in several cameras collide
    const int64_t n = gid[i];
    const Cam& cam = cams[cid[i]];
    evaluate(cam, mp + 3 * n, qp + 4 * n, sp + 3 * n, -1e300, 1e300, eps2d, e);
    const double z = e.pc[2], x = e.pc[0], y = e.pc[1];
    // conic = inverse(cov2): v_cov2 = -P G P with G = [[vA, vB/2], [vB/2, vC]]
    const double P00 = con[3 * i], P01 = con[3 * i + 1], P11 = con[3 * i + 2];
    const double G00 = vco[3 * i], G01 = 0.5 * vco[3 * i + 1], G11 = vco[3 * i + 2];
    const double PG00 = P00 * G00 + P01 * G01, PG01 = P00 * G01 + P01 * G11;
    const double PG10 = P01 * G00 + P11 * G01, PG11 = P01 * G01 + P11 * G11;
    const double v_ca = -(PG00 * P00 + PG01 * P01);
    const double v_cb = -2.0 * (PG00 * P01 + PG01 * P11);
    const double v_cc = -(PG10 * P01 + PG11 * P11);
    double v_j0[3], v_j1[3];
    for (int k = 0; k < 3; ++k) {
      v_j0[k] = 2.0 * v_ca * e.j0[k] + v_cb * e.j1[k];
      v_j1[k] = 2.0 * v_cc * e.j1[k] + v_cb * e.j0[k];
    }
    // j0 = J0 @ RM, j1 = J1 @ RM
    double v_J0[3] = {0, 0, 0}, v_J1[3] = {0, 0, 0}, v_RM[3][3];
    for (int r = 0; r < 3; ++r)
      for (int k = 0; k < 3; ++k) {
        v_J0[r] += v_j0[k] * e.RM[r][k];
        v_J1[r] += v_j1[k] * e.RM[r][k];
        v_RM[r][k] = e.J0[r] * v_j0[k] + e.J1[r] * v_j1[k];
      }
    double v_pc[3] = {0, 0, 0};
    const double vmx = vm2[2 * i], vmy = vm2[2 * i + 1];
    v_pc[0] += cam.fx / z * vmx;
    v_pc[1] += cam.fy / z * vmy;
    v_pc[2] += -(cam.fx * x * vmx + cam.fy * y * vmy) / (z * z) + vz[i];
    v_pc[2] += -cam.fx / (z * z) * v_J0[0] - cam.fy / (z * z) * v_J1[1];
    if (e.clamp_x) {
      v_pc[2] += cam.fx * e.u / (z * z) * v_J0[2];
    } else {
      v_pc[0] += -cam.fx / (z * z) * v_J0[2];
      v_pc[2] += 2.0 * cam.fx * x / (z * z * z) * v_J0[2];
    }
    if (e.clamp_y) {
      v_pc[2] += cam.fy * e.v / (z * z) * v_J1[2];
    } else {
      v_pc[1] += -cam.fy / (z * z) * v_J1[2];
      v_pc[2] += 2.0 * cam.fy * y / (z * z * z) * v_J1[2];
    }
    // RM = R_view @ (R_q diag(s)); v_Mq = R_view^T v_RM
    double G[3][3];
    const float* s = sp + 3 * n;
    float* vsn = vsp + 3 * n;
    for (int r = 0; r < 3; ++r)
      for (int k = 0; k < 3; ++k) {
        double vM = 0;
        for (int l = 0; l < 3; ++l) vM += cam.R[l][r] * v_RM[l][k];
        G[r][k] = vM * s[k];
        vsn[k] += float(vM * e.Rq[r][k]);
      }
    const double w = e.qn[0], qx = e.qn[1], qy = e.qn[2], qz = e.qn[3];
    double vq[4];
    vq[0] = 2 * (-qz * G[0][1] + qy * G[0][2] + qz * G[1][0] - qx * G[1][2] - qy * G[2][0] +
                 qx * G[2][1]);
    vq[1] = 2 * (qy * G[0][1] + qz * G[0][2] + qy * G[1][0] - 2 * qx * G[1][1] - w * G[1][2] +
                 qz * G[2][0] + w * G[2][1] - 2 * qx * G[2][2]);
    vq[2] = 2 * (-2 * qy * G[0][0] + qx * G[0][1] + w * G[0][2] + qx * G[1][0] + qz * G[1][2] -
                 w * G[2][0] + qz * G[2][1] - 2 * qy * G[2][2]);
    vq[3] = 2 * (-2 * qz * G[0][0] - w * G[0][1] + qx * G[0][2] + w * G[1][0] - 2 * qz * G[1][1] +
                 qy * G[1][2] + qx * G[2][0] + qy * G[2][1]);
    const float* q = qp + 4 * n;
    const double qnorm = std::sqrt(double(q[0]) * q[0] + double(q[1]) * q[1] +
                                   double(q[2]) * q[2] + double(q[3]) * q[3]);
    const double dot = vq[0] * w + vq[1] * qx + vq[2] * qy + vq[3] * qz;
    for (int k = 0; k < 4; ++k) vqp[4 * n + k] += float((vq[k] - e.qn[k] * dot) / qnorm);
    for (int k = 0; k < 3; ++k)
      vmp[3 * n + k] +=
          float(cam.R[0][k] * v_pc[0] + cam.R[1][k] * v_pc[1] + cam.R[2][k] * v_pc[2]);
  }
  return {v_means, v_quats, v_scales};
}

// Bins packed entries into 16x16 tiles: flatten_ids [P] (per tile, front to back), offsets
// [C * tiles_y * tiles_x + 1], tiles_per_gauss [M].
std::vector<torch::Tensor> intersect_tiles(torch::Tensor means2d, torch::Tensor radii,
                                           torch::Tensor depths, torch::Tensor camera_ids,
                                           int64_t n_cams, int64_t tiles_x, int64_t tiles_y) {
  const int64_t M = means2d.size(0), n_tiles = n_cams * tiles_x * tiles_y;
  const float* m2 = means2d.data_ptr<float>();
  const int32_t* rad = radii.data_ptr<int32_t>();
  const float* z = depths.data_ptr<float>();
  const int64_t* cid = camera_ids.data_ptr<int64_t>();
  auto opts = camera_ids.options();
  auto per_gauss = torch::empty({M}, opts);
  auto offsets = torch::zeros({n_tiles + 1}, opts);
  int64_t* cnt = per_gauss.data_ptr<int64_t>();
  int64_t* off = offsets.data_ptr<int64_t>();
  std::vector<int64_t> rect(4 * M);
  for (int64_t i = 0; i < M; ++i) {
    const float cx = m2[2 * i] / kTile, cy = m2[2 * i + 1] / kTile;
    const float rx = float(rad[2 * i]) / kTile, ry = float(rad[2 * i + 1]) / kTile;
    int64_t* r = rect.data() + 4 * i;
    r[0] = std::min<int64_t>(std::max<int64_t>(0, int64_t(std::floor(cx - rx))), tiles_x);
    r[1] = std::min<int64_t>(std::max<int64_t>(0, int64_t(std::ceil(cx + rx))), tiles_x);
    r[2] = std::min<int64_t>(std::max<int64_t>(0, int64_t(std::floor(cy - ry))), tiles_y);
    r[3] = std::min<int64_t>(std::max<int64_t>(0, int64_t(std::ceil(cy + ry))), tiles_y);
    cnt[i] = (r[1] - r[0]) * (r[3] - r[2]);
    const int64_t base = cid[i] * tiles_x * tiles_y;
    for (int64_t ty = r[2]; ty < r[3]; ++ty)
      for (int64_t tx = r[0]; tx < r[1]; ++tx) ++off[base + ty * tiles_x + tx + 1];
  }
  for (int64_t t = 0; t < n_tiles; ++t) off[t + 1] += off[t];
  auto flat = torch::empty({off[n_tiles]}, opts);
  int64_t* fp = flat.data_ptr<int64_t>();
  std::vector<int64_t> order(M), cursor(off, off + n_tiles);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return z[a] < z[b]; });
  for (int64_t i : order) {
    const int64_t* r = rect.data() + 4 * i;
    const int64_t base = cid[i] * tiles_x * tiles_y;
    for (int64_t ty = r[2]; ty < r[3]; ++ty)
      for (int64_t tx = r[0]; tx < r[1]; ++tx) fp[cursor[base + ty * tiles_x + tx]++] = i;
  }
  return {flat, offsets, per_gauss};
}
