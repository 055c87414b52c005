// CPU EWA projection (forward and hand-written backward) and tile binning for 3D Gaussians.
//
// Same rules as the pure-torch `_project.py` (gsplat's classic pinhole path): cull outside
// [near, far], non-positive blurred 2D covariance, opacity < 1/255, or a pixel box missing the
// image. Per-entry maths runs in double and is stored in float. The forward is parallel over
// (camera, Gaussian) rows, the backward over Gaussians (each sums its cameras, so no two threads
// write one Gaussian's gradient), binning is serial (a radix sort by depth, then one fill).

#include "_kernels.h"

namespace fit3d {

namespace {

constexpr double kAlphaMinD = 1.0 / 255.0;

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

void project_forward(const ProjectArgs& a, float* means2d, float* conics, float* depths,
                     int32_t* radii) {
  const int64_t N = a.n_gauss, C = a.n_cams, total = C * N;
  std::vector<Cam> cams;
  for (int64_t c = 0; c < C; ++c)
    cams.push_back(camera(a.viewmats + c * 16, a.Ks + c * 9, a.width, a.height));
  constexpr int64_t kChunk = 4096;
  parallel_tasks(a.n_threads, (total + kChunk - 1) / kChunk, [&](int64_t task, int) {
    Entry e;
    const int64_t end = std::min(total, (task + 1) * kChunk);
    for (int64_t idx = task * kChunk; idx < end; ++idx) {
      const int64_t c = idx / N, n = idx % N;
      const Cam& cam = cams[c];
      const double o = a.opacities[n];
      radii[2 * idx] = radii[2 * idx + 1] = 0;
      means2d[2 * idx] = means2d[2 * idx + 1] = 0.0f;
      conics[3 * idx] = conics[3 * idx + 1] = conics[3 * idx + 2] = 0.0f;
      depths[idx] = 0.0f;
      if (!evaluate(cam, a.means + 3 * n, a.quats + 4 * n, a.scales + 3 * n, a.near, a.far,
                    a.eps2d, e))
        continue;
      const double det = e.ca * e.cc - e.cb * e.cb;
      if (!(det > 0) || o < kAlphaMinD) continue;
      const double extend = std::min(3.33, std::sqrt(2.0 * std::log(o / kAlphaMinD)));
      const double rx = std::ceil(extend * std::sqrt(e.ca));
      const double ry = std::ceil(extend * std::sqrt(e.cc));
      const double z = e.pc[2];
      const double mx = cam.fx * e.pc[0] / z + cam.cx, my = cam.fy * e.pc[1] / z + cam.cy;
      if (mx + rx <= 0 || mx - rx >= a.width || my + ry <= 0 || my - ry >= a.height) continue;
      radii[2 * idx] = static_cast<int32_t>(rx), radii[2 * idx + 1] = static_cast<int32_t>(ry);
      means2d[2 * idx] = float(mx), means2d[2 * idx + 1] = float(my);
      conics[3 * idx] = float(e.cc / det), conics[3 * idx + 1] = float(-e.cb / det);
      conics[3 * idx + 2] = float(e.ca / det);
      depths[idx] = float(z);
    }
  });
}

void project_backward(const ProjectArgs& a, const int32_t* radii, const float* con,
                      const float* vm2, const float* vco, const float* vz, float* v_means,
                      float* v_quats, float* v_scales) {
  const int64_t N = a.n_gauss, C = a.n_cams;
  std::vector<Cam> cams;
  for (int64_t c = 0; c < C; ++c)
    cams.push_back(camera(a.viewmats + c * 16, a.Ks + c * 9, a.width, a.height));
  const float* mp = a.means;
  const float* qp = a.quats;
  const float* sp = a.scales;
  const double eps2d = a.eps2d;
  constexpr int64_t kChunk = 2048;
  parallel_tasks(a.n_threads, (N + kChunk - 1) / kChunk, [&](int64_t task, int) {
    Entry e;
    const int64_t end = std::min(N, (task + 1) * kChunk);
    for (int64_t n = task * kChunk; n < end; ++n) {
      double acc_m[3] = {0, 0, 0}, acc_q[4] = {0, 0, 0, 0}, acc_s[3] = {0, 0, 0};
      for (int64_t c = 0; c < C; ++c) {
        const int64_t row = c * N + n;
        if (radii[2 * row] <= 0) continue;
        const Cam& cam = cams[c];
        evaluate(cam, mp + 3 * n, qp + 4 * n, sp + 3 * n, -1e300, 1e300, eps2d, e);
        const double z = e.pc[2], x = e.pc[0], y = e.pc[1];
        // conic = inverse(cov2): v_cov2 = -P G P with G = [[vA, vB/2], [vB/2, vC]]
        const double P00 = con[3 * row], P01 = con[3 * row + 1], P11 = con[3 * row + 2];
        const double G00 = vco[3 * row], G01 = 0.5 * vco[3 * row + 1], G11 = vco[3 * row + 2];
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
        const double vmx = vm2[2 * row], vmy = vm2[2 * row + 1];
        v_pc[0] += cam.fx / z * vmx;
        v_pc[1] += cam.fy / z * vmy;
        v_pc[2] += -(cam.fx * x * vmx + cam.fy * y * vmy) / (z * z) + vz[row];
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
        for (int r = 0; r < 3; ++r)
          for (int k = 0; k < 3; ++k) {
            double vM = 0;
            for (int l = 0; l < 3; ++l) vM += cam.R[l][r] * v_RM[l][k];
            G[r][k] = vM * s[k];
            acc_s[k] += vM * e.Rq[r][k];
          }
        const double w = e.qn[0], qx = e.qn[1], qy = e.qn[2], qz = e.qn[3];
        double vq[4];
        vq[0] = 2 * (-qz * G[0][1] + qy * G[0][2] + qz * G[1][0] - qx * G[1][2] - qy * G[2][0] +
                     qx * G[2][1]);
        vq[1] = 2 * (qy * G[0][1] + qz * G[0][2] + qy * G[1][0] - 2 * qx * G[1][1] - w * G[1][2] +
                     qz * G[2][0] + w * G[2][1] - 2 * qx * G[2][2]);
        vq[2] = 2 * (-2 * qy * G[0][0] + qx * G[0][1] + w * G[0][2] + qx * G[1][0] + qz * G[1][2] -
                     w * G[2][0] + qz * G[2][1] - 2 * qy * G[2][2]);
        vq[3] = 2 * (-2 * qz * G[0][0] - w * G[0][1] + qx * G[0][2] + w * G[1][0] -
                     2 * qz * G[1][1] + qy * G[1][2] + qx * G[2][0] + qy * G[2][1]);
        const float* q = qp + 4 * n;
        const double qnorm = std::sqrt(double(q[0]) * q[0] + double(q[1]) * q[1] +
                                       double(q[2]) * q[2] + double(q[3]) * q[3]);
        const double dot = vq[0] * w + vq[1] * qx + vq[2] * qy + vq[3] * qz;
        for (int k = 0; k < 4; ++k) acc_q[k] += (vq[k] - e.qn[k] * dot) / qnorm;
        for (int k = 0; k < 3; ++k)
          acc_m[k] += cam.R[0][k] * v_pc[0] + cam.R[1][k] * v_pc[1] + cam.R[2][k] * v_pc[2];      }
      for (int k = 0; k < 3; ++k) v_means[3 * n + k] = float(acc_m[k]);
      for (int k = 0; k < 4; ++k) v_quats[4 * n + k] = float(acc_q[k]);
      for (int k = 0; k < 3; ++k) v_scales[3 * n + k] = float(acc_s[k]);
    }
  });
}

namespace {

// Tile rectangle [tx0, tx1) x [ty0, ty1) of a pixel box, clipped to the image's tiles.
struct Rect {
  int64_t x0, x1, y0, y1;
};

inline Rect tile_rect(const IsectArgs& a, int64_t row) {
  const float cx = a.means2d[2 * row] / kTile, cy = a.means2d[2 * row + 1] / kTile;
  const float rx = float(a.radii[2 * row]) / kTile, ry = float(a.radii[2 * row + 1]) / kTile;
  Rect r;
  r.x0 = std::min<int64_t>(std::max<int64_t>(0, int64_t(std::floor(cx - rx))), a.tiles_x);
  r.x1 = std::min<int64_t>(std::max<int64_t>(0, int64_t(std::ceil(cx + rx))), a.tiles_x);
  r.y0 = std::min<int64_t>(std::max<int64_t>(0, int64_t(std::floor(cy - ry))), a.tiles_y);
  r.y1 = std::min<int64_t>(std::max<int64_t>(0, int64_t(std::ceil(cy + ry))), a.tiles_y);
  return r;
}

// Order-preserving unsigned key of a float (negative values below positive ones).
inline uint32_t sort_key(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Entries sorted by depth, ties in entry order (an LSD radix sort is stable).
std::vector<int64_t> depth_order(const IsectArgs& a) {
  const int64_t M = a.n_entries;
  std::vector<uint32_t> key(M), key2(M);
  std::vector<int64_t> idx(M), idx2(M);
  for (int64_t m = 0; m < M; ++m) {
    key[m] = sort_key(a.depths[a.rows ? a.rows[m] : m]);
    idx[m] = m;
  }
  for (int shift = 0; shift < 32; shift += 16) {
    std::vector<int64_t> count(65537, 0);
    for (int64_t m = 0; m < M; ++m) ++count[((key[m] >> shift) & 0xFFFF) + 1];
    for (int b = 0; b < 65536; ++b) count[b + 1] += count[b];
    for (int64_t m = 0; m < M; ++m) {
      const int64_t dst = count[(key[m] >> shift) & 0xFFFF]++;
      key2[dst] = key[m];
      idx2[dst] = idx[m];
    }
    key.swap(key2);
    idx.swap(idx2);
  }
  return idx;
}

}  // namespace

int64_t intersect_count(const IsectArgs& a, int64_t* offsets, int64_t* tiles_per_entry) {
  const int64_t per_cam = a.tiles_x * a.tiles_y, n_tiles = a.n_cams * per_cam;
  std::fill(offsets, offsets + n_tiles + 1, 0);
  for (int64_t m = 0; m < a.n_entries; ++m) {
    const Rect r = tile_rect(a, a.rows ? a.rows[m] : m);
    tiles_per_entry[m] = (r.x1 - r.x0) * (r.y1 - r.y0);
    int64_t* base = offsets + a.cams[m] * per_cam + 1;
    for (int64_t ty = r.y0; ty < r.y1; ++ty)
      for (int64_t tx = r.x0; tx < r.x1; ++tx) ++base[ty * a.tiles_x + tx];
  }
  for (int64_t t = 0; t < n_tiles; ++t) offsets[t + 1] += offsets[t];
  return offsets[n_tiles];
}

void intersect_fill(const IsectArgs& a, const int64_t* offsets, int64_t* flatten_ids) {
  const int64_t per_cam = a.tiles_x * a.tiles_y, n_tiles = a.n_cams * per_cam;
  std::vector<int64_t> cursor(offsets, offsets + n_tiles);
  for (const int64_t m : depth_order(a)) {
    const int64_t row = a.rows ? a.rows[m] : m;
    const Rect r = tile_rect(a, row);
    int64_t* base = cursor.data() + a.cams[m] * per_cam;
    for (int64_t ty = r.y0; ty < r.y1; ++ty)
      for (int64_t tx = r.x0; tx < r.x1; ++tx) flatten_ids[base[ty * a.tiles_x + tx]++] = row;
  }
}

}  // namespace fit3d
